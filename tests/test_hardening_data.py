"""Issue 18, data part: `prepare` and the prepared-data cache never touch what is not theirs, never trust
what does not match, and end every failure in one line (build folders, cache keys, damaged files, locks,
fsync, output paths, SIGTERM, a full disk, BOMs, mixed formats, deep JSON, broken templates)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import SMALL_ALPACA_ROWS, write_small_alpaca
from ftcli.errors import EXIT_CONFIG, EXIT_DATA, EXIT_INTERRUPTED, EXIT_OUTPUT
from test_errors import assert_one_line_error

TINY = ["--model", "builtin:tiny-llama"]
MANIFEST = "ftcli_prepared.json"
CHAT_ROWS = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
             {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wrapping: the long cache paths the output names are read back whole."""
    from ftcli.console import console

    monkeypatch.setattr(console, "width", 1000)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepared_folder(result) -> Path:
    """The folder a successful `prepare` printed (cache hit or build)."""
    assert result.exit_code == 0, result.stdout + result.stderr
    words = " ".join(result.stdout.split())
    marker = "(cache hit): " if "already prepared" in words else "prepared "
    return Path(words.split(marker, 1)[1].split(" ")[0])


def hidden_leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def stale_build(parent: Path, target: str, marker: bool = True, n: int = 0) -> Path:
    """A build folder as a killed prepare (pid 99999999 never runs) leaves it."""
    build = parent / f".{target}.ftcli-build.{socket.gethostname()}.99999999.{n}"
    (build / "data").mkdir(parents=True)
    if marker:
        (build / "ftcli-build.json").write_text(json.dumps(
            {"target": str((parent / target).absolute()), "host": socket.gethostname(), "pid": 99999999}))
    return build


# ---- 1. clean-up touches only ftcli's own build folders of the target --------------------------------------------


def test_cleanup_removes_only_ftcli_builds_of_the_target(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    parent = tmp_path / "outs"
    parent.mkdir()
    users = [".photos.old-2023", ".x.tmp-99999999", ".out.work-99999999", ".out.old-99999999", ".out.tmp-99999999"]
    for name in users:
        (parent / name).mkdir()
        (parent / name / "keep.txt").write_text("mine")
    imitation = stale_build(parent, "out", marker=False)  # ftcli's name, but no marker: not provably ftcli's
    other_target = stale_build(parent, "other")
    own = stale_build(parent, "out", n=1)
    result = cli("prepare", *TINY, "--dataset", data, "--output-dir", parent / "out")
    assert result.exit_code == 0, result.stdout + result.stderr
    for name in users:
        assert (parent / name / "keep.txt").read_text() == "mine", name
    assert imitation.is_dir() and other_target.is_dir()
    assert not own.exists()
    assert (parent / "out" / MANIFEST).is_file()


def test_a_build_killed_between_its_renames_gives_the_old_folder_back(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "small.jsonl")
    first = tmp_path / "first"
    assert cli("prepare", *TINY, "--dataset", data, "--output-dir", first).exit_code == 0
    build = stale_build(tmp_path, "out")
    shutil.copytree(first, build / "old")  # killed after setting the old "out" aside, before the new one arrived
    result = cli("prepare", *TINY, "--dataset", data, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, EXIT_OUTPUT, "exists and is not empty")  # the old one is back, and kept
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == json.loads((first / MANIFEST).read_text())
    assert not build.exists()


def test_interrupt_between_the_renames_of_overwrite_keeps_the_old_folder(cli, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import ftcli.data.cache as cache

    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "out"
    assert cli("prepare", *TINY, "--dataset", data, "--output-dir", out).exit_code == 0
    before = (out / MANIFEST).read_text()
    real_replace = os.replace

    def interrupted_second_rename(src, dst):
        if Path(src).name == "data" and Path(dst) == out:
            raise KeyboardInterrupt  # Ctrl-C / SIGTERM right after the old folder was set aside
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", interrupted_second_rename)
    result = cli("prepare", *TINY, "--dataset", data, "--output-dir", out, "--overwrite", "--seed", "7")
    monkeypatch.setattr(cache.os, "replace", real_replace)
    assert result.exit_code == EXIT_INTERRUPTED
    assert (out / MANIFEST).read_text() == before
    assert hidden_leftovers(tmp_path, "out") == []


# ---- 2. the cache key is the hash of the bytes parsed; entries whose fingerprints disagree are rebuilt ------------


def test_data_changed_between_hash_and_read_is_filed_under_what_was_read(cli, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import ftcli.data.prepare as prep

    data = tmp_path / "changing.jsonl"
    eight = "".join(json.dumps({**r, "output": r["output"] + " (v1)"}) + "\n" for r in SMALL_ALPACA_ROWS)
    three = "".join(json.dumps({**r, "output": r["output"] + " (v2)"}) + "\n" for r in SMALL_ALPACA_ROWS[:3])
    data.write_text(eight)
    original = prep._read

    def changed_meanwhile(config):
        data.write_text(three)  # another program rewrites the file after it was hashed, before it is parsed
        return original(config)

    monkeypatch.setattr(prep, "_read", changed_meanwhile)
    first = prepared_folder(cli("prepare", *TINY, "--dataset", data))
    monkeypatch.setattr(prep, "_read", original)
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["stats"]["rows_read"] == 3
    assert manifest["source"]["fingerprint"] == "sha256:" + hashlib.sha256(three.encode()).hexdigest()
    data.write_text(eight)  # the old content again: its entry must hold its own eight rows
    result = cli("prepare", *TINY, "--dataset", data)
    assert "already prepared" not in result.stdout
    assert json.loads((prepared_folder(result) / MANIFEST).read_text())["stats"]["rows_read"] == 8
    data.write_text(three)
    result = cli("prepare", *TINY, "--dataset", data)
    assert "already prepared" in result.stdout and prepared_folder(result) == first


def test_an_entry_whose_fingerprint_disagrees_with_its_key_is_rebuilt(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "fp.jsonl", [{**r, "output": r["output"] + " fp"} for r in SMALL_ALPACA_ROWS])
    entry = prepared_folder(cli("prepare", *TINY, "--dataset", data))
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["source"]["fingerprint"] = "sha256:" + "0" * 64  # filed under other content (an older ftcli's bug)
    (entry / MANIFEST).write_text(json.dumps(manifest))
    result = cli("prepare", *TINY, "--dataset", data)
    assert "already prepared" not in result.stdout and "fingerprint does not match" in result.stdout
    assert prepared_folder(result) == entry
    assert json.loads((entry / MANIFEST).read_text())["source"]["fingerprint"] == manifest["key_fields"]["source"]


# ---- 3. a damaged prepared file is found: a cache entry rebuilt, an explicit folder refused --------------------


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))  # same size, other content


def test_damaged_cache_entry_is_rebuilt(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "dmg.jsonl", [{**r, "output": r["output"] + " dmg"} for r in SMALL_ALPACA_ROWS])
    entry = prepared_folder(cli("prepare", *TINY, "--dataset", data))
    arrow = next(entry.glob("*.arrow"))
    good = arrow.read_bytes()
    _flip_byte(arrow)
    result = cli("prepare", *TINY, "--dataset", data)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "already prepared" not in result.stdout and "damaged" in result.stdout and arrow.name in result.stdout
    assert arrow.read_bytes() == good  # rebuilt: the same tokens again


def test_damaged_prepared_folder_is_refused_naming_the_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    assert cli("prepare", *TINY, "--dataset", write_small_alpaca(tmp_path / "s.jsonl"), "--output-dir", out) \
        .exit_code == 0
    arrow = next(out.glob("*.arrow"))
    _flip_byte(arrow)
    result = cli("prepare", *TINY, "--dataset", out)
    assert_one_line_error(result, EXIT_DATA, str(arrow), "damaged", "--overwrite")
    arrow.write_bytes(arrow.read_bytes()[:100])  # truncated
    assert_one_line_error(cli("prepare", *TINY, "--dataset", out), EXIT_DATA, str(arrow), "bytes")


# ---- 4. locks: an explicit folder being written is refused; a cache entry being built is waited for ------------


def test_output_dir_being_prepared_by_another_is_refused(cli, tmp_path: Path) -> None:
    from ftcli.files import exclusive

    out = tmp_path / "busy"
    with exclusive(out, "--output-dir"):
        result = cli("prepare", *TINY, "--dataset", write_small_alpaca(tmp_path / "s.jsonl"), "--output-dir", out)
    assert_one_line_error(result, EXIT_OUTPUT, f"--output-dir {out} is in use by ftcli pid {os.getpid()}")
    assert not out.exists()


def test_second_identical_prepare_waits_for_the_first_then_reuses_it(cli, tmp_path: Path) -> None:
    from ftcli.files import exclusive

    data = write_jsonl(tmp_path / "wait.jsonl", [{**r, "output": r["output"] + " w"} for r in SMALL_ALPACA_ROWS])
    entry = prepared_folder(cli("prepare", *TINY, "--dataset", data))
    aside = tmp_path / "aside"
    os.replace(entry, aside)  # the entry is "being built" by another prepare, which publishes it in a moment
    held = threading.Event()

    def other_prepare() -> None:
        with exclusive(entry, "prepared-data cache entry"):
            held.set()
            time.sleep(1.0)
            os.replace(aside, entry)

    thread = threading.Thread(target=other_prepare)
    thread.start()
    held.wait(10)
    try:
        result = cli("prepare", *TINY, "--dataset", data)
    finally:
        thread.join()
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "waiting for ftcli pid" in " ".join(result.stdout.split())
    assert "already prepared" in result.stdout and prepared_folder(result) == entry


# ---- 5. prepared data is fsynced before the rename that publishes it --------------------------------------------


def test_prepared_files_and_folders_are_fsynced_before_publishing(cli, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "synced"
    assert cli("prepare", *TINY, "--dataset", write_small_alpaca(tmp_path / "s.jsonl"), "--output-dir", out) \
        .exit_code == 0
    monkeypatch.setattr(os, "fsync", real_fsync)
    in_build = [Path(p) for p in synced if ".synced.ftcli-build." in p]
    for name in [p.name for p in out.iterdir()]:
        assert any(p.name == name and p.parent.name == "data" for p in in_build), (name, synced)
    assert any(p.name == "data" for p in in_build)  # the folder itself
    assert str(tmp_path) in synced  # and the parent, after the rename


# ---- 6. --output-dir that is a file, empty, or a folder ftcli did not write ------------------------------------


def test_output_dir_that_is_a_file_or_empty_or_foreign(cli, tmp_path: Path) -> None:
    data = write_small_alpaca(tmp_path / "s.jsonl")
    work = tmp_path / "work"
    work.mkdir()
    target = work / "notes.txt"
    target.write_text("precious")
    result = cli("prepare", *TINY, "--dataset", data, "--output-dir", target)
    assert_one_line_error(result, EXIT_OUTPUT, f"--output-dir {target} is a file")
    assert target.read_text() == "precious" and sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert_one_line_error(cli("prepare", *TINY, "--dataset", data, "--output-dir", ""), EXIT_CONFIG,
                          "--output-dir is empty")
    result = cli("prepare", *TINY, "--dataset", data, "--output-dir", work, "--overwrite")
    assert_one_line_error(result, EXIT_OUTPUT, "not a dataset ftcli prepared")
    assert target.read_text() == "precious" and sorted(p.name for p in work.iterdir()) == ["notes.txt"]


# ---- 7. SIGTERM ends prepare like Ctrl-C (a real process) ------------------------------------------------------


def test_sigterm_stops_prepare_in_one_line_and_leaves_no_build(tmp_path: Path, ftcli_home: Path) -> None:
    rows = [{"instruction": f"Echo {i} " + "w " * (i % 50), "input": "", "output": f"{i} " * 30}
            for i in range(20_000)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "out"
    env = {**os.environ, "FTCLI_NUM_PROC": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", "prepare", *TINY, "--dataset", str(data),
                             "--output-dir", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.ftcli-build.*")):
        assert proc.poll() is None, "prepare finished before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert stderr.strip() == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]  # no build folder, no lock, no output


# ---- 8. a full disk: one line, nothing half-written --------------------------------------------------------------


def test_full_disk_leaves_nothing_half_written(cli, tmp_path: Path) -> None:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = cli("prepare", *TINY, "--dataset", "builtin:alpaca-sample", "--output-dir", mnt / "out")
        assert_one_line_error(result, EXIT_OUTPUT, "no space left", str(mnt / "out"))
        assert list(mnt.iterdir()) == []
    finally:
        unmounted = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert unmounted.returncode == 0, f"a file on the full disk is still open: {unmounted.stderr}"


# ---- 9. byte-order marks --------------------------------------------------------------------------------------


def test_files_with_a_utf8_bom_are_read(cli, tmp_path: Path) -> None:
    bom = "\ufeff"
    csv_file = tmp_path / "bom.csv"
    csv_file.write_text(bom + "instruction,input,output\n" + "".join(
        f"{r['instruction']},{r['input']},{r['output'].replace(',', '')}\n" for r in SMALL_ALPACA_ROWS),
        encoding="utf-8")
    jsonl_file = tmp_path / "bom.jsonl"
    jsonl_file.write_text(bom + "".join(json.dumps(r) + "\n" for r in SMALL_ALPACA_ROWS), encoding="utf-8")
    json_file = tmp_path / "bom.json"
    json_file.write_text(bom + json.dumps(SMALL_ALPACA_ROWS), encoding="utf-8")
    for path in (csv_file, jsonl_file, json_file):
        out = tmp_path / f"out-{path.suffix[1:]}"
        result = cli("prepare", *TINY, "--dataset", path, "--output-dir", out)
        assert result.exit_code == 0, (path, result.stdout + result.stderr)
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["format"] == "alpaca" and manifest["stats"]["rows_kept"] == len(SMALL_ALPACA_ROWS)


# ---- 10. a folder mixing formats is refused, naming each file's format ------------------------------------------


def test_folder_mixing_formats_is_refused(cli, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_small_alpaca(folder / "a.jsonl")
    write_jsonl(folder / "b.jsonl", CHAT_ROWS)
    result = cli("prepare", *TINY, "--dataset", folder, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, EXIT_DATA, "mixes formats", f"{folder / 'a.jsonl'}: 8 alpaca rows",
                          f"{folder / 'b.jsonl'}: 2 chat rows")
    assert not (tmp_path / "out").exists()
    one_file = write_jsonl(tmp_path / "one.jsonl", [*SMALL_ALPACA_ROWS[:2], CHAT_ROWS[0]])  # within one file too
    assert_one_line_error(cli("prepare", *TINY, "--dataset", one_file, "--output-dir", tmp_path / "out"),
                          EXIT_DATA, "mixes formats", "1 chat row (from row 3)")


# ---- 11. deeply nested JSON --------------------------------------------------------------------------------------


def test_deeply_nested_json_is_one_line_naming_the_file(cli, tmp_path: Path) -> None:
    deep = "[" * 5000 + "]" * 5000
    jsonl_file = tmp_path / "deep.jsonl"
    jsonl_file.write_text(json.dumps(SMALL_ALPACA_ROWS[0]) + "\n" + '{"instruction": "x", "output": "y", "input": '
                          + deep + "}\n")
    assert_one_line_error(cli("prepare", *TINY, "--dataset", jsonl_file, "--output-dir", tmp_path / "o1"),
                          EXIT_DATA, f"{jsonl_file}:2", "nested too deeply")
    json_file = tmp_path / "deep.json"
    json_file.write_text("[" + json.dumps(SMALL_ALPACA_ROWS[0]) + ', {"instruction": "x", "output": "y", "input": '
                         + deep + "}]")
    assert_one_line_error(cli("prepare", *TINY, "--dataset", json_file, "--output-dir", tmp_path / "o2"),
                          EXIT_DATA, str(json_file), "nested too deeply")
    middling = tmp_path / "middling.jsonl"  # JSON reads it, Arrow cannot store it
    middling.write_text(json.dumps(SMALL_ALPACA_ROWS[0]) + "\n" + '{"instruction": "x", "output": "y", "extra": '
                        + "[" * 300 + "]" * 300 + "}\n")
    assert_one_line_error(cli("prepare", *TINY, "--dataset", middling, "--output-dir", tmp_path / "o3"),
                          EXIT_DATA, f"{middling}: row 2", "nested 301 levels deep")


# ---- 12. a Jinja template with a syntax error is blamed on the template -----------------------------------------


def test_template_syntax_error_names_the_file_and_line(cli, tmp_path: Path) -> None:
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}\n{{ m['role'] }}: {{ m['content'] }}\n{% if m.role == %}\n"
                        "{% endfor %}\n")
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    result = cli("prepare", *TINY, "--dataset", data, "--template", template, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, EXIT_CONFIG, f"--template {template}:3: Jinja syntax error")
    assert not (tmp_path / "out").exists()
