"""Shared fixtures: an isolated ftcli cache, the hub switched off, and a CLI runner.

Nothing here downloads: the tiny model and sample data are built by ftcli itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Set before any test imports transformers / datasets / huggingface_hub, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def ftcli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session, so the tiny model is built once and never read from the user's cache."""
    home = tmp_path_factory.mktemp("ftcli-home")
    os.environ["FTCLI_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def rich_reads_the_current_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich reads COLUMNS from the os.environ object it captured at import; `datasets.map(num_proc>1)` rebinds
    os.environ to a copy, after which an in-process test's setenv would no longer reach Rich (a real command starts
    afresh). Which tests ran before in the same process (a pytest-xdist worker takes whole files) must not matter."""
    from rich.console import Console

    monkeypatch.setattr(Console, "_environ", os.environ)


@pytest.fixture(scope="session")
def tiny_model_dir(ftcli_home: Path) -> Path:
    from ftcli.builtin import resolve_builtin_model

    return resolve_builtin_model("builtin:tiny-llama")


@pytest.fixture
def cli():
    """Run `ftcli ARGS...` in-process through Typer's test runner; returns the click Result."""
    from typer.testing import CliRunner

    from ftcli.cli import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


SMALL_ALPACA_ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5."},
    {"instruction": "Name a color.", "input": "", "output": "Blue is a color."},
    {"instruction": "Reverse the words.", "input": "red green blue", "output": "blue green red"},
    {"instruction": "Uppercase this.", "input": "quiet cat", "output": "QUIET CAT"},
    {"instruction": "Count the words.", "input": "one two three four", "output": "There are 4 words."},
    {"instruction": "Is 7 even or odd?", "input": "", "output": "7 is odd."},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
]


def write_small_alpaca(path: Path) -> Path:
    """Eight short Alpaca rows: small enough to memorise in a few dozen steps."""
    path.write_text("".join(json.dumps(r) + "\n" for r in SMALL_ALPACA_ROWS), encoding="utf-8")
    return path


@pytest.fixture
def small_alpaca(tmp_path: Path) -> Path:
    return write_small_alpaca(tmp_path / "small.jsonl")


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "ftcli_run.json").read_text())


def losses(run_dir: Path) -> list[float]:
    """Per-step training losses a run wrote to metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def probe_logits_of(model, run_dir: Path):
    """(logits of `model` on the run's probe input, the logits the run saved for it)."""
    import torch
    from safetensors.torch import load_file

    probe = load_file(str(run_dir / "probe.safetensors"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0].float()
    return logits, probe["logits"]
