"""`ftcli warmup` / `train --compile`: compile ahead of time, weights untouched, the cache found again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_manifest, write_small_alpaca

FLAGS = {"method": "full", "model": "builtin:tiny-llama", "batch_size": 4, "seq_length": 96, "max_steps": 2,
         "compile": True}


def _cli_flags(flags: dict) -> list[str]:
    out = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


WARM_SCRIPT = r"""
import json, sys
import torch
from transformers import set_seed

from ftcli.config import build_run_config
from ftcli.data import load_training_dataset
from ftcli.methods import METHODS
from ftcli.models import load_model, load_tokenizer
from ftcli.training.warmup import cache_folder, cache_key_fields, warm_compile_cache

flags, out = json.loads(sys.argv[1]), sys.argv[2]
config = build_run_config(flags)
tokenizer = load_tokenizer(config.model)
dataset, _ = load_training_dataset(config, tokenizer)
set_seed(config.seed)
model = load_model(config.model, dtype="float32", device="cpu")
plan = METHODS["full"].plan(config, model)
before = {k: v.detach().clone() for k, v in plan.model.state_dict().items()}
rng_before = torch.random.get_rng_state()
report = warm_compile_cache(config, plan, tokenizer, dataset, "cpu")
after = plan.model.state_dict()
changed = [k for k, v in before.items()
           if k not in after or not v.contiguous().view(torch.uint8).equal(after[k].contiguous().view(torch.uint8))]
json.dump({
    "report": report,
    "folder": str(cache_folder(cache_key_fields(config, dataset, "cpu", plan.model.dtype))),
    "same_keys": sorted(before) == sorted(after),
    "changed": changed,
    "grads_left": [n for n, p in plan.model.named_parameters() if p.grad is not None],
    "rng_unchanged": bool(torch.equal(rng_before, torch.random.get_rng_state())),
    "forward_qualname": plan.model.forward.__qualname__,
}, open(out, "w"), default=str)
"""


@pytest.fixture(scope="module")
def warmed(tmp_path_factory) -> dict:
    """Warm the cache exactly as `train --compile` does before building its trainer, in a fresh process.

    A fresh process, as a user's would be: compiles of earlier tests in this process must not decide
    what the warmup finds in PyTorch's in-memory caches."""
    data = write_small_alpaca(tmp_path_factory.mktemp("data") / "small.jsonl")
    result = tmp_path_factory.mktemp("warm") / "result.json"
    proc = subprocess.run([sys.executable, "-c", WARM_SCRIPT, json.dumps({**FLAGS, "dataset": str(data)}), str(result)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warm = json.loads(result.read_text())
    return {**warm, "data": data, "folder": Path(warm["folder"])}


def test_warmup_leaves_weights_bit_identical(warmed: dict) -> None:
    # Bit for bit (torch.equal would take -0.0 for 0.0): the script compares the raw bytes of every tensor.
    assert warmed["same_keys"]
    assert warmed["changed"] == [], f"changed during warmup: {warmed['changed']}"
    assert warmed["grads_left"] == [], "warmup left gradients behind"
    assert warmed["rng_unchanged"], "warmup consumed random numbers"
    assert warmed["forward_qualname"].endswith("forward")  # no trainer patch left on the model


def test_warmup_ran_forward_and_backward_and_saved_the_cache(warmed: dict) -> None:
    report, folder = warmed["report"], warmed["folder"]
    assert report["cache"] == "cold"
    assert report["shapes"] and all(s[0] == 4 and s[1] <= 96 for s in report["shapes"])
    assert report["compile_s"] > 0 and report["step_s"] > 0 and report["real_tokens_per_second"] > 0
    assert report["peak_memory_bytes"] > 0
    marker = json.loads((folder / "warmup.json").read_text())
    assert marker["key"]["method"] == "full" and marker["key"]["batch_size"] == 4
    assert marker["key"]["versions"]["torch"] == torch.__version__.split("+")[0] or marker["key"]["versions"]["torch"]
    assert (folder / "artifacts.bin").stat().st_size > 0
    assert list((folder / "inductor").rglob("*")), "Inductor wrote nothing to the cache folder"


def test_inspect_shows_the_compile_cache(warmed: dict, cli) -> None:
    result = cli("inspect", warmed["folder"], "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "compile_cache"
    cache = report["compile_cache"]
    assert cache["key"]["method"] == "full" and cache["key"]["seq_length"] == 96
    assert cache["shapes"] == warmed["report"]["shapes"] and cache["artifacts_bytes"] > 0


def test_second_train_compile_finds_the_cache(warmed: dict, tmp_path: Path) -> None:
    """A fresh process: `train --compile` loads the artefacts and compiles nothing new into the cache."""
    folder = warmed["folder"]
    files_before = {p.relative_to(folder) for p in (folder / "inductor").rglob("*") if p.is_file()}
    assert any("fxgraph" in str(p) for p in files_before), "the warmup left no FX graph cache entries"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ftcli", "train", *_cli_flags(FLAGS), "--dataset", str(warmed["data"]),
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"compile cache: warm ({folder.name}" in proc.stdout, proc.stdout
    files_after = {p.relative_to(folder) for p in (folder / "inductor").rglob("*") if p.is_file()}
    new = sorted(str(p) for p in files_after - files_before if "fxgraph" in str(p) or "aotautograd" in str(p))
    assert not new, f"the run compiled graphs the warmup had not: {new}"
    assert read_manifest(out)["metrics"]["steps"] == 2


def test_warmup_command_in_a_fresh_process_prints_its_own_lines_only(warmed: dict) -> None:
    """`ftcli warmup` as a user runs it: its own output from the first line (no library noise, such as
    bitsandbytes' note about optional CPU kernels), the data line, and the warm cache found."""
    flags = {k: v for k, v in FLAGS.items() if k not in ("compile", "max_steps")}
    cmd = [sys.executable, "-m", "ftcli", "warmup", *_cli_flags(flags), "--dataset", str(warmed["data"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ftcli warmup method=full"), proc.stdout[:300]
    assert proc.stderr.strip() == "", proc.stderr
    assert "8 rows read, all of them selected, 8 examples used" in proc.stdout
    assert f"warm: {warmed['folder']}" in " ".join(proc.stdout.split()).replace("│", "")


def test_warmup_command_options_and_errors(cli, tmp_path: Path) -> None:
    result = cli("warmup", "--help")
    assert result.exit_code == 0 and "--batch-size" in result.stdout and "--seq-length" in result.stdout
    result = cli("warmup", "--method", "fsdp", "--model", "builtin:tiny-llama", "--dataset", "builtin:alpaca-sample")
    assert result.exit_code == 2 and "fsdp" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = cli("warmup", "--model", tmp_path / "missing", "--dataset", "builtin:alpaca-sample")
    assert result.exit_code == 2 and "does not exist" in result.stderr
