"""Device selection (one GPU of several, a launcher's local GPU) and data parallel (DDP) for full, lora and qlora.

    $ python -m pytest -q tests/test_ddp.py

The CUDA choices are checked on CPU through the function `resolve_device` uses, with fake environments (and a
fake torch.cuda where the narrowing itself is checked); DDP runs as real processes (gloo) on the tiny model.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import losses, read_manifest, write_small_alpaca
from ftcli import models
from ftcli.errors import ConfigError
from ftcli.models import VISIBLE, VISIBLE_BEFORE, cuda_choice, resolve_device
from ftcli.training.checkpoints import read_marker

TINY = ["--model", "builtin:tiny-llama"]
STEPS = 3


# ---- device selection -------------------------------------------------------------------------


@pytest.mark.parametrize("visible, device, expected", [
    (None, "auto", "0"), (None, "cuda", "0"), (None, "cuda:1", "1"),
    ("0,1,2,3", "cuda:2", "2"), ("2,3", "auto", "2"), ("2,3", "cuda:1", "3"),
    ("GPU-aaaa-1111,GPU-bbbb-2222", "cuda:1", "GPU-bbbb-2222"),
])
def test_one_process_narrows_to_the_named_gpu(visible: str | None, device: str, expected: str) -> None:
    env = {} if visible is None else {VISIBLE: visible}
    assert cuda_choice(device, env) == (0, expected)
    # Asked again after narrowing (the same request, or the device string it became): the same GPU.
    narrowed = {VISIBLE: expected, VISIBLE_BEFORE: visible or ""}
    assert cuda_choice(device, narrowed) == (0, expected)


def test_a_gpu_beyond_the_visible_ones_is_one_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        cuda_choice("cuda:2", {VISIBLE: "2,3"})
    assert "cuda:2" in str(err.value) and "CUDA_VISIBLE_DEVICES=2,3" in str(err.value) and "only 2" in str(err.value)
    assert cuda_choice("auto", {VISIBLE: ""}) == (0, None)  # no GPU on purpose: nothing is narrowed


@pytest.mark.parametrize("visible, count, local_rank, expected", [
    ("0,1,2,3", None, 1, 1), ("0,1,2,3", None, 3, 3), (None, 4, 2, 2),
    ("5", None, 1, 0), (None, 1, 3, 0),  # Slurm style: one GPU visible per rank, so every rank uses cuda:0
    ("GPU-aaaa-1111", None, 1, 0),
])
def test_a_launched_rank_uses_its_local_gpu(visible: str | None, count: int | None, local_rank: int,
                                           expected: int) -> None:
    env = {"WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank), **({} if visible is None else {VISIBLE: visible})}
    for device in ("auto", "cuda"):
        assert cuda_choice(device, env, count) == (expected, None)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """torch.cuda as a machine with `n` GPUs would answer (before initialisation), and a fresh device cache."""
    monkeypatch.setattr(models, "_resolved", {})
    monkeypatch.delenv(VISIBLE_BEFORE, raising=False)

    def install(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return install


def test_resolve_device_makes_only_the_named_gpu_visible(fake_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(VISIBLE, "0,1,2,3")
    fake_cuda(1)  # once narrowed, torch sees the one GPU
    assert resolve_device("cuda:1") == "cuda:0"
    assert os.environ[VISIBLE] == "1" and os.environ[VISIBLE_BEFORE] == "0,1,2,3"
    assert resolve_device("cuda:1") == resolve_device("cuda:0") == "cuda:0"  # asked again: the same GPU
    assert os.environ[VISIBLE] == "1"


def test_resolve_device_under_a_launcher_with_one_gpu_per_rank(fake_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of a Slurm-style job (one GPU visible per rank) uses cuda:0: cuda:1 would fail after saving."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(VISIBLE, "6")
    fake_cuda(1)
    assert resolve_device("cuda") == "cuda:0" and os.environ[VISIBLE] == "6"
    monkeypatch.setattr(models, "_resolved", {})
    monkeypatch.delenv(VISIBLE)
    fake_cuda(2)  # torchrun's way: every GPU visible, rank 1 takes the second
    assert resolve_device("auto") == "cuda:1" and VISIBLE not in os.environ


def test_device_cuda_1_without_cuda_is_one_line(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_resolved", {}, raising=False)
    monkeypatch.setenv(VISIBLE, "0,1,2,3")
    data = write_small_alpaca(tmp_path / "small.jsonl")
    out = tmp_path / "run"
    result = cli("train", "--method", "lora", *TINY, "--dataset", data, "--max-steps", "2", "--device", "cuda:1",
                 "--output-dir", out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: --device cuda:1 asked for CUDA (GPU 1 of CUDA_VISIBLE_DEVICES=0,1,2,3) "
                                "but no CUDA device is visible"), result.output
    assert not out.exists()
    assert os.environ[VISIBLE] == "0,1,2,3" and VISIBLE_BEFORE not in os.environ  # narrowing undone
    several = cli("train", "--method", "lora", *TINY, "--dataset", data, "--device", "cuda:1",
                  "--nproc-per-node", "2", "--output-dir", out)
    assert several.exit_code == 2 and "each uses its own" in several.output and not out.exists()


# ---- data parallel ----------------------------------------------------------------------------


def run_ranks(*args: object, port: int, timeout: float = 180) -> subprocess.CompletedProcess:
    from test_fsdp import child_env, ftcli_cmd

    cmd = ftcli_cmd(*args, "--nproc-per-node", "2", "--master-port", port)
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def train_args(method: str, data: Path, out: Path, batch: int) -> list[object]:
    return ["train", "--method", method, *TINY, "--dataset", data, "--max-steps", STEPS, "--batch-size", batch,
            "--learning-rate", "1e-3", "--dtype", "float32", "--output-dir", out]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


def assert_equivalent(ddp: Path, one: Path) -> None:
    """Same per-step losses and the same final weights (float32, within 1e-5)."""
    got, want = losses(ddp), losses(one)
    assert len(got) == len(want) == STEPS and all(math.isfinite(x) for x in got)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    a, b = weights(ddp), weights(one)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def moved(out: Path, base: Path) -> float:
    """How far training moved the weights: from the base model's, or (LoRA) B from its zero start."""
    trained = weights(out)
    if (out / "adapter_model.safetensors").is_file():
        return max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k)
    start = weights(base)
    return max((trained[k] - start[k]).abs().max().item() for k in trained if k in start)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_x_batch_4_equal_one_process_x_batch_8(method: str, cli, tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    from test_fsdp import free_port

    data = write_small_alpaca(tmp_path / "small.jsonl")
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert cli(*train_args(method, data, one, 8)).exit_code == 0
    save = ["--save-steps", "1"] if method == "lora" else []
    result = run_ranks(*train_args(method, data, ddp, 4), *save, port=free_port())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ftcli launch" in result.stdout and result.stdout.count("training summary") == 1  # rank 0 prints
    manifest = read_manifest(ddp)
    assert manifest["status"] == "finished" and manifest["resolved"]["processes"] == 2
    assert "max of 2 ranks" in manifest["metrics"]["peak_memory_kind"]
    assert manifest["metrics"]["sharded_parameter_fraction"] == 0.0  # data parallel: every rank holds it all
    assert manifest["resolved"]["saves"] == ("adapter" if method == "lora" else "model")
    assert_equivalent(ddp, one)
    assert moved(ddp, tiny_model_dir) > 1e-3  # a hundred times the tolerance: the runs really trained
    if method != "lora":
        return
    # Resumed on 2 processes from its step-2 checkpoint, the run ends where the uninterrupted one did.
    finished = weights(ddp)
    result = run_ranks(*train_args(method, data, ddp, 4), *save, "--resume", ddp / "checkpoint-2", port=free_port())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = read_manifest(ddp)
    assert manifest["status"] == "finished" and manifest["resumed_from"]["step"] == 2
    assert_equivalent(ddp, one)
    assert all(torch.equal(finished[k], weights(ddp)[k]) for k in finished)
    assert read_marker(ddp / "checkpoint-3")["step"] == 3  # its checkpoint completed again, by rank 0


def test_the_estimate_says_how_each_method_scales(cli) -> None:
    result = cli("inspect", "builtin:tiny-llama", "--seq-length", "256", "--nproc", "4", "--json")
    assert result.exit_code == 0, result.stderr
    by = {e["method"]: e for e in json.loads(result.stdout)["memory"]["methods"]}
    for method in ("full", "lora", "qlora"):
        notes = " | ".join(by[method]["notes"])
        assert "scales data parallel (DDP)" in notes and "data parallel over 4 processes" in notes, notes
        assert "runs in one process" not in notes
    assert any(n.startswith("scales by sharding (FSDP)") for n in by["fsdp"]["notes"])
    assert by["lora"]["optimizer_bytes"] > by["fsdp"]["optimizer_bytes"]  # DDP replicates, FSDP divides


def test_qlora_trains_on_two_processes(cli, tmp_path: Path) -> None:
    """The 4-bit base (bitsandbytes' CPU kernels) under DDP: both ranks train, rank 0 saves the adapter, and the
    losses are the one-process run's (its adapters train in bfloat16, so the weights are not compared to 1e-5)."""
    from test_fsdp import free_port

    data = write_small_alpaca(tmp_path / "small.jsonl")
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    args = ["train", "--method", "qlora", *TINY, "--dataset", data, "--max-steps", "2"]
    assert cli(*args, "--batch-size", "8", "--output-dir", one).exit_code == 0
    result = run_ranks(*args, "--batch-size", "4", "--output-dir", ddp, port=free_port())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = read_manifest(ddp)
    assert manifest["status"] == "finished" and manifest["resolved"]["processes"] == 2
    assert (ddp / "adapter_model.safetensors").is_file() and not (ddp / "model.safetensors").exists()
    assert max(abs(a - b) for a, b in zip(losses(ddp), losses(one))) < 1e-4


def test_a_launched_one_process_run_sees_only_its_device_gpu() -> None:
    """`--method fsdp --device cuda:2` (one rank, under the launcher): the rank must get GPU 2, not its local GPU 0."""
    from ftcli.config import build_run_config
    from ftcli.training.launch import narrow_for_ranks

    env = {VISIBLE: "4,5,6,7"}
    narrow_for_ranks(build_run_config({"method": "fsdp", "device": "cuda:2"}), env)
    assert env[VISIBLE] == "6"
    env = {}
    narrow_for_ranks(build_run_config({"method": "fsdp", "device": "cuda"}), env)
    assert env == {}  # no GPU named: every rank takes its own
    with pytest.raises(ConfigError):
        narrow_for_ranks(build_run_config({"method": "lora", "device": "cuda:4"}), {VISIBLE: "0,1"})


def test_too_late_to_narrow_addresses_the_gpu_by_its_number(fake_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA started before ftcli could narrow the visible GPUs (torch still counts 4): cuda:2 stays cuda:2."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(VISIBLE, "0,1,2,3")
    fake_cuda(4)
    assert resolve_device("cuda:2") == "cuda:2"
