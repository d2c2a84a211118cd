"""What ftcli writes and how it fails while writing: exports (locks, replacing an earlier export, a kill between
its renames, damaged sources), file modes under the umask, a full disk, unwritable places, empty output
paths, and usage errors as one line. Everything through the CLI on the built-in tiny model."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_small_alpaca

TINY = ["--model", "builtin:tiny-llama"]


def flat(text: str) -> str:
    return " ".join(text.split())


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return flat(lines[0])


def siblings(out: Path) -> list[str]:
    """What ftcli leaves beside an output folder: staging, set-aside and lock names."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.ftcli-*"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A full fine-tune with two checkpoints, trained under umask 027 (group may read, others nothing)."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    root = tmp_path_factory.mktemp("full")
    data = write_small_alpaca(root / "small.jsonl")
    previous = os.umask(0o027)
    try:
        result = CliRunner().invoke(app, ["train", "--method", "full", *TINY, "--dataset", str(data), "--max-steps", "2",
                                          "--save-steps", "1", "--output-dir", str(root / "run")],
                                    catch_exceptions=False)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stdout + result.stderr
    return root / "run"


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_outputs_get_the_mode_the_umask_gives(full_run: Path, cli, tmp_path: Path) -> None:
    # Before: safetensors and every atomically written JSON file came out 0600 whatever the umask.
    files = {name: mode for name, mode in modes(full_run).items() if (full_run / name).is_file()}
    assert {"model.safetensors", "probe.safetensors", "ftcli_run.json", "checkpoint-2/model.safetensors",
            "checkpoint-2/ftcli_checkpoint.json"} <= files.keys()
    assert {name: mode for name, mode in files.items() if mode != 0o640} == {}
    previous = os.umask(0o022)
    try:
        assert cli("export", full_run, "--output", tmp_path / "exported").exit_code == 0
    finally:
        os.umask(previous)
    exported = modes(tmp_path / "exported")
    assert exported and set(exported.values()) == {0o644}, exported


def test_a_checkpoint_of_a_run_exports_with_the_run_s_record(full_run: Path, cli, tmp_path: Path) -> None:
    # Before: "is neither a run folder nor an adapter folder", with no hint.
    result = cli("export", full_run / "checkpoint-1", "--output", tmp_path / "step1")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "step1" / "ftcli_export.json").read_text())
    assert record["source"].endswith("checkpoint-1") and record["method"] == "full"
    from safetensors.torch import load_file

    saved, exported = load_file(str(full_run / "checkpoint-1" / "model.safetensors")), \
        load_file(str(tmp_path / "step1" / "model.safetensors"))
    assert exported.keys() == saved.keys() and all((exported[k] == saved[k]).all() for k in saved)

    broken = tmp_path / "run-copy"
    shutil.copytree(full_run, broken)
    (broken / "checkpoint-2" / "ftcli_checkpoint.json").unlink()
    result = cli("export", broken / "checkpoint-2", "--output", tmp_path / "step2")
    assert result.exit_code == 4 and "not a complete checkpoint" in one_error_line(result)
    assert "checkpoint-1 instead" in one_error_line(result) and not (tmp_path / "step2").exists()


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_weights_file_in_the_source_is_one_line(full_run: Path, cli, tmp_path: Path, damage: str) -> None:
    source = tmp_path / "run"
    shutil.copytree(full_run, source, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[12:40] = b"#" * 28  # same size, header no longer JSON
        weights.write_bytes(bytes(data))
    result = cli("export", source, "--output", tmp_path / "out")
    assert result.exit_code == 4, result.stderr
    line = one_error_line(result)
    assert str(weights) in line and "damaged" in line
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


def test_a_deeply_nested_manifest_is_one_line(full_run: Path, cli, tmp_path: Path) -> None:
    source = tmp_path / "run"
    shutil.copytree(full_run, source, ignore=shutil.ignore_patterns("checkpoint-*"))
    (source / "ftcli_run.json").write_text("[" * 100000 + "]" * 100000)
    result = cli("export", source, "--output", tmp_path / "out")
    assert result.exit_code == 4 and "nested too deeply" in one_error_line(result)


def test_export_options_refused_before_anything_loads(full_run: Path, cli, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for size in ("0", "0GB", "0.0MB"):
        result = cli("export", full_run, "--output", tmp_path / "out", "--max-shard-size", size)
        assert result.exit_code == 2 and "more than zero" in one_error_line(result)
    # An empty --output (an unset $OUT) would mean the current folder; with --overwrite it replaced it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("the user's")
    for extra in ([], ["--overwrite"]):
        result = cli("export", full_run, "--output", "", *extra)
        assert result.exit_code == 2 and "--output is empty" in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    result = cli("generate", full_run, "--prompt", "hi", "--output", "")
    assert result.exit_code == 2 and "--output is empty" in one_error_line(result)


def test_unwritable_places_that_os_access_approves_are_refused(full_run: Path, cli, small_alpaca: Path) -> None:
    # As root, os.access(W_OK) says yes to /proc and /sys; writing there fails after the model has loaded.
    result = cli("export", full_run, "--output", "/proc/ftcli-export")
    assert result.exit_code == 5 and "not writable" in one_error_line(result)
    result = cli("train", "--method", "lora", *TINY, "--dataset", small_alpaca, "--output-dir", "/sys/ftcli-run")
    assert result.exit_code == 5 and "not writable" in one_error_line(result)
    result = cli("generate", full_run, "--prompt", "hi", "--output", "/proc/answers.jsonl")
    assert result.exit_code == 5 and "not writable" in one_error_line(result)


def test_one_export_at_a_time_per_folder(full_run: Path, cli, tmp_path: Path) -> None:
    from ftcli.files import exclusive, lock_path

    out = tmp_path / "model"
    with exclusive(out, "--output"):  # another export writing this folder (same host: a flock held)
        result = cli("export", full_run, "--output", out)
    assert result.exit_code == 5
    line = one_error_line(result)
    assert f"--output {out} is in use by ftcli pid {os.getpid()}" in line and not out.exists()
    # A lock file left by a process that died binds nobody: no flock is held on it.
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": os.uname().nodename}))
    result = cli("export", full_run, "--output", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").exists() and siblings(out) == []


def test_an_export_is_on_disk_before_it_is_swapped_in(full_run: Path, cli, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the export was renamed into place without fsync; after a power cut it could hold empty files.
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "model"
    assert cli("export", full_run, "--output", out).exit_code == 0
    monkeypatch.setattr(os, "fsync", real_fsync)
    staged = [Path(p) for p in synced if ".model.ftcli-export." in p]
    for name in [p.name for p in out.iterdir()]:
        assert any(p.name == name for p in staged), (name, synced)  # every file, in the staging folder
    assert any(p.name.startswith(".model.ftcli-export.") for p in staged)  # the folder itself
    assert synced[-1] == str(tmp_path)  # and the parent, after the rename


KILL_BETWEEN_RENAMES = """
import os, sys
import ftcli.export.staging as staging
staging._exchange = lambda new, out: False  # the filesystem has no atomic exchange: two renames
rename = os.rename
def rename_then_die(src, dst):
    rename(src, dst)
    if ".ftcli-replaced." in str(dst):
        os._exit(9)  # killed between the two renames: no handler, no finally runs
staging.os.rename = rename_then_die
from ftcli.cli import app
app(sys.argv[1:])
"""


def test_an_export_killed_between_its_renames_loses_nothing(full_run: Path, cli, tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert cli("export", full_run, "--output", out).exit_code == 0
    (out / "ours.txt").write_text("the previous export")
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, "export", str(full_run), "--output", str(out),
                           "--overwrite"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists()  # the moment the old export is set aside and the new one not yet in place
    [aside] = [name for name in siblings(out) if ".ftcli-replaced." in name]
    assert (tmp_path / aside / "ours.txt").exists()

    # Before: the next export deleted the set-aside copy. Now it is put back first; without --overwrite the
    # export is then refused, the previous export in place.
    result = cli("export", full_run, "--output", out)
    assert result.exit_code == 5 and "put back" in flat(result.stdout), result.stdout + result.stderr
    assert (out / "ours.txt").read_text() == "the previous export" and siblings(out) == []
    result = cli("export", full_run, "--output", out, "--overwrite")
    assert result.exit_code == 0 and not (out / "ours.txt").exists() and siblings(out) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs (root can mount one); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def test_a_full_disk_is_one_line_and_leaves_nothing(full_run: Path, cli, small_disk: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fill(small_disk, leave=600 * 1024)  # less than the 1.1 MiB model
    out = small_disk / "model"
    result = cli("export", full_run, "--output", out)
    assert result.exit_code == 5, result.stdout + result.stderr
    assert "no space left on device" in one_error_line(result)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]

    # Building the built-in model into a full cache.
    monkeypatch.setenv("FTCLI_HOME", str(small_disk / "home"))
    result = cli("inspect", "builtin:tiny-llama")
    assert result.exit_code == 5 and "no space left on device" in one_error_line(result)
    built = [p for p in (small_disk / "home").rglob("*") if p.is_file()]
    assert built == []


@pytest.mark.parametrize("args, expected", [
    (["train", "--batch-size", "x"], "Invalid value for '--batch-size'"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["export"], "Missing argument 'source'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors_are_one_line(cli, args: list[str], expected: str) -> None:
    # Before: click's boxed report over five lines (usage, try, a box of the message).
    result = cli(*args)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert expected in line and "--help'" in line and "╭" not in result.stderr
