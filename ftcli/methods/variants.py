"""The LoRA variants (peft): DoRA, rsLoRA, the adapters' initialisation, trained biases; and saving PiSSA/OLoRA
adapters in a form that needs no changed base.

    $ ftcli train --method lora --use-dora --lora-init pissa --model builtin:tiny-llama --max-steps 5

    >>> from ftcli.methods import variants
    >>> LoraConfig(**variants.lora_config_args(config), r=..., ...)      # use_dora, use_rslora, init, bias

PiSSA and OLoRA start the adapter from the base weight's principal directions (SVD) or its QR
factors and subtract that start from the base, so training runs on a residual base W_res = W - s·B0·A0
(s = alpha / r, or alpha / sqrt(r) with rsLoRA). The checkpoints keep that form (peft rebuilds the
residual from the original base when it loads them, and resuming needs the very same start); the run's
final adapter is converted as peft's `subtract_mutated_init` does, ΔW = s·(B·A - B0·A0) =
s·[B | -B0]·[A ; A0]: a plain LoRA adapter of rank 2r (alpha doubled, or times sqrt 2 with rsLoRA, so
the scaling stays s) on the ORIGINAL base, which export, eval, generate and any other LoRA loader
apply as is. Unlike peft's own conversion, the other trained tensors (DoRA's magnitude vectors,
biases) are kept.

LoftQ (QLoRA only) starts the adapter so that Q(W) + B·A is close to W, with the 4-bit base
untouched; peft computes it on CUDA only. Importing this module must not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ftcli.errors import ConfigError

# --lora-init -> peft's `init_lora_weights` (loftq is applied after the adapters exist: see `apply_loftq`).
PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
# Initialisations that subtract the adapter's start from the base weights (the run saves them converted).
CHANGES_BASE = ("pissa", "olora")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def describe(config: Any) -> str:
    """`dora, rslora, init pissa, bias all`: the variant options that differ from plain LoRA ("" for none of them)."""
    parts = [name for name, on in (("dora", getattr(config, "use_dora", False)),
                                   ("rslora", getattr(config, "use_rslora", False))) if on]
    if getattr(config, "lora_init", "default") != "default":
        parts.append(f"init {config.lora_init}")
    if getattr(config, "lora_bias", "none") != "none":
        parts.append(f"bias {config.lora_bias}")
    return ", ".join(parts)


def adapter_variant(adapter_config: dict[str, Any], trained_init: str | None = None) -> str:
    """What a saved adapter is, in words (`DoRA, rsLoRA, biases all, PiSSA start converted to plain LoRA of rank
    16`), "" for plain LoRA; `trained_init` is the run's --lora-init when its manifest is known."""
    parts = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if adapter_config.get(key)]
    if adapter_config.get("bias", "none") != "none":
        parts.append(f"biases {adapter_config['bias']}")
    init = adapter_config.get("init_lora_weights", True)
    if init in CHANGES_BASE:
        parts.append(f"{init} start, saved as trained: peft rebuilds the residual base from the base model as it loads")
    elif trained_init in CHANGES_BASE:
        parts.append(f"{trained_init} start converted to plain LoRA of rank {adapter_config.get('r')} on the "
                     "original base")
    elif init not in (True, None) or trained_init not in (None, "default"):
        parts.append(f"{trained_init or init} start")
    return ", ".join(parts)


def lora_config_args(config: Any) -> dict[str, Any]:
    """The LoraConfig arguments of the variant options."""
    return {"use_dora": config.use_dora, "use_rslora": config.use_rslora,
            "init_lora_weights": PEFT_INIT[config.lora_init], "bias": config.lora_bias}


def check_rank(config: Any, model: Any, targets: Any) -> None:
    """PiSSA and OLoRA start the adapter from the first `--lora-rank` singular directions (QR columns) of each adapted
    weight, which has only min(in, out) of them: a higher rank trains, and saves an adapter whose recorded rank its
    tensors do not have (nothing loads it). Refused before training, naming the narrowest layer."""
    import torch

    if config.lora_init not in ("pissa", "olora"):
        return
    wanted = None if targets == "all-linear" else set(targets)
    narrowest = None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, torch.nn.Linear) or leaf == "lm_head" or (wanted is not None and leaf not in wanted):
            continue
        size = min(module.in_features, module.out_features)
        if narrowest is None or size < narrowest[0]:
            narrowest = (size, name, module.in_features, module.out_features)
    if narrowest is not None and config.lora_rank > narrowest[0]:
        size, name, n_in, n_out = narrowest
        raise ConfigError(f"--lora-rank {config.lora_rank} with --lora-init {config.lora_init}: the rank must be at "
                          f"most min(in, out) of every adapted layer, and {name} is {n_in} x {n_out}",
                          hint=f"use --lora-rank {size} or less, or --lora-init default")


def check_biases(config: Any, model: Any, targets: Any) -> None:
    """Refuse --lora-bias when the layers it would train have no bias (nothing would train, silently)."""
    if config.lora_bias == "none":
        return
    names = [n for n, p in model.named_parameters() if n.endswith("bias")]
    if config.lora_bias == "lora_only" and targets != "all-linear":
        names = [n for n in names if n.rsplit(".", 2)[-2] in set(targets)]
    if not names:
        where = "the model" if config.lora_bias == "all" else "the layers LoRA adapts"
        raise ConfigError(f"--lora-bias {config.lora_bias}: {where} has no bias terms to train "
                          f"({type(model).__name__})", hint="leave --lora-bias at none for this model")


def initial_adapter(peft_model: Any) -> dict[str, Any]:
    """The adapter's A and B matrices as initialised (CPU copies), keyed as peft saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()
            if ".lora_A." in k or ".lora_B." in k}


def convert_to_plain_lora(folder: Path, initial: dict[str, Any]) -> int:
    """Rewrite the PiSSA/OLoRA adapter saved in `folder` as a plain LoRA adapter on the original base; returns
    its new rank. Each file is replaced atomically; an adapter already converted is left as it is."""
    from safetensors.torch import load_file, save

    from ftcli.files import write_atomic, write_json_atomic

    config_path = folder / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    if adapter_config.get("init_lora_weights") not in CHANGES_BASE:
        return int(adapter_config["r"])
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    missing = [k for k in saved if (".lora_A." in k or ".lora_B." in k) and k not in initial]
    if missing:
        raise RuntimeError(f"the initial adapter has no {missing[0]}: cannot convert the saved adapter")
    converted = {}
    for key, value in saved.items():
        if ".lora_A." in key:
            converted[key] = _cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            converted[key] = _cat([value, -initial[key].to(value.dtype)], dim=1)
        else:  # DoRA's magnitude vectors and trained biases do not depend on the start
            converted[key] = value
    write_atomic(folder / ADAPTER_WEIGHTS, save(converted, metadata={"format": "pt"}))
    adapter_config.update(converted_config(adapter_config))
    write_json_atomic(config_path, adapter_config)
    return int(adapter_config["r"])


def converted_config(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The adapter config of the converted adapter (peft's rule): rank doubled, the scaling kept."""
    factor = math.sqrt(2) if adapter_config.get("use_rslora") else 2
    return {
        "init_lora_weights": True,
        "r": 2 * int(adapter_config["r"]),
        "lora_alpha": adapter_config["lora_alpha"] * factor,
        "rank_pattern": {k: 2 * v for k, v in (adapter_config.get("rank_pattern") or {}).items()},
        "alpha_pattern": {k: v * factor for k, v in (adapter_config.get("alpha_pattern") or {}).items()},
    }


def _cat(tensors: list[Any], dim: int) -> Any:
    import torch

    return torch.cat(tensors, dim=dim).contiguous()


def plain_lora_saving(trainer_base: type, initial: dict[str, Any]) -> type:
    """`trainer_base` whose final save (not its checkpoints) writes the adapter converted to plain LoRA."""

    class PlainLoraSavingTrainer(trainer_base):  # type: ignore[misc,valid-type]
        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call)
            # Checkpoints (the trainer's internal saves) stay as trained: resuming rebuilds the same residual base.
            if not _internal_call and self.args.should_save:
                convert_to_plain_lora(Path(output_dir or self.args.output_dir), initial)

    return PlainLoraSavingTrainer


def check_device(config: Any, device: str) -> None:
    """LoftQ's round trips run on CUDA only in peft (`loftq_utils` moves each weight to "cuda")."""
    if config.lora_init == "loftq" and not device.startswith("cuda"):
        raise ConfigError(f"--lora-init loftq needs CUDA (peft computes its 4-bit round trips on the GPU), and this "
                          f"run is on {device}", hint="run on a CUDA GPU, or use --lora-init default")


def apply_loftq(peft_model: Any, config: Any) -> None:
    """LoftQ on the loaded 4-bit base: peft reads each original weight from the checkpoint and sets A, B so that
    Q(W) + B·A approximates W (one alternating step); the 4-bit base itself stays as loaded."""
    from peft import replace_lora_weights_loftq

    from ftcli.models import resolve_model_source

    source = resolve_model_source(config.model)
    path = None if source.kind == "hub" else str(source.path)
    replace_lora_weights_loftq(peft_model, model_path=path)
