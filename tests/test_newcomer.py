"""Issue 28, a newcomer's edge cases: each through the real CLI, on the tiny model and files made here.

Commands that must answer "at once" run in a subprocess where torch, transformers and datasets cannot
be imported: reaching them would end in an ImportError traceback instead of the one-line answer.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftcli.errors import EXIT_CONFIG, EXIT_DATA, EXIT_MODEL

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "builtin:tiny-llama"]
NO_HEAVY = ("import sys; sys.modules.update(torch=None, transformers=None, datasets=None); "
            "from ftcli.cli import entrypoint; sys.argv = ['ftcli'] + sys.argv[1:]; entrypoint()")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **extra}
    return env


def light(*args: object, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`ftcli ARGS` in a fresh process that cannot import torch, transformers or datasets."""
    return subprocess.run([sys.executable, "-c", NO_HEAVY, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env(**env), timeout=120)


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- 1. no surprise downloads ------------------------------------------------------------------------------


def test_every_hub_default_has_its_facts() -> None:
    from ftcli.config import METHOD_DEFAULTS, RunConfig
    from ftcli.preflight import HUB_FACTS

    assert {d["model"] for d in METHOD_DEFAULTS.values()} <= set(HUB_FACTS)
    assert RunConfig.model_fields["dataset"].default in HUB_FACTS


def test_a_default_model_is_named_with_its_size_and_refused_offline_at_once(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = light("train", "--method", "qlora", "--dataset", "builtin:alpaca-sample", "--output-dir",
                   tmp_path / "run", cwd=tmp_path, HF_HOME=str(tmp_path / "hf"))
    seconds = time.perf_counter() - started
    note = next(line for line in result.stderr.splitlines() if line.startswith("note:"))
    assert "no --model given" in note and "meta-llama/Llama-3.1-70B-Instruct" in note and "70.6B" in note
    assert "GB download" in note and "gated" in note and "hf auth login" in note
    one_line(result, EXIT_MODEL, "not in the local cache", "HF_HUB_OFFLINE=1", "pass --model")
    assert seconds < 30 and not (tmp_path / "run").exists()


def test_a_default_dataset_is_named_and_refused_offline_at_once(tmp_path: Path) -> None:
    result = light("prepare", *TINY, cwd=tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert "note: no --dataset given: using tatsu-lab/alpaca from the hub (52,002 rows" in result.stderr
    one_line(result, EXIT_DATA, "tatsu-lab/alpaca", "not in the local cache", "--dataset")


# ---- 2. a path-looking TARGET that does not exist ----------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["generate", "runs/chat-lora-typo", "--prompt", "hi"],
    ["chat", "runs/chat-lora-typo"],
    ["eval", "runs/chat-lora-typo", "--dataset", "builtin:alpaca-sample"],
    ["export", "runs/chat-lora-typo", "--output", "out"],
    ["inspect", "runs/chat-lora-typo"],
    ["train", "--model", "runs/chat-lora-typo", "--dataset", "builtin:alpaca-sample", "--output-dir", "out"],
    ["warmup", "--model", "runs/chat-lora-typo", "--dataset", "builtin:alpaca-sample"],
    ["prepare", "--model", "runs/chat-lora-typo", "--dataset", "builtin:alpaca-sample"],
])
def test_a_mistyped_run_folder_is_does_not_exist_at_once(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "runs" / "chat-lora").mkdir(parents=True)
    result = light(*args, cwd=tmp_path)
    one_line(result, EXIT_CONFIG, "runs/chat-lora-typo does not exist", "did you mean runs/chat-lora?")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["./nope", "~/no-such-ftcli-folder", "a/b/c", "runs/x"])
def test_path_looking_targets_never_reach_the_hub(tmp_path: Path, target: str) -> None:
    (tmp_path / "runs").mkdir()
    one_line(light("inspect", target, cwd=tmp_path), EXIT_CONFIG, "does not exist")
    one_line(light("generate", target, "--prompt", "hi", cwd=tmp_path), EXIT_CONFIG, "does not exist")


# ---- 3. bare ftcli -----------------------------------------------------------------------------------------


def test_bare_ftcli_prints_the_help_and_no_error_line(cli) -> None:
    result = cli()
    assert result.exit_code == 2  # click's convention for "no command given"
    assert "Usage:" in result.stdout and "train" in result.stdout
    assert "error" not in result.stderr


# ---- 4. CSV headers with stray spaces, inspect --columns ---------------------------------------------------


@pytest.fixture
def spaced_csv(tmp_path: Path) -> Path:
    path = tmp_path / "qa.csv"
    path.write_text("Question,Answer \nWhat is 2+2?,4\nCapital of France?,Paris\n", encoding="utf-8")
    return path


def test_a_header_with_a_trailing_space_is_mappable_and_quoted(cli, spaced_csv: Path, tmp_path: Path) -> None:
    for mapping in ("instruction=Question,output=Answer", "instruction=Question,output=Answer "):
        result = cli("prepare", *TINY, "--dataset", spaced_csv, "--columns", mapping, "--output-dir",
                     tmp_path / f"p{len(mapping)}")
        assert result.exit_code == 0, result.output
    result = cli("prepare", *TINY, "--dataset", spaced_csv, "--columns", "instruction=Question,output=Answr")
    assert result.exit_code == EXIT_DATA
    assert "columns found: 'Question', 'Answer '" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_inspect_takes_columns_and_format(cli, spaced_csv: Path) -> None:
    result = cli("inspect", spaced_csv, "--columns", "instruction=Question,output=Answer", "--format", "alpaca",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"]["format"] == "alpaca" and report["data"]["rows"] == 2
    text = "".join(p["text"] for p in report["example"]["pieces"])
    assert "What is 2+2?" in text and report["example"]["source_row"] == 0


# ---- 5. chat: Ctrl-C stops the answer, Ctrl-D ends on a new line, words wrapped whole ----------------------


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return needle in seen


def _reap(pid: int, timeout: float = 30) -> int:
    """The child's wait status; a child still running after `timeout` (a check above failed while it waits for
    input) is killed, so a failing test fails instead of waiting for it forever."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_chat_ctrl_c_stops_the_answer_and_ctrl_d_ends_on_a_new_line(tmp_path: Path) -> None:
    import fcntl
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: ftcli chat on a 60-column terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "ftcli", "chat", "builtin:tiny-llama",
                                   "--max-new-tokens", "5000", "--temperature", "0", "--output", "talk.jsonl"],
                  _env(COLUMNS="60", LINES="30", TERM="xterm"))
    # greedy: the tiny model's greedy answer runs to the context's end (2,035 tokens), where a sampled one
    # can meet its end-of-sequence token before Ctrl-C arrives on a fast machine
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 60, 0, 0))
    seen = bytearray()
    try:
        assert _read_until(fd, b"you>", seen, 120), seen.decode(errors="replace")
        os.write(fd, b"hello there\r")
        assert _read_until(fd, b"context of 2,048", seen, 60), seen.decode(errors="replace")
        start = len(seen)
        deadline = time.monotonic() + 60
        while len(seen) - start < 20 and time.monotonic() < deadline:  # part of the answer has streamed
            _read_until(fd, b"\x00never", seen, 0.5)
        os.write(fd, b"\x03")
        assert _read_until(fd, b"answer stopped", seen, 30), seen.decode(errors="replace")
        deadline = time.monotonic() + 30
        while b"you>" not in seen[seen.index(b"answer stopped"):] and time.monotonic() < deadline:
            _read_until(fd, b"\x00never", seen, 0.5)  # back at the prompt
        os.write(fd, b"/exit\r")
        _read_until(fd, b"\x00never", seen, 5)
    finally:
        status = _reap(pid)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
    assert b"you>" in seen[seen.index(b"answer stopped"):]
    assert (tmp_path / "talk.jsonl").read_text() == ""  # the stopped answer is not in the conversation

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "ftcli", "chat", "builtin:tiny-llama"],
                  _env(COLUMNS="60", LINES="30", TERM="xterm"))
    seen = bytearray()
    try:
        assert _read_until(fd, b"you>", seen, 120), seen.decode(errors="replace")
        os.write(fd, b"\x04")
        _read_until(fd, b"\x00never", seen, 10)
    finally:
        status = _reap(pid)
    assert os.waitstatus_to_exitcode(status) == 0
    tail = re.sub(rb"\x1b\[[0-9;]*m|\r", b"", bytes(seen[seen.rindex(b"you>"):]))
    assert tail.rstrip(b" ").startswith(b"you>") and tail.replace(b" ", b"").startswith(b"you>\n"), tail


def test_streamed_words_are_wrapped_whole() -> None:
    from ftcli.inference.stream import WordWrap

    out: list[str] = []
    wrap = WordWrap(out.append, width=20)
    for piece in ["The qu", "ick brown fox jum", "ps over the lazy dog again\nand ", "again"]:
        wrap(piece)
    wrap.finish()
    lines = "".join(out).split("\n")
    assert all(len(line) <= 20 for line in lines), lines
    words = "The quick brown fox jumps over the lazy dog again and again".split()
    assert " ".join(" ".join(lines).split()) == " ".join(words)
    assert all(word in words for line in lines for word in line.split())


# ---- 6. no bitsandbytes noise ------------------------------------------------------------------------------


def test_generate_neither_imports_bitsandbytes_nor_prints_its_notices(tmp_path: Path) -> None:
    code = ("import sys, atexit; atexit.register(lambda: sys.stderr.write('BNB_IMPORTED=%s\\n' % "
            "(sys.modules.get('bitsandbytes') is not None))); from ftcli.cli import entrypoint; "
            "sys.argv = ['ftcli'] + sys.argv[1:]; entrypoint()")
    result = subprocess.run([sys.executable, "-c", code, "generate", "builtin:tiny-llama", "--prompt", "hi",
                             "--max-new-tokens", "2"], capture_output=True, text=True, cwd=tmp_path, env=_env(),
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "BNB_IMPORTED=False" in result.stderr
    for noise in ("publisher trust", "kernels-community", "gemm_4bit", "bitsandbytes"):
        assert noise not in result.stderr, result.stderr


# ---- 7. prepare and inspect details ------------------------------------------------------------------------


def test_prepare_cache_hit_reports_padding_at_the_batch_size_asked(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x " * (i + 1), "output": "y " * (3 * i + 1)}
                                              for i in range(12)])
    first = cli("prepare", *TINY, "--dataset", data, "--batch-size", "4")
    assert first.exit_code == 0 and "padding at batch size 4" in first.stdout, first.output
    hit = cli("prepare", *TINY, "--dataset", data, "--batch-size", "2")
    assert hit.exit_code == 0 and "cache hit" in hit.stdout, hit.output
    assert "padding at batch size 2" in hit.stdout and "batch size 4" not in hit.stdout


def test_preference_pairs_given_to_sft_get_the_dpo_hint(cli, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 3)
    result = cli("prepare", *TINY, "--dataset", data)
    assert result.exit_code == EXIT_DATA
    assert "preference pairs" in result.stderr and "--objective dpo" in result.stderr


@pytest.mark.parametrize("command", ["prepare", "train", "warmup", "eval"])
def test_a_missing_data_file_is_reported_before_the_imports(tmp_path: Path, command: str) -> None:
    args = {"eval": ["builtin:tiny-llama"], "train": [*TINY, "--output-dir", "out"]}.get(command, TINY)
    result = light(command, *args, "--dataset", "nope.jsonl", cwd=tmp_path)
    one_line(result, EXIT_DATA, "nope.jsonl does not exist")


def test_inspect_example_0_is_the_first_row_of_the_file(cli, tmp_path: Path) -> None:
    rows = [{"instruction": f"Question number {i}", "output": f"Answer {i}"} for i in range(6)]
    data = write_jsonl(tmp_path / "six.jsonl", rows)
    for index in (0, 5):
        result = cli("inspect", data, "--example", index)
        assert result.exit_code == 0, result.output
        assert f"Question number {index}" in result.stdout and f"row {index} of the file" in result.stdout
    # A dropped row (empty answer): which file row an example is cannot be known; say it is the shuffled order.
    write_jsonl(data, [*rows, {"instruction": "no answer", "output": ""}])
    result = cli("inspect", data, "--example", "0")
    assert result.exit_code == 0 and "shuffled with seed" in result.stdout, result.output


def test_one_eval_flag_needs_an_eval_set(cli, tmp_path: Path) -> None:
    one = cli("train", *TINY, "--dataset", "builtin:alpaca-sample", "--early-stopping-patience", "2",
              "--output-dir", tmp_path / "r")
    assert one.exit_code == EXIT_CONFIG and "--early-stopping-patience needs an eval set" in one.stderr
    two = cli("train", *TINY, "--dataset", "builtin:alpaca-sample", "--early-stopping-patience", "2", "--load-best",
              "--output-dir", tmp_path / "r")
    assert two.exit_code == EXIT_CONFIG and "--load-best need an eval set" in two.stderr
