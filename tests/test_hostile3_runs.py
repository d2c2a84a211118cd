"""Issue 26 (hostile round 3): processes, resume identity, run folders and output files, through the CLI.

    $ python -m pytest -q tests/test_hostile3_runs.py

Data-parallel runs are real processes (`python -m ftcli ... --nproc-per-node 2`, gloo on CPU) on the tiny
model; `FTCLI_DEBUG_STEP_DELAY` slows their steps so a test can act while they train.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_manifest, write_small_alpaca
from ftcli.files import lock_path

TINY = ["--model", "builtin:tiny-llama"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def ftcli(*args: object, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftcli", *[str(a) for a in args]], env=child_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ddp_args(data: Path, out: Path, steps: int, *extra: object) -> list[object]:
    return ["train", "--method", "lora", *TINY, "--dataset", data, "--max-steps", steps, "--batch-size", 2,
            "--seq-length", 64, "--nproc-per-node", 2, "--output-dir", out, *extra]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def flock_holders(path: Path) -> dict[int, str]:
    """{pid: READ|WRITE} of the flock locks on `path`, from /proc/locks."""
    inode = os.stat(path).st_ino
    holders = {}
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "->" in parts:
            continue
        if parts[1] == "FLOCK" and int(parts[5].split(":")[2]) == inode:
            holders[int(parts[4])] = parts[3]
    return holders


def wait_until(check, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) first:\n{out[-3000:]}\n{err[-3000:]}")
        assert time.time() < end, "timed out"
        time.sleep(0.2)


def rank_pids(launcher: subprocess.Popen, n: int = 2) -> list[int]:
    """The launcher's ranks (its `python -m ftcli` children), once all are started."""
    def ranks() -> list[int]:
        return [c for c in children(launcher.pid) if "ftcli" in Path(f"/proc/{c}/cmdline").read_text(errors="ignore")]
    wait_until(lambda: len(ranks()) == n, launcher, timeout=120)
    return ranks()


# ---- D1: ranks live and die with their launcher, and hold the run folder's lock while they live ----

def test_sigkill_of_the_launcher_ends_its_ranks_and_the_folder_stays_locked_while_any_lives(
        cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "ddp"
    args = ddp_args(data, out, 12, "--save-steps", 2)
    launcher = ftcli(*args, FTCLI_DEBUG_STEP_DELAY="1")
    try:
        ranks = rank_pids(launcher)
        wait_until(lambda: (out / "checkpoint-2" / "ftcli_checkpoint.json").is_file(), launcher)
        # The launcher and both ranks hold the folder's lock (shared: one launch), so nobody else can take it.
        holders = flock_holders(lock_path(out))
        assert set(ranks) <= set(holders) and launcher.pid in holders, (holders, ranks, launcher.pid)
        resumed = cli(*args, "--resume")
        assert resumed.exit_code == 5 and "in use" in resumed.output, resumed.output

        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        end = time.time() + 5
        while any(alive(p) for p in ranks) and time.time() < end:
            time.sleep(0.05)
        assert not any(alive(p) for p in ranks), "a rank outlived its SIGKILLed launcher"
    finally:
        for pid in [launcher.pid, *[p for p in locals().get("ranks", []) if alive(p)]]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # Once they are gone, the folder is free: the resume runs alone and the record is one run's.
    resumed = ftcli(*args, "--resume")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stdout[-3000:] + stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resumed_from"]["step"] >= 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), steps


# ---- D11: a single-node launch picks its own port; a busy --master-port is one line ----

def test_two_single_node_launches_started_together_both_finish(tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    runs = [ftcli(*ddp_args(data, tmp_path / name, 2)) for name in ("a", "b")]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [r[1][-3000:] for r in results]
    for stdout, _ in results:
        assert "--standalone" in stdout and "--master-port" not in stdout.split("ftcli launch", 1)[1].split("\n")[0]
    assert all(read_manifest(tmp_path / name)["status"] == "finished" for name in ("a", "b"))


def test_a_busy_master_port_is_one_line_naming_it(cli, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli(*ddp_args(write_small_alpaca(tmp_path / "small.jsonl"), tmp_path / "out", 2,
                               "--master-port", port))
    assert result.exit_code == 2, result.output
    assert f"--master-port {port}" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_more_ranks_than_cores_is_refused_before_anything_starts(cli, tmp_path: Path) -> None:
    many = len(os.sched_getaffinity(0)) + 1
    result = cli(*ddp_args(write_small_alpaca(tmp_path / "small.jsonl"), tmp_path / "out", 2)[:-4],
                 "--nproc-per-node", many,
                 "--output-dir", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and f"--nproc-per-node {many}" in result.output, result.output
    assert not (tmp_path / "out").exists()


# ---- R12: the rank that was killed is the recorded cause ----

def test_a_killed_rank_is_the_recorded_cause(tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "ddp"
    launcher = ftcli(*ddp_args(data, out, 30), FTCLI_DEBUG_STEP_DELAY="1")
    ranks = rank_pids(launcher)
    wait_until(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip(), launcher)
    victim = next(p for p in ranks if "LOCAL_RANK=1\0" in Path(f"/proc/{p}/environ").read_text(errors="ignore"))
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "rank 1 killed by SIGKILL" in stderr, stderr
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and manifest["error"].startswith("rank 1 killed by SIGKILL"), manifest["error"]
    # torch-elastic's own log lines (W1207 ..., E1207 ...) stay off stderr.
    assert not [line for line in stderr.splitlines() if line[:1] in "WE" and line[1:5].isdigit()], stderr


# ---- D4, D21, R23: one resume identity, checked before loading, and a record of what was used ----

def lora_args(data: Path, out: Path, **over: object) -> list[object]:
    opts = {"max-steps": 6, "save-steps": 2, "batch-size": 2, "seq-length": 64, "learning-rate": "1e-3", **over}
    return ["train", "--method", "lora", *TINY, "--dataset", data, "--output-dir", out,
            *[a for k, v in opts.items() for a in (f"--{k}", v)]]


def test_resume_refuses_what_changes_the_remaining_steps_before_loading(cli, tmp_path: Path) -> None:
    import yaml

    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "run"
    assert cli(*lora_args(data, out)).exit_code == 0
    record = (out / "ftcli_run.json").read_bytes()
    mid = ["--resume", out / "checkpoint-2"]
    for change, name in ((("learning-rate", "1e-2"), "learning_rate"), (("lora-alpha", 64), "lora_alpha"),
                         (("seq-length", 96), "seq_length"), (("max-steps", 8), "goal"),
                         (("lora-dropout", 0.1), "lora_dropout")):
        result = cli(*lora_args(data, out, **{change[0]: change[1]}), *mid)
        assert result.exit_code == 2 and name in result.output and "--force" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output  # refused before loading anything
    # A different adapter shape cannot load the checkpoint's weights: refused even with --force.
    for change, name in ((("lora-rank", 16), "lora_rank"), (("lora-target-modules", "q_proj"), "lora_target_modules")):
        result = cli(*lora_args(data, out, **{change[0]: change[1]}), *mid, "--force")
        assert result.exit_code == 2 and name in result.output and "shape" in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert (out / "ftcli_run.json").read_bytes() == record and (out / "checkpoint-6").is_dir()

    # A higher goal from the checkpoint that reached the old one trains further (the documented use).
    result = cli(*lora_args(data, out, **{"max-steps": 8}), "--resume")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)) and read_manifest(out)["resumed_from"]["step"] == 6

    # --force with another learning rate: the checkpoint's schedule is what trains, and what is recorded.
    result = cli(*lora_args(data, out, **{"learning-rate": "1e-2", "max-steps": 6}), *mid, "--force")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["config"]["learning_rate"] == 1e-3, manifest["config"]["learning_rate"]
    assert yaml.safe_load((out / "ftcli_config.yaml").read_text())["learning_rate"] == 1e-3
    assert any(d.startswith("learning_rate 0.001 -> 0.01") for d in manifest["resumed_from"]["forced_differences"])


# ---- D14, R19: a symlinked output folder stands for the folder it points to; the link is never moved ----

def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_overwrite_through_a_symlinked_run_folder_or_export_replaces_the_real_folder(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    sl = tmp_path / "sl"
    sl.mkdir()
    args = ["train", "--method", "lora", *TINY, "--dataset", data, "--max-steps", 1, "--seq-length", 64]
    assert cli(*args, "--output-dir", sl / "run_real").exit_code == 0
    (sl / "run_link").symlink_to(sl / "run_real")
    first = read_manifest(sl / "run_real")["started_at"], (sl / "run_real" / "ftcli_run.json").stat().st_ino
    for _ in range(2):
        result = cli(*args, "--output-dir", sl / "run_link", "--overwrite")
        assert result.exit_code == 0, result.output
        assert (sl / "run_link").is_symlink() and os.readlink(sl / "run_link") == str(sl / "run_real")
        assert hidden(sl) == [], hidden(sl)
    assert (sl / "run_real" / "ftcli_run.json").stat().st_ino != first[1]
    result = cli(*args, "--max-steps", 2, "--save-steps", 1, "--output-dir", sl / "run_link", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_manifest(sl / "run_real")["resolved"]["output_dir"] == str(sl / "run_real")

    (sl / "exp_link").symlink_to(sl / "exp_real", target_is_directory=True)
    for _ in range(2):
        result = cli("export", sl / "run_link", "--output", sl / "exp_link", "--overwrite")
        assert result.exit_code == 0, result.output
        assert (sl / "exp_link").is_symlink() and (sl / "exp_real" / "ftcli_export.json").is_file()
        assert hidden(sl) == [], hidden(sl)


# ---- D18: `eval RUN` scores the run's own eval set or nothing ----

def test_eval_of_a_run_whose_training_file_changed_is_refused(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "run"
    result = cli("train", "--method", "full", *TINY, "--dataset", data, "--eval-split", 2, "--max-steps", 1,
                 "--seq-length", 64, "--output-dir", out)
    assert result.exit_code == 0, result.output
    assert cli("eval", out).exit_code == 0  # unchanged: its own eval set
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "output": r["output"] + " Changed."}) + "\n" for r in rows))
    result = cli("eval", out)
    assert result.exit_code == 3 and "has changed since it trained" in result.output, result.output
    assert "--dataset" in result.output and len(result.output.strip().splitlines()) == 2, result.output  # header + error
    assert cli("eval", out, "--dataset", data).exit_code == 0  # as new data, named as such


# ---- D19: one writer per generate/chat --output file ----

def test_two_commands_writing_one_output_file_never_lose_a_result(tmp_path: Path) -> None:
    race = tmp_path / "race.jsonl"
    runs = [ftcli("generate", "builtin:tiny-llama", "--prompt", f"Run {n}", "--max-new-tokens", 4, "--output", race)
            for n in (1, 2)]
    done = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 5], done
    loser = next(err for code, _, err in done if code == 5)
    assert ("in use" in loser or "already exists" in loser) and len(loser.strip().splitlines()) == 1, loser
    winner = next(n for (code, _, _), n in zip(done, (1, 2)) if code == 0)
    rows = [json.loads(line) for line in race.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == f"Run {winner}", rows
    assert hidden(tmp_path) == []  # the lock file goes with its holder

    chat = tmp_path / "chat.jsonl"
    runs = [subprocess.Popen([sys.executable, "-m", "ftcli", "chat", "builtin:tiny-llama", "--max-new-tokens", "4",
                              "--output", str(chat)], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(run.communicate("Hi\n", timeout=300), run.returncode) for run in runs]
    assert sorted(code for _, code in done) == [0, 5], done
    assert len(chat.read_text().splitlines()) == 1
