"""The path users take: runs that train by epochs (the default, no `--max-steps`), interrupted with Ctrl-C and
resumed with the command ftcli printed, and a run that continues another (`--model RUN`).

    $ python -m pytest -q tests/test_default_path.py

Every resume test here passes no step limit: the goal is `--num-epochs` (its default of 1 where the README's
command leaves it out). Interrupted runs are real processes (`python -m ftcli`) sent SIGINT, as a terminal's
Ctrl-C does; `FTCLI_DEBUG_STEP_DELAY` slows the steps so the signal lands mid-epoch. Losses and weights are
compared with the uninterrupted run bit for bit (CPU float32 repeats the same operations).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_manifest
from ftcli.training.checkpoints import MARKER, read_marker

TINY = ["--model", "builtin:tiny-llama"]
# The README's checkpoint example, with the step count of the checkpoint interval only (no --max-steps).
README_LORA = ["train", "--method", "lora", *TINY, "--dataset", "builtin:alpaca-sample", "--save-steps", "10"]


def env(delay: float | None = None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    out.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    if delay is not None:
        out["FTCLI_DEBUG_STEP_DELAY"] = str(delay)
    return out


def ftcli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcli", *[str(a) for a in args]], env=env(), capture_output=True,
                          text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def interrupt(args: list[object], wait_for: Path, sig: int = signal.SIGINT, delay: float = 0.05,
              timeout: float = 180) -> tuple[str, str]:
    """Start `ftcli ARGS`, send `sig` once `wait_for` exists, and return (stdout, stderr) of the exit 130."""
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", *[str(a) for a in args]], env=env(delay),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not wait_for.exists():
            assert proc.poll() is None, f"the run ended before {wait_for} appeared: {proc.communicate()}"
            assert time.time() < deadline, f"{wait_for} never appeared"
            time.sleep(0.02)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout[-3000:] + stderr[-3000:]
    return stdout, stderr


def printed_resume(stderr: str) -> list[str]:
    """The command the interrupted run printed, as the user would paste it (`ftcli ...`), as arguments."""
    line = " ".join(stderr.split())
    assert "resume with: " in line, stderr
    args = shlex.split(line.rsplit("resume with: ", 1)[1])  # the last line: the launcher's, for several ranks
    assert args[0] == "ftcli" and args[-1] == "--resume", args
    assert "--max-steps" not in args  # the user never typed one
    return args[1:]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (run / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(run / name))


def losses(run: Path) -> list[float]:
    """The training losses of metrics.jsonl (evaluation records have none)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_same_run(run: Path, reference: Path) -> None:
    assert losses(run) == losses(reference) and losses(run)
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].equal(want[key]), key


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Twelve Alpaca rows of different lengths, their chat form, and twelve string preference pairs."""
    words = "apple river stone cloud green seven table music amber north salt violet".split()
    rows = [{"instruction": f"Repeat {w} " + "please " * (i % 4), "input": "",
             "output": " ".join([w] * (1 + (i * 5) % 9))} for i, w in enumerate(words)]
    folder = tmp_path_factory.mktemp("default-path-data")
    chat = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": "I will not."} for r in rows]
    return {"alpaca": write_jsonl(folder / "varied.jsonl", rows), "chat": write_jsonl(folder / "chat.jsonl", chat),
            "pairs": write_jsonl(folder / "pairs.jsonl", pairs)}


@pytest.fixture(scope="module")
def readme_reference(tmp_path_factory) -> Path:
    """The README's LoRA checkpoint example, uninterrupted: one epoch of the sample data (100 steps)."""
    out = tmp_path_factory.mktemp("reference") / "lora"
    ok(ftcli(*README_LORA, "--output-dir", out))
    return out


# ---- resume by epochs -------------------------------------------------------------------------------------------


def test_ctrl_c_mid_epoch_then_the_printed_command_equals_the_uninterrupted_run(readme_reference: Path,
                                                                               tmp_path: Path) -> None:
    out = tmp_path / "R"
    _, stderr = interrupt([*README_LORA, "--output-dir", out], out / "checkpoint-20" / MARKER)
    manifest = read_manifest(out)
    step = manifest["interrupted_at_step"]
    assert manifest["status"] == "interrupted" and 20 <= step < 100, manifest  # mid-epoch: 100 steps in epoch 1
    resumed = ok(subprocess.run([sys.executable, "-m", "ftcli", *printed_resume(stderr)], env=env(),
                                capture_output=True, text=True, timeout=300))
    assert f"resuming from {out}/checkpoint-{step} (step {step})" in " ".join(resumed.stdout.split())
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resumed_from"]["step"] == step
    assert manifest["metrics"]["steps"] == 100 and len(losses(out)) == 100
    assert_same_run(out, readme_reference)


def test_a_finished_epoch_run_says_it_is_complete_and_changes_nothing(readme_reference: Path,
                                                                       tmp_path: Path) -> None:
    run = tmp_path / "done"
    shutil.copytree(readme_reference, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = ok(ftcli(*README_LORA, "--output-dir", run, "--resume"))
    said = " ".join(result.stdout.split())
    assert "is complete" in said and "--num-epochs 1 (100 steps)" in said and "--max-steps -1" not in said, said
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # Into a new folder (--resume RUN): nothing to train, nothing created, no step past the goal.
    elsewhere = tmp_path / "elsewhere"
    result = ok(ftcli(*README_LORA, "--resume", run, "--output-dir", elsewhere))
    assert "already reached --num-epochs 1 (step 100): nothing to train" in " ".join(result.stdout.split())
    assert not elsewhere.exists()

    # Without --resume the folder is refused as a finished run: export it or --overwrite, not "--resume".
    refused = ftcli(*README_LORA, "--output-dir", run)
    assert refused.returncode == 5, refused.stdout + refused.stderr
    line = " ".join(refused.stderr.split())
    assert "holds a finished run" in line and "ftcli export" in line and "--overwrite" in line
    assert "--resume" not in line and len(refused.stderr.strip().splitlines()) == 1


def test_a_finished_run_without_checkpoints_resumes_to_complete(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plain"
    args = ["train", "--method", "lora", *TINY, "--dataset", data["alpaca"], "--output-dir", out]
    ok(ftcli(*args))
    assert not list(out.glob("checkpoint-*"))
    result = ok(ftcli(*args, "--resume"))
    assert "is complete: it trained --num-epochs 1" in " ".join(result.stdout.split())
    # A higher goal needs a checkpoint to continue from: one line saying there is none.
    more = ftcli(*args, "--resume", "--num-epochs", "2")
    assert more.returncode == 5 and "no complete checkpoint" in more.stderr, more.stdout + more.stderr


def test_ctrl_c_in_a_later_epoch_resumes_exactly(data: dict[str, Path], tmp_path: Path) -> None:
    """Three epochs of six steps: stopped in the second epoch, the resumed run replays the epochs' order."""
    args = ["train", "--method", "full", *TINY, "--dataset", data["alpaca"], "--batch-size", 2, "--num-epochs", 3,
            "--learning-rate", "3e-3", "--save-steps", 4]
    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(ftcli(*args, "--output-dir", reference))
    assert read_manifest(reference)["metrics"]["steps"] == 18
    _, stderr = interrupt([*args, "--output-dir", out], out / "checkpoint-8" / MARKER)
    step = read_manifest(out)["interrupted_at_step"]
    assert 8 <= step < 12 or 12 <= step < 18, step
    ok(ftcli(*printed_resume(stderr)))
    assert read_marker(out / "checkpoint-18")["epoch"] == 3.0
    assert_same_run(out, reference)


def test_early_stopping_by_epochs_resumes_to_the_same_stop(data: dict[str, Path], tmp_path: Path) -> None:
    """Evaluated at each epoch's end, no evaluation improves by 100, patience 2: the run stops after epoch 2 (step
    8 of 16); stopped during epoch 2 and resumed, it stops there too, with the same evaluations and weights."""
    args = ["train", "--method", "lora", *TINY, "--dataset", data["alpaca"], "--eval-split", 4, "--batch-size", 2,
            "--num-epochs", 4, "--early-stopping-patience", 2, "--early-stopping-threshold", 100, "--save-steps", 3]
    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(ftcli(*args, "--output-dir", reference))
    stopped = read_manifest(reference)["eval"]["early_stopped"]
    assert stopped["step"] == 8, stopped
    # Steps of 1 s, slept before each step's stop check: a signal sent once checkpoint-6 is written (its marker
    # follows on a thread) lands in step 7; a loaded machine stretches the time to stop, not past step 8's check.
    _, stderr = interrupt([*args, "--output-dir", out], out / "checkpoint-6" / "trainer_state.json", delay=1.0)
    assert 6 <= read_manifest(out)["interrupted_at_step"] < 8
    ok(ftcli(*printed_resume(stderr)))
    manifest = read_manifest(out)
    assert manifest["eval"]["early_stopped"]["step"] == 8
    evals = (lambda run: [(r["step"], r["eval_loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())
                          if "eval_loss" in r])
    assert evals(out) == evals(reference) and [s for s, _ in evals(out)] == [0, 4, 8]
    assert_same_run(out, reference)


def test_dpo_by_epochs_resumes_exactly(data: dict[str, Path], tmp_path: Path) -> None:
    args = ["train", "--objective", "dpo", "--method", "lora", *TINY, "--dataset", data["pairs"], "--batch-size", 4,
            "--num-epochs", 2, "--seq-length", 96, "--save-steps", 2]
    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(ftcli(*args, "--output-dir", reference))
    assert read_manifest(reference)["metrics"]["steps"] == 6
    # checkpoint-2 written (its marker follows on a thread): the signal lands in step 3 or 4, before the last
    _, stderr = interrupt([*args, "--output-dir", out], out / "checkpoint-2" / "trainer_state.json", delay=0.3)
    ok(ftcli(*printed_resume(stderr)))
    assert read_manifest(out)["resumed_from"]["step"] >= 2
    margins = (lambda run: [r["rewards/margins"] for r in read_manifest(run)["log_history"]])
    assert margins(out) == margins(reference)
    assert_same_run(out, reference)
    again = ok(ftcli(*printed_resume(stderr)))
    assert "is complete: it trained --num-epochs 2 (6 steps)" in " ".join(again.stdout.split())


def test_data_parallel_by_epochs_resumes_exactly(data: dict[str, Path], tmp_path: Path) -> None:
    """Two processes: Ctrl-C to the launcher reaches both ranks, which save one checkpoint; the printed command
    resumes through the launcher to the uninterrupted two-process run's losses and adapter."""
    from test_fsdp import free_port

    def args(out: Path) -> list[object]:
        return ["train", "--method", "lora", *TINY, "--dataset", data["alpaca"], "--batch-size", 2, "--num-epochs", 2,
                "--nproc-per-node", 2, "--master-port", free_port(), "--output-dir", out]

    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(ftcli(*args(reference)))
    assert read_manifest(reference)["metrics"]["steps"] == 6  # 12 rows / (2 ranks x 2) per step, 2 epochs
    _, stderr = interrupt(args(out), out / "metrics.jsonl", delay=0.5)
    step = read_manifest(out)["interrupted_at_step"]
    assert 1 <= step < 6
    command = printed_resume(stderr)
    command[command.index("--master-port") + 1] = str(free_port())  # a fresh port for the new launch
    ok(ftcli(*command))
    assert read_manifest(out)["resumed_from"]["step"] == step
    assert_same_run(out, reference)


# ---- a run that continues another inherits its template ----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_sft(tmp_path_factory, data: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("chain") / "chat-sft"
    ok(ftcli("train", "--method", "lora", *TINY, "--dataset", data["chat"], "--output-dir", out))
    assert read_manifest(out)["data"]["template"] == "model"
    return out


def test_dpo_on_strings_after_a_chat_sft_run_trains_with_its_chat_template(chat_sft: Path, data: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from ftcli.builtin import resolve_builtin_model

    out = tmp_path / "dpo"
    result = ok(ftcli("train", "--objective", "dpo", "--method", "lora", "--model", chat_sft, "--dataset",
                      data["pairs"], "--output-dir", out))
    assert f"template: the model's chat template, as {chat_sft} was trained" in " ".join(result.stdout.split())
    manifest = read_manifest(out)
    assert manifest["data"]["template"] == "model" and manifest["data"]["format"] == "prompt-completion"

    # The prepared prompt is what transformers' own chat template gives with the generation prompt.
    from datasets import load_from_disk

    prepared = load_from_disk(manifest["data"]["prepared"])
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_builtin_model("builtin:tiny-llama")))
    first = json.loads(data["pairs"].read_text().splitlines()[0])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": first["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    want = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = [list(r) for r in prepared["prompt_ids"]]
    assert want in rows, (tokenizer.decode(want), [tokenizer.decode(r) for r in rows[:2]])

    chat = subprocess.run([sys.executable, "-m", "ftcli", "chat", str(out), "--max-new-tokens", "3"], input="Hi\n",
                          env=env(), capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and "template model" in chat.stderr, chat.stdout + chat.stderr


def test_chat_data_after_a_single_turn_run_is_one_line_with_the_fix(data: dict[str, Path], tmp_path: Path) -> None:
    alpaca = tmp_path / "alpaca-sft"
    ok(ftcli("train", "--method", "lora", *TINY, "--dataset", data["alpaca"], "--output-dir", alpaca))
    refused = ftcli("train", "--method", "lora", "--model", alpaca, "--dataset", data["chat"], "--output-dir",
                    tmp_path / "next")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    line = " ".join(refused.stderr.split())
    assert "trained on single-turn prompts with the alpaca template" in line and "--template model" in line
    assert not (tmp_path / "next").exists()
    # ... and the fix it names works.
    ok(ftcli("train", "--method", "lora", "--model", alpaca, "--dataset", data["chat"], "--template", "model",
             "--max-steps", 1, "--output-dir", tmp_path / "next"))


def test_unset_step_limit_is_none_never_a_number() -> None:
    from ftcli.config import build_run_config
    from ftcli.errors import ConfigError

    assert build_run_config({}).max_steps is None
    # A config file or manifest written with the old sentinel reads back as "no limit".
    assert build_run_config({"max_steps": -1}).max_steps is None
    assert build_run_config({"max_steps": "none"}).max_steps is None
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="--max-steps"):
            build_run_config({"max_steps": bad})
