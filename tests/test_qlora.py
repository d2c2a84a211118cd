"""`ftcli train --method qlora` end to end on the built-in tiny model, on CPU, with real bitsandbytes 4-bit layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import losses, probe_logits_of, read_manifest, write_small_alpaca

TINY = ["--model", "builtin:tiny-llama"]
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def reload_adapter(tiny_model_dir: Path, run_dir: Path):
    """Base in 4-bit exactly as the run loaded it (float32 compute/storage on CPU) + the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftcli.methods.qlora import keep_cpu_inference_in_compute_dtype

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=bnb, dtype=torch.float32,
                                                device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(run_dir))
    keep_cpu_inference_in_compute_dtype(model)
    return model


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from ftcli.cli import app

    root = tmp_path_factory.mktemp("qlora")
    data = write_small_alpaca(root / "small.jsonl")
    out = root / "run"
    result = CliRunner().invoke(app, ["train", "--method", "qlora", *TINY, "--dataset", str(data), "--max-steps", "30",
                                      "--learning-rate", "1e-2", "--output-dir", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    return out


def test_qlora_run_learns_and_reports(qlora_run: Path) -> None:
    seen = losses(qlora_run)
    assert len(seen) == 30
    # Observed 7.77 -> 2.22; a run that does not train stays near its start.
    assert seen[-1] < 0.5 * seen[0], f"loss went {seen[0]:.3f} -> {seen[-1]:.3f}"
    manifest = read_manifest(qlora_run)
    assert manifest["status"] == "finished" and manifest["config"]["method"] == "qlora"
    assert manifest["resolved"]["saves"] == "adapter" and manifest["resolved"]["dtype"] == "float32"
    assert manifest["metrics"]["peak_memory_bytes"] > 0 and manifest["metrics"]["peak_memory_kind"] == "cpu peak RSS"
    assert manifest["metrics"]["real_tokens_per_second"] > 0


def test_qlora_base_was_4bit(qlora_run: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    record = read_manifest(qlora_run)
    manifest = record["resolved"]
    float_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    full = sum(p.numel() for p in float_model.parameters())
    linear = sum(m.weight.numel() for n, m in float_model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEARS)
    # Every targeted linear weight is NF4 (counted by its weights, not by the packed elements that hold them),
    # the rest of the base float32 after kbit prep; the total is the model's plus the adapters.
    assert record["precision"]["weights"] == {"nf4": linear, "float32": full - linear}
    assert manifest["total_parameters"] == full + manifest["trainable_parameters"]
    assert 0 < manifest["trainable_parameters"] < manifest["total_parameters"] / 5


def test_qlora_adapter_reloads_on_a_4bit_base(qlora_run: Path, tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    adapter_config = json.loads((qlora_run / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]} == LINEARS  # all-linear
    assert (qlora_run / "adapter_model.safetensors").exists() and not (qlora_run / "model.safetensors").exists()

    model = reload_adapter(tiny_model_dir, qlora_run)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    # TRL trains a quantized model's adapters in bfloat16 (and saves them so); peft upcasts them to float32
    # on load. Cast them back to compute as the run did: then only summation order can differ (~1e-6).
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    got, saved = probe_logits_of(model, qlora_run)
    assert torch.allclose(got, saved, atol=1e-4), (got - saved).abs().max()

    # The adapter matters: the same 4-bit base without it gives clearly different logits.
    with model.disable_adapter():
        plain, _ = probe_logits_of(model, qlora_run)
    assert not torch.allclose(plain, saved, atol=1e-2), "the adapter changed nothing"


def test_qlora_compile_trains_the_same_first_step(qlora_run: Path, cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    """--compile works with 4-bit layers (bitsandbytes' matmul is a graph break, the rest compiles)."""
    data = qlora_run.parent / "small.jsonl"
    out = tmp_path / "compiled"
    result = cli("train", "--method", "qlora", *TINY, "--dataset", data, "--max-steps", "1", "--compile",
                 "--output-dir", out)
    assert result.exit_code == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest["config"]["compile"] is True and manifest["metrics"]["steps"] == 1
    assert losses(out)[0] == pytest.approx(losses(qlora_run)[0], abs=1e-3)
    model = reload_adapter(tiny_model_dir, out)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
    got, saved = probe_logits_of(model, out)
    assert torch.allclose(got, saved, atol=1e-4), (got - saved).abs().max()


def test_qlora_terminal_is_clean(tmp_path: Path, small_alpaca: Path) -> None:
    """A real process: nothing from bitsandbytes (or anything else) reaches stderr on a successful run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ftcli", "train", "--method", "qlora", *TINY, "--dataset",
                           str(small_alpaca), "--max-steps", "1", "--batch-size", "2", "--output-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert "kernels" not in proc.stdout and "Loading weights" not in proc.stdout
