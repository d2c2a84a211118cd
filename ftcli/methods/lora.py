"""LoRA: the base model stays frozen, low-rank adapters train (reference: 8B LoRA, r=8, alpha 16, lr 1e-4).

    >>> plan = lora.plan(config, model)   # plan.model is a peft.PeftModel; the run saves the adapter

The variant options (--use-dora, --use-rslora, --lora-init, --lora-bias) go into the same LoraConfig
(ftcli/methods/variants.py); a PiSSA/OLoRA start also gives the plan a trainer whose final save
converts the adapter to plain LoRA on the original base.
"""

from __future__ import annotations

from typing import Any

from ftcli.errors import ConfigError
from ftcli.methods import variants
from ftcli.methods.base import LLAMA_PROJECTIONS, Method, MethodPlan, count_parameters


def linear_module_names(model: Any) -> list[str]:
    """The distinct leaf names of the model's linear layers (what --lora-target-modules may name)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    return sorted(names - {"lm_head", "score"})


def task_type(model: Any) -> str:
    """peft's task: a causal LM, or a sequence classifier (the model setup loaded with the head the objective asks
    for, Objective.head: a reward model), whose new score head peft then trains in full and saves with the adapter
    (modules_to_save)."""
    from ftcli.models import CLASSIFIER_SUFFIX

    return "SEQ_CLS" if type(model).__name__.endswith(CLASSIFIER_SUFFIX) else "CAUSAL_LM"


def plan(config: Any, model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    targets = list(config.lora_target_modules)
    if targets != ["all-linear"]:
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ConfigError(f"--lora-target-modules names {', '.join(unknown)}, which this model does not have",
                              hint=f"its linear layers are: {', '.join(available)} (or use all-linear)")
    target_modules = targets[0] if targets == ["all-linear"] else targets
    variants.check_biases(config, model, target_modules)
    variants.check_rank(config, model, target_modules)
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        task_type=task_type(model),
        **variants.lora_config_args(config),
    )
    if config.gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps the graph connected.
        model.enable_input_require_grads()
        model.config.use_cache = False
    peft_model = get_peft_model(model, lora_config)
    trainable, total = count_parameters(peft_model)
    plan = MethodPlan(model=peft_model, saves="adapter", trainable_parameters=trainable, total_parameters=total)
    if config.lora_init in variants.CHANGES_BASE:
        # The base now holds the residual: the run's final adapter is saved converted to plain LoRA on the original.
        initial = plan.initial_adapter = variants.initial_adapter(peft_model)
        plan.trainer_class = lambda objective_class: variants.plain_lora_saving(objective_class, initial)
        plan.notes.append(f"{config.lora_init} start: the final adapter is saved as plain LoRA of rank "
                          f"{2 * config.lora_rank} on the original base")
    return plan


METHOD = Method(
    name="lora",
    summary="LoRA adapters on a frozen base",
    trains_adapter=True, uses_lora=True, loads_4bit=False, shards=False, multi_process=True,
    defaults={"model": "meta-llama/Llama-3.1-8B-Instruct", "batch_size": 4, "learning_rate": 1e-4,
              "gradient_checkpointing": False, "lora_target_modules": list(LLAMA_PROJECTIONS)},
    plan=plan,
)
