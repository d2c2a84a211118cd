"""`ftcli eval` on preference data: the objective's loss and rewards, as the run's eval steps compute them.

    >>> from ftcli.evaluation.pairs import evaluate_pairs
    >>> metrics = evaluate_pairs(target, config, eval_set, tokenizer, "cpu")
    >>> metrics["loss"], metrics["rewards/accuracies"], metrics["rewards/margins"]

The numbers are the evaluate() of the run's objective's trainer (the code the run's eval steps call: TRL's
DPOTrainer, KTOTrainer, ORPOTrainer or CPOTrainer for SimPO, as ftcli/objectives/ builds them) with the run's options
and eval batch size, so `ftcli eval RUN` repeats the run's final eval metrics. Preference data given to a target
trained otherwise (an SFT run) is scored as DPO scores it.

With a reference (DPO, KTO), the implicit reward of an answer is beta * (its log-probability under the policy - under
the reference), and the reference is the policy's start: the model with its adapter disabled for an adapter (a LoRA
run), else the base model the target records (a full run's start model); a model that records no base has no
reference: refused. KTO adds its KL estimate (`kl`) and has no accuracy (its rows are not pairs). Without a reference
(ORPO, SimPO), the reward is beta x the answer's log-probability (ORPO: mean per token; SimPO: mean per token), so the
accuracy is the share of held-out pairs whose chosen answer the model finds more likely than the rejected one.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ftcli.errors import ConfigError

# What the report keeps of the trainers' eval_* metrics (the rest are timings); a metric an objective does not report
# is None (KTO: no accuracy; ORPO, SimPO: no kl).
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "kl")


def reference_of(target: Any) -> str:
    """How the reference is held: "adapter disabled", or the base model it loads."""
    if target.adapter is not None:
        return "adapter disabled"
    if not target.base:
        raise ConfigError(f"--dataset: preference pairs are scored against a reference model (the policy's start), "
                          f"and {target.ref} records none", hint="score a run, an adapter or an exported folder, "
                                                                 "whose start model is known")
    return str(target.base)


def evaluate_pairs(target: Any, config: Any, eval_set: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    """The metrics of `target` on the prepared rows of `eval_set` (see the module's docstring)."""
    from transformers import PrinterCallback

    from ftcli.objectives import OBJECTIVES
    from ftcli.targets import load_target_model
    from ftcli.training import precision
    from ftcli.training.trainer import compute_dtype, objective_args

    objective = OBJECTIVES[config.objective]
    reference = reference_of(target) if objective.reference is not None else None
    model = load_target_model(target, config, device)
    extra: dict[str, Any] = {}
    if objective.reference is not None:
        ref_model = None
        if target.adapter is None:
            ref_model = load_target_model(target, config, device, base_only=True)
            ref_model.requires_grad_(False)
            ref_model.eval()
        extra["ref_model"] = ref_model
    collator = objective.data_collator(config, tokenizer)
    if collator is not None:
        extra["data_collator"] = collator
    with tempfile.TemporaryDirectory(prefix="ftcli-eval-") as scratch:
        args = objective_args(objective.config_class(), {
            "output_dir": scratch, "report_to": "none", "disable_tqdm": True, "use_cpu": device == "cpu",
            "seed": config.seed, **precision.autocast_args(compute_dtype(config, device), device),
            "per_device_train_batch_size": config.batch_size, **objective.training_args(config, device),
            "precompute_ref_log_probs": False, "dataloader_pin_memory": device.startswith("cuda")})
        trainer = objective.trainer_class()(model=model, args=args, train_dataset=eval_set.dataset,
                                            eval_dataset=eval_set.dataset, processing_class=tokenizer,
                                            ftcli_config=config, **extra)
        trainer.remove_callback(PrinterCallback)
        raw = objective.evaluate(trainer) if objective.evaluate is not None else trainer.evaluate()
    metrics = {name: raw.get(f"eval_{name}") for name in PAIR_METRICS}
    options = {name: getattr(config, name) for name in objective.options}
    return {**metrics, "pairs": eval_set.examples, "tokens": eval_set.loss_tokens, "options": options,
            "beta": next((v for k, v in options.items() if k.endswith("_beta")), None),
            "dpo_loss": options.get("dpo_loss"), "reference": reference}
