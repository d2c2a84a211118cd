"""`ftcli eval` on preference pairs: the DPO loss and implicit rewards, as a DPO run's eval steps compute them.

    >>> from ftcli.evaluation.pairs import evaluate_pairs
    >>> metrics = evaluate_pairs(target, config, eval_set, tokenizer, "cpu")
    >>> metrics["loss"], metrics["rewards/accuracies"], metrics["rewards/margins"]

The numbers are TRL's DPOTrainer.evaluate (the code the run's eval steps call, ftcli.objectives.dpo.evaluate), with
the run's --dpo-beta, --dpo-loss and eval batch size, so `ftcli eval DPO_RUN` repeats the run's final eval metrics.
The implicit reward of an answer is beta * (its log-probability under the policy - under the reference), and the
reference is the policy's start: the model with its adapter disabled for an adapter (a LoRA run), else the base
model the target records (a full run's start model). A model that records no base has no reference: refused.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ftcli.errors import ConfigError

# What the report keeps of TRL's eval_* metrics (the rest are timings).
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


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
    """The DPO metrics of `target` on the prepared pairs of `eval_set` (see the module's docstring)."""
    from transformers import PrinterCallback
    from trl import DPOConfig

    from ftcli.objectives.dpo import training_args
    from ftcli.objectives.dpo_trainer import FtcliDPOTrainer
    from ftcli.targets import load_target_model
    from ftcli.training import precision
    from ftcli.training.trainer import compute_dtype, objective_args

    reference = reference_of(target)
    model = load_target_model(target, config, device)
    ref_model = None
    if target.adapter is None:
        ref_model = load_target_model(target, config, device, base_only=True)
        ref_model.requires_grad_(False)
        ref_model.eval()
    with tempfile.TemporaryDirectory(prefix="ftcli-eval-") as scratch:
        args = objective_args(DPOConfig, {
            "output_dir": scratch, "report_to": "none", "disable_tqdm": True, "use_cpu": device == "cpu",
            "seed": config.seed, **precision.autocast_args(compute_dtype(config, device), device),
            **training_args(config, device), "precompute_ref_log_probs": False,
            "dataloader_pin_memory": device.startswith("cuda")})
        trainer = FtcliDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=eval_set.dataset,
                                  eval_dataset=eval_set.dataset, processing_class=tokenizer, ftcli_config=config)
        trainer.remove_callback(PrinterCallback)
        raw = trainer.evaluate()
    metrics = {name: raw.get(f"eval_{name}") for name in PAIR_METRICS}
    return {**metrics, "pairs": eval_set.examples, "tokens": eval_set.loss_tokens, "beta": config.dpo_beta,
            "dpo_loss": config.dpo_loss, "reference": reference}
