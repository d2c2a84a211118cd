"""Hostile round 3 (issue 26), inference, model loading, caches and signals: each case drives the real CLI on the
built-in tiny model and checks one clear line, the documented exit code, and that nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_small_alpaca

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(result) -> str:
    """The stderr of a failed command: exactly one `error:` line and no traceback."""
    err = result.stderr
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A full run and a LoRA run of one step each, and damaged copies of both (weights truncated / emptied)."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    root = tmp_path_factory.mktemp("hostile3")
    data = write_small_alpaca(root / "small.jsonl")
    pref = root / "pref.jsonl"
    pref.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": "no"}) + "\n"
                            for i in range(8)), encoding="utf-8")
    found = {"data": data, "pref": pref}
    for method in ("full", "lora"):
        out = root / method
        result = CliRunner().invoke(app, ["train", "--method", method, "--model", "builtin:tiny-llama", "--dataset",
                                          str(data), "--max-steps", "1", "--output-dir", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        found[method] = out
    found["dmg"] = root / "dmg"
    shutil.copytree(found["full"], found["dmg"])
    os.truncate(found["dmg"] / "model.safetensors", 3000)
    found["dmgl"] = root / "dmgl"
    shutil.copytree(found["lora"], found["dmgl"])
    os.truncate(found["dmgl"] / "adapter_model.safetensors", 0)
    return found


# ---- D12 D15: the walk (every command, a damaged model, a damaged adapter, an unwritable FTCLI_HOME) ----

def _walk(runs: dict[str, Path], target: Path, out: Path) -> dict[str, list[str]]:
    model = ["--model", str(target), "--dataset", str(runs["data"]), "--max-steps", "1"]
    return {
        "train": ["train", "--method", "full", *model, "--output-dir", str(out / "train")],
        "train-dpo-chain": ["train", "--objective", "dpo", "--method", "lora", "--model", str(target), "--dataset",
                            str(runs["pref"]), "--max-steps", "1", "--output-dir", str(out / "chain")],
        "warmup": ["warmup", "--method", "full", *model],
        "eval": ["eval", str(target), "--dataset", str(runs["data"])],
        "generate": ["generate", str(target), "--prompt", "Hi", "--output", str(out / "gen.jsonl")],
        "chat": ["chat", str(target), "--template", "model", "--output", str(out / "chat.jsonl")],
        "export": ["export", str(target), "--output", str(out / "export")],
    }


@pytest.mark.parametrize("which", ["dmg", "dmgl"])
def test_every_command_refuses_damaged_weights_in_one_line(cli, runs, tmp_path, which) -> None:
    target = runs[which]
    damaged = target / ("model.safetensors" if which == "dmg" else "adapter_model.safetensors")
    before = sorted(p.name for p in target.iterdir())
    for name, args in _walk(runs, target, tmp_path).items():
        result = cli(*args, input="Hi\n")
        assert result.exit_code == 4, (name, result.stderr)
        line = one_error_line(result)
        assert f"{damaged} is damaged" in line, (name, line)
        assert list(tmp_path.iterdir()) == [], (name, list(tmp_path.iterdir()))
    assert sorted(p.name for p in target.iterdir()) == before


def test_every_command_refuses_an_unwritable_ftcli_home_in_one_line(cli, runs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FTCLI_HOME", "/proc/ftcli-home")
    walk = _walk(runs, Path("builtin:tiny-llama"), tmp_path)
    del walk["export"]  # a bare model is no export source; the GGUF export of a run fetches into FTCLI_HOME
    walk["prepare"] = ["prepare", "--model", "builtin:tiny-llama", "--dataset", str(runs["data"])]
    walk["eval-run"] = ["eval", str(runs["full"]), "--dataset", str(runs["data"])]
    walk["export-gguf"] = ["export", str(runs["full"]), "--output", str(tmp_path / "gguf"), "--format", "gguf"]
    walk["inspect"] = ["inspect", "builtin:tiny-llama"]
    for name, args in walk.items():
        result = cli(*args, input="Hi\n")
        assert result.exit_code == 5, (name, result.stderr)
        line = one_error_line(result)
        assert "FTCLI_HOME /proc/ftcli-home cannot hold ftcli's cache" in line, (name, line)
        assert "cannot be created" in line, (name, line)
        assert list(tmp_path.iterdir()) == [], (name, list(tmp_path.iterdir()))


# ---- D17 R21: a model whose weights are NaN ----

@pytest.fixture(scope="module")
def nan_model(runs, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("nan") / "nanm"
    shutil.copytree(runs["full"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v * float("nan") for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def test_non_finite_outputs_are_one_line_in_generate_and_chat(cli, nan_model, tmp_path) -> None:
    for args in (["generate", nan_model, "--prompt", "Hi", "--temperature", "0.7"],
                 ["generate", nan_model, "--prompt", "Hi"],
                 ["chat", nan_model, "--template", "model"]):
        result = cli(*args, input="Hi\n")
        assert result.exit_code == 4, result.stderr
        assert "the model's outputs are not finite (NaN or inf)" in one_error_line(result)


def test_training_from_a_non_finite_start_says_so_at_load(cli, nan_model, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--method", "lora", "--model", nan_model, "--dataset", "builtin:alpaca-sample",
                 "--dataset-size", "8", "--max-steps", "1", "--output-dir", out)
    assert result.exit_code == 4, result.stderr
    line = one_error_line(result)
    assert "holds non-finite weights" in line and "learning-rate" not in line
    assert not out.exists()


# ---- D24 D25 R14 R15 R16 R20: input refused in one line ----

def test_chat_with_a_closed_stdin_is_one_line(runs) -> None:
    done = subprocess.run([sys.executable, "-m", "ftcli", "chat", str(runs["full"]), "--template", "model"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.close(0), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "stdin is closed" in done.stderr and "Traceback" not in done.stderr


def test_prompts_files_refused_in_one_line(cli, runs, tmp_path) -> None:
    cases = {"garbage.txt": (b"\xff\xfe garbage \x00\x01\n", ":1: not valid UTF-8"),
             "garbage.jsonl": (b'{"instruction": "a"}\n\xff\n', ":2: not valid UTF-8"),
             "null.jsonl": (b'{"instruction": "a"}\n{"instruction": null}\n', ":2: the prompt is empty"),
             "empty.jsonl": (b'{"instruction": ""}\n', ":1: the prompt is empty")}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        result = cli("generate", runs["full"], "--prompts-file", tmp_path / name)
        assert result.exit_code == 3, result.stderr
        assert f"{tmp_path / name}{expected}" in one_error_line(result)
    (tmp_path / "folder.txt").mkdir()
    result = cli("generate", runs["full"], "--prompts-file", tmp_path / "folder.txt")
    assert result.exit_code == 3 and "is a folder, not a file" in one_error_line(result)
    result = cli("generate", runs["full"], "--prompt", "Hi", "--output", "")
    assert result.exit_code == 2 and "pass a file path to --output" in one_error_line(result)


def test_compare_base_on_a_bare_model_is_refused_before_loading(cli, monkeypatch) -> None:
    import ftcli.inference.run as run

    monkeypatch.setattr(run, "load_target", lambda *a, **k: pytest.fail("loaded the model first"))
    result = cli("generate", "builtin:tiny-llama", "--prompt", "Hi", "--compare-base")
    assert result.exit_code == 2
    assert "--compare-base: builtin:tiny-llama is a model of its own" in one_error_line(result)


def test_chat_drops_the_carriage_return_of_crlf_input(cli, runs, tmp_path) -> None:
    out = tmp_path / "chat.jsonl"
    done = subprocess.run([sys.executable, "-m", "ftcli", "chat", str(runs["full"]), "--template", "model",
                           "--max-new-tokens", "2", "--output", str(out)], input=b"Hi\r\n", capture_output=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text().splitlines()[0])
    assert row["user"] == "Hi" and "\r" not in row["rendered_prompt"]


def test_a_turn_the_template_refuses_is_not_sent_and_the_chat_goes_on(runs, tmp_path) -> None:
    """R13: a system prompt the template refuses fails that turn only; `/system` alone clears it and the chat goes
    on (it ended the whole chat with exit 3)."""
    nosys = tmp_path / "nosys.jinja"
    nosys.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                     "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    out = tmp_path / "chat.jsonl"
    done = subprocess.run([sys.executable, "-m", "ftcli", "chat", str(runs["full"]), "--template", str(nosys),
                           "--max-new-tokens", "2", "--output", str(out)],
                          input=b"Hi\n/system Be terse.\nStill there?\n/system\nAnd now?\n", capture_output=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    stderr = " ".join(done.stderr.decode().split())
    assert "turn not sent: " in stderr and "no system role" in stderr and "the conversation so far is kept" in stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user"] for r in rows] == ["Hi", "And now?"]
    assert "Still there?" not in rows[1]["rendered_prompt"] and "Hi" in rows[1]["rendered_prompt"]


# ---- D13 R3 R4: Ctrl-C, SIGTERM and SIGHUP while answers stream ----

def _run_on_pty(args: list[str], sig: int, after: bytes, stdin_text: bytes = b"", settle: float = 3.0,
                timeout: float = 300, more: int = 300) -> tuple[int, str]:
    """`python -m ftcli ARGS` with a terminal for stdin/stdout/stderr; `sig` sent `settle` s after `after` shows
    and more output followed it (the answer streams). Returns (exit code, everything it printed)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", *map(str, args)], stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}, start_new_session=True)
    os.close(slave)
    if stdin_text:
        os.write(master, stdin_text)
    out, sent, start, closed = b"", None, time.time(), False
    while time.time() - start < timeout:
        ready, _, _ = select.select([master], [], [], 0.2)
        try:
            chunk = os.read(master, 65536) if ready else b""
            closed = ready and not chunk
            out += chunk
        except OSError:  # the child is gone and the terminal with it
            closed = True
        if sent is None and after in out and len(out.split(after, 1)[1]) >= more:
            time.sleep(settle)
            proc.send_signal(sig)
            sent = time.time()
        if proc.poll() is not None and (closed or not ready):
            break
    else:
        proc.kill()
    os.close(master)
    assert sent is not None, out.decode(errors="replace")
    return proc.wait(), out.decode(errors="replace")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_generate_streams_stops_the_answer_and_exits_130(runs, sig) -> None:
    code, out = _run_on_pty(["generate", runs["full"], "--prompt", "Hello", "--max-new-tokens", "3000"], sig,
                            after=b"on cpu")
    assert code == 130, out
    assert "interrupted" in out and "terminate called" not in out and "Traceback" not in out
    assert "--max-new-tokens 3,000 capped to" in out  # R5: the answer must fit the model's context


def test_a_prompt_longer_than_the_context_is_one_line(cli, runs) -> None:
    result = cli("generate", runs["full"], "--prompt", "word " * 5000)
    assert result.exit_code == 3, result.stderr
    assert "and the model's context holds 2,048" in one_error_line(result)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_chat_keeps_its_transcript_on_sigterm_and_sighup(runs, tmp_path, sig) -> None:
    out = tmp_path / "chat.jsonl"
    code, printed = _run_on_pty(["chat", runs["full"], "--template", "model", "--max-new-tokens", "4",
                                 "--output", out], sig, after=b"stop:", stdin_text=b"Hi\n", settle=1.0, more=0)
    assert code == 130, printed
    assert "terminate called" not in printed and "Traceback" not in printed
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["user"] for r in rows] == ["Hi"]


def test_generate_output_keeps_the_finished_rows_when_stopped(runs, tmp_path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hello.\nAdd 2 and 3.\nHello\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", "generate", str(runs["full"]), "--prompts-file",
                             str(prompts), "--max-new-tokens", "3000", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.suffix == ".partial" and p.stat().st_size for p in tmp_path.iterdir()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "kept the 1 finished row(s) of 3" in stderr, stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hello."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "p.txt"]


# ---- D23: the llama.cpp converter cache is verified against what was extracted ----

def test_a_damaged_converter_cache_is_fetched_again_or_refused_in_one_line(cli, runs, tmp_path, monkeypatch) -> None:
    from ftcli.export.gguf import convert

    first = cli("export", runs["lora"], "--output", tmp_path / "g1", "--format", "gguf", "--no-verify")
    assert first.exit_code == 0, first.stderr
    tree = convert.cached_tree()
    assert (tree / convert.TREE_RECORD).is_file()
    convert._verified.clear()
    os.truncate(tree / "conversion" / "base.py", 2000)
    again = cli("export", runs["lora"], "--output", tmp_path / "g2", "--format", "gguf", "--no-verify")
    assert again.exit_code == 0, again.stderr
    assert "replaced the damaged cached llama.cpp converter (conversion/base.py differs" in " ".join(
        again.stdout.split())
    assert convert.tree_problem(tree) is None
    convert._verified.clear()
    os.truncate(tree / "conversion" / "base.py", 2000)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    offline = cli("export", runs["lora"], "--output", tmp_path / "g3", "--format", "gguf", "--no-verify")
    assert offline.exit_code == 2, offline.stderr
    assert f"the cached llama.cpp converter in {tree} is damaged (conversion/base.py differs" in \
        one_error_line(offline)
    assert not (tmp_path / "g3").exists()
    convert._verified.clear()


# ---- R2: a stop request during DPO's reference pass is honoured between batches ----

def test_sigterm_during_the_dpo_reference_pass_stops_it(tmp_path) -> None:
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}, written out in words please?",
                                        "chosen": f"It is {2 * i}.", "rejected": "I do not know."}) + "\n"
                            for i in range(3000)), encoding="utf-8")
    out = tmp_path / "dpo"
    proc = subprocess.Popen([sys.executable, "-m", "ftcli", "train", "--objective", "dpo", "--method", "full", "--model",
                             "builtin:tiny-llama", "--dataset", str(data), "--max-steps", "2", "--batch-size", "2",
                             "--precompute-ref", "--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("model:"):
            time.sleep(2)
            proc.send_signal(signal.SIGTERM)
            sent = time.time()
            break
    rest = proc.communicate(timeout=600)[0]
    text = "".join(printed) + rest
    assert proc.returncode == 130, text
    assert "computed once and cached" not in text and "Traceback" not in text
    assert time.time() - sent < 60, text
    assert json.loads((out / "ftcli_run.json").read_text())["status"] == "interrupted"
