"""Reward functions for `--objective grpo` (and `ftcli eval --reward`): loading, the built-ins, the probe.

    >>> from ftcli.rewards import load_rewards
    >>> rewards = load_rewards(["rewards.py:correct", "builtin:format=<answer>.*</answer>"], [1.0, 0.5])
    >>> [(r.name, r.weight) for r in rewards]
    [('rewards.py:correct', 1.0), ('builtin:format', 0.5)]

A reward is a (name, callable, weight) entry: the callable takes `prompts` and `completions` (lists of strings)
and the rows' other columns as keyword lists (plus **kwargs) and returns one float (or None) per completion
(the contract: docs/grpo.md). A spec is `FILE.py:function` or `builtin:NAME[=ARG]` (ftcli/rewards/builtins.py);
another kind of reward (a scoring model, say) joins with `register_kind(prefix, loader)`. Importing this package
must not import torch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from ftcli.errors import ConfigError


# The run folder's sample of scored completions (written by objectives/grpo_trainer.py, read by `inspect RUN`).
COMPLETIONS = "completions.jsonl"


class Reward(NamedTuple):
    name: str  # as the user wrote it, shortened: `rewards.py:correct`, `builtin:exact-match`
    fn: Callable[..., list[Any]]
    weight: float


# `model:RUN` (what --reward-model RUN stands for): a reward model trained by ftcli (ftcli/rewards/model.py), a kind
# the command line registers (the model's loading reaches the objectives, which import this package).
MODEL_KIND = "model"

# prefix -> loader(rest of the spec) -> (name, callable): `builtin:` here; a file path is the fallback.
KINDS: dict[str, Callable[[str], tuple[str, Callable[..., list[Any]]]]] = {}


def register_kind(prefix: str, loader: Callable[[str], tuple[str, Callable[..., list[Any]]]]) -> None:
    """Another kind of reward: specs `PREFIX:REST` are loaded by `loader(REST)` -> (name, callable)."""
    KINDS[prefix] = loader


def load_reward(spec: str) -> tuple[str, Callable[..., list[Any]]]:
    """(name, callable) of one `--reward` spec; a missing file or function, a syntax error: one ConfigError."""
    from ftcli.rewards import builtins, files

    if not spec or not spec.strip():
        raise ConfigError("--reward is empty", hint="pass FILE.py:function or builtin:NAME (see docs/grpo.md)")
    prefix, _, rest = spec.partition(":")
    if prefix == "builtin":
        return builtins.load(rest)
    if prefix in KINDS:
        return KINDS[prefix](rest)
    return files.load(spec)


def load_rewards(specs: list[str], weights: list[float] | None = None) -> list[Reward]:
    """Every `--reward`, with its `--reward-weights` entry (1 each by default)."""
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"--reward-weights has {len(weights)} values for {len(specs)} --reward functions",
                          hint="give one weight per --reward, in their order (e.g. --reward-weights 1,0.5)")
    rewards = []
    for i, spec in enumerate(specs):
        name, fn = load_reward(spec)
        rewards.append(Reward(name, fn, float(weights[i]) if weights is not None else 1.0))
    return rewards


__all__ = ["COMPLETIONS", "KINDS", "MODEL_KIND", "Reward", "load_reward", "load_rewards", "register_kind"]
