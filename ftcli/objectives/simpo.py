"""SimPO: the length-normalised log-probability as the reward, a target margin, no reference model.

    >>> from ftcli.objectives import OBJECTIVES
    >>> OBJECTIVES["simpo"].trainer_class().__name__    # TRL's CPOTrainer with loss_type="simpo", fed ftcli's pairs
    'FtcliCPOTrainer'

It trains on DPO's pairs (the "pairs" shape, ftcli/data/preference.py) and holds no reference model. The loss
(Meng et al. 2024) is -log sigmoid(beta * (mean log-prob of the chosen answer - of the rejected one) - gamma), TRL's
CPO trainer with `loss_type="simpo"`. Defaults are the paper's: `--simpo-beta` 2.0 and `--simpo-gamma` 1.0 (gamma /
beta = 0.5). `--cpo-alpha` adds CPO's SFT term on the chosen answer at that weight (CPO-SimPO); 0, pure SimPO, is
the paper's.
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives import preference_common as common
from ftcli.objectives.base import Objective
from ftcli.objectives.dpo import probe_ids
from ftcli.objectives.preference_common import experimental_import


def trainer_class() -> type:
    from ftcli.objectives.preference_trainers import FtcliCPOTrainer

    return FtcliCPOTrainer


def config_class() -> type:
    with experimental_import():
        from trl.experimental.cpo import CPOConfig

    return CPOConfig


def training_args(config: Any, device: str) -> dict[str, Any]:
    return {**common.training_args(config), "loss_type": "simpo", "beta": config.simpo_beta,
            "simpo_gamma": config.simpo_gamma, "cpo_alpha": config.cpo_alpha}


def check(config: Any) -> None:
    common.check_preference(config, "simpo", zero_start=False)


def evaluate(trainer: Any) -> dict[str, Any]:
    from ftcli.objectives.dpo import evaluate as dpo_evaluate

    return dpo_evaluate(trainer)


OBJECTIVE = Objective(
    name="simpo",
    summary="pairs, no reference (SimPO)",
    data="pairs",
    options=("simpo_beta", "simpo_gamma", "cpo_alpha", "max_prompt_length"),
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
    notes=common.notes("simpo", "in random order"),
)
