"""Training methods: each a small plan builder, registered in one dict.

    >>> from ftcli.methods import METHODS
    >>> plan = METHODS["lora"](config, model)   # -> MethodPlan(model=PeftModel, saves="adapter", ...)

A plan says how the loaded model is adapted before training and what the run folder will hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ftcli.methods import full, lora


@dataclass
class MethodPlan:
    model: Any
    saves: str  # "model" | "adapter"
    trainable_parameters: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


METHODS: dict[str, Callable[[Any, Any], MethodPlan]] = {
    "full": full.plan,
    "lora": lora.plan,
}
