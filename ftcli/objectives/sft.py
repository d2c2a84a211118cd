"""Supervised fine-tuning: the response (and its EOS) is trained, the prompt masked. TRL's SFTTrainer.

    >>> from ftcli.objectives import OBJECTIVES
    >>> OBJECTIVES["sft"].trainer_class().__name__
    'SFTTrainer'
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives.base import Objective


def trainer_class() -> type:
    from trl import SFTTrainer

    return SFTTrainer


def config_class() -> type:
    from trl import SFTConfig

    return SFTConfig


def training_args(config: Any, device: str) -> dict[str, Any]:
    # ftcli has already tokenized and masked the data; TRL must not re-tokenize or re-append EOS.
    return {"dataset_kwargs": {"skip_prepare_dataset": True}}


OBJECTIVE = Objective(
    name="sft",
    summary="supervised, on the responses",
    data="examples",
    options=(),
    trainer_class=trainer_class,
    config_class=config_class,
    training_args=training_args,
)
