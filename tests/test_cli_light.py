"""`ftcli --help` and `ftcli train --help` must not import the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ftcli import __version__

HEAVY = ["torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate"]

PROBE = """
import json, sys
from ftcli.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["--version"], ["prepare", "--help"],
                                  ["warmup", "--help"], ["export", "--help"], ["inspect", "--help"], ["generate", "--help"],
                                  ["chat", "--help"], ["eval", "--help"]])
def test_help_does_not_import_heavy_libraries(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE % HEAVY, *argv], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["heavy"] == [], f"`ftcli {' '.join(argv)}` imported {report['heavy']}"


def test_version(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ftcli {__version__}"


def test_help_lists_every_command(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("prepare", "train", "warmup", "export", "inspect"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["warmup", "prepare"])
def test_commands_sharing_train_options_show_their_help(cli, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("TERMINAL_WIDTH", "250")
    result = cli(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    # The options they read keep their help text, not just their names; train's optimizer is not among them.
    assert "--seq-length" in text and "Maximum tokens per example" in text and "--model" in text
    assert "Peak learning rate" not in text and "--optim" not in text


def test_train_help_shows_reference_flags(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("TERMINAL_WIDTH", "250")
    result = cli("train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for flag in ("--model", "--dtype", "--batch-size", "--seq-length", "--num-epochs", "--gradient-accumulation-steps",
                 "--learning-rate", "--gradient-checkpointing", "--lora-rank", "--dataset-size", "--logging-steps",
                 "--log-dir", "--compile", "--output-dir", "--config", "--trust-remote-code"):
        assert flag in text, flag
