"""ORPO: odds-ratio preference optimisation, an SFT loss on the chosen answer plus an odds-ratio term, no reference.

    >>> from ftcli.objectives import OBJECTIVES
    >>> OBJECTIVES["orpo"].trainer_class().__name__     # TRL's ORPOTrainer (trl.experimental.orpo), fed ftcli's pairs
    'FtcliORPOTrainer'

It trains on DPO's pairs (the "pairs" shape: ftcli/data/preference.py renders and masks them) and holds no reference
model: one copy of the weights, one forward pass over both answers. `--orpo-beta` is the paper's lambda, the weight
of the odds-ratio term (Hong et al. 2024: 0.1). TRL's SFT term covers the chosen sequence's prompt as well as its
answer (trl.experimental.orpo computes it over the whole chosen sequence); the odds ratio covers the answers only.
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives import preference_common as common
from ftcli.objectives.base import Objective
from ftcli.objectives.dpo import probe_ids
from ftcli.objectives.preference_common import experimental_import


def trainer_class() -> type:
    from ftcli.objectives.preference_trainers import FtcliORPOTrainer

    return FtcliORPOTrainer


def config_class() -> type:
    with experimental_import():
        from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


def training_args(config: Any, device: str) -> dict[str, Any]:
    return {**common.training_args(config), "beta": config.orpo_beta}


def check(config: Any) -> None:
    common.check_preference(config, "orpo", zero_start=False)


def evaluate(trainer: Any) -> dict[str, Any]:
    from ftcli.objectives.dpo import evaluate as dpo_evaluate

    return dpo_evaluate(trainer)


OBJECTIVE = Objective(
    name="orpo",
    summary="pairs, no reference (ORPO)",
    data="pairs",
    options=("orpo_beta", "max_prompt_length"),
    trainer_class=trainer_class,
    config_class=config_class,
    training_args=training_args,
    trainer_kwargs=common.trainer_kwargs,
    data_collator=common.pair_collator,
    check=check,
    evaluate=evaluate,
    probe_ids=probe_ids,
    rows_per_example=2,
    compiles=False,
    notes=common.notes("orpo", "in random order"),
)
