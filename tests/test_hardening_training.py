"""The run folder under hostile use (issue 18, training part): empty paths, --overwrite, locks, damaged and
complete resumes, fsync, a full disk, killed and signalled runs, relative paths, --log-dir, --seq-length.

    $ python -m pytest -q tests/test_hardening_training.py

Real processes (`python -m ftcli`) where a lock, a SIGKILL or a SIGTERM needs one; the rest in-process
on the built-in tiny model, sharing one finished run where the checks allow.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import read_manifest, write_small_alpaca
from ftcli.files import exclusive, lock_path

TINY = ["--model", "builtin:tiny-llama"]


def train(data: Path | str, out: Path | str | None, *extra: object, method: str = "lora") -> list[str]:
    args = ["train", "--method", method, *TINY, "--dataset", data, "--max-steps", 2, "--batch-size", 4, *extra]
    if out is not None:
        args += ["--output-dir", out]
    return [str(a) for a in args]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def flip_bytes(path: Path) -> None:
    """Damage a file without changing its size."""
    data = bytearray(path.read_bytes())
    for i in range(8, 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished LoRA run with a checkpoint at its last step, started with relative paths from its own
    working folder and with --seq-length beyond the tiny model's context; every fsync of the run recorded."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    work = tmp_path_factory.mktemp("work")
    write_small_alpaca(work / "small.jsonl")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setattr(os, "fsync", recording_fsync)
        result = CliRunner().invoke(app, train("small.jsonl", "run", "--save-steps", 2, "--seq-length", 8192),
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"work": work, "run": work / "run", "data": work / "small.jsonl", "output": result.output,
            "synced": synced}


def copy_run(finished, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(finished["run"], out)
    return out


# ---- 1, 11: empty output paths and a --log-dir that is a file, refused before anything is created ----

def test_empty_output_dir_and_log_dir_are_refused(cli, small_alpaca: Path, tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "keep.txt").write_text("mine")
    result = cli(*train(small_alpaca, "", "--overwrite"))
    assert result.exit_code == 2 and "--output-dir is empty" in result.stderr
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text('output_dir: ""\n')
    result = cli(*train(small_alpaca, None, "--config", yaml_file))
    assert result.exit_code == 2 and "--output-dir is empty" in result.stderr
    result = cli(*train(small_alpaca, work / "run", "--log-dir", ""))
    assert result.exit_code == 2 and "--log-dir is empty" in result.stderr
    (tmp_path / "logs-file").write_text("not a folder")
    result = cli(*train(small_alpaca, work / "deep" / "run", "--log-dir", tmp_path / "logs-file"))
    assert result.exit_code == 5 and "--log-dir" in result.stderr and "is a file" in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]


# ---- 2: --overwrite replaces only an ftcli run folder, atomically ----

def test_overwrite_replaces_only_a_run_folder(cli, finished, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"\xff\xd8 precious")
    result = cli(*train(finished["data"], mine, "--overwrite"))
    assert result.exit_code == 5 and "not an ftcli run folder" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["photo.jpg"]

    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    result = cli(*train(tmp_path / "missing.jsonl", out, "--overwrite"))
    assert result.exit_code == 3 and snapshot(out) == before  # a refused run leaves the old one as it was

    result = cli(*train(finished["data"], out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["status"] == "finished" and not (out / "checkpoint-2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "mine"]  # no set-aside copy, no lock left


def test_a_run_set_aside_by_a_killed_overwrite_is_put_back(cli, finished, tmp_path: Path) -> None:
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".gone.ftcli-replaced.{socket.gethostname()}.{dead.pid}.1"
    shutil.copytree(finished["run"], aside)
    result = cli(*train(finished["data"], tmp_path / "gone"))
    assert result.exit_code == 5 and "not empty" in result.stderr  # the old run is back, and still protected
    assert read_manifest(tmp_path / "gone")["status"] == "finished" and not aside.exists()


# ---- 3: one writer per run folder; default names never collide ----

def ftcli_process(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftcli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def test_two_concurrent_trains_then_sigkill_then_stale_lock(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "shared"
    args = train(data, out, "--save-steps", 1, "--max-steps", 40)
    procs = [ftcli_process(args, tmp_path, FTCLI_DEBUG_STEP_DELAY="0.5") for _ in range(2)]
    try:
        deadline = time.time() + 150
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        stderr = loser.stderr.read()
        assert loser.returncode == 5, stderr
        assert "is in use by ftcli pid" in stderr and str(winner.pid) in stderr and stderr.count("\n") == 1
        while not (out / "checkpoint-1" / "ftcli_checkpoint.json").is_file() and time.time() < deadline:
            assert winner.poll() is None, winner.stderr.read()
            time.sleep(0.2)
        winner.send_signal(signal.SIGKILL)
        winner.wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    manifest = read_manifest(out)
    assert manifest["status"] == "running" and manifest["pid"] == winner.pid and manifest["host"]
    assert sorted(p.name for p in out.glob("ftcli_run.json*")) == ["ftcli_run.json"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1
    assert lock_path(out).is_file()  # left behind by the killed holder

    shown = cli("inspect", out)
    assert shown.exit_code == 0 and f"stopped (process {winner.pid} is gone)" in shown.output
    as_json = json.loads(cli("inspect", out, "--json").output)
    assert as_json["run"]["status"] == "stopped"

    # The dead holder's lock does not block the next run, which resumes the checkpoint.
    result = cli(*train(data, out, "--save-steps", 1, "--max-steps", 40, "--resume"))  # the same run, to its end
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["status"] == "finished" and not lock_path(out).exists()


def test_default_run_names_never_collide(cli, small_alpaca: Path, tmp_path: Path, monkeypatch) -> None:
    import ftcli.training.runfolder as runfolder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runfolder.time, "strftime", lambda fmt, *a: "20260101-000000")
    base = tmp_path / "runs" / "lora-20260101-000000"
    with exclusive(base, "--output-dir"):  # another run holds the first name, and has not created it yet
        first = cli(*train(small_alpaca, None))
        second = cli(*train(small_alpaca, None))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["lora-20260101-000000-2",
                                                                     "lora-20260101-000000-3"]
    assert read_manifest(base.with_name(base.name + "-3"))["resolved"]["output_dir"] == str(base) + "-3"


# ---- 4, 5: damaged checkpoints refused before anything changes; a complete run is not trained again ----

def test_damaged_checkpoint_is_refused_and_the_finished_record_kept(cli, finished, tmp_path: Path) -> None:
    out = copy_run(finished, tmp_path, "checked")
    record = (out / "ftcli_run.json").read_bytes()
    flip_bytes(out / "checkpoint-2" / "adapter_model.safetensors")
    result = cli(*train(finished["data"], out, "--save-steps", 2, "--max-steps", 4, "--seq-length", 8192, "--resume"))
    assert result.exit_code == 2, result.output
    assert "damaged" in result.stderr and "adapter_model.safetensors" in result.stderr
    assert (out / "ftcli_run.json").read_bytes() == record

    # A marker written before checksums (sizes only) still counts; a resume failing before its first step
    # puts the finished record back instead of recording the finished run as failed.
    old = copy_run(finished, tmp_path, "old-marker")
    marker_path = old / "checkpoint-2" / "ftcli_checkpoint.json"
    marker = json.loads(marker_path.read_text())
    marker["format"] = 1
    del marker["sha256"]
    marker_path.write_text(json.dumps(marker))
    flip_bytes(old / "checkpoint-2" / "adapter_model.safetensors")
    result = cli(*train(finished["data"], old, "--save-steps", 2, "--max-steps", 4, "--seq-length", 8192, "--resume"))
    assert result.exit_code != 0 and "resuming from" in result.output
    assert (old / "ftcli_run.json").read_bytes() == record


def test_checkpoint_files_are_checksummed_as_they_land(cli, small_alpaca: Path, tmp_path: Path, monkeypatch) -> None:
    """The trainer's files are handed to the background checksums as each part of the save returns (not re-read
    at the mark); the marker still names every file of the folder with its size and its sha256."""
    from ftcli.files import file_sha256
    from ftcli.training.checksums import Checksums

    landed: list[str] = []
    written: list[str] = []
    real_land, real_write_later = Checksums.land, Checksums.write_later

    def recording_land(self, paths):
        landed.extend(Path(p).name for p in paths)
        real_land(self, paths)

    def recording_write_later(self, path, write):
        written.append(Path(path).name)
        real_write_later(self, path, write)

    monkeypatch.setattr(Checksums, "land", recording_land)
    monkeypatch.setattr(Checksums, "write_later", recording_write_later)
    out = tmp_path / "run"
    result = cli(*train(small_alpaca, out, "--save-steps", 1))
    assert result.exit_code == 0, result.output
    for name in ("adapter_model.safetensors", "scheduler.pt", "rng_state.pth"):
        assert landed.count(name) == 2, (name, landed)  # in each of the two checkpoints
    # The optimizer state (a LoRA's: small) is copied at the save and written in the background (it may be seen
    # appearing while the random states are saved: land leaves it to its write)
    assert written == ["optimizer.pt", "optimizer.pt"], written
    for folder in (out / "checkpoint-1", out / "checkpoint-2"):
        marker = json.loads((folder / "ftcli_checkpoint.json").read_text())
        on_disk = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        del on_disk["ftcli_checkpoint.json"]
        assert marker["files"] == on_disk and set(marker["sha256"]) == set(on_disk)
        assert all(file_sha256(folder / name) == digest for name, digest in marker["sha256"].items())


def test_landed_checksums_follow_later_changes(tmp_path: Path) -> None:
    """A file changed or removed after it landed is not taken on its earlier checksum; a file that never landed
    is checksummed at the mark; an fsync that fails on the background thread fails the mark."""
    from ftcli.files import file_sha256
    from ftcli.training.checksums import Checksums

    folder = tmp_path / "checkpoint-1"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.bin", "b.bin", "gone.bin", "sub/c.bin"):
        (folder / name).write_bytes(os.urandom(3 << 20))
    checksums = Checksums()
    checksums.land([folder / "a.bin", folder / "b.bin", folder / "gone.bin"])
    for synced, hashed in checksums._landed.values():  # the landed work done before the changes below
        synced.result(), hashed.result()
    changed = folder / "b.bin"
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF  # same size, other contents, a later modification time
    before = changed.stat()
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    (folder / "gone.bin").unlink()
    sizes, sums = checksums.settle(folder)
    assert set(sums) == set(sizes) == {"a.bin", "b.bin", "sub/c.bin"}
    assert all(file_sha256(folder / name) == digest for name, digest in sums.items())
    assert sizes["b.bin"] == 3 << 20

    bad = tmp_path / "checkpoint-2"  # a file whose fsync fails (procfs refuses fsync)
    bad.mkdir()
    (bad / "status").symlink_to("/proc/self/status")
    checksums.land([bad / "status"])
    with pytest.raises(OSError):
        checksums.settle(bad)


def slow_background_writes(monkeypatch, delay: float, fail: OSError | None = None) -> None:
    """Every background write of a checkpoint file starts `delay` seconds late (or fails with `fail`)."""
    from ftcli.training.checksums import Checksums

    real = Checksums.write_later

    def late(self, path, write):
        def delayed(target):
            time.sleep(delay)
            if fail is not None:
                raise fail
            write(target)

        real(self, path, delayed)

    monkeypatch.setattr(Checksums, "write_later", late)


def test_the_background_optimizer_write_holds_the_state_of_its_step(cli, small_alpaca: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """checkpoint-1's optimizer.pt, written while step 2 already trains, holds the state after step 1: the same
    as a run that stops at step 1 (Adam's moments after one step do not depend on the schedule)."""
    import torch

    slow_background_writes(monkeypatch, 1.0)  # step 2 changes the live state long before the write starts
    two, one = tmp_path / "two", tmp_path / "one"
    assert (result := cli(*train(small_alpaca, two, "--save-steps", 1))).exit_code == 0, result.output
    monkeypatch.undo()
    assert (result := cli(*train(small_alpaca, one, "--save-steps", 1, "--max-steps", 1))).exit_code == 0
    state = (lambda run, n: torch.load(run / f"checkpoint-{n}" / "optimizer.pt", weights_only=True)["state"])
    want, got, later = state(one, 1), state(two, 1), state(two, 2)
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert all(torch.equal(got[key][name], want[key][name]) for name in want[key]), key
    assert any(not torch.equal(later[key]["exp_avg"], got[key]["exp_avg"]) for key in got)


def test_a_failed_background_optimizer_write_fails_the_run_and_leaves_the_checkpoint_incomplete(
        cli, small_alpaca: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    from ftcli.training.checkpoints import MARKER, complete_checkpoints

    slow_background_writes(monkeypatch, 0.0, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "run"
    result = cli(*train(small_alpaca, out, "--save-steps", 1))
    assert result.exit_code != 0
    assert "No space left on device" in result.output and "Traceback" not in result.output, result.output
    assert f"cannot write {out / 'checkpoint-1' / 'optimizer.pt'}" in " ".join(result.output.split())
    assert not (out / "checkpoint-1" / MARKER).exists() and complete_checkpoints(out) == []
    assert read_manifest(out)["status"] == "failed"


def test_resuming_a_complete_run_trains_nothing(cli, finished, tmp_path: Path) -> None:
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    result = cli(*train(finished["data"], out, "--save-steps", 2, "--seq-length", 8192, "--resume"))
    assert result.exit_code == 0, result.output
    assert "is complete" in result.output and "step 3" not in result.output
    assert snapshot(out) == before and not lock_path(out).exists()

    # Stopped after its last step but before the final save (a SIGTERM during it): no extra step either.
    manifest = json.loads((out / "ftcli_run.json").read_text())
    manifest["status"] = "interrupted"
    (out / "ftcli_run.json").write_text(json.dumps(manifest))
    before = snapshot(out)
    result = cli(*train(finished["data"], out, "--save-steps", 2, "--seq-length", 8192, "--resume"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "stopped before its final save" in said and "step 3/2" not in said
    assert f"ftcli export {out / 'checkpoint-2'}" in said
    assert snapshot(out) == before


# ---- 6, 9, 12: what the finished run wrote ----

def test_final_files_are_fsynced_before_finished(finished) -> None:
    run, synced = finished["run"], finished["synced"]
    for name in ("adapter_model.safetensors", "tokenizer.json", "probe.safetensors", "metrics.jsonl",
                 "ftcli_config.yaml"):
        assert str(run / name) in synced, name
    assert str(run) in synced
    # The record saying finished is itself flushed (its temporary file, renamed over ftcli_run.json).
    assert any(Path(p).name.startswith(".ftcli_run.json.") for p in synced[-3:])


def test_manifest_paths_are_absolute_and_seq_length_note(finished) -> None:
    manifest = read_manifest(finished["run"])
    assert manifest["config"]["output_dir"] == str(finished["run"])
    assert manifest["config"]["dataset"] == str(finished["data"])
    assert manifest["resolved"]["log_dir"] == str(finished["run"] / "logs")
    assert manifest["config"]["model"] == "builtin:tiny-llama"
    assert "note:" in finished["output"] and "--seq-length 8192" in finished["output"] \
        and "2048" in finished["output"]


def test_resume_command_works_from_another_folder(cli, tmp_path: Path, monkeypatch) -> None:
    """SIGTERM during training (sent to this process once a step is logged) records a resume command with
    absolute paths; run from elsewhere, it finishes the run."""
    work = tmp_path / "work"
    work.mkdir()
    write_small_alpaca(work / "small.jsonl")
    monkeypatch.chdir(work)
    monkeypatch.setenv("FTCLI_DEBUG_STEP_DELAY", "0.3")

    def signal_once_training() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            metrics = work / "run" / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().strip():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=signal_once_training, daemon=True)
    watcher.start()
    args = train("small.jsonl", "run", "--max-steps", 6)
    monkeypatch.setattr(sys, "argv", ["ftcli", *args])  # what a real process records as its command
    result = cli(*args)
    watcher.join()
    assert result.exit_code == 130, result.output
    how = read_manifest(work / "run")["resume_command"]
    monkeypatch.delenv("FTCLI_DEBUG_STEP_DELAY")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "small.jsonl" not in shlex.split(how) and str(work / "small.jsonl") in shlex.split(how)
    result = cli(*shlex.split(how)[1:])
    assert result.exit_code == 0, result.output
    assert read_manifest(work / "run")["status"] == "finished" and not any(elsewhere.iterdir())


# ---- 7: a full disk ----

def test_full_disk_records_the_failure(cli, small_alpaca: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        for name, extra in (("checkpoints", ["--save-steps", 1]), ("final", [])):
            out = disk / name
            result = cli(*train(small_alpaca, out, *extra, method="full"))
            # torch.save reports a full disk as "unexpected pos ..." (checkpoints); safetensors as ENOSPC.
            assert result.exit_code == 1 and result.stderr.startswith("error: "), result.output
            assert result.stderr.strip().count("\n") == 0  # one line
            manifest = read_manifest(out)
            assert manifest["status"] == "failed" and manifest["error"]
            # The cause is named either way (torch's own message does not say it).
            assert "No space left on device" in result.stderr or f"the disk holding {out} is full" in result.stderr
            if name == "final":
                assert "No space left on device" in result.stderr and "No space" in manifest["error"]
                assert not (out / "model.safetensors").exists()  # nothing half-written left
            assert not list(out.glob("checkpoint-*")) and not lock_path(out).exists()
            shutil.rmtree(out)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---- 10: SIGTERM while loading ----

def test_sigterm_while_loading_is_one_line_and_130(tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "run"
    proc = ftcli_process(train(data, out), tmp_path)
    try:
        first = proc.stdout.readline()  # "ftcli train method=..." : loading starts
        assert "ftcli train" in first
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "interrupted" or "Traceback" not in stderr and stderr.strip().count("\n") == 0
    assert not out.exists() and not lock_path(out).exists()
