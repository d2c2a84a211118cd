"""`ftcli train --method fsdp`: real processes (torch.distributed.run, gloo, CPU) on the tiny model.

    $ /work/venv/bin/python -m pytest -q tests/test_fsdp.py
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from conftest import losses, probe_logits_of, read_manifest

TINY = ["--model", "builtin:tiny-llama"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ftcli_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "ftcli", *[str(a) for a in args]]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def train_args(data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--method", "fsdp", *TINY, "--dataset", data, "--max-steps", "12", "--batch-size", "2",
            "--learning-rate", "1e-2", "--output-dir", out, "--master-port", free_port(), *extra]


def run_ftcli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ftcli_cmd(*args), env=child_env(), capture_output=True, text=True, timeout=timeout)


def probe_matches(model, run_dir: Path) -> None:
    got, saved = probe_logits_of(model, run_dir)
    assert torch.allclose(got, saved, atol=1e-5), (got - saved).abs().max()


def assert_learned(out: Path) -> dict:
    seen = losses(out)
    assert len(seen) == 12 and all(math.isfinite(x) for x in seen)
    assert sum(seen[-3:]) / 3 < sum(seen[:3]) / 3, f"loss did not fall: {seen}"
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resolved"]["processes"] == 2
    assert "max of 2 ranks" in manifest["metrics"]["peak_memory_kind"]
    return manifest


def test_fsdp_lora_two_processes(tmp_path: Path, small_alpaca: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = run_ftcli(*train_args(small_alpaca, out, "--nproc-per-node", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("training summary") == 1  # only rank 0 prints
    manifest = assert_learned(out)
    assert manifest["resolved"]["saves"] == "adapter"
    assert manifest["resolved"]["processes"] == 2
    assert manifest["metrics"]["sharded_parameter_fraction"] > 0.99  # FSDP2 really sharded the weights
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))
    probe_matches(model, out)


def test_fsdp_full_parameters_reload(tmp_path: Path, small_alpaca: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    result = run_ftcli(*train_args(small_alpaca, out, "--nproc-per-node", "2", "--full-parameters"))
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = assert_learned(out)
    assert manifest["resolved"]["saves"] == "model"
    assert manifest["resolved"]["trainable_parameters"] == manifest["resolved"]["total_parameters"]
    assert manifest["metrics"]["sharded_parameter_fraction"] > 0.99
    probe_matches(AutoModelForCausalLM.from_pretrained(str(out)), out)


def test_two_machines_on_localhost(tmp_path: Path, small_alpaca: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "two-nodes"
    port = free_port()
    common = ["train", "--method", "fsdp", *TINY, "--dataset", small_alpaca, "--max-steps", "4", "--batch-size", "2",
              "--output-dir", out, "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
              "--master-port", port]
    nodes = [subprocess.Popen(ftcli_cmd(*common, "--node-rank", rank), env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:  # never leave a launcher waiting for its peer behind
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    manifest = read_manifest(out)
    assert manifest["status"] == "finished" and manifest["resolved"]["processes"] == 2
    assert manifest["metrics"]["steps"] == 4


def test_a_killed_rank_fails_the_run(tmp_path: Path, small_alpaca: Path, tiny_model_dir: Path) -> None:
    """SIGKILL one rank mid-training: the launch exits non-zero soon, naming that rank and the signal."""
    out = tmp_path / "killed"
    args = train_args(small_alpaca, out, "--nproc-per-node", "2")
    args[args.index("--max-steps") + 1] = "100000"
    launcher = subprocess.Popen(ftcli_cmd(*args), env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not (out / "metrics.jsonl").exists() or not losses(out):
            assert launcher.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.5)
        victim = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                      if p.environ().get("LOCAL_RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        output = launcher.communicate(timeout=60)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60
    assert "rank 1 killed by SIGKILL" in output, output[-2000:]  # the killed rank is the cause
    manifest = read_manifest(out)  # recorded by rank 0 (it saw its peer go) or else by the launcher
    assert manifest["status"] == "failed" and manifest["error"]


def test_fsdp_refuses_a_non_empty_output_dir_before_launching(tmp_path: Path, small_alpaca: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_ftcli(*train_args(small_alpaca, out, "--nproc-per-node", "2"), timeout=60)
    assert result.returncode == 5 and "is not empty" in result.stderr
    assert "ftcli launch" not in result.stdout


def test_wrap_class_is_read_from_the_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ftcli.methods.fsdp import decoder_layer_classes

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert decoder_layer_classes(model) == ["LlamaDecoderLayer"]
    model._no_split_modules = None  # no declaration: found as the class of the decoder stack
    assert decoder_layer_classes(model) == ["LlamaDecoderLayer"]
