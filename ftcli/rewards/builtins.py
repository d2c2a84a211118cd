"""The built-in rewards, `--reward builtin:NAME[=ARG]` (documented in docs/grpo.md).

    >>> from ftcli.rewards.builtins import load
    >>> name, fn = load("exact-match")
    >>> fn(prompts=["2+2="], completions=[" 4", "5"], answer=["4", "4"])
    [1.0, 0.0]

| name | ARG | reward per completion |
|---|---|---|
| exact-match | the column (default `answer`) | 1 when the completion, stripped, equals the column's value, else 0 |
| normalized-match | the column (default `answer`) | 1 when both are equal once lower-cased, spaces collapsed, the final punctuation dropped, and numbers compared as numbers (`3.0` = `3`, `1,000` = `1000`), else 0 |
| math-match | the column (default `answer`) | 1 when the completion's final answer (the last `\\boxed{...}`, else the last number) equals the column's value as mathematics (sympy: `1/2` = `0.5`), else 0 |
| format | a regular expression (required) | 1 when the whole completion matches it (Python `re.fullmatch`, `.` matching newlines too), else 0 |
| length-penalty | characters (default 200) | 0 up to that length, then falling linearly to -1 at twice it |
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from ftcli.errors import ConfigError

DEFAULT_COLUMN = "answer"
DEFAULT_LENGTH = 200


def _column(name: str, column: str) -> Callable[..., list[Any]]:
    def values(kwargs: dict[str, Any], n: int) -> list[Any]:
        if column not in kwargs:
            found = ", ".join(sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric",
                                                                    "completion_ids", "prompt_ids"))) or "none"
            raise KeyError(f"builtin:{name} compares with the column '{column}', and the data has none (columns: "
                           f"{found}); name another with builtin:{name}=COLUMN, or map it with --columns "
                           f"{column}=YOURS")
        got = list(kwargs[column])
        if len(got) != n:
            raise ValueError(f"{len(got)} values of '{column}' for {n} completions")
        return got
    return values


def normalize(text: Any) -> str:
    s = " ".join(str(text).strip().lower().split()).rstrip(".!?;:")
    number = s.replace(",", "").replace("$", "").removesuffix("%")
    try:
        value = float(number)
    except ValueError:
        return s
    return repr(value) if math.isfinite(value) else s


BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(text: str) -> str | None:
    boxed = BOXED.findall(text)
    if boxed:
        return boxed[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def math_equal(a: str, b: str) -> bool:
    """Whether two answers are the same number or expression (sympy), else the same normalised text."""
    if normalize(a) == normalize(b):
        return True
    try:
        from sympy import simplify
        from sympy.parsing.sympy_parser import parse_expr

        return bool(simplify(parse_expr(a.replace("^", "**"), evaluate=True)
                             - parse_expr(b.replace("^", "**"), evaluate=True)) == 0)
    except Exception:  # noqa: BLE001 - anything sympy cannot read is not an equal expression
        return False


def exact_match(column: str) -> Callable[..., list[float]]:
    values = _column("exact-match", column)

    def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        answers = values(kwargs, len(completions))
        return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answers)]
    return reward


def normalized_match(column: str) -> Callable[..., list[float]]:
    values = _column("normalized-match", column)

    def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        answers = values(kwargs, len(completions))
        return [float(normalize(c) == normalize(a)) for c, a in zip(completions, answers)]
    return reward


def math_match(column: str) -> Callable[..., list[float]]:
    values = _column("math-match", column)

    def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        answers = values(kwargs, len(completions))
        out = []
        for c, a in zip(completions, answers):
            got = final_answer(c)
            out.append(float(got is not None and math_equal(got, final_answer(str(a)) or str(a))))
        return out
    return reward


def format_match(pattern: str) -> Callable[..., list[float]]:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"--reward builtin:format={pattern}: not a regular expression ({exc})",
                          hint="fix the pattern (Python re syntax; quote it for the shell)") from None

    def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [float(compiled.fullmatch(c) is not None) for c in completions]
    return reward


def length_penalty(limit: int) -> Callable[..., list[float]]:
    def reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [-min(1.0, max(0, len(c) - limit) / limit) for c in completions]
    return reward


def _length(arg: str | None) -> Callable[..., list[float]]:
    if arg is None:
        return length_penalty(DEFAULT_LENGTH)
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"--reward builtin:length-penalty={arg}: the length must be a whole number of characters "
                          "above 0", hint="e.g. builtin:length-penalty=300")
    return length_penalty(int(arg))


def _format(arg: str | None) -> Callable[..., list[float]]:
    if not arg:
        raise ConfigError("--reward builtin:format needs the pattern", hint="e.g. 'builtin:format=<answer>.*</answer>'")
    return format_match(arg)


BUILTINS: dict[str, Callable[[str | None], Callable[..., list[float]]]] = {
    "exact-match": lambda arg: exact_match(arg or DEFAULT_COLUMN),
    "normalized-match": lambda arg: normalized_match(arg or DEFAULT_COLUMN),
    "math-match": lambda arg: math_match(arg or DEFAULT_COLUMN),
    "format": _format,
    "length-penalty": _length,
}


def load(rest: str) -> tuple[str, Callable[..., list[float]]]:
    """`NAME[=ARG]` (after `builtin:`) -> (`builtin:NAME`, the reward)."""
    name, sep, arg = rest.partition("=")
    if name not in BUILTINS:
        raise ConfigError(f"--reward builtin:{rest}: no built-in reward '{name}'",
                          hint=f"built-ins: {', '.join(BUILTINS)} (see docs/grpo.md)")
    fn = BUILTINS[name](arg if sep else None)
    fn.__name__ = f"builtin:{name}"
    return f"builtin:{name}", fn
