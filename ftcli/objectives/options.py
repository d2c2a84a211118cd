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

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from ftcli.objectives.dpo import DPO_LOSSES
from ftcli.objectives.grpo import GRPO_LOSSES, VLLM_MODES


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
    # Online RL (--objective grpo; see ftcli/objectives/grpo.py, docs/grpo.md): the rewards, the sampling, the loss.
    reward: list[str] = []  # FILE.py:function or builtin:NAME[=ARG], each a --reward (ftcli/rewards/)
    reward_model: list[str] = []  # a reward model's run, adapter or export (--objective reward), each a --reward-model
    reward_weights: list[float] | None = None  # one per --reward, then one per --reward-model; None: 1 each
    num_generations: int = Field(default=8, ge=2)  # completions sampled per prompt (one group)
    max_completion_length: int = Field(default=256, ge=1)  # new tokens per completion
    temperature: float = Field(default=1.0, gt=0)  # sampling temperature of the completions
    grpo_beta: float = Field(default=0.0, ge=0)  # KL coefficient; 0: no reference model (DAPO, Dr. GRPO)
    grpo_loss: Literal[GRPO_LOSSES] = "dapo"  # type: ignore[valid-type]
    vllm: Literal[VLLM_MODES] | None = None  # type: ignore[valid-type]  # generate with vLLM: colocate | server
    completions_every: int = Field(default=10, ge=1)  # steps between the samples appended to completions.jsonl

    @field_validator("reward", "reward_model", mode="before")
    @classmethod
    def _reward_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("reward_weights", mode="before")
    @classmethod
    def _weight_list(cls, value: Any) -> Any:
        """`1,0.5` (the flag, or a YAML string) or a list of numbers."""
        if isinstance(value, (int, float)):
            return [value]
        return parse_weights(value) if isinstance(value, str) else value


def parse_weights(text: str) -> list[float]:
    """`1,0.5` -> [1.0, 0.5] (--reward-weights)."""
    import math

    try:
        weights = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--reward-weights {text!r}: comma-separated numbers, one per --reward (e.g. 1,0.5)") from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--reward-weights {text!r}: the weights must be finite numbers")
    return weights
