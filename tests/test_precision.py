"""Precision truth (issue 20, items 3 and 4): autocast follows the compute dtype, the manifest records the real
dtypes, float16 gets loss scaling, TF32 is recorded and export's tolerance knows it, --liger/--no-liger; a QLoRA
export leaves no quantization flags; the estimate's QLoRA bytes and GB/GiB; the compile-cache key.

Two tiny runs through the CLI (QLoRA in bfloat16, LoRA in bfloat16), shared by the checks that read them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import read_manifest, write_small_alpaca

RUN = ("--model", "builtin:tiny-llama", "--device", "cpu", "--max-steps", "2", "--batch-size", "2",
       "--seq-length", "64")


def _train(cli, tmp: Path, *args: str) -> Path:
    out = tmp / "run"
    data = write_small_alpaca(tmp / "small.jsonl")
    result = cli("train", *RUN, "--dataset", str(data), "--output-dir", str(out), *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    from ftcli.cli import app

    def cli(*args: str):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    return _train(cli, tmp_path_factory.mktemp("qlora"), "--method", "qlora", "--dtype", "bfloat16")


# ---- autocast and the manifest's dtypes ---------------------------------------------------------------------


def test_qlora_bf16_trains_under_bf16_autocast_and_the_manifest_says_what_each_part_is(qlora_run: Path) -> None:
    """prepare_model_for_kbit_training leaves model.dtype float32; the trainer's arguments still say bf16
    (the manifest reads them off the built trainer), and the dtypes are the real ones."""
    manifest = read_manifest(qlora_run)
    assert manifest["status"] == "finished"
    precision = manifest["precision"]
    assert precision["compute"] == "bfloat16" and precision["autocast"] == "bfloat16"
    assert precision["grad_scaler"] is False and precision["tf32"] is False and precision["liger"] is False
    # The 4-bit linears, the float32 norms / embeddings / head after kbit prep, bfloat16 adapters (TRL's cast).
    assert set(precision["weights"]) == {"nf4", "float32"}
    assert precision["trainable"] == {"bfloat16": manifest["resolved"]["trainable_parameters"]}
    assert precision["weights"]["nf4"] + precision["weights"]["float32"] + precision["trainable"]["bfloat16"] == \
        manifest["resolved"]["total_parameters"]


def test_lora_manifest_records_float32_adapters_on_a_bfloat16_base_and_liger_stays_off_on_cpu(
        cli, tmp_path: Path) -> None:
    out = _train(cli, tmp_path, "--method", "lora", "--dtype", "bfloat16", "--liger")
    precision = read_manifest(out)["precision"]
    assert precision["autocast"] == "bfloat16" and precision["compute"] == "bfloat16"
    assert list(precision["weights"]) == ["bfloat16"]
    assert list(precision["trainable"]) == ["float32"]  # peft upcasts adapters on a 16-bit base
    assert precision["liger"] is False  # --liger is never on on CPU


def test_autocast_and_loss_scaling_follow_the_compute_dtype() -> None:
    import torch

    from ftcli.training.precision import autocast_args, keep_master_weights

    assert autocast_args(torch.bfloat16, "cuda:0") == {"bf16": True, "fp16": False}
    assert autocast_args(torch.float32, "cuda:0") == {"bf16": False, "fp16": False}
    assert autocast_args(torch.float16, "cuda:0") == {"bf16": False, "fp16": True}  # autocast + GradScaler
    assert autocast_args(torch.float16, "cpu") == {"bf16": False, "fp16": False}  # accelerate: no fp16 amp on CPU
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    model[0].requires_grad_(False)
    assert keep_master_weights(model) == 2  # GradScaler refuses to unscale float16 gradients
    assert [p.dtype for p in model.parameters()] == [torch.float16] * 2 + [torch.float32] * 2


def test_tf32_is_read_from_torch() -> None:
    import torch

    from ftcli.training.precision import tf32_enabled

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tf32_enabled() is False
        torch.set_float32_matmul_precision("high")
        assert tf32_enabled() is True
    finally:
        torch.set_float32_matmul_precision(before)


# ---- --liger / --no-liger ------------------------------------------------------------------------------------


def test_liger_rules(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from ftcli.config import build_run_config
    from ftcli.errors import ConfigError
    from ftcli.training import precision
    from ftcli.training.trainer import liger_args

    def config(**flags):
        return build_run_config({"method": "lora", "model": "builtin:tiny-llama", **flags})

    monkeypatch.setattr(precision, "liger_available", lambda: True)
    assert precision.use_liger(config(), "cuda:0") is True
    assert liger_args(config(), "cuda:0") == {"use_liger_kernel": True}
    assert precision.use_liger(config(compile=True), "cuda:0") is False  # Liger and torch.compile do not mix
    assert precision.use_liger(config(compile=True, liger=True), "cuda:0") is True  # asked for: as asked
    assert precision.use_liger(config(liger=False), "cuda:0") is False
    assert precision.use_liger(config(liger=True), "cpu") is False and liger_args(config(), "cpu") == {}
    monkeypatch.setattr(precision, "liger_available", lambda: False)
    assert precision.use_liger(config(), "cuda:0") is False
    with pytest.raises(ConfigError, match="liger-kernel"):
        precision.use_liger(config(liger=True), "cuda:0")
    help_text = cli("train", "--help").output
    names = [line.split("│")[1].split()[0] for line in help_text.splitlines() if line.count("│") >= 2
             and line.split("│")[1].split()]  # the first word of each row: the option names column
    assert names[names.index("--liger") + 1] == "--no-liger"  # the switch's two forms, one under the other
    text = re.sub(r"[\s│]+", " ", help_text)  # the panel's borders and wrapping gone
    assert "on for CUDA without --compile, when installed" in text


# ---- export --------------------------------------------------------------------------------------------------


def test_qlora_float32_export_has_no_quantization_flags_and_a_float32_check(cli, qlora_run: Path,
                                                                           tmp_path: Path) -> None:
    """A bfloat16 QLoRA run exported as float32: verified at float32 precision (the reference computes the same
    4-bit weights in float32), config.json and the in-memory config free of every quantization record."""
    out = tmp_path / "export"
    result = cli("export", str(qlora_run), "--output", str(out), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and not [k for k in config if "quant" in k]
    check = json.loads((out / "ftcli_export.json").read_text())["verification"]
    assert check["passed"] and check["tolerance_of"] == "float32"
    assert check["max_logit_difference"] < check["adapter_effect"] / 10  # tight enough to see a lost adapter

    from ftcli.export.run import build_model
    from ftcli.export.source import ExportOptions, find_source, load_source_tokenizer

    src = find_source(ExportOptions(source=str(qlora_run), output=str(tmp_path / "unused")))
    model, _, _ = build_model(src, "dequantized", "float32", "cpu", load_source_tokenizer(src), verify=False)
    for name in ("_is_quantized", "quantization_config"):
        assert name not in model.config.__dict__, name  # FlashAttention 2 reads _is_quantized
    assert not model.is_quantized and not getattr(model, "is_loaded_in_4bit", False)
    assert model.config._attn_implementation != "flash_attention_2"


def test_export_tolerance_knows_a_run_that_computed_in_tf32(cli, tmp_path: Path) -> None:
    """`--dtype float32 --compile` on CUDA turns TF32 on (transformers); its probe logits are then off by TF32's
    rounding. The probe is perturbed here as TF32 would: refused as float32, accepted once the run records TF32."""
    from safetensors.torch import load_file, save_file

    run = _train(cli, tmp_path, "--method", "full", "--dtype", "float32")
    probe = load_file(str(run / "probe.safetensors"))
    scale = float(probe["logits"].abs().max())
    probe["logits"] = probe["logits"] + 1e-3 * max(1.0, scale)  # ten times float32's tolerance, a tenth of TF32's
    save_file(probe, str(run / "probe.safetensors"))
    refused = cli("export", str(run), "--output", str(tmp_path / "e1"), "--dtype", "float32")
    assert refused.exit_code == 1 and "float32 tolerance" in refused.output and not (tmp_path / "e1").exists()
    manifest = read_manifest(run)
    manifest["precision"]["tf32"] = True
    (run / "ftcli_run.json").write_text(json.dumps(manifest))
    accepted = cli("export", str(run), "--output", str(tmp_path / "e2"), "--dtype", "float32")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads((tmp_path / "e2" / "ftcli_export.json").read_text())["verification"]["tolerance_of"] == "tf32"


# ---- the memory estimate ---------------------------------------------------------------------------------------


def test_qlora_estimate_counts_the_bytes_the_run_held(qlora_run: Path) -> None:
    """Weights: the estimate against the run's own parameter record (4-bit packed at half a byte, the float32
    parts at 4, the bfloat16 adapters at 2) plus the quantisation constants; within 1%."""
    from ftcli.inspection.estimate import describe_model, estimate_memory

    manifest = read_manifest(qlora_run)
    precision = manifest["precision"]
    held = precision["weights"]["nf4"] // 2 + precision["weights"]["float32"] * 4 + precision["trainable"][
        "bfloat16"] * 2
    est = estimate_memory(describe_model("builtin:tiny-llama"), "qlora", batch_size=2, seq_length=64,
                          dtype="bfloat16", lora_targets=["all-linear"])
    assert est.trainable_parameters == manifest["resolved"]["trainable_parameters"]
    assert held <= est.weights_bytes <= 1.01 * held, (held, est.weights_bytes)
    assert est.gradients_bytes == est.trainable_parameters * 2


def test_qlora_activation_estimate_is_the_float32_bytes_autograd_saves(tmp_path: Path) -> None:
    """The bytes autograd keeps for one QLoRA loss under bf16 autocast (a float32 residual stream: the
    embeddings are upcast and the 4-bit layers return their input's dtype): the estimate is at least them and
    at most 25% over (it counts every kept tensor at 4 bytes; SDPA's output is bfloat16)."""
    import torch

    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset
    from ftcli.inspection.estimate import (LOGIT_TILE_TOKENS, LOGIT_TILE_VOCAB, activation_elements_per_token,
                                           describe_model, estimate_memory)
    from ftcli.methods import METHODS
    from ftcli.models import load_model, load_tokenizer
    from ftcli.training.warmup import _warmup_trainer

    config = build_run_config({"method": "qlora", "model": "builtin:tiny-llama", "dataset": "builtin:alpaca-sample",
                               "batch_size": 8, "seq_length": 256, "dtype": "bfloat16", "device": "cpu"})
    tokenizer = load_tokenizer(config.model)
    dataset, _ = load_training_dataset(config, tokenizer)
    method = METHODS["qlora"]
    plan = method.plan(config, load_model(config.model, dtype="bfloat16", device="cpu",
                                          **method.load_options(config, "cpu")))
    trainer = _warmup_trainer(config, plan, tokenizer, dataset, tmp_path, "cpu")
    batch = next(iter(trainer.get_train_dataloader()))
    weights = {p.untyped_storage().data_ptr() for p in plan.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    plan.model.train()
    # The loss the estimate models: TRL's fused LM head, as on CUDA (on CPU ftcli computes the plain Trainer's
    # loss, which keeps the whole logits: ftcli.training.trainer.lean_loss_class).
    trainer._ftcli_plain = False
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.compute_loss(plan.model, dict(batch))
    rows, length = batch["input_ids"].shape
    info = describe_model(config.model)
    est = estimate_memory(info, "qlora", batch_size=rows, seq_length=length, dtype="bfloat16")
    # The estimate's per-layer term alone: without its LM-head tile and attention-mask terms.
    tokens = rows * length
    estimated = est.activations_bytes - 2 * min(tokens, LOGIT_TILE_TOKENS) * min(info.vocab_size, LOGIT_TILE_VOCAB) * 4 \
        - rows * length * length
    assert estimated == activation_elements_per_token(info, False) * tokens * 4
    assert sum(saved.values()) <= estimated <= 1.25 * sum(saved.values()), (sum(saved.values()), estimated)


def test_gpu_memory_reads_decimal_and_binary_units(cli) -> None:
    from ftcli.inspection.estimate import parse_size

    assert parse_size("80GB") == 80 * 10**9 and parse_size("80G") == 80 * 10**9
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("24Gi") == 24 * 2**30
    assert parse_size("16000MB") == 16 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("80") == 80 * 2**30  # a bare number: GiB, as torch and nvidia-smi report
    result = cli("inspect", "builtin:tiny-llama", "--gpu-memory", "1.5GB", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["memory"]["gpu_memory_bytes"] == 1_500_000_000


# ---- the compile-cache key -------------------------------------------------------------------------------------


def test_compile_cache_key_includes_the_gpu_model_and_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from ftcli.config import build_run_config
    from ftcli.training import precision
    from ftcli.training.warmup import cache_folder, cache_key_fields

    config = build_run_config({"method": "lora", "model": "builtin:tiny-llama", "compile": True})
    dataset = {"input_ids": [[1, 2, 3], [4, 5]]}
    monkeypatch.setattr(precision, "liger_available", lambda: True)

    def key(gpu: str, **flags) -> Path:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
        return cache_folder(cache_key_fields(config.model_copy(update=flags), dataset, "cuda:0", torch.bfloat16))

    a100 = key("NVIDIA A100-SXM4-80GB")
    assert key("NVIDIA A100-SXM4-80GB") == a100
    assert key("NVIDIA H100 80GB HBM3") != a100
    assert key("NVIDIA A100-SXM4-80GB", liger=True) != a100
    cpu = cache_key_fields(config, dataset, "cpu", torch.float32)
    assert cpu["gpu"] is None and cpu["liger"] is False
