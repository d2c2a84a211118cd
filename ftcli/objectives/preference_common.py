"""What the preference objectives other than DPO share: their refusals, their trainers' arguments, their eval.

    >>> from ftcli.objectives.preference_common import check_preference
    >>> check_preference(config, "orpo", zero_start=False)     # ValueError naming the option and the fix

KTO, ORPO and SimPO train on rows rendered and masked as DPO's pairs are (ftcli/data/preference.py), so the options
that make no sense with DPO make none with them either; each refusal names the run's objective. Importing this
module must not import torch.
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives.dpo import ZERO_START_INITS, max_prompt_length

COMPILE_REFUSAL = ("--compile is not available with --objective {name} (TRL's {name} forward is not the one "
                   "ftcli's compile warmup and its shape buckets cover)")


def experimental_import() -> Any:
    """TRL's warning that trl.experimental may change is silenced: ftcli pins the TRL it is tested with."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    return stack


def check_preference(config: Any, name: str, *, zero_start: bool) -> None:
    """One ValueError naming the option and the fix. `zero_start`: the reference is the model with its adapter
    disabled, so the adapter must start at zero (KTO); ORPO and SimPO have no reference."""
    from ftcli.methods import METHODS

    if not isinstance(config.dataset, str):
        raise ValueError(f"--objective {name} trains on one preference dataset, not a mixture: pass one --dataset "
                         "(merge the files into one, or a folder of them)")
    if config.train_on_inputs:
        raise ValueError(f"--train-on-inputs puts the prompt in an SFT loss; --objective {name} trains on the answers "
                         "only (the prompt is never in its loss): drop --train-on-inputs")
    if config.format != "auto":
        raise ValueError(f"--format {config.format} names an SFT data format; --objective {name} reads its rows from "
                         "their prompt/completion/label or prompt/chosen/rejected columns (map other names with "
                         "--columns): drop --format")
    if config.lora_dropout:
        raise ValueError(f"--lora-dropout {config.lora_dropout:g}: --objective {name} runs without dropout (TRL's "
                         "disable_dropout), so that the answers' log-probabilities are computed alike: drop "
                         "--lora-dropout")
    if config.packing or config.padding_free:
        which = "--packing" if config.packing else "--padding-free"
        raise ValueError(f"{which} applies to single examples; --objective {name} batches each prompt with its "
                         f"answer(s) (TRL's preference collator): drop {which}")
    if config.compile:
        raise ValueError(COMPILE_REFUSAL.format(name=name) + ": drop --compile")
    if zero_start and METHODS[config.method].uses_lora and config.lora_init not in ZERO_START_INITS:
        raise ValueError(f"--lora-init {config.lora_init} starts the adapter away from zero, and the {name} reference "
                         "is the model with the adapter disabled, which would then not be the starting model: use "
                         "--lora-init default or gaussian")
    if max_prompt_length(config) >= config.seq_length:
        raise ValueError(f"--max-prompt-length {max_prompt_length(config)} leaves no room for the answers within "
                         f"--seq-length {config.seq_length}: pass a smaller --max-prompt-length")


def training_args(config: Any) -> dict[str, Any]:
    """The arguments every one of these trainers gets: ftcli has cut every row to --seq-length already."""
    return {
        "max_length": config.seq_length,
        "per_device_eval_batch_size": config.eval_batch_size or config.batch_size,
        "train_sampling_strategy": "random",
        # ftcli's collator reads prompt_ids and the answers' ids, which the model's forward does not take.
        "remove_unused_columns": False,
    }


def trainer_kwargs(config: Any, plan: Any, evaluator: Any) -> dict[str, Any]:
    """The eval rows, and the run's config (for the trainers' notes)."""
    kwargs: dict[str, Any] = {"ftcli_config": config}
    if evaluator is not None:
        kwargs["eval_dataset"] = evaluator.eval_set.dataset
    return kwargs


def pair_collator(config: Any, tokenizer: Any) -> Any:
    from ftcli.objectives.preference_trainers import pair_collator as collator

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collator(pad)


def notes(name: str, order: str) -> Any:
    """The note for --group-by-length, which sorts single examples: these objectives batch their rows `order`."""
    def say(config: Any) -> list[str]:
        if "group_by_length" in config.model_fields_set and config.group_by_length:
            return [f"--group-by-length sorts single examples; --objective {name} batches its rows {order}"]
        return []

    return say
