"""Merging LoRA adapters into their base weights in place, and checking the result against the unmerged model.

    >>> from ftcli.models import attach_adapter
    >>> from ftcli.export.merge import compare, forward_logits, merge_into_weights, reference_logits
    >>> from ftcli.export.merge import verification_inputs
    >>> model = attach_adapter(base, "runs/lora-1")            # base + adapter (peft), unmerged
    >>> inputs = verification_inputs(tokenizer, probe_path=None)
    >>> ref = reference_logits(model, inputs)                   # logits of what was trained
    >>> merged = merge_into_weights(model)                      # the same tensors, adapter added in
    >>> check = compare(forward_logits(merged, inputs), ref.logits, "bfloat16")

Every merge here works on the loaded model's own tensors, one layer at a time, so an export never
holds two copies of the model. Two ways in:

- `merge_into_weights`: peft's `merge_and_unload` (W += B·A·scale, in place) for adapters trained
  on ordinary float weights (LoRA).
- `merge_into_dequantized`: for QLoRA adapters on a 4-bit NF4 base. Each bitsandbytes `Linear4bit`
  weight is dequantised (`bitsandbytes.functional.dequantize_4bit`), the adapter's delta is added
  in float32, and the layer becomes a plain `nn.Linear` in the output dtype. peft's own 4-bit merge
  would quantise the sum again, rounding most of the adapter away, so it is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


# Short, fixed prompts: an instruction, code and a fact to complete. The check runs VERIFY_INPUTS inputs of at
# most MAX_VERIFY_TOKENS tokens: the run's probe input (the one its training recorded logits for) when there is
# one, then these prompts in order. A merge that went wrong leaves a wrong weight in a layer every position passes
# through, so it shows at every position; two inputs in different contexts (32 positions) tell it, and every
# position costs a forward pass through the whole model three times (base + adapter, base alone, merged).
VERIFY_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "def fibonacci(n):\n    return n if n < 2 else",
    "The capital of France is Paris, and the capital of Italy is",
)
VERIFY_INPUTS = 2
MAX_VERIFY_TOKENS = 16  # as many as the run's probe input (ftcli.training.run.PROBE_TOKENS)

# Largest logit difference allowed, relative to the largest reference logit (at least 1.0): float32 only
# reorders sums; 16-bit formats round every weight and activation (bfloat16 keeps 8 bits of mantissa);
# TF32 matmuls (float32 storage) keep float16's 10 bits of mantissa.
RELATIVE_TOLERANCE = {"float32": 1e-4, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}


def loosest(*precisions: str) -> str:
    """Of the precisions the two sides of a comparison were computed in, the one with the widest tolerance."""
    return max(precisions, key=lambda name: RELATIVE_TOLERANCE[name])
_CHECK_SLICE = 1 << 22  # elements per slice of the finiteness check
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@dataclass
class Reference:
    logits: list[Any]
    adapter_effect: float | None  # largest |logits(base + adapter) - logits(base)|, None when not measured


@dataclass
class Comparison:
    max_difference: float
    tolerance: float
    precision: str = "float32"  # whose tolerance: the less precise of the reference's and the output's

    @property
    def ok(self) -> bool:
        return self.max_difference <= self.tolerance


def verification_inputs(tokenizer: Any, probe_path: Path | None) -> list[Any]:
    """Token ids of the VERIFY_INPUTS inputs: the run's probe input when there is one, then the fixed prompts."""
    import torch

    inputs = []
    if probe_path is not None and probe_path.is_file():
        inputs.append(read_probe(probe_path)["input_ids"][:MAX_VERIFY_TOKENS])
    for text in VERIFY_PROMPTS[:VERIFY_INPUTS - len(inputs)]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_VERIFY_TOKENS]
        inputs.append(torch.tensor(ids, dtype=torch.long))
    return inputs


def read_probe(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def forward_logits(model: Any, inputs: list[Any], batched: bool = True) -> list[Any]:
    """Logits (float32, on CPU) of each input.

    `batched`: one forward pass over all inputs, right-padded into one batch with an attention mask. A causal
    model's logits at a position depend only on the tokens up to it, so padding after the last real token changes
    nothing that is kept, and the weights are read once for all inputs instead of once per input (the pass is
    bound by reading them). The comparison runs the same batch through both sides. `batched=False`: one sequence
    at a time, for heads that read a sequence's last token (a reward model's score), which padding would move."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        if not batched or len(inputs) < 2:
            for ids in inputs:
                out.append(model(input_ids=ids[None].to(device)).logits[0].float().cpu())
            return out
        longest = max(len(ids) for ids in inputs)
        batch = torch.zeros(len(inputs), longest, dtype=torch.long)
        mask = torch.zeros(len(inputs), longest, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        return [logits[row, :len(ids)] for row, ids in enumerate(inputs)]


def reference_logits(model: Any, inputs: list[Any], batched: bool = True) -> Reference:
    """Logits of base + adapter (unmerged), and how far the adapter moves them from the base alone."""
    logits = forward_logits(model, inputs, batched)
    with model.disable_adapter():
        plain = forward_logits(model, inputs, batched)
    return Reference(logits, max_difference(logits, plain))


def max_difference(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def compare(got: list[Any], ref: list[Any], precision: str) -> Comparison:
    """`got` against `ref` within the tolerance of `precision` (see `loosest`), relative to the largest logit."""
    scale = max(1.0, max(float(r.abs().max()) for r in ref))
    return Comparison(max_difference(got, ref), RELATIVE_TOLERANCE[precision] * scale, precision)


def merge_into_weights(model: Any) -> Any:
    """peft's in-place merge (W += ΔW on the loaded tensors); returns the plain transformers model."""
    return model.merge_and_unload()


def merge_into_dequantized(model: Any, dtype: Any) -> Any:
    """Merge each LoRA layer into its dequantised 4-bit weight; every 4-bit layer becomes a plain `nn.Linear`.

    Works layer by layer: the float32 sum of one layer is the only temporary, and the 4-bit layer
    it replaces is freed as soon as the new one is in place."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    for name, module in list(inner.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            module.merge()  # a layer the quantiser left in float (none with all-linear): the ordinary merge
            inner.set_submodule(name, base.to(dtype))
            continue
        weight = _dequantize(base).float()
        bias = base.bias.data.float() if base.bias is not None else None
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if adapter in module.lora_variant:  # DoRA and friends know their own merge
                weight = module.lora_variant[adapter].merge_safe(module, adapter, weight)
            else:
                weight += module.get_delta_weight(adapter).float()
            if bias is not None and module.lora_bias.get(adapter):
                bias += module.lora_B[adapter].bias.data.float()
        inner.set_submodule(name, _plain_linear(weight.to(dtype), None if bias is None else bias.to(dtype)))
        del weight, bias
    unwrap_trained_modules(inner)
    dequantize_remaining(inner, dtype)
    return inner


def unwrap_trained_modules(inner: Any) -> int:
    """Put each module peft trained in full (a reward model's score head: modules_to_save) in place of its wrapper,
    as peft's own merge_and_unload does; returns how many."""
    from peft.tuners.lora import LoraLayer

    wrappers = [(name, module) for name, module in inner.named_modules()
                if hasattr(module, "unload_and_optionally_merge_module") and not isinstance(module, LoraLayer)]
    for name, module in wrappers:
        inner.set_submodule(name, module.unload_and_optionally_merge_module(merge=True, safe_merge=False,
                                                                            adapter_names=None))
    return len(wrappers)


def return_freed_memory_promptly() -> bool:
    """Serve large allocations (1 MiB and up) with their own mappings, so memory freed goes back at once.

    glibc raises its mmap threshold each time a large block is freed; after that, the per-layer
    temporaries of a merge come from the heap, which fragments and keeps growing while the merged
    weights pile up behind them (measured: about half the model more on a 134M-parameter merge). A fixed
    threshold turns that adaptation off. Only glibc has `mallopt`; elsewhere this does nothing."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def release_file_mapping(model: Any) -> int:
    """Give the 4-bit model's float tensors (embeddings, norms, head) memory of their own; returns bytes copied.

    transformers maps the checkpoint into memory and leaves the tensors it did not convert as views
    of that mapping. After quantisation every page of the file has been read, and all of them stay
    counted in the process's memory while one view is alive: copying the small float part lets the
    whole mapping go before the merge builds the new weights."""
    import bitsandbytes as bnb

    copied = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def dequantize_remaining(model: Any, dtype: Any) -> int:
    """Replace every 4-bit layer still in `model` by its dequantised `nn.Linear`; drop the quantisation record."""
    import bitsandbytes as bnb

    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            bias = module.bias.data.to(dtype) if module.bias is not None else None
            model.set_submodule(name, _plain_linear(_dequantize(module).to(dtype), bias))
            replaced += 1
    forget_quantization(model)
    return replaced


def forget_quantization(model: Any) -> None:
    """Drop every record of the 4-bit load from the model and its configs, in memory as on disk: the quantizer and
    `quantization_config`, and the in-memory `_is_quantized` flag transformers puts on every sub-model's config
    (FlashAttention 2 reads it and then feeds the config's dtype, float32 for a float32 export, to its kernel)."""
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        for config in {id(c): c for c in (module.config, module.config.get_text_config())}.values():
            for key in ("quantization_config", "_is_quantized", "_pre_quantization_dtype"):
                if key in config.__dict__:
                    delattr(config, key)
        module.is_quantized = False
        module.is_loaded_in_4bit = False
        for key in ("hf_quantizer", "quantization_method"):
            if key in module.__dict__:
                delattr(module, key)


def _dequantize(layer: Any) -> Any:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _plain_linear(weight: Any, bias: Any) -> Any:
    import torch

    out_features, in_features = weight.shape
    with torch.device("meta"):
        linear = torch.nn.Linear(in_features, out_features, bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


def cast_in_place(model: Any, dtype: Any) -> None:
    """Cast the floating-point parameters one tensor at a time (never a second full copy).

    Buffers keep their dtype: they are not saved (rotary frequencies, for one, are rebuilt in float32
    on load), so casting them would make the verification see a model no reload reproduces."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def non_finite_weights(model: Any) -> list[str]:
    """Names of parameters holding NaN or inf.

    A sum is NaN or infinite whenever one of its terms is, so one sum per tensor (a single read, no
    tensor-sized temporary) clears nearly every tensor; only one whose sum is not finite (a NaN or inf inside,
    or finite values large enough to overflow the sum) is checked element by element, in slices (`isfinite`
    makes input-sized temporaries)."""
    import torch

    bad = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point() or bool(torch.isfinite(param.sum())):
                continue
            if not all(bool(torch.isfinite(part).all()) for part in param.detach().reshape(-1).split(_CHECK_SLICE)):
                bad.append(name)
    return bad


def model_bytes(model: Any) -> int:
    """Bytes the model's parameters and buffers take in memory (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


# ---- narrowing a checkpoint before it is loaded -----------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_NARROWER = {"float16", "bfloat16"}


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a .safetensors file, read without mapping the file."""
    import json
    import struct

    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return 8 + size, json.loads(fh.read(size))


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names, or `model.safetensors` (not e.g. a probe file)."""
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def needs_narrowing(folder: Path, dtype_name: str) -> bool:
    """Whether the checkpoint in `folder` stores float tensors wider than the 16-bit `dtype_name`."""
    if dtype_name not in _NARROWER:
        return False
    for file in weight_files(folder):
        _, header = read_safetensors_header(file)
        if any(v.get("dtype") in ("F32", "F64") for k, v in header.items() if k != "__metadata__"):
            return True
    return False


def narrow_checkpoint(src: Path, dst: Path, dtype_name: str) -> int:
    """Copy the checkpoint in `src` to `dst` with its wider float tensors cast to `dtype_name`, one tensor at a time.

    Loading a float32 checkpoint as bfloat16 maps the whole float32 file while the bfloat16 model is
    built (transformers keeps its checkpoint files mapped until loading ends): about three times the
    exported model in resident memory. Reading each tensor with a plain read (the page cache is not
    the process's memory), casting it and writing it out at once keeps this step near one tensor, and
    the load that follows maps a file of the exported size. Returns the bytes written."""
    import shutil

    import torch

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():  # config, generation config, index: everything small the loader reads
        if item.is_file() and item.suffix == ".json":
            shutil.copy2(item, dst / item.name)
    target = getattr(torch, dtype_name)
    written = 0
    for file in weight_files(src):
        written += _narrow_file(file, dst / file.name, target)
    return written


def _narrow_file(src: Path, dst: Path, target: Any) -> int:
    import json

    import torch

    start, header = read_safetensors_header(src)
    names = [k for k in header if k != "__metadata__"]
    names.sort(key=lambda k: header[k]["data_offsets"][0])
    out_header: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    sizes: dict[str, tuple[str, int]] = {}
    for name in names:
        info = header[name]
        stored = info["dtype"]
        cast = stored in ("F32", "F64")
        dtype = "BF16" if cast and target == torch.bfloat16 else "F16" if cast else stored
        begin, end = info["data_offsets"]
        nbytes = (end - begin) // _itemsize(stored) * _itemsize(dtype) if cast else end - begin
        sizes[name] = (dtype, nbytes)
    offset = 0
    for name in names:
        dtype, nbytes = sizes[name]
        out_header[name] = {"dtype": dtype, "shape": header[name]["shape"],
                            "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(len(blob).to_bytes(8, "little") + blob)
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            fin.seek(start + begin)
            raw = bytearray(fin.read(end - begin))
            if info["dtype"] in ("F32", "F64"):
                source = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
                tensor = torch.frombuffer(raw, dtype=source) if raw else torch.empty(0, dtype=source)
                raw = tensor.to(target).view(torch.uint8).numpy().tobytes()
            fout.write(raw)
    return offset


def _itemsize(code: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[code]
