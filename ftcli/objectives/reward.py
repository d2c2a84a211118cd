"""Reward models: a score head on the model, trained so that the chosen answer scores above the rejected one.

    $ ftcli train --objective reward --method lora --model builtin:tiny-llama --dataset pairs.jsonl
    $ ftcli eval runs/reward-1 --dataset pairs.jsonl          # pairwise accuracy and mean margin

    >>> from ftcli.objectives import OBJECTIVES
    >>> OBJECTIVES["reward"].trainer_class().__name__       # TRL's RewardTrainer, fed ftcli's tokenized pairs
    'FtcliRewardTrainer'

The model is the base with one score per sequence instead of its LM head (AutoModelForSequenceClassification,
num_labels=1, loaded by ftcli.models.load_model because this objective's `head` is "classification"); the loss is
TRL's Bradley-Terry one, -log sigmoid(score(prompt + chosen) - score(prompt + rejected)). The pairs are DPO's
(ftcli/data/preference.py: the same shapes, rendering, truncation and cache), so `--max-prompt-length` applies too.
With LoRA or QLoRA the adapter trains on the decoder and the new score head trains in full (peft's SEQ_CLS task,
which saves it with the adapter). `--method fsdp` is refused: its sharded save and wrap plan gather a causal LM
(ftcli/methods/fsdp.py); several GPUs train a reward model with `--method lora/full --nproc-per-node N` (DDP).
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives.base import Objective
from ftcli.objectives.dpo import max_prompt_length


def trainer_class() -> type:
    from ftcli.objectives.reward_trainer import FtcliRewardTrainer

    return FtcliRewardTrainer


def config_class() -> type:
    from trl import RewardConfig

    return RewardConfig


def training_args(config: Any, device: str) -> dict[str, Any]:
    return {
        "max_length": None,  # ftcli has cut every pair to --seq-length already: TRL's filter would drop none
        "per_device_eval_batch_size": config.eval_batch_size or config.batch_size,
        # Pairs are batched in random order: ftcli's length grouping sorts single examples.
        "train_sampling_strategy": "random",
        "disable_dropout": True,
    }


def data_collator(config: Any, tokenizer: Any) -> Any:
    from ftcli.models import classifier_pad_token_id
    from ftcli.objectives.reward_trainer import PairSequenceCollator

    return PairSequenceCollator(pad_token_id=classifier_pad_token_id(tokenizer))


def trainer_kwargs(config: Any, plan: Any, evaluator: Any) -> dict[str, Any]:
    return {"eval_dataset": evaluator.eval_set.dataset} if evaluator is not None else {}


def evaluate(trainer: Any) -> dict[str, Any]:
    """The loss, pairwise accuracy and mean margin on the held-out pairs (TRL's evaluate: eval_loss, eval_accuracy,
    eval_margin); the model goes back to its mode, by which RewardTrainer.log files its metrics."""
    training = trainer.model.training
    try:
        return trainer.evaluate()
    finally:
        trainer.model.train(training)


def check(config: Any) -> None:
    """What makes no sense for a reward model: one ValueError naming the option and the fix."""
    from ftcli.methods import METHODS

    method = METHODS[config.method]
    if method.shards:
        raise ValueError(f"--method {config.method} is not available with --objective reward (its sharded save "
                         "gathers a causal LM, not a score head): use --method lora, qlora or full, with "
                         "--nproc-per-node N for several GPUs")
    if not isinstance(config.dataset, str):
        raise ValueError("--objective reward trains on one preference dataset, not a mixture: pass one --dataset "
                         "(merge the files into one, or a folder of them)")
    if config.train_on_inputs:
        raise ValueError("--train-on-inputs puts the prompt in an SFT loss; a reward model scores whole sequences "
                         "(there is no token loss): drop --train-on-inputs")
    if config.format != "auto":
        raise ValueError(f"--format {config.format} names an SFT data format; preference pairs are read from their "
                         "prompt/chosen/rejected columns (map other names with --columns): drop --format")
    if config.packing or config.padding_free:
        which = "--packing" if config.packing else "--padding-free"
        raise ValueError(f"{which} applies to single examples; --objective reward scores each answer as its own "
                         f"sequence: drop {which}")
    if config.compile:
        raise ValueError("--compile is not available with --objective reward (ftcli's compile warmup drives the "
                         "LM head's loss): drop --compile")
    if max_prompt_length(config) >= config.seq_length:
        raise ValueError(f"--max-prompt-length {max_prompt_length(config)} leaves no room for the answers within "
                         f"--seq-length {config.seq_length}: pass a smaller --max-prompt-length")


def notes(config: Any) -> list[str]:
    if "group_by_length" in config.model_fields_set and config.group_by_length:
        return ["--group-by-length sorts single examples; --objective reward batches its pairs in random order"]
    return []


def probe_ids(row: dict[str, Any]) -> list[int]:
    """The tokens the run's probe score is taken on: the prompt and the chosen answer."""
    return list(row["prompt_ids"]) + list(row["chosen_ids"])


OBJECTIVE = Objective(
    name="reward",
    summary="a reward model trained on pairs",
    data="pairs",
    options=("max_prompt_length",),
    trainer_class=trainer_class,
    config_class=config_class,
    training_args=training_args,
    trainer_kwargs=trainer_kwargs,
    data_collator=data_collator,
    check=check,
    evaluate=evaluate,
    probe_ids=probe_ids,
    rows_per_example=2,
    compiles=False,
    shards=False,
    notes=notes,
    head="classification",
)
