"""The training objectives, in one registry (the order `--help` lists them).

    >>> from ftcli.objectives import OBJECTIVES
    >>> objective = OBJECTIVES[config.objective]
    >>> trainer_class = objective.trainer_class()     # TRL's SFTTrainer, or ftcli's DPOTrainer subclass

An objective (ftcli/objectives/base.py) declares what it trains on (`pairs`), the options it owns,
and which trainer and arguments class run it. Adding one (ORPO, KTO, ...) is its file plus one
line here. Importing this package must not import torch.
"""

from __future__ import annotations

from ftcli.objectives import dpo, grpo, kto, orpo, reward, sft, simpo
from ftcli.objectives.base import Objective

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    sft.OBJECTIVE,
    dpo.OBJECTIVE,
    kto.OBJECTIVE,
    orpo.OBJECTIVE,
    simpo.OBJECTIVE,
    reward.OBJECTIVE,
    grpo.OBJECTIVE,
)}

# Every objective's own options (a field no objective names is shared by all).
OBJECTIVE_OPTIONS = tuple(name for o in OBJECTIVES.values() for name in o.options)

__all__ = ["OBJECTIVES", "OBJECTIVE_OPTIONS", "Objective"]
