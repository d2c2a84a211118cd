"""The options that belong to one training objective: RunConfig's fields (ftcli/config.py) for each objective,
one section per objective, next to the objectives that read them.

    >>> from ftcli.config import build_run_config
    >>> build_run_config({"objective": "dpo", "dpo_beta": 0.2}).dpo_beta
    0.2

Each objective names its fields in `Objective.options` (ftcli/objectives/base.py); set with another objective,
they are refused (RunConfig._check_objective). An option several objectives read (`max_prompt_length`) is named by
each of them. Importing this module must not import torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ftcli.objectives.dpo import DPO_LOSSES


class ObjectiveOptions(BaseModel):
    """The objectives' own fields of RunConfig (its validation and settings apply to them too)."""

    # Preference tuning (--objective dpo; see ftcli/objectives/dpo.py): TRL's DPO beta and loss, the prompt's share.
    dpo_beta: float = Field(default=0.1, gt=0)
    dpo_loss: Literal[DPO_LOSSES] = "sigmoid"  # type: ignore[valid-type]
    max_prompt_length: int | None = Field(default=None, ge=1)  # None: half of --seq-length
    precompute_ref: bool = False  # full: reference log-probs computed once before training (cached)

    # KTO (--objective kto; ftcli/objectives/kto.py): TRL's beta, and the weights of the desirable and undesirable
    # rows' losses (None: balanced from the data's counts, as the KTO paper advises).
    kto_beta: float = Field(default=0.1, gt=0)
    kto_desirable_weight: float | None = Field(default=None, gt=0)
    kto_undesirable_weight: float | None = Field(default=None, gt=0)
    # ORPO (--objective orpo; ftcli/objectives/orpo.py): the paper's lambda, the odds-ratio term's weight.
    orpo_beta: float = Field(default=0.1, gt=0)
    # SimPO (--objective simpo; ftcli/objectives/simpo.py): the paper's beta and target margin gamma; CPO's SFT term.
    simpo_beta: float = Field(default=2.0, gt=0)
    simpo_gamma: float = Field(default=1.0, ge=0)
    cpo_alpha: float = Field(default=0.0, ge=0)
