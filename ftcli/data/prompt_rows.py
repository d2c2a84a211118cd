"""A prompts dataset's rows as written (`--objective grpo`, `ftcli eval --reward`), read without rendering them:
what the reward probe calls the functions on, before any model or tokenizer loads.

    >>> from ftcli.data.prompt_rows import read_prompt_rows
    >>> rows = read_prompt_rows("prompts.jsonl", {"prompt": "question"})
    >>> rows[0]["prompt"], rows[0]["answer"]

Kept apart from ftcli/data/prompts.py (the preparation), which the objectives' registry must not import.
"""

from __future__ import annotations

from typing import Any

from ftcli.data.formats import column_renames
from ftcli.errors import DataError


def prompt_renames(mapping: dict[str, str] | None, columns: list[str], source: str) -> dict[str, str]:
    """`--columns prompt=question,answer=solution` as renames; any field name may be mapped (the rewards' names)."""
    mapping = mapping or {}
    return column_renames(mapping, columns, {"prompt", *mapping}, "prompts data", source, ("role", "content"))


def read_prompt_rows(ref: str, mapping: dict[str, str] | None, split: str = "train",
                     revision: str | None = None) -> list[dict[str, Any]]:
    """The rows of a prompts dataset as they are (not rendered), `--columns` applied; no prompt column: one line."""
    import datasets

    from ftcli.data.sources import load_rows

    datasets.disable_progress_bars()
    ds = load_rows(ref, split=split, revision=revision).dataset
    renames = prompt_renames(mapping, ds.column_names, ref)
    ds = ds.rename_columns(renames) if renames else ds
    if "prompt" not in ds.column_names:
        raise DataError(f"{ref} has no 'prompt' column (columns found: {', '.join(ds.column_names)})",
                        hint="name the prompt column with --columns prompt=YOURS")
    return ds.to_list()


def prompt_text(prompt: Any) -> str:
    """A raw prompt as text for the reward probe: a string as is, a message list its last message's content."""
    if isinstance(prompt, list) and prompt:
        last = prompt[-1]
        return str(last.get("content", "")) if isinstance(last, dict) else str(last)
    return str(prompt)
