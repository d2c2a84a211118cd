"""FSDP: the model sharded across processes with FSDP2, LoRA adapters by default or every weight.

    $ ftcli train --method fsdp --model builtin:tiny-llama --dataset builtin:alpaca-sample \\
        --nproc-per-node 2 --max-steps 5                       # add --full-parameters to train every weight

    >>> plan = fsdp.plan(config, model)   # LoRA (or full) plan + the trainer's FSDP arguments

The sharding goes through the trainer's own engine: `SFTConfig(fsdp=True, fsdp_config=...)` becomes
accelerate's `FullyShardedDataParallelPlugin` (FSDP2, `fully_shard` per decoder layer, FULL_STATE_DICT).
Two gaps of that engine are closed by `FsdpTrainer`: accelerate ignores the FSDP plugin when the
processes run on CPU (gloo), and on CPU the FSDP2 "full" state dict comes back as DTensor shards, so
saving gathers every tensor itself and rank 0 writes an ordinary adapter or model folder.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ftcli.methods import full, lora, variants
from ftcli.methods.base import LLAMA_PROJECTIONS, Method

# Collectives that wait longer than this are a stuck rank, not slow work: fail instead of hanging.
COLLECTIVE_TIMEOUT_S = 600


def load_options(config: Any, device: str) -> dict[str, Any]:
    """Load on CPU without device placement: accelerate's `fully_shard` moves each shard to its rank's device."""
    return {"device_map": None}


def decoder_layer_classes(model: Any) -> list[str]:
    """Class names of the repeated blocks to wrap one FSDP unit each, read from the model itself.

    The model's `_no_split_modules` (what transformers keeps whole across devices) when those classes
    occur in it; otherwise the class of the children of its largest `ModuleList` (the decoder stack).
    """
    import torch

    present = {type(m).__name__ for m in model.modules()}
    declared = sorted(set(getattr(model, "_no_split_modules", None) or []) & present)
    if declared:
        return declared
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not stacks:
        from ftcli.errors import ConfigError

        raise ConfigError(f"--method fsdp cannot find the repeated layers of {type(model).__name__}",
                          hint="use a transformers model with a decoder-layer stack, or --method lora/full")
    return [type(max(stacks, key=len)[0]).__name__]


def plan(config: Any, model: Any) -> Any:
    layers = decoder_layer_classes(model)
    base = full.plan(config, model) if config.full_parameters else lora.plan(config, model)
    base.training_args = {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
            # Not FSDP's own checkpointing (cheaper by one all-gather): its wrapper renames the modules, and
            # peft 0.21 then finds no adapter weights to save. The trainer's --gradient-checkpointing applies.
            "activation_checkpointing": False,
        },
        "ddp_timeout": COLLECTIVE_TIMEOUT_S,
    }
    base.trainer_class = fsdp_trainer_class
    if base.initial_adapter is not None:
        initial = base.initial_adapter
        base.trainer_class = lambda objective_class: variants.plain_lora_saving(fsdp_trainer_class(objective_class),
                                                                                initial)
    base.notes.append(f"FSDP2 wraps each {', '.join(layers)}; "
                      f"{'all weights train' if config.full_parameters else 'LoRA adapters train'}")
    return base


def full_state_dict(model: Any, keep: bool) -> dict[str, Any]:
    """Every rank joins the all-gather of each shard; only the rank that `keep`s holds the full tensors."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[name] = full.detach().cpu().clone()
    return out


@lru_cache(maxsize=None)
def fsdp_trainer_class(base: type) -> type:
    """`base` (the objective's trainer: SFTTrainer, DPO's) sharding with FSDP on CPU too, and saving a plain folder
    from gathered weights."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class FsdpTrainer(base):  # type: ignore[misc,valid-type]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            # accelerate only turns the plugin on for GPU-like process groups; on CPU it would silently
            # train plain data-parallel. Its FSDP2 code itself works with gloo, so turn it on here.
            if state.distributed_type == DistributedType.MULTI_CPU and self.args.fsdp_plugin_args:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            if not self.is_fsdp_enabled:
                super().save_model(output_dir, _internal_call)
                return
            output_dir = output_dir or self.args.output_dir
            state_dict = full_state_dict(self.model, keep=self.args.should_save)
            if self.args.should_save:
                model = self.accelerator.unwrap_model(self.model)
                model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
            self.accelerator.wait_for_everyone()

    return FsdpTrainer


METHOD = Method(
    name="fsdp",
    summary="sharded across processes and machines (LoRA, or --full-parameters)",
    trains_adapter=True, uses_lora=True, loads_4bit=False, shards=True, multi_process=True,
    defaults={"model": "meta-llama/Llama-3.1-70B-Instruct", "batch_size": 4, "learning_rate": 1e-4,
              "gradient_checkpointing": True, "lora_target_modules": list(LLAMA_PROJECTIONS)},
    plan=plan,
    load_options=load_options,
)
