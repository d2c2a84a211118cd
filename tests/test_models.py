"""The model-loading core: where a model comes from, its dtype, and the hub path (offline, from a local cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftcli.errors import ModelError
from ftcli.models import resolve_model_source


def test_sources_are_classified(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_source("builtin:tiny-llama").kind == "builtin"
    assert resolve_model_source(str(tiny_model_dir)).kind == "local"
    assert resolve_model_source("meta-llama/Llama-3.2-3B-Instruct").kind == "hub"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source("./missing/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))


def test_hub_id_loads_from_the_local_hub_cache_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A hub id goes through the real hub code path; with HF_HUB_OFFLINE=1 it is served from the cache."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--ftcli-test--cached-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--ftcli-test--cached-llama" / "refs").mkdir()
    (cache / "models--ftcli-test--cached-llama" / "refs" / "main").write_text("a" * 40)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "ftcli", "train", "--method", "lora",
                           "--model", "ftcli-test/cached-llama", "--dataset", "builtin:alpaca-sample",
                           "--max-steps", "2", "--output-dir", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "ftcli_run.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["resolved"]["model_path"] == "ftcli-test/cached-llama"
    assert manifest["config"]["model"] == "ftcli-test/cached-llama"


def test_bfloat16_weights_train_and_save_in_bfloat16(cli, tmp_path: Path, small_alpaca: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "bf16"
    result = cli("train", "--method", "full", "--model", "builtin:tiny-llama", "--dataset", small_alpaca,
                 "--dtype", "bfloat16", "--max-steps", "2", "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "ftcli_run.json").read_text())["resolved"]["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) == "torch.bfloat16"


def test_cuda_device_without_cuda_is_one_line(cli, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("train", "--model", "builtin:tiny-llama", "--dataset", "builtin:alpaca-sample", "--device", "cuda",
                 "--output-dir", tmp_path / "r")
    assert result.exit_code == 2
    assert "no CUDA device" in result.stderr and len(result.stderr.strip().splitlines()) == 1
