"""Full fine-tuning: every weight of the model trains (reference: 3B full fine-tune, lr 5e-5, batch 8).

    >>> plan = full.plan(config, model)
"""

from __future__ import annotations

from typing import Any

from ftcli.methods.base import LLAMA_PROJECTIONS, Method, MethodPlan, count_parameters


def plan(config: Any, model: Any) -> Any:
    for param in model.parameters():
        param.requires_grad_(True)
    if config.gradient_checkpointing:
        model.config.use_cache = False
    trainable, total = count_parameters(model)
    return MethodPlan(model=model, saves="model", trainable_parameters=trainable, total_parameters=total)


METHOD = Method(
    name="full",
    summary="every weight trains",
    trains_adapter=False, uses_lora=False, loads_4bit=False, shards=False, multi_process=True,
    defaults={"model": "meta-llama/Llama-3.2-3B-Instruct", "batch_size": 8, "learning_rate": 5e-5,
              "gradient_checkpointing": False, "lora_target_modules": list(LLAMA_PROJECTIONS)},
    plan=plan,
)
