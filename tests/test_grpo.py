"""Online RL (`ftcli train --objective grpo`) through the real CLI on the built-in tiny model.

The reward the learning test uses is the share of the letter "e" in a completion: a random tiny model's sampled
completions score about 0.1, and GRPO can raise it within a couple of dozen steps of full fine-tuning. Whether it
did is measured here, independently of ftcli and TRL: the base and the tuned model are loaded with plain
transformers, completions of held-out prompts are sampled with `model.generate` from the same seeds, and the same
reward function (imported from the same file) scores them.

    $ python -m pytest -q tests/test_grpo.py
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import read_manifest

TINY = ["--model", "builtin:tiny-llama"]
NEW_TOKENS = 16
SAMPLES = 8

REWARDS = '''
def share_e(prompts, completions, **kwargs):
    return [c.count("e") / max(1, len(c)) for c in completions]


def boom(prompts, completions, **kwargs):
    return [1 / 0 for c in completions]


def short(prompts, completions, **kwargs):
    return [1.0]


def not_finite(prompts, completions, answer, **kwargs):
    return [float("nan") if a else 0.0 for a in answer]
'''


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("grpo")
    (folder / "rewards.py").write_text(REWARDS, encoding="utf-8")
    (folder / "syntax.py").write_text("def score(prompts, completions:\n    return []\n", encoding="utf-8")
    return {
        "folder": folder, "rewards": folder / "rewards.py", "syntax": folder / "syntax.py",
        "train": write_jsonl(folder / "train.jsonl", [{"prompt": f"Write some letters, round {i}:",
                                                        "answer": "eeee"} for i in range(24)]),
        "held": write_jsonl(folder / "held.jsonl", [{"prompt": f"Write some letters, round {100 + i}:", "answer": "eeee"}
                                                    for i in range(6)]),
        "small": write_jsonl(folder / "small.jsonl", [{"question": "Say yes.", "solution": "yes"},
                                                      {"question": "Say no.", "solution": "no"}]),
    }


@pytest.fixture(scope="module")
def runner():
    from typer.testing import CliRunner

    from ftcli.cli import app

    def invoke(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def reward_module(path: Path):
    spec = importlib.util.spec_from_file_location("grpo_test_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- bad reward functions: one line each, before the model loads -----------------------------------------------


@pytest.mark.parametrize("function, expected", [
    ("boom", "rewards.py:boom raised ZeroDivisionError on the probe"),
    ("short", "rewards.py:short returned 1 values for"),
    ("not_finite", "rewards.py:not_finite returned nan for completion 0 (not finite)"),
    ("missing", "rewards.py has no function missing (functions found: boom, not_finite, share_e, short)"),
])
def test_a_bad_reward_function_is_one_line_before_the_model_loads(runner, files, tmp_path, function, expected):
    out = tmp_path / "run"
    result = runner("train", "--objective", "grpo", *TINY, "--dataset", files["train"], "--reward",
                    f"{files['rewards']}:{function}", "--output-dir", out)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: --reward ") and expected in lines[0], result.output
    assert "fix" in lines[0] or "check the name" in lines[0]
    assert not out.exists()


def test_a_reward_file_with_a_syntax_error_or_missing_is_one_line(runner, files, tmp_path):
    out = tmp_path / "run"
    broken = runner("train", "--objective", "grpo", *TINY, "--dataset", files["train"], "--reward",
                    f"{files['syntax']}:score", "--output-dir", out)
    assert broken.exit_code == 2 and broken.output.count("\n") == 1, broken.output
    assert "syntax.py:score failed: syntax error in syntax.py line 1" in broken.output
    missing = runner("train", "--objective", "grpo", *TINY, "--dataset", files["train"], "--reward",
                     f"{files['folder'] / 'nope.py'}:score", "--output-dir", out)
    assert missing.exit_code == 2 and "nope.py does not exist" in missing.output, missing.output
    none = runner("train", "--objective", "grpo", *TINY, "--dataset", files["train"], "--output-dir", out)
    assert none.exit_code == 2 and "needs at least one --reward" in none.output
    assert not out.exists()


def test_refusals_name_the_fix(runner, files, tmp_path):
    base = ["train", "--objective", "grpo", *TINY, "--dataset", files["train"], "--reward", "builtin:exact-match",
            "--output-dir", tmp_path / "run"]
    uneven = runner(*base, "--batch-size", "6")
    assert uneven.exit_code == 2 and "make --batch-size a multiple of 8" in uneven.output, uneven.output
    fsdp = runner(*base, "--method", "fsdp")
    assert fsdp.exit_code == 2 and "use --method lora or full with --nproc-per-node" in fsdp.output
    vllm = runner(*base, "--vllm", "colocate")
    assert vllm.exit_code == 2 and "--vllm colocate" in vllm.output and "drop --vllm" in vllm.output
    weights = runner(*base, "--reward-weights", "1,2")
    assert weights.exit_code == 2 and "--reward-weights has 2 values for 1" in weights.output
    assert not (tmp_path / "run").exists()


def test_builtin_rewards_score_as_documented():
    from ftcli.rewards import load_rewards

    exact, normal, maths, fmt, length = load_rewards(["builtin:exact-match", "builtin:normalized-match=solution",
                                                      "builtin:math-match", "builtin:format=<a>.*</a>",
                                                      "builtin:length-penalty=4"])
    assert exact.fn(prompts=["p"] * 2, completions=[" 4 ", "4."], answer=["4", "4"]) == [1.0, 0.0]
    assert normal.fn(prompts=["p"] * 2, completions=["1,000.", "Yes"], solution=["1000", "no"]) == [1.0, 0.0]
    assert maths.fn(prompts=["p"] * 3, completions=["so \\boxed{1/2}", "it is 0.5", "3"],
                    answer=["0.5", "1/2", "4"]) == [1.0, 1.0, 0.0]
    assert fmt.fn(prompts=["p"] * 2, completions=["<a>x\ny</a>", "<a>x</a> more"]) == [1.0, 0.0]
    assert length.fn(prompts=["p"] * 3, completions=["abc", "abcdef", "a" * 20]) == [0.0, -0.5, -1.0]


# ---- training -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned(runner, files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo-runs") / "full"
    ok(runner("train", "--objective", "grpo", "--method", "full", *TINY, "--dataset", files["train"],
              "--reward", f"{files['rewards']}:share_e", "--learning-rate", "2e-2", "--seq-length", "48",
              "--max-completion-length", NEW_TOKENS, "--completions-every", "5", "--output-dir", out))
    return out


def sampled_reward(model_dir: Path, tokenizer, prompts: list[str], reward) -> float:
    """Mean reward of SAMPLES completions per prompt, sampled with plain transformers from fixed seeds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    scores = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS,
                                 num_return_sequences=SAMPLES, pad_token_id=tokenizer.pad_token_id)
        completions = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        scores += reward(prompts=[prompt] * SAMPLES, completions=completions)
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_grpo_raises_the_held_out_reward_above_the_base(learned, files, tiny_model_dir):
    from transformers import AutoTokenizer

    manifest = read_manifest(learned)
    assert manifest["status"] == "finished" and manifest["config"]["objective"] == "grpo"
    assert manifest["metrics"]["steps"] == 24  # one epoch: 24 prompts, one group of 8 completions per step
    records = [json.loads(line) for line in (learned / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r and "frac_reward_zero_std" in r and "completions/clipped_ratio" in r for r in records)
    held = [json.loads(line)["prompt"] for line in files["held"].read_text().splitlines()]
    reward = reward_module(files["rewards"]).share_e
    tokenizer = AutoTokenizer.from_pretrained(str(learned))
    base = sampled_reward(tiny_model_dir, tokenizer, held, reward)
    tuned = sampled_reward(learned, tokenizer, held, reward)
    assert base < 0.2 and tuned > base + 0.1, (base, tuned)
    # A sample of the completions, with their rewards, every --completions-every steps (and at step 1).
    sampled = [json.loads(line) for line in (learned / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in sampled}) == [1, 5, 10, 15, 20]
    assert all(set(r["rewards"]) == {"rewards.py:share_e"} and r["completion"] is not None for r in sampled)


@pytest.mark.slow
def test_eval_reports_the_tuned_and_base_mean_reward_and_inspect_shows_completions(runner, learned, files):
    result = runner("eval", learned, "--reward", f"{files['rewards']}:share_e", "--dataset", files["held"],
                    "--samples", "4", "--json")
    ok(result)
    report = json.loads(result.stdout)
    assert report["prompts"] == 6 and report["tuned"]["completions"] == 24 and report["max_new_tokens"] == NEW_TOKENS
    assert report["tuned"]["mean"] > report["base"]["mean"] + 0.1, report
    inspect = runner("inspect", learned)
    ok(inspect)
    assert "latest completions" in inspect.output and "rewards.py:share_e" in inspect.output
    assert "mean reward (metrics.jsonl, 24 points)" in inspect.output  # GRPO's curve (its loss says little)


FLAKY = """
def score(prompts, completions, trainer_state=None, **kwargs):
    if trainer_state is not None and trainer_state.global_step >= 2:
        raise RuntimeError("the grader is down")
    return [float(len(c) % 3) + c.count("e") for c in completions]
"""
FIXED = """
def score(prompts, completions, **kwargs):
    return [float(len(c) % 3) + c.count("e") for c in completions]
"""


@pytest.mark.slow
def test_a_reward_that_fails_mid_run_stops_with_a_checkpoint_and_resumes_exactly(runner, files, tmp_path):
    """QLoRA: the fault at step 3 leaves checkpoint-2 (the state before that step, its random state included); the
    function fixed, --resume trains to the same adapter as a run that never failed, as does a resume from that run's
    own checkpoint-2; the result exports."""
    from safetensors.torch import load_file

    reward, same = tmp_path / "grader.py", tmp_path / "same.py"
    reward.write_text(FLAKY, encoding="utf-8")
    same.write_text(FIXED, encoding="utf-8")
    args = ["train", "--objective", "grpo", "--method", "qlora", *TINY, "--dataset", files["train"], "--max-steps",
            "3", "--seq-length", "32", "--max-completion-length", "4", "--learning-rate", "1e-3"]
    out = tmp_path / "run"
    result = runner(*args, "--reward", f"{reward}:score", "--output-dir", out)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: training stopped: --reward grader.py:score raised RuntimeError at step 3: the "
                           "grader is down; checkpoint saved to"), last
    assert "--resume" in last
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and manifest["failed_at_step"] == 3
    marker = json.loads((out / "checkpoint-2" / "ftcli_checkpoint.json").read_text())
    assert marker["step"] == 2 and (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    reward.write_text(FIXED, encoding="utf-8")
    ok(runner(*args, "--reward", f"{reward}:score", "--output-dir", out, "--resume"))
    straight_dir = tmp_path / "never-failed"
    ok(runner(*args, "--reward", f"{same}:score", "--output-dir", straight_dir, "--save-steps", "2"))
    straight = load_file(str(straight_dir / "adapter_model.safetensors"))
    # An ordinary checkpoint resumes exactly too: the never-failed run's checkpoint-2, as a killed run leaves it.
    killed = tmp_path / "killed"
    shutil.copytree(straight_dir / "checkpoint-2", killed / "checkpoint-2")
    (killed / "ftcli_run.json").write_text(json.dumps({**read_manifest(straight_dir), "status": "running"}))
    ok(runner(*args, "--reward", f"{same}:score", "--output-dir", killed, "--save-steps", "2", "--resume"))
    for folder in (out, killed):
        assert read_manifest(folder)["resumed_from"]["step"] == 2  # resumed, not started again
        resumed = load_file(str(folder / "adapter_model.safetensors"))
        assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    ok(runner("export", out, "--output", tmp_path / "exported"))
    assert (tmp_path / "exported" / "model.safetensors").is_file()


@pytest.mark.slow
def test_lora_on_two_processes_by_epochs_with_builtin_rewards_then_export(runner, files, tmp_path):
    from test_fsdp import child_env, free_port, ftcli_cmd
    import subprocess

    out = tmp_path / "lora"
    cmd = ftcli_cmd("train", "--objective", "grpo", "--method", "lora", *TINY, "--dataset", files["small"],
                    "--columns", "prompt=question,answer=solution", "--reward", "builtin:normalized-match",
                    "--reward", "builtin:length-penalty=40", "--reward-weights", "1,0.5", "--max-completion-length",
                    "24", "--output-dir", out, "--nproc-per-node", "2", "--master-port", free_port())
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["metrics"]["steps"] == 1  # 2 prompts x 8 over 2 processes
    assert manifest["config"]["batch_size"] == 8 and manifest["config"]["learning_rate"] == 1e-5  # GRPO's defaults
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "rewards/builtin:normalized-match/mean" in record and "rewards/builtin:length-penalty/mean" in record
    exported = tmp_path / "exported"
    ok(runner("export", out, "--output", exported))
    assert (exported / "model.safetensors").is_file()
