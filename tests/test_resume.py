"""Checkpoints, exact resume, signals, the non-finite guard and the output-folder rules, on the tiny model.

    $ /work/venv/bin/python -m pytest -q tests/test_resume.py

The killed runs are real processes (`python -m ftcli`); `FTCLI_DEBUG_STEP_DELAY` slows each step down
so a test can kill a run right after a given checkpoint is complete, and never after the run ended.
Losses and weights are compared exactly: a resumed run on CPU repeats the same float operations.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import losses, read_manifest
from ftcli.training.checkpoints import MARKER, read_marker, resume_command

TINY = ["--model", "builtin:tiny-llama"]
STEPS = 12


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory) -> Path:
    """Twelve rows of different lengths (batches pad differently), six optimizer steps per epoch at batch 2."""
    words = "apple river stone cloud green seven table music amber north salt violet".split()
    rows = [{"instruction": f"Repeat {w} " + "please " * (i % 4), "input": "",
             "output": " ".join([w] * (1 + (i * 5) % 9))} for i, w in enumerate(words)]
    path = tmp_path_factory.mktemp("data") / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(method: str, data: Path, out: Path, *extra: object) -> list[str]:
    return [str(a) for a in ["train", "--method", method, *TINY, "--dataset", data, "--max-steps", STEPS,
                             "--batch-size", 2, "--learning-rate", "3e-3", "--save-steps", 3, "--output-dir", out,
                             *extra]]


def reference_run(tmp_path_factory, method: str, data: Path) -> Path:
    from typer.testing import CliRunner

    from ftcli.cli import app

    out = tmp_path_factory.mktemp("reference") / method
    result = CliRunner().invoke(app, train_args(method, data, out), catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory, varied_data: Path) -> Path:
    return reference_run(tmp_path_factory, "full", varied_data)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, varied_data: Path) -> Path:
    return reference_run(tmp_path_factory, "lora", varied_data)


def ftcli_process(args: list[str], delay: float = 0.25) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FTCLI_DEBUG_STEP_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-m", "ftcli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def weights(run_dir: Path) -> dict:
    name = "model.safetensors" if (run_dir / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(str(run_dir / name))


def assert_same_run(resumed: Path, reference: Path) -> None:
    """The same per-step losses (metrics.jsonl and the manifest) and the same final weights, bit for bit."""
    assert losses(resumed) == losses(reference)
    history = [r["loss"] for r in read_manifest(resumed)["log_history"]]
    assert history == losses(reference) and len(history) == STEPS
    assert_same_weights(resumed, reference)


def assert_same_weights(folder: Path, reference: Path) -> None:
    """Every saved tensor bit for bit equal (the files are read once each)."""
    got, want = weights(folder), weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].equal(want[key]), key


def test_sigkill_after_a_checkpoint_then_resume_is_exact(full_reference: Path, varied_data: Path,
                                                         tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    proc = ftcli_process(train_args("full", varied_data, out))
    try:
        wait_for(out / "checkpoint-3" / MARKER, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert read_manifest(out)["status"] == "running"  # a killed process records nothing more
    assert not (out / "model.safetensors").exists()
    result = cli(*train_args("full", varied_data, out), "--resume")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert re.search(r"resuming from \S*checkpoint-\d+ \(step (\d+)\)", result.stdout)
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and 3 <= manifest["resumed_from"]["step"] < STEPS
    assert_same_run(out, full_reference)


def test_sigterm_saves_a_checkpoint_and_prints_the_resume_command(lora_reference: Path, varied_data: Path,
                                                                   tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    proc = ftcli_process(train_args("lora", varied_data, out))
    try:
        wait_for(out / "checkpoint-3" / MARKER, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    manifest = read_manifest(out)
    step = manifest["interrupted_at_step"]
    assert manifest["status"] == "interrupted" and 3 <= step < STEPS, manifest
    assert "SIGTERM" in manifest["error"] and manifest["checkpoint"].endswith(f"checkpoint-{step}")
    assert read_marker(out / f"checkpoint-{step}")["step"] == step
    assert not (out / "adapter_model.safetensors").exists()  # an interrupted run has no final adapter
    assert len(stderr.strip().splitlines()) == 1 and f"after step {step}" in stderr
    command = stderr.split("resume with: ", 1)[1].strip()
    assert command == manifest["resume_command"] and command.endswith("--resume")

    args = shlex.split(command)
    assert args[0] == "ftcli"
    resumed = cli(*args[1:])  # the printed command, as is
    assert resumed.exit_code == 0, resumed.stdout + resumed.stderr
    assert read_manifest(out)["resumed_from"]["step"] == step
    assert_same_run(out, lora_reference)


def test_a_second_ctrl_c_stops_at_once(varied_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = ftcli_process(train_args("lora", varied_data, out), delay=0.5)
    try:
        wait_for(out / "checkpoint-3" / MARKER, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)  # inside the (slowed-down) step the first one lets finish
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "press Ctrl-C again to stop at once" in " ".join(stdout.split())
    manifest = read_manifest(out)
    assert manifest["status"] == "interrupted" and "stopped at once" in manifest["error"]
    assert "checkpoint-3" in manifest["error"] and "interrupted_at_step" not in manifest
    assert [p.name for p in out.glob("checkpoint-*") if read_marker(p)] == ["checkpoint-3"]


def test_fsdp_sigterm_stops_all_ranks_and_resumes_exactly(varied_data: Path, tmp_path: Path) -> None:
    """SIGTERM to the launcher: forwarded to both ranks, which stop after the same step with one checkpoint;
    the printed command resumes it (through the launcher again) to the uninterrupted run's losses and adapter."""
    import socket

    def launch_args(out: Path) -> list[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return ["train", "--method", "fsdp", *TINY, "--dataset", str(varied_data), "--max-steps", "8",
                "--batch-size", "2", "--learning-rate", "3e-3", "--nproc-per-node", "2", "--master-port", str(port),
                "--output-dir", str(out)]

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    reference, out = tmp_path / "reference", tmp_path / "fsdp"
    done = subprocess.run([sys.executable, "-m", "ftcli", *launch_args(reference)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    launcher = subprocess.Popen([sys.executable, "-m", "ftcli", *launch_args(out)],
                                env={**env, "FTCLI_DEBUG_STEP_DELAY": "0.5"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or not losses(out):
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, stdout + stderr
    manifest = read_manifest(out)
    step = manifest["interrupted_at_step"]
    assert manifest["status"] == "interrupted" and 1 <= step < 8, manifest
    marker = read_marker(out / f"checkpoint-{step}")
    assert marker["step"] == step and {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert len(losses(out)) == step

    args = shlex.split(manifest["resume_command"])
    resumed = subprocess.run([sys.executable, "-m", "ftcli", *args[1:]], env=env, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert read_manifest(out)["status"] == "finished" and read_manifest(out)["resumed_from"]["step"] == step
    assert losses(out) == losses(reference) and len(losses(out)) == 8
    assert_same_weights(out, reference)


def test_incomplete_checkpoints_are_skipped(full_reference: Path, varied_data: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_reference, out)
    manifest = read_manifest(out)  # a run killed while it wrote its last checkpoint: never finished
    (out / "ftcli_run.json").write_text(json.dumps({**manifest, "status": "running"}))
    (out / "checkpoint-12" / MARKER).unlink()  # its writing stopped before the marker
    (out / "checkpoint-12" / "optimizer.pt").unlink()
    with open(out / "checkpoint-9" / "optimizer.pt", "r+b") as fh:  # marked, but a file was cut short since
        fh.truncate(100)
    refused = cli(*train_args("full", varied_data, out), "--resume", out / "checkpoint-12")
    assert refused.exit_code == 2 and "not a complete checkpoint" in refused.stderr
    result = cli(*train_args("full", varied_data, out), "--resume")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert f"resuming from {out / 'checkpoint-6'} (step 6)" in result.stdout
    assert_same_run(out, full_reference)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-3", "checkpoint-6",
                                                                "checkpoint-9"]
    assert all(read_marker(p) for p in out.glob("checkpoint-*"))  # rewritten whole by the resumed run


def test_resume_with_a_changed_batch_size_is_refused(full_reference: Path, varied_data: Path, tmp_path: Path,
                                                     cli) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_reference, out)
    before = (out / "ftcli_run.json").read_bytes()
    args = train_args("full", varied_data, out)
    args[args.index("--batch-size") + 1] = "4"
    result = cli(*args, "--resume", "--seed", "7")  # a bare --resume in the middle of the options
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "batch_size 2 -> 4" in result.stderr and "seed 42 -> 7" in result.stderr and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (out / "ftcli_run.json").read_bytes() == before

    # From an earlier checkpoint: resuming the last one of this complete run would train nothing.
    forced = cli(*args, "--resume", out / "checkpoint-9", "--seed", "7", "--force")
    assert forced.exit_code == 0, forced.stdout + forced.stderr
    assert read_manifest(out)["resumed_from"]["forced_differences"] == ["batch_size 2 -> 4", "seed 42 -> 7"]


def test_nan_stops_at_that_step_and_keeps_the_last_good_checkpoint(full_reference: Path, varied_data: Path,
                                                                    tmp_path: Path, cli,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTCLI_DEBUG_NAN_AT_STEP", "8")
    out = tmp_path / "run"
    result = cli(*train_args("full", varied_data, out))
    assert result.exit_code == 1
    assert "stopped at step 8" in result.stderr and "not finite" in result.stderr
    assert f"{out / 'checkpoint-6'} is untouched" in result.stderr
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and manifest["failed_at_step"] == 8 and "step 8" in manifest["error"]
    assert losses(out) == losses(full_reference)[:7]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert read_marker(out / "checkpoint-6")["step"] == 6
    assert_same_weights(out / "checkpoint-6", full_reference / "checkpoint-6")
    assert not (out / "model.safetensors").exists()


def test_accumulation_gives_the_same_loss_curve(varied_data: Path, tmp_path: Path, cli) -> None:
    """Batch 8 x 1 and batch 2 x 4 on variable-length data: the same examples and the same loss per step."""
    curves = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        out = tmp_path / f"b{batch}x{accumulation}"
        result = cli("train", "--method", "full", *TINY, "--dataset", varied_data, "--max-steps", 4,
                     "--learning-rate", "3e-3", "--batch-size", batch, "--gradient-accumulation-steps", accumulation,
                     "--output-dir", out)
        assert result.exit_code == 0, result.stdout + result.stderr
        curves[batch] = losses(out)
    assert len(curves[8]) == 4
    assert curves[2] == pytest.approx(curves[8], rel=1e-5, abs=1e-5)


def test_qlora_resume_is_exact(varied_data: Path, tmp_path: Path, cli) -> None:
    """QLoRA adapters train in bfloat16: the resumed run must keep them so (peft would load them as float32)."""
    common = ["train", "--method", "qlora", *TINY, "--dataset", varied_data, "--max-steps", 6, "--batch-size", 2,
              "--save-steps", 3]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert cli(*common, "--output-dir", reference).exit_code == 0
    result = cli(*common, "--output-dir", resumed, "--resume", reference / "checkpoint-3")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert read_manifest(resumed)["resumed_from"]["step"] == 3
    assert losses(resumed) == losses(reference) and len(losses(reference)) == 6
    assert_same_weights(resumed, reference)


def test_output_folder_rules(full_reference: Path, varied_data: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_reference, out)
    again = cli(*train_args("full", varied_data, out))
    # A finished run: use it or replace it (resuming it would train nothing).
    assert again.exit_code == 5 and "not empty" in again.stderr and "holds a finished run" in again.stderr
    assert "--overwrite" in again.stderr and "ftcli export" in again.stderr

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = cli(*train_args("full", varied_data, other), "--resume")
    assert result.exit_code == 5 and "not an ftcli run folder" in result.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"
    result = cli(*train_args("full", varied_data, empty), "--resume")
    assert result.exit_code == 5 and "no complete checkpoint" in result.stderr and not empty.exists()

    result = cli(*train_args("full", varied_data, out), "--resume", "--overwrite")
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def test_resume_command_keeps_the_flags() -> None:
    command = ["ftcli", "train", "--method", "lora", "--resume", "old/checkpoint-3", "--output-dir", "a b",
               "--overwrite", "--force", "--lr", "1e-3"]
    assert resume_command(command, Path("runs/x")) == (
        "ftcli train --method lora --lr 1e-3 --output-dir runs/x --resume")


def test_no_torch_load_without_weights_only() -> None:
    """ftcli never unpickles with torch.load unless weights_only=True (a checkpoint is untrusted input)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "ftcli"
    calls, offenders = 0, []
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "from torch import load" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
        # A call the parser would not see as torch.load(...) (an alias, getattr) must not hide one either.
        assert text.count("torch.load(") == len([n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)
                                                 and ast.unparse(n.func) == "torch.load"]), path
    assert not offenders, offenders


def test_remote_code_without_revision_warns(cli, tmp_path: Path) -> None:
    result = cli("train", "--model", "ftcli-test-org/remote-a", "--trust-remote-code", "--dataset",
                 "builtin:alpaca-sample", "--output-dir", tmp_path / "a")
    assert result.exit_code == 4  # not in the offline cache, after the warning
    assert "--trust-remote-code runs the code in ftcli-test-org/remote-a's repository" in result.stdout
    assert "--revision" in result.stdout
    pinned = cli("train", "--model", "ftcli-test-org/remote-b", "--trust-remote-code", "--revision", "abc123",
                 "--dataset", "builtin:alpaca-sample", "--output-dir", tmp_path / "b")
    assert pinned.exit_code == 4 and "warning" not in pinned.stdout
