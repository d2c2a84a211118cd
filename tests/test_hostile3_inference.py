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
