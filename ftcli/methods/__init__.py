"""Training methods: each a small plan builder, registered in one dict.

    >>> from ftcli.methods import METHODS
    >>> method = METHODS["lora"]
    >>> model = load_model(config.model, **method.load_options(config, device))
    >>> plan = method.plan(config, model)   # -> MethodPlan(model=PeftModel, saves="adapter", ...)

A method says how its model is loaded (`load_options`: extra keyword arguments for
`models.load_model`, e.g. a quantization config or no device placement) and how the loaded model
is adapted before training (`plan`), including what the run folder will hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ftcli.methods import fsdp, full, lora, qlora


@dataclass
class MethodPlan:
    model: Any
    saves: str  # "model" | "adapter"
    trainable_parameters: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)
    # Extra SFTConfig keyword arguments (e.g. FSDP settings), merged over ftcli's own by train.py.
    training_args: dict[str, Any] = field(default_factory=dict)
    trainer_class: Any = None  # None: trl's SFTTrainer


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@dataclass(frozen=True)
class Method:
    load_options: Callable[[Any, str], dict[str, Any]]
    plan: Callable[[Any, Any], MethodPlan]


def no_load_options(config: Any, device: str) -> dict[str, Any]:
    return {}


METHODS: dict[str, Method] = {
    "full": Method(no_load_options, full.plan),
    "lora": Method(no_load_options, lora.plan),
    "fsdp": Method(fsdp.load_options, fsdp.plan),
    "qlora": Method(qlora.load_options, qlora.plan),
}
