"""What a training method is: its declared facts, and the plan it builds for one run.

    >>> from ftcli.methods import METHODS
    >>> method = METHODS["qlora"]
    >>> method.trains_adapter, method.loads_4bit, method.shards, method.defaults["batch_size"]
    (True, True, False, 8)

Code outside `ftcli/methods/` asks a method for these facts and never compares its name, so a new
method is its own file (a `Method(...)` named `METHOD`) plus one line in the registry
(`ftcli/methods/__init__.py`). Importing this module must not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The options whose default depends on the method; every method gives each of them a value.
PER_METHOD_OPTIONS = ("model", "batch_size", "learning_rate", "gradient_checkpointing", "lora_target_modules")


@dataclass
class MethodPlan:
    model: Any
    saves: str  # "model" | "adapter"
    trainable_parameters: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)
    # Extra SFTConfig keyword arguments (e.g. FSDP settings), merged over ftcli's own by the trainer builder.
    training_args: dict[str, Any] = field(default_factory=dict)
    # The method's trainer, built on the objective's (TRL's SFTTrainer, ftcli's DPOTrainer: ftcli/objectives/):
    # a function of that class (e.g. FSDP's saving on top of it); None: the objective's class as it is.
    trainer_class: Callable[[type], type] | None = None
    # PiSSA/OLoRA: the adapter's start (A0, B0), which the final save subtracts (ftcli/methods/variants.py).
    initial_adapter: Any = None


def weight_count(param: Any) -> int:
    """How many weights a parameter holds: a bitsandbytes 4-bit one packs them (its quant_state has the shape)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return int(math.prod(shape))
    return param.numel()


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(weight_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(weight_count(p) for p in model.parameters())
    return trainable, total


def no_load_options(config: Any, device: str) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """One training method: the facts the rest of ftcli asks about, and how it loads and adapts a model.

    - `trains_adapter`: by default only LoRA adapters train (the run saves an adapter; export merges it).
    - `uses_lora`: the LoRA options (rank, alpha, dropout, targets) shape the run; they are part of
      its compile-cache key.
    - `loads_4bit`: the frozen base is loaded in 4-bit NF4 (bitsandbytes); the adapter was trained
      against the dequantised weights, and its trainable weights are kept in bfloat16.
    - `shards`: weights, gradients and optimizer state are sharded over the processes (FSDP); the
      model compiles after sharding, inside the run, so there is no ahead-of-time warmup.
    - `multi_process`: may run on several processes and machines (`--nproc-per-node`, `--nnodes`),
      started by ftcli's launcher: sharded (`shards`, always launched, even on one process) or
      data parallel (DDP: every process holds the whole model and trains on its share of each
      optimizer step; launched only for more than one process).
    - `defaults`: this method's value of every option in PER_METHOD_OPTIONS (the reference scripts').
    """

    name: str
    summary: str
    trains_adapter: bool
    uses_lora: bool
    loads_4bit: bool
    shards: bool
    multi_process: bool
    defaults: Mapping[str, Any]
    plan: Callable[[Any, Any], MethodPlan]
    load_options: Callable[[Any, str], dict[str, Any]] = no_load_options

    def __post_init__(self) -> None:
        missing = [key for key in PER_METHOD_OPTIONS if key not in self.defaults]
        if missing:
            raise ValueError(f"method {self.name} declares no default for {', '.join(missing)}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
