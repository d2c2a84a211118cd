"""The data options as written: `--dataset` (one source, or a mixture of `SOURCE[:WEIGHT]`, see
ftcli.data.mixture), `--columns FIELD=COLUMN,...` and `--template-kwargs KEY=VALUE,...`.

    >>> split_weight("data/b.jsonl:0.25"), split_weight("builtin:alpaca-sample")
    (('data/b.jsonl', 0.25), ('builtin:alpaca-sample', None))

Parsed and checked here, with no heavy import: `ftcli.config` validates the `dataset` option with it.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

# The weight after a mixture source's last colon: a number (`inf` and `nan` too, to be refused as such).
_WEIGHT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


def split_weight(spec: str) -> tuple[str, float | None]:
    """`data/b.jsonl:0.25` -> ("data/b.jsonl", 0.25): the text after the LAST colon is a weight only when it is
    a number, so `builtin:alpaca-sample` and `org/name` stay names (weight None: not given), and when the whole text
    is not itself an existing path whose head is not (a file named `data/t:5` is read as that file)."""
    ref, sep, tail = spec.rpartition(":")
    if not sep or not ref or not _WEIGHT.fullmatch(tail.strip()):
        return spec, None
    if os.path.lexists(os.path.expanduser(spec)) and not os.path.lexists(os.path.expanduser(ref)):
        return spec, None  # a file named `t:5` (and no `t`): its name; in a mixture, `t:5:2` gives it weight 2
    return ref, float(tail)


def check_dataset(value: Any) -> Any:
    """`dataset` as given (a string, or a list of `SOURCE[:WEIGHT]`) -> a string for one source (exactly as
    before mixtures existed), a list for a mixture; a ValueError for an empty source, a bad or lone weight,
    or a source given twice."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("needs at least one source")
        if not all(isinstance(v, str) for v in value):
            raise ValueError("each source must be text: SOURCE or SOURCE:WEIGHT")
        if len(value) == 1:
            value = value[0]
        else:
            value = list(value)
    mixture = isinstance(value, (list, tuple))
    if not mixture and not isinstance(value, str):
        return value  # the field's own validation names the type
    specs = list(value) if mixture else [value]
    seen: set[str] = set()
    for spec in specs:
        ref, weight = split_weight(spec)
        if mixture and not ref.strip():
            raise ValueError(f"'{spec}' names no source")
        if weight is not None and not mixture:
            raise ValueError(f"'{spec}': a weight only applies to a mixture; give --dataset twice or more "
                             f"(SOURCE[:WEIGHT] each), or drop ':{spec.rpartition(':')[2]}'")
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"'{spec}': the weight {spec.rpartition(':')[2]} must be a finite number above 0 "
                             f"(e.g. {ref}:0.25)")
        if ref in seen:
            raise ValueError(f"'{ref}' is given twice in the mixture: give each source once, with its weight")
        seen.add(ref)
    return value


def mixture_specs(dataset: str | list[str]) -> list[tuple[str, float]] | None:
    """[(source, weight)] of a mixture (a weight not given is 1), or None for one source."""
    if isinstance(dataset, str):
        return None
    return [(ref, 1.0 if weight is None else weight) for ref, weight in map(split_weight, dataset)]


def map_sources(dataset: str | list[str], fn: Any) -> str | list[str]:
    """`dataset` with `fn` applied to each source's reference, a mixture's weights kept as written."""
    return fn(dataset) if isinstance(dataset, str) else [map_spec(spec, fn) for spec in dataset]


def map_spec(spec: str, fn: Any) -> str:
    """One mixture source `SOURCE[:WEIGHT]` with `fn` applied to SOURCE."""
    ref, weight = split_weight(spec)
    return fn(ref) if weight is None else f"{fn(ref)}:{spec.rpartition(':')[2]}"


def dataset_label(dataset: str | list[str]) -> str:
    """`--dataset` for messages: the source, or the mixture's sources joined with ` + `."""
    return dataset if isinstance(dataset, str) else " + ".join(dataset)


def parse_columns(text: str) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"}: the one parser of
    the `--columns` flag and the `columns:` YAML key. A ValueError names the part that is not FIELD=COLUMN."""
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(f"'{part}' is not FIELD=COLUMN (write e.g. instruction=question,output=answer)")
        mapping[field.strip()] = column.strip()
    return mapping


def parse_template_kwargs(text: str) -> dict[str, Any]:
    """`enable_thinking=false,reasoning_effort=low` -> {"enable_thinking": False, "reasoning_effort": "low"}: each
    value read as JSON where it is JSON (true, 3, "x", [..]), else as text."""
    import json

    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"'{part}' is not KEY=VALUE (write e.g. enable_thinking=false)")
        try:
            out[key.strip()] = json.loads(value.strip())
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def read_tools(path: str) -> list[dict[str, Any]]:
    """`--tools FILE.json`: a JSON list of tool schemas (or one schema); a ValueError says what is wrong with it."""
    import json
    from pathlib import Path

    try:
        value = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{path} must hold a JSON list of tool schemas")
    return value
