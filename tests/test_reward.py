"""Reward models (`ftcli train --objective reward`) through the real CLI on the built-in tiny model.

The sample is test_dpo.py's design: each pair's prompt is an Alpaca row's instruction, its chosen answer that row's
real response, and its rejected answer the response of one of a small pool of rows that never appear as prompts.
The held-out pairs have prompts and chosen answers the training never saw, with rejected answers from the same
pool, so what the reward model learns (the pool's answers score low) shows on them. Scores are computed here with
plain `AutoModelForSequenceClassification` loaded from the export, on token ids built here (BOS + prompt, the answer,
one EOS), independently of TRL, of ftcli's prepared data and of its scorer.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import losses, read_manifest

TINY = ["--model", "builtin:tiny-llama"]
POOL, TRAIN, HELD = 3, 40, 16
FIT = ["--seq-length", 96, "--batch-size", 8]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, Path]:
    from ftcli.builtin.alpaca_sample import alpaca_sample_rows

    rows = [r for r in alpaca_sample_rows() if len(r["output"]) < 40 and not r["input"]]
    pool, train, held = rows[:POOL], rows[POOL:POOL + TRAIN], rows[POOL + TRAIN:POOL + TRAIN + HELD]
    pair = (lambda i, r: {"prompt": r["instruction"] + "\n", "chosen": r["output"], "rejected": pool[i % POOL]["output"]})
    folder = tmp_path_factory.mktemp("reward-data")
    return {
        "train": write_jsonl(folder / "train.jsonl", [pair(i, r) for i, r in enumerate(train)]),
        "held": write_jsonl(folder / "held.jsonl", [pair(i, r) for i, r in enumerate(held)]),
        "sft": write_jsonl(folder / "sft.jsonl", [{"prompt": r["instruction"] + "\n", "completion": r["output"]}
                                                   for r in train]),
    }


@pytest.fixture(scope="module")
def runner():
    from typer.testing import CliRunner

    from ftcli.cli import app

    def invoke(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def ok(result) -> None:
    assert result.exit_code == 0, result.stdout + (result.stderr or "")


def eval_json(runner, target: Path, data: Path) -> dict:
    result = runner("eval", target, "--dataset", data, "--json")
    ok(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sample, runner) -> tuple[Path, Path]:
    """A LoRA reward model trained by epochs as the guide's example does, evaluated on the held-out pairs; exported."""
    runs = tmp_path_factory.mktemp("runs")
    out, exported = runs / "reward", runs / "reward-export"
    ok(runner("train", "--objective", "reward", "--method", "lora", *TINY, "--dataset", sample["train"],
              "--eval-dataset", sample["held"], "--num-epochs", 3, "--learning-rate", "1e-2", *FIT,
              "--output-dir", out))
    ok(runner("export", out, "--output", exported))
    return out, exported


# ---- independent scores ---------------------------------------------------------------------------------------


def plain_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """A string pair's sequence as the SFT prompt/completion rules render it: BOS + prompt + answer + one EOS."""
    tok = (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.bos_token_id] + tok(prompt) + tok(answer) + [tokenizer.eos_token_id]


def classifier(folder: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return (AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(folder)))


def score(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def pairwise(folder: Path, data: Path) -> tuple[float, float]:
    """(accuracy, mean margin) of the exported classifier on the pairs in `data`, one sequence at a time."""
    model, tokenizer = classifier(folder)
    margins = []
    for row in map(json.loads, data.read_text().splitlines()):
        margins.append(score(model, plain_ids(tokenizer, row["prompt"], row["chosen"]))
                       - score(model, plain_ids(tokenizer, row["prompt"], row["rejected"])))
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


# ---- training, eval, export -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_held_out_accuracy_beats_chance_and_matches_ftcli_eval(lora_run, sample, runner) -> None:
    out, exported = lora_run
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["config"]["objective"] == "reward"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in (adapter["modules_to_save"] or [])
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    accuracy, margin = pairwise(exported, sample["held"])
    assert accuracy >= 0.75 and margin > 0, (accuracy, margin)
    for target in (out, exported):  # the run (base + adapter) and its export print the same numbers
        report = eval_json(runner, target, sample["held"])
        assert report["pairs"] == HELD and report["accuracy"] == pytest.approx(accuracy)
        assert report["margin"] == pytest.approx(margin, rel=1e-4, abs=1e-4)
    final = manifest["eval"]["final_metrics"]  # the run's last eval step (TRL's RewardTrainer) agrees too
    assert final["eval_accuracy"] == pytest.approx(accuracy) and final["eval_margin"] == pytest.approx(margin, rel=1e-3)
    table = runner("eval", out, "--dataset", sample["held"])
    ok(table)
    assert f"pairwise accuracy {accuracy:.2%}" in " ".join(table.stdout.split())
    assert f"data: --dataset {sample['held']}" in " ".join(table.stdout.split())  # the flag the user typed


@pytest.mark.slow
def test_scorer_matches_plain_classifier_scores(lora_run, sample) -> None:
    from ftcli.evaluation.reward_model import load_reward_scorer

    out, exported = lora_run
    rows = [json.loads(line) for line in sample["held"].read_text().splitlines()][:6]
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    model, tokenizer = classifier(exported)
    want = [score(model, plain_ids(tokenizer, p, c)) for p, c in zip(prompts * 2, completions)]
    for ref in (out, exported):
        got = load_reward_scorer(str(ref), device="cpu")(prompts * 2, completions)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_qlora_reward_model_trains_and_exports(tmp_path: Path, sample, runner) -> None:
    out, exported = tmp_path / "run", tmp_path / "export"
    ok(runner("train", "--objective", "reward", "--method", "qlora", *TINY, "--dataset", sample["train"],
              "--max-steps", 4, "--learning-rate", "1e-2", *FIT, "--output-dir", out))
    result = runner("export", out, "--output", exported)  # merged into the dequantised base, verified
    ok(result)
    assert "verify: largest logit difference" in " ".join(result.stdout.split())
    accuracy, margin = pairwise(exported, sample["held"])
    report = eval_json(runner, out, sample["held"])  # the 4-bit base + adapter, as trained
    assert report["base_4bit"] and report["accuracy"] == pytest.approx(accuracy)
    assert report["margin"] == pytest.approx(margin, rel=0.05, abs=0.05)


@pytest.mark.slow
def test_sft_then_full_reward_model_chain(tmp_path: Path, sample, runner) -> None:
    """`--model SFT_RUN`: the score head on the SFT'd model; a full run re-exports with its probe verified."""
    sft, out, exported = tmp_path / "sft", tmp_path / "reward", tmp_path / "export"
    ok(runner("train", "--method", "lora", *TINY, "--dataset", sample["sft"], "--max-steps", 2, *FIT,
              "--output-dir", sft))
    ok(runner("train", "--objective", "reward", "--method", "full", "--model", sft, "--dataset", sample["train"],
              "--max-steps", 3, "--learning-rate", "1e-3", *FIT, "--output-dir", out))
    chain = read_manifest(out)["resolved"]["chain"]
    assert [s.get("model") or s.get("run") for s in chain] == ["builtin:tiny-llama", str(sft), str(out)]
    assert [s.get("objective") for s in chain[1:]] == ["sft", "reward"]
    result = runner("export", out, "--output", exported)
    ok(result)
    assert "verify: largest logit difference vs the run's probe logits" in " ".join(result.stdout.split())
    accuracy, margin = pairwise(exported, sample["held"])
    report = eval_json(runner, out, sample["held"])
    assert report["accuracy"] == pytest.approx(accuracy) and report["margin"] == pytest.approx(margin, abs=1e-4)


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(tmp_path: Path, sample, runner) -> None:
    args = ["train", "--objective", "reward", "--method", "lora", *TINY, "--dataset", str(sample["train"]),
            "--max-steps", "6", "--batch-size", "4", "--seq-length", "96", "--save-steps", "2"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(runner(*args, "--output-dir", reference))
    # The delay follows each step: a signal after checkpoint-2 stops after step 3, 4 or (under load) 5, not the last
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FTCLI_DEBUG_STEP_DELAY": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", *args, "--output-dir", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        # checkpoint-2 saved (its marker follows on a thread of its own): the signal lands well before the last step
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    command = shlex.split(stderr.split("resume with: ", 1)[1].strip())
    ok(runner(*command[1:]))
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and 2 <= manifest["resumed_from"]["step"] < 6
    assert losses(out) == losses(reference)
    from safetensors.torch import load_file

    got, want = (load_file(str(run / "adapter_model.safetensors")) for run in (out, reference))
    assert got.keys() == want.keys() and any("score" in k for k in want) and all(got[k].equal(want[k]) for k in want)


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_data_of_the_wrong_shape_is_refused_before_the_model_loads(tmp_path: Path, runner) -> None:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "input": "", "output": "Hello"}])
    result = runner("train", "--objective", "reward", "--method", "lora", *TINY, "--dataset", data,
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--objective reward" in lines[0] and "'chosen'" in lines[0] and str(data) in lines[0]
    assert "model:" not in result.stdout  # refused before the model line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "fsdp"], "--method fsdp is not available with --objective reward"),
    (["--packing"], "--packing applies to single examples"),
    (["--compile"], "--compile is not available with --objective reward"),
    (["--dpo-beta", "0.2"], "--dpo-beta applies to --objective dpo"),
])
def test_options_that_make_no_sense_are_refused(tmp_path: Path, runner, args: list[str], needle: str) -> None:
    result = runner("train", "--objective", "reward", *TINY, "--dataset", "builtin:alpaca-sample", *args,
                    "--output-dir", tmp_path / "r")
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_chat_and_gguf_are_refused_in_one_line(lora_run, tmp_path: Path, runner) -> None:
    out, exported = lora_run
    for args in (["generate", out, "--prompt", "Hi"], ["chat", exported],
                 ["export", out, "--output", tmp_path / "g", "--format", "gguf"]):
        result = runner(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "reward model" in lines[0], result.stderr
    assert "ftcli eval" in runner("generate", out, "--prompt", "Hi").stderr
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_inspect_says_reward_model(lora_run, runner) -> None:
    out, exported = lora_run
    assert "reward model" in " ".join(runner("inspect", out).stdout.split())
    result = runner("inspect", exported, "--json")
    ok(result)
    report = json.loads(result.stdout)
    assert report["model"]["reward_model"] and report["memory"]["objective"] == "reward"


def test_memory_estimate_has_no_lm_head_and_two_rows(runner) -> None:
    from ftcli.inspection.estimate import LOGIT_TILE_TOKENS, LOGIT_TILE_VOCAB

    reports = {}
    for extra in ([], ["--objective", "reward"], ["--objective", "dpo"]):
        result = runner("inspect", "builtin:tiny-llama", "--json", "--seq-length", 64, *extra)
        ok(result)
        reports[" ".join(extra)] = json.loads(result.stdout)
    sft = {m["method"]: m for m in reports[""]["memory"]["methods"]}
    reward = {m["method"]: m for m in reports["--objective reward"]["memory"]["methods"]}
    info = reports[""]["model"]
    lm_head = 0 if info["tied_embeddings"] else info["vocab_size"] * info["hidden_size"]
    # The score head replaces the LM head, and trains in full beside the adapter.
    assert reward["full"]["trainable_parameters"] == info["parameters"] - lm_head + info["hidden_size"]
    assert reward["lora"]["trainable_parameters"] == sft["lora"]["trainable_parameters"] + info["hidden_size"]
    # DPO's rows (chosen + rejected) and activations, less the LM head's logits tiles.
    dpo = {m["method"]: m for m in reports["--objective dpo"]["memory"]["methods"]}
    tokens = dpo["lora"]["batch_size"] * 2 * 64
    logits = 2 * min(tokens, LOGIT_TILE_TOKENS) * min(info["vocab_size"], LOGIT_TILE_VOCAB) * 4
    assert reward["lora"]["activations_bytes"] == dpo["lora"]["activations_bytes"] - logits
    assert any("no LM-head logits" in n for n in reward["lora"]["notes"])
    assert set(reward) == {"full", "lora", "qlora"} and "fsdp" in sft  # fsdp is refused for a reward model


# ---- a reward model as GRPO's reward (--reward-model) ----------------------------------------------------------


def policy_scores(policy: Path, rm: Path, prompts: list[str], samples: int = 8, new_tokens: int = 16) -> list[float]:
    """The reward model's scores (plain AutoModelForSequenceClassification) of completions sampled with plain
    transformers from `policy`, from fixed seeds: each on the prompt's tokens, the completion's, one EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).eval()
    scorer, tokenizer = classifier(rm)
    scores = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        torch.manual_seed(2000 + i)
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, ids.shape[1]:].tolist():
            completion = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            scores.append(score(scorer, ids[0].tolist() + completion + [tokenizer.eos_token_id]))
    return scores


@pytest.mark.slow
def test_grpo_with_the_reward_model_raises_its_score(lora_run, sample, runner, tmp_path: Path,
                                                     tiny_model_dir: Path) -> None:
    """`--reward-model EXPORT` drives GRPO (by epochs); the held-out score of sampled completions rises, measured with
    plain transformers sampling and the plain classifier. The reward's own scoring of token ids equals the plain
    classifier's; a model that is not a reward model is refused in one line before anything loads."""
    from ftcli.cli import app  # noqa: F401  (registers the model: reward kind)
    from ftcli.rewards import load_rewards

    out, exported = lora_run
    rows = [json.loads(line) for line in sample["train"].read_text().splitlines()]
    held = [json.loads(line)["prompt"] for line in sample["held"].read_text().splitlines()][:6]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows[:16]])
    policy = tmp_path / "grpo"
    ok(runner("train", "--objective", "grpo", "--method", "full", *TINY, "--dataset", prompts, "--reward-model",
              exported, "--learning-rate", "2e-2", "--seq-length", 48, "--max-completion-length", 16,
              "--output-dir", policy))
    records = [json.loads(line) for line in (policy / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 16 and all(f"rewards/model:{exported.name}/mean" in r for r in records)
    base = policy_scores(tiny_model_dir, exported, held)
    tuned = policy_scores(policy, exported, held)
    assert sum(tuned) / len(tuned) > sum(base) / len(base) + 0.1, (sum(base) / len(base), sum(tuned) / len(tuned))
    # `ftcli eval --reward model:RM` (texts rendered as the reward model trained) sees the same direction.
    held_file = write_jsonl(tmp_path / "held-prompts.jsonl", [{"prompt": p} for p in held])
    result = runner("eval", policy, "--reward", f"model:{exported}", "--dataset", held_file, "--samples", 4, "--json")
    ok(result)
    report = json.loads(result.stdout)
    assert report["prompts"] == 6 and report["tuned"]["mean"] > report["base"]["mean"], report

    (reward,) = load_rewards([f"model:{out}"])  # the run (base + adapter) scores token ids as the export does
    model, tokenizer = classifier(exported)
    pairs = [(tokenizer(r["prompt"])["input_ids"], tokenizer(r["chosen"], add_special_tokens=False)["input_ids"])
             for r in rows[:4]]
    got = reward.fn(prompts=[r["prompt"] for r in rows[:4]], completions=[r["chosen"] for r in rows[:4]],
                    prompt_ids=[p for p, _ in pairs], completion_ids=[c for _, c in pairs])
    want = [score(model, p + c + [tokenizer.eos_token_id]) for p, c in pairs]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)

    refused = runner("train", "--objective", "grpo", *TINY, "--dataset", prompts, "--reward-model", tiny_model_dir,
                     "--output-dir", tmp_path / "no")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert f"--reward-model {tiny_model_dir} is not a reward model" in refused.output
    assert not (tmp_path / "no").exists()
