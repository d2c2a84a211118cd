"""KTO: Kahneman-Tversky optimisation on answers labeled desirable or undesirable, against a frozen reference.

    >>> from ftcli.objectives import OBJECTIVES
    >>> OBJECTIVES["kto"].trainer_class().__name__      # TRL's KTOTrainer, fed ftcli's labeled rows
    'FtcliKTOTrainer'

It trains on the "labeled" shape (ftcli/data/labeled.py): a prompt, one answer and a boolean label, rendered and
masked as DPO's pairs are; preference pairs are unpaired into a desirable and an undesirable row. No pairs are
needed, which is how most feedback data (thumbs up / thumbs down) looks.

The reference is DPO's (ftcli/objectives/dpo.py): the model with its adapter disabled for LoRA methods, a frozen
copy of the starting weights for full fine-tuning. The KL term is estimated from each batch's completions paired
with other rows' prompts, so a batch needs two rows or more. The losses of the desirable and the undesirable rows
are weighted so that weight x count is balanced between the two (Ethayarajh et al. 2024, eq. 8, asks for a ratio
in [1, 4/3]): the larger group weighs 1, the smaller one larger count / smaller count (ratio 1), unless
`--kto-desirable-weight` / `--kto-undesirable-weight` say otherwise (one given: the other balances it). The weights
chosen are printed as the run starts (ftcli/objectives/preference_trainers.py, `balanced_weights`).
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives import preference_common as common
from ftcli.objectives.base import Objective
from ftcli.objectives.dpo import ADAPTER_DISABLED, FROZEN_COPY


def trainer_class() -> type:
    from ftcli.objectives.preference_trainers import FtcliKTOTrainer

    return FtcliKTOTrainer


def config_class() -> type:
    from trl import KTOConfig

    return KTOConfig


def training_args(config: Any, device: str) -> dict[str, Any]:
    return {**common.training_args(config), "beta": config.kto_beta, "loss_type": "kto",
            # TRL pairs each row with its batch neighbour's completion for the KL estimate: batches in data order
            # (ftcli shuffled the rows once, when it prepared them).
            "train_sampling_strategy": "sequential", "remove_unused_columns": True,
            "precompute_ref_log_probs": False}


def reference(method: Any, config: Any) -> str:
    """How the reference model is held for `method` (its facts) and `config`."""
    if method.trains_adapter and not getattr(config, "full_parameters", False):
        return ADAPTER_DISABLED
    return FROZEN_COPY


def trainer_kwargs(config: Any, plan: Any, evaluator: Any) -> dict[str, Any]:
    """A frozen copy of the starting model as the reference where there is no adapter to disable; the eval rows."""
    import copy

    from ftcli.methods import METHODS

    kwargs = common.trainer_kwargs(config, plan, evaluator)
    if reference(METHODS[config.method], config) == FROZEN_COPY:
        ref = copy.deepcopy(plan.model)
        ref.requires_grad_(False)
        ref.eval()
        kwargs["ref_model"] = ref
    return kwargs


def check(config: Any) -> None:
    common.check_preference(config, "kto", zero_start=True)
    if config.batch_size < 2:
        raise ValueError(f"--batch-size {config.batch_size}: KTO estimates its KL term from the other rows of a "
                         "batch, so a batch needs two rows or more: pass --batch-size 2 or more")


def evaluate(trainer: Any) -> dict[str, Any]:
    from ftcli.objectives.dpo import evaluate as dpo_evaluate

    return dpo_evaluate(trainer)


def probe_ids(row: dict[str, Any]) -> list[int]:
    return list(row["prompt_ids"]) + list(row["completion_ids"])


OBJECTIVE = Objective(
    name="kto",
    summary="answers labeled good or bad (KTO)",
    data="labeled",
    options=("kto_beta", "kto_desirable_weight", "kto_undesirable_weight", "max_prompt_length"),
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
    notes=common.notes("kto", "in data order (shuffled once when prepared)"),
)
