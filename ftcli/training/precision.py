"""How a run computes: autocast, loss scaling, TF32 and Liger, decided in one place and recorded as they are.

    >>> from ftcli.training.precision import autocast_args, use_liger, precision_record
    >>> autocast_args(torch.bfloat16, "cuda:0")     # the SFTConfig arguments of the compute dtype
    {'bf16': True, 'fp16': False}
    >>> use_liger(config, "cpu")                     # never on CPU
    False
    >>> manifest["precision"] = precision_record(trainer)

The compute dtype is --dtype resolved (QLoRA's 4-bit layers compute in it too), and autocast follows it,
not `model.dtype`: after `prepare_model_for_kbit_training` a QLoRA model reads float32 (its norms,
embeddings and head are upcast), while its matmuls are meant to run in the compute dtype.

- bfloat16: bf16 autocast (a no-op for bfloat16 weights; for QLoRA it puts the attention, MLP and head
  matmuls in bfloat16 around the float32 parts).
- float16 on CUDA: fp16 autocast with a gradient scaler (`fp16=True`). torch's GradScaler refuses to unscale
  float16 gradients, and float16 weight updates underflow, so the trainable parameters are kept in float32
  (master weights); the frozen weights stay float16. On CPU accelerate has no fp16 autocast: nothing changes.
- float32: no autocast. `--compile` lets transformers switch TF32 matmuls on (CUDA, Ampere or newer);
  the manifest records it, and export's verification widens its tolerance for that run's probe logits.

Importing this module must not import torch.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from ftcli.errors import ConfigError


def autocast_args(compute_dtype: Any, device: str) -> dict[str, bool]:
    """SFTConfig's `bf16` / `fp16` for the compute dtype: autocast in it, with loss scaling for float16 on CUDA."""
    name = str(compute_dtype).removeprefix("torch.")
    return {"bf16": name == "bfloat16", "fp16": name == "float16" and not device.startswith("cpu")}


def keep_master_weights(model: Any) -> int:
    """Trainable half-precision parameters to float32 (fp16 autocast trains float32 master weights under a
    gradient scaler); returns how many were cast. Called after the trainer is built (TRL casts QLoRA's adapters
    to bfloat16 in its constructor) and before it creates the optimizer."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            cast += 1
    return cast


def liger_available() -> bool:
    return find_spec("liger_kernel") is not None


def use_liger(config: Any, device: str) -> bool:
    """Liger's fused kernels: off on CPU (they are Triton kernels); on CUDA as --liger/--no-liger says, and when
    unset, on where installed unless --compile (Liger's kernels and torch.compile are known not to mix)."""
    if not device.startswith("cuda"):
        return False
    asked = getattr(config, "liger", None)
    if asked is None:
        return liger_available() and not config.compile
    if asked and not liger_available():
        raise ConfigError("--liger needs the liger-kernel package, which is not installed",
                          hint="pip install liger-kernel, or pass --no-liger")
    return bool(asked)


def tf32_enabled() -> bool:
    """Whether float32 matmuls may run in TF32 in this process (any of torch's switches for it)."""
    import torch

    checks = (lambda: torch.get_float32_matmul_precision() != "highest",
              lambda: bool(torch.backends.cuda.matmul.allow_tf32),
              lambda: getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32")
    for check in checks:
        try:
            if check():
                return True
        except (AttributeError, RuntimeError):  # an older torch, or torch refusing a mix of its old and new APIs
            continue
    return False


def _dtype_counts(params: list[Any]) -> dict[str, int]:
    from ftcli.methods.base import weight_count

    counts: dict[str, int] = {}
    for param in params:
        # A bitsandbytes 4-bit weight is stored packed in a float or uint8 tensor: name it by what it is.
        state = getattr(param, "quant_state", None)
        name = str(getattr(state, "quant_type", "4bit")) if state is not None else \
            str(param.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + weight_count(param)
    return counts


def compute_dtype_of(model: Any, default: Any) -> str:
    """The 4-bit layers' compute dtype when the model has any, else `default` (the resolved --dtype)."""
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if dtype is not None and type(module).__name__ == "Linear4bit":
            return str(dtype).removeprefix("torch.")
    return str(default).removeprefix("torch.")


def precision_record(trainer: Any, compute_dtype: Any) -> dict[str, Any]:
    """What the run really computes with, read from the trainer's model and arguments (the manifest's `precision`)."""
    model, args = trainer.model, trainer.args
    params = list(model.parameters())
    autocast = "bfloat16" if args.bf16 else "float16" if args.fp16 else None
    return {
        "weights": _dtype_counts([p for p in params if not p.requires_grad]),
        "trainable": _dtype_counts([p for p in params if p.requires_grad]),
        "compute": compute_dtype_of(model, compute_dtype),
        "autocast": autocast,
        "grad_scaler": bool(args.fp16),
        "tf32": tf32_enabled(),
        "liger": bool(getattr(args, "use_liger_kernel", False)),
    }
