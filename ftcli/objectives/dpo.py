"""Direct preference optimisation: prefer the chosen answer to the rejected one, against a frozen reference.

    >>> from ftcli.objectives import OBJECTIVES
    >>> dpo = OBJECTIVES["dpo"]
    >>> dpo.trainer_class().__name__        # TRL's DPOTrainer, fed ftcli's tokenized pairs
    'FtcliDPOTrainer'

The pairs are tokenized and masked by ftcli (ftcli/data/preference.py) with the same rendering rules as SFT;
the trainer (ftcli/objectives/dpo_trainer.py) is TRL's DPOTrainer kept from re-tokenizing them.

The reference model, by method:

| method | reference |
|---|---|
| lora, qlora, fsdp (LoRA) | the same model with the adapter disabled: no second copy |
| full, fsdp --full-parameters | a frozen copy of the starting weights |
| full --precompute-ref | reference log-probabilities computed once before training, cached |
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives.base import Objective

# TRL 1.16's DPOConfig.loss_type choices (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# exo_pair needs label smoothing above 0; the EXO paper's value.
EXO_LABEL_SMOOTHING = 1e-3
# The LoRA starts whose adapter is zero at step 0, so that disabling it gives the starting model back.
ZERO_START_INITS = ("default", "gaussian")

COMPILE_REFUSAL = ("--compile is not available with --objective dpo (TRL's DPO forward runs its fused log-prob LM "
                   "head, which ftcli's compile warmup and its shape buckets do not cover)")

ADAPTER_DISABLED = "adapter disabled"
FROZEN_COPY = "frozen copy"
PRECOMPUTED = "precomputed"


def trainer_class() -> type:
    from ftcli.objectives.dpo_trainer import FtcliDPOTrainer

    return FtcliDPOTrainer


def config_class() -> type:
    from trl import DPOConfig

    return DPOConfig


def max_prompt_length(config: Any) -> int:
    """--max-prompt-length, or half of --seq-length."""
    return config.max_prompt_length if config.max_prompt_length is not None else config.seq_length // 2


def reference(method: Any, config: Any) -> str:
    """How the reference model is held for `method` (its facts) and `config`."""
    if method.trains_adapter and not getattr(config, "full_parameters", False):
        return ADAPTER_DISABLED
    return PRECOMPUTED if config.precompute_ref else FROZEN_COPY


def training_args(config: Any, device: str) -> dict[str, Any]:
    return {
        "beta": config.dpo_beta,
        "loss_type": [config.dpo_loss],
        "label_smoothing": EXO_LABEL_SMOOTHING if config.dpo_loss == "exo_pair" else 0.0,
        "max_length": config.seq_length,  # ftcli has cut every pair to it already: TRL's collator cuts nothing
        "precompute_ref_log_probs": bool(config.precompute_ref),
        "per_device_eval_batch_size": config.eval_batch_size or config.batch_size,
        # Pairs are batched in random order: ftcli's length grouping sorts single examples (see check()).
        "train_sampling_strategy": "random",
        "padding_free": False,
    }


def trainer_kwargs(config: Any, plan: Any, evaluator: Any) -> dict[str, Any]:
    """A frozen copy of the starting model as the reference, where there is no adapter to disable and no
    precomputed log-probabilities; the eval pairs (TRL precomputes their reference log-probs at the start too)."""
    import copy

    from ftcli.methods import METHODS

    kwargs: dict[str, Any] = {}
    if reference(METHODS[config.method], config) == FROZEN_COPY:
        ref = copy.deepcopy(plan.model)
        ref.requires_grad_(False)
        ref.eval()
        kwargs["ref_model"] = ref
    if evaluator is not None:
        kwargs["eval_dataset"] = evaluator.eval_set.dataset
    kwargs["ftcli_config"] = config
    return kwargs


def evaluate(trainer: Any) -> dict[str, Any]:
    """The DPO loss and rewards on the held-out pairs (TRL's evaluate, logged by the trainer as eval_*). The model
    goes back to training mode at once: DPOTrainer.log files the step's training rewards by the model's mode."""
    training = trainer.model.training
    try:
        return trainer.evaluate()
    finally:
        trainer.model.train(training)


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check(config: Any) -> None:
    """What makes no sense with DPO: one ValueError naming the option and the fix."""
    from ftcli.methods import METHODS

    method = METHODS[config.method]
    if not isinstance(config.dataset, str):
        raise ValueError("--objective dpo trains on one preference dataset, not a mixture: pass one --dataset (merge "
                         "the files into one, or a folder of them)")
    if config.train_on_inputs:
        raise ValueError("--train-on-inputs puts the prompt in an SFT loss; DPO compares the two answers only (the "
                         "prompt is never in its loss): drop --train-on-inputs")
    if config.format != "auto":
        raise ValueError(f"--format {config.format} names an SFT data format; preference pairs are read from their "
                         "prompt/chosen/rejected columns (map other names with --columns): drop --format")
    if config.lora_dropout:
        raise ValueError(f"--lora-dropout {config.lora_dropout:g}: DPO runs without dropout (TRL's disable_dropout), "
                         "so that the policy's and the reference's log-probabilities are computed alike: drop "
                         "--lora-dropout")
    if config.packing or config.padding_free:
        which = "--packing" if config.packing else "--padding-free"
        raise ValueError(f"{which} applies to single examples; --objective dpo batches each prompt with its two "
                         f"answers (TRL's preference collator): drop {which}")
    if config.compile:
        raise ValueError(COMPILE_REFUSAL + ": drop --compile")
    if config.precompute_ref and reference(method, config) == ADAPTER_DISABLED:
        raise ValueError(f"--precompute-ref: with --method {config.method} the reference is the model with its "
                         "adapter disabled, computed alongside at no memory cost: drop --precompute-ref")
    if config.precompute_ref and method.shards:
        raise ValueError(f"--precompute-ref is not supported with --method {config.method} (the ranks would each "
                         "need the unsharded model first): drop it, the reference is then a sharded frozen copy")
    if method.uses_lora and config.lora_init not in ZERO_START_INITS:
        raise ValueError(f"--lora-init {config.lora_init} starts the adapter away from zero, and DPO's reference is "
                         "the model with the adapter disabled, which would then not be the starting model: use "
                         "--lora-init default or gaussian")
    if max_prompt_length(config) >= config.seq_length:
        raise ValueError(f"--max-prompt-length {max_prompt_length(config)} leaves no room for the answers within "
                         f"--seq-length {config.seq_length}: pass a smaller --max-prompt-length")


def notes(config: Any) -> list[str]:
    if "group_by_length" in config.model_fields_set and config.group_by_length:
        return ["--group-by-length sorts single examples; --objective dpo batches its pairs in random order"]
    return []


def probe_ids(row: dict[str, Any]) -> list[int]:
    """The tokens of a pair the run's probe logits are taken on: the prompt and the chosen answer."""
    return list(row["prompt_ids"]) + list(row["chosen_ids"])


OBJECTIVE = Objective(
    name="dpo",
    summary="preference pairs (DPO)",
    data="pairs",
    options=("dpo_beta", "dpo_loss", "max_prompt_length", "precompute_ref"),
    trainer_class=trainer_class,
    config_class=config_class,
    training_args=training_args,
    trainer_kwargs=trainer_kwargs,
    check=check,
    evaluate=evaluate,
    reference=reference,
    probe_ids=probe_ids,
    rows_per_example=2,
    compiles=False,
    notes=notes,
)
