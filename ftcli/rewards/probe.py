"""Trying the rewards before anything loads, and watching them during the run.

    >>> from ftcli.rewards.probe import probe, watched
    >>> probe(rewards, rows)          # a few real rows with plausible completions: one ConfigError at the first fault
    >>> fn = watched(reward, failures)  # for the trainer: a fault is recorded (the guard stops the run), never raised

The probe's completions for a row: the value of its reference column (`answer`, or the first other text column),
a short sentence, and an empty string, so that a function that only works on the happy path is caught as well.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

from ftcli.errors import ConfigError

PROBE_ROWS = 4
REFERENCE_COLUMNS = ("answer", "solution", "reference", "target", "output", "completion")
FIX = "fix the function: it gets prompts, completions and the columns as lists, and returns one float (or None) " \
      "per completion (docs/grpo.md)"


def probe_completions(row: dict[str, Any]) -> list[str]:
    reference = next((str(row[c]) for c in REFERENCE_COLUMNS if isinstance(row.get(c), (str, int, float))), None)
    if reference is None:
        reference = next((v for k, v in row.items() if k != "prompt" and isinstance(v, str)), "42")
    return [reference, "The answer is 42.", ""]


def problem(out: Any, n: int) -> str | None:
    """What is wrong with a reward function's return value for `n` completions, or None."""
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        return f"returned a {type(out).__name__}, not a list of {n} numbers"
    if len(out) != n:
        return f"returned {len(out)} values for {n} completions"
    for i, value in enumerate(out):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"returned {type(value).__name__} {value!r} for completion {i}, not a number"
        if not math.isfinite(float(value)):
            return f"returned {float(value)} for completion {i} (not finite)"
    return None


def probe(rewards: list[Any], rows: list[dict[str, Any]]) -> None:
    """Call every reward on `rows` (with the prompt texts as `prompts`), each row with its probe completions."""
    prompts, completions, columns = [], [], {}
    keys = [k for k in rows[0] if k != "prompt"] if rows else []
    for row in rows[:PROBE_ROWS]:
        for completion in probe_completions(row):
            prompts.append(row["prompt"] if isinstance(row["prompt"], str) else str(row["prompt"]))
            completions.append(completion)
            for key in keys:
                columns.setdefault(key, []).append(row.get(key))
    for reward in rewards:
        if not getattr(reward.fn, "probed", True):  # a reward model: checked when named, loaded by the run
            continue
        try:
            out = reward.fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:  # noqa: BLE001 - whatever the user's function raises is reported in one line
            raise ConfigError(f"--reward {reward.name} raised {type(exc).__name__} on the probe ({len(prompts)} "
                              f"completions of the data's first rows): {first_line(exc)}", hint=FIX) from None
        fault = problem(out, len(completions))
        if fault:
            raise ConfigError(f"--reward {reward.name} {fault} on the probe", hint=FIX)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"")
    return text.splitlines()[0] if text else type(exc).__name__


class RewardFailures:
    """The first fault of a reward function during the run (the guard reads it at the step's end)."""

    def __init__(self) -> None:
        self.message: str | None = None

    def record(self, message: str) -> None:
        if self.message is None:
            self.message = message


def watched(reward: Any, failures: RewardFailures, step: Callable[[], int]) -> Callable[..., list[Any]]:
    """`reward.fn` for the trainer: a raise, a wrong length or a non-finite value is recorded in `failures` with
    the step, and the step gets None (no reward) instead, so that every process reaches the step's end together,
    where the guard stops the run with a checkpoint."""
    def fn(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[Any]:
        n = len(completions)
        try:
            out = reward.fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the guard, in one line
            failures.record(f"--reward {reward.name} raised {type(exc).__name__} at step {step() + 1}: "
                            f"{first_line(exc)}")
            return [None] * n
        fault = problem(out, n)
        if fault:
            failures.record(f"--reward {reward.name} {fault} at step {step() + 1}")
            return [None] * n
        return [None if v is None else float(v) for v in out]

    fn.__name__ = reward.name
    return fn
