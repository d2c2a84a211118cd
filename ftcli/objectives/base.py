"""What a training objective is: what it trains on, which trainer runs it, and the options it owns.

    >>> from ftcli.objectives import OBJECTIVES
    >>> objective = OBJECTIVES["dpo"]
    >>> objective.data, objective.options
    ('pairs', ('dpo_beta', 'dpo_loss', 'max_prompt_length', 'precompute_ref'))

The objective is a second axis next to the method (ftcli/methods/): the method decides how the
model is loaded and adapted (full, LoRA, QLoRA, FSDP), the objective what it is trained to do
(SFT: the response's next tokens; DPO: prefer the chosen answer to the rejected one). Code outside
`ftcli/objectives/` asks an objective for these facts and never compares its name, so a new
objective (ORPO, KTO, ...) is its own file plus one line in the registry. Importing this module
must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


FROZEN_COPY = "frozen copy"  # `reference(...)` of an objective holding a second copy of the weights (the estimate counts it)


def no_arguments(*args: Any) -> dict[str, Any]:
    return {}


def no_check(config: Any) -> None:
    return None


def example_ids(row: dict[str, Any]) -> list[int]:
    return list(row["input_ids"])


@dataclass(frozen=True)
class Objective:
    """One training objective.

    - `data`: the shape of the rows it trains on, a name in ftcli.data.SHAPES: "examples" (SFT's tokenized
      examples with their loss mask), "pairs" (a prompt with a chosen and a rejected answer, ftcli/data/preference.py),
      "labeled" (a prompt with one answer and a desirable/undesirable label, ftcli/data/labeled.py).
      `pairs` is `data == "pairs"`.
    - `options`: the RunConfig fields only this objective uses; set with another objective, they are refused.
    - `trainer_class` / `config_class`: the innermost trainer (TRL's, imported when called) and its arguments
      class; ftcli's batching, recipe and guard wrap it (ftcli/training/trainer.py).
    - `training_args(config, device)`: the objective's own arguments class settings.
    - `trainer_kwargs(config, plan, evaluator)`: extra keyword arguments of the trainer (a reference model,
      the eval pairs).
    - `data_collator(config, tokenizer)`: the collator, or None for ftcli's batching's choice.
    - `check(config)`: raises ValueError for option combinations that make no sense with this objective.
    - `evaluate(trainer)`: held-out metrics with `eval_loss` (None: ftcli's token-weighted SFT eval loss).
    - `reference(method, config)`: how the run's reference model is held (None: the objective has none, as ORPO's
      and SimPO's; the memory estimate then counts none).
    - `probe_ids(row)`: the tokens of a prepared row the run's probe logits are taken on.
    - `compiles`: `--compile` and `ftcli warmup` apply (ftcli's compile warmup drives this objective's trainer).
    - `notes(config)`: lines the run prints about options this objective handles its own way.
    - `head`: the model's output the objective trains: "causal" (the LM head: next-token logits) or
      "classification" (one score per sequence, a reward model; loaded by ftcli.models.load_model, and a LoRA
      plan trains the score head in full).
    - `defaults(config)`: its own defaults of shared options ({field: value}), applied where not given.
    - `samples`: it samples completions from the model at every step (GRPO): the estimate counts their KV cache.
    - `preflight(config)`: checks before anything loads (GRPO: the reward functions tried on the data's first rows);
      raises an FtcliError.
    - `rows_per_example`: sequences one example puts through the model per step (DPO: the chosen and the
      rejected answer, each after the prompt), for the memory estimate.
    - `shards`: the sharded methods (fsdp) can train it; False: `check` refuses them, and the estimate leaves them out.
    """

    name: str
    summary: str
    data: str
    options: tuple[str, ...]
    trainer_class: Callable[[], type]
    config_class: Callable[[], type]
    training_args: Callable[..., dict[str, Any]] = no_arguments
    trainer_kwargs: Callable[..., dict[str, Any]] = no_arguments
    data_collator: Callable[..., Any] = lambda config, tokenizer: None  # noqa: E731
    check: Callable[[Any], None] = no_check
    evaluate: Callable[[Any], dict[str, Any]] | None = None
    reference: Callable[[Any, Any], str] | None = None
    probe_ids: Callable[[dict[str, Any]], list[int]] = example_ids
    rows_per_example: int = 1
    compiles: bool = True
    head: str = "causal"
    notes: Callable[[Any], list[str]] = lambda config: []  # noqa: E731
    defaults: Callable[[Any], dict[str, Any]] = lambda config: {}  # noqa: E731
    preflight: Callable[[Any], None] = no_check
    samples: bool = False
    shards: bool = True

    @property
    def pairs(self) -> bool:
        return self.data == "pairs"
