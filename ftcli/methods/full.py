"""Full fine-tuning: every weight of the model trains (reference: 3B full fine-tune, lr 5e-5, batch 8).

    >>> plan = full.plan(config, model)
"""

from __future__ import annotations

from typing import Any


def plan(config: Any, model: Any) -> Any:
    from ftcli.methods import MethodPlan, count_parameters

    for param in model.parameters():
        param.requires_grad_(True)
    if config.gradient_checkpointing:
        model.config.use_cache = False
    trainable, total = count_parameters(model)
    return MethodPlan(model=model, saves="model", trainable_parameters=trainable, total_parameters=total)
