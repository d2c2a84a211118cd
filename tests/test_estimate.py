"""The memory estimate of `ftcli inspect MODEL` at 150M parameters: the dtype it is for, each figure against an
independent count of the same thing, and its table at 80 columns.

The model is a random Llama of the 150M bench shape (bench/scale_common.py: hidden 1024, 12 layers, 16 heads with
4 key/value heads, intermediate 3072, vocabulary 4096, untied head), built from its config in a temporary folder.
The weights, LoRA's trainable parameters and AdamW's state are counted on the real model (peft's LoRA with ftcli's
default targets, one optimizer step); the activations, the loss logits and the CPU process from the config's shapes.
How close the whole estimate comes to a measured peak is bench/scale_estimate.py's (docs/inspect.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

SHAPE = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=3072, vocab_size=4096)
# Llama 3.1 8B's shape: counts of eleven digits and more, byte figures in the hundreds of GiB.
SHAPE_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256)


def _config(folder: Path, shape: dict) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32",
                **shape).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def model_150m(tmp_path_factory) -> Path:
    return _config(tmp_path_factory.mktemp("m150m"), SHAPE)


def _estimate(cli, model: Path, *args: str) -> dict:
    result = cli("inspect", model, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _this_machine() -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        return "gpu", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "cpu", "float32"


def test_the_estimate_is_for_the_dtype_train_would_use_here(cli, model_150m: Path) -> None:
    device, dtype = _this_machine()
    mem = _estimate(cli, model_150m)["memory"]
    assert (mem["device"], mem["dtype"]) == (device, dtype)
    assert "--dtype auto" in mem["dtype_reason"]
    assert all(e["dtype"] == dtype for e in mem["methods"])
    # --gpu-memory asks about a GPU: the dtype auto picks there, and tensors only (the verdict adds the rest).
    gpu = _estimate(cli, model_150m, "--gpu-memory", "24GB")["memory"]
    assert gpu["device"] == "gpu" and gpu["dtype"] in ("bfloat16", "float16")
    assert all(e["process_bytes"] == 0 for e in gpu["methods"])
    given = _estimate(cli, model_150m, "--dtype", "bfloat16")["memory"]
    assert given["dtype"] == "bfloat16" and given["dtype_reason"] == "--dtype bfloat16"
    bad = cli("inspect", model_150m, "--dtype", "float8")
    assert bad.exit_code == 2 and "--dtype float8" in bad.stderr and len(bad.stderr.strip().splitlines()) <= 2


def test_the_150m_estimate_against_an_independent_count(cli, model_150m: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftcli.config import METHOD_DEFAULTS
    from ftcli.inspection.estimate import CPU_RUNTIME_BYTES

    rows, length = 4, 512
    report = _estimate(cli, model_150m, "--batch-size", str(rows), "--seq-length", str(length), "--dtype", "float32")
    by = {e["method"]: e for e in report["memory"]["methods"]}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_150m)), dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    assert 0.15e9 < params < 0.16e9 and report["model"]["parameters"] == params
    full = by["full"]
    assert (full["weights_bytes"], full["gradients_bytes"]) == (weights, weights)
    assert full["optimizer_bytes"] == 3 * weights  # AdamW's two moments + the foreach step's temporary

    lora = get_peft_model(model, LoraConfig(r=8,  # inspect's --lora-rank default
                                            target_modules=list(METHOD_DEFAULTS["lora"]["lora_target_modules"])))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    assert by["lora"]["trainable_parameters"] == count
    assert by["lora"]["weights_bytes"] == weights + 4 * count  # the float32 base and the adapters
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    assert by["lora"]["optimizer_bytes"] == moments * 3 // 2

    # Activations per token: per layer two RMSNorms (4h), attention (5q + 2kv), the MLP (4i); outside the layers 4h.
    h, layers, i = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["intermediate_size"]
    vocab = SHAPE["vocab_size"]
    q, kv = h, SHAPE["num_key_value_heads"] * h // SHAPE["num_attention_heads"]
    tokens = rows * length
    tiles = 2 * min(tokens, 4096) * min(vocab, 32768) * 4  # TRL's fused head (a GPU's loss)
    per_token = layers * (4 * h + 5 * q + 2 * kv + 4 * i) + 4 * h
    assert full["activations_bytes"] == per_token * tokens * 4 + tiles + rows * length * length

    if report["memory"]["device"] != "cpu":
        return
    # The CPU process: the runtime, the plain loss's whole logits (logits, log-softmax, gradient) in place of the
    # tiles, and glibc's heap keeping as much again as the activations (every per-layer tensor here is at most
    # 4 x 512 x 3072 x 4 bytes = 24 MiB, below its 32 MiB mmap threshold), less the gradients and AdamW state
    # that reuse it: all of it for LoRA, none for full fine-tuning (its 2.3 GiB of them exceed the 2.1 GiB).
    for e in by.values():
        assert e["device"] == "cpu"
        assert e["process"]["runtime"] == CPU_RUNTIME_BYTES
        assert e["process"]["loss logits"] == 3 * tokens * vocab * 4 - tiles
        assert e["process_bytes"] == sum(e["process"].values())
        assert e["total_bytes"] == sum(e[k] for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes",
                                                      "activations_bytes", "process_bytes"))
    lora = by["lora"]
    assert lora["process"]["allocator"] == lora["activations_bytes"] - tiles - lora["gradients_bytes"] \
        - lora["optimizer_bytes"] > 1 << 30
    assert full["process"]["allocator"] == 0
    # At 8 x 1024 tokens the MLP's tensors (96 MiB) are mapped and unmapped whole: only the rest stays in the heap.
    big = {e["method"]: e for e in _estimate(cli, model_150m, "--batch-size", "8", "--seq-length", "1024",
                                             "--dtype", "float32")["memory"]["methods"]}["lora"]
    heap = (4 * h + 5 * q + 2 * kv) / (4 * h + 5 * q + 2 * kv + 4 * i)
    big_tiles = 2 * 4096 * 4096 * 4
    assert big["process"]["allocator"] == int((big["activations_bytes"] - big_tiles) * heap - big["gradients_bytes"]
                                              - big["optimizer_bytes"])


@pytest.mark.parametrize("shape", ["150m", "8b"])
def test_the_estimate_table_fits_80_columns_and_names_its_dtype(cli, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path, shape: str) -> None:
    model = _config(tmp_path / shape, SHAPE if shape == "150m" else SHAPE_8B)
    monkeypatch.setenv("COLUMNS", "80")
    for extra, dtype, device in (([], _this_machine()[1], _this_machine()[0]),
                                 (["--objective", "dpo", "--gpu-memory", "80GB", "--nproc", "8"], None, "gpu")):
        result = cli("inspect", model, *extra)
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert max(map(len, lines)) <= 80 and "…" not in result.stdout, [line for line in lines if len(line) > 80]
        # Every method's total on one row, each a whole figure.
        assert re.search(r"│ total\s+│(\s+[\d.]+ [KMG]iB │){4}$", result.stdout, re.M), result.stdout
        text = " ".join(result.stdout.split())
        assert re.search(r"For (this CPU|a GPU)[^,]*, in (float32|bfloat16|float16) \(--dtype auto on ", text), text
        if dtype:
            assert f", in {dtype} (--dtype auto on" in text
        if device == "cpu":
            assert "│ CPU process " in result.stdout and "peak RSS" in text
        else:
            assert "CPU process" not in result.stdout and "fits 74.5 GiB" in result.stdout
