"""What a prepare measures and why it drops rows: the `stats` of a prepared folder's manifest.

    >>> from ftcli.data.stats import padding_waste
    >>> padding_waste([4, 2, 2, 2], batch_size=2)   # batches [4, 2] and [2, 2]: 2 of 12 tokens are padding
    0.1667

Rows dropped before training have a reason (`ftcli.data.pipeline`: empty response, prompt longer
than `--seq-length`, nothing trained left after truncation); a row whose values are unusable is an
error naming its row, not a drop.
"""

from __future__ import annotations

from typing import Any

from ftcli.data.pipeline import DROP_EMPTY, DROP_NO_ASSISTANT, DROP_NO_RESPONSE, DROP_SAME, DROP_TOO_LONG, INVALID
from ftcli.errors import DataError


def shuffled_order(shuffled: Any, as_array: bool = False) -> Any:
    """Row i of the shuffled dataset is row order[i] of the unshuffled one (a list, or with `as_array` a NumPy
    array: no Python int per row)."""
    import numpy as np

    indices = shuffled._indices  # datasets keeps a shuffle as an indices mapping until it is flattened
    if as_array:
        return indices.column(0).to_numpy().astype(np.int64) if indices is not None else np.arange(len(shuffled))
    return indices.column(0).to_pylist() if indices is not None else list(range(len(shuffled)))


def measure(mapped: Any, kept_rows: list[int], drops: list[str], rows_read: int, rows_selected: int,
           batch_size: int | None) -> dict[str, Any]:
    """Statistics of the kept rows (`kept_rows`: their indices in `mapped`, in training order)."""
    import numpy as np

    def column(name: str) -> Any:
        return mapped.data.column(name).to_numpy()[kept_rows]

    lengths = column("length").astype(np.int64)
    loss = int(column("loss_tokens").sum())
    truncated = int(column("truncated").sum())
    eos_once = int(column("eos_once").sum())
    tokens = int(lengths.sum())
    bs = batch_size or 1
    pct = {f"p{q}": int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 95, 99)}
    return {
        "rows_read": rows_read,
        "rows_selected": rows_selected,
        "rows_kept": len(lengths),
        "dropped": {"empty": drops.count(DROP_EMPTY), "too_long": drops.count(DROP_TOO_LONG),
                    "no_response": drops.count(DROP_NO_RESPONSE)},
        "tokens": tokens,
        "loss_tokens": loss,
        "loss_token_share": round(loss / tokens, 4) if tokens else 0.0,
        "truncated": truncated,
        "truncated_share": round(truncated / len(lengths), 4),
        "eos_trained_once": eos_once,
        "length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1), **pct,
                   "max": int(lengths.max())},
        "padding": {"batch_size": bs, "in_order": padding_waste(lengths, bs),
                    "length_grouped": padding_waste(np.sort(lengths)[::-1], bs)},
    }


def padding_waste(lengths: Any, batch_size: int) -> float:
    """Share of the padded batches (each padded to its longest row) that is padding."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        padded += int(chunk.max()) * len(chunk)
    return round(1 - int(lengths.sum()) / padded, 4)


def raise_first_invalid(drops: list[str], ref: str, rows: list[int] | None = None) -> None:
    """The first invalid row as one error; `rows`: the source row of each entry (a conversation rendered one
    example per assistant turn is several entries)."""
    for i, d in enumerate(drops):
        if d.startswith(INVALID):
            count = sum(1 for x in drops if x.startswith(INVALID))
            more = f" ({count - 1} more rows like it)" if count > 1 else ""
            row = rows[i] if rows is not None else i
            raise DataError(f"{ref}: row {row + 1}: {d.removeprefix(INVALID)}{more}",
                            hint="fix the row(s), or pick the right --format / --columns")


def rendering_note(stats: dict[str, Any], fmt: str | None) -> str | None:
    """How conversations became examples (None for single-turn data): one sequence each, or, where the chat template
    renders history differently once later turns follow (it drops earlier reasoning), one example per assistant turn
    (ftcli.data.templates.render_turns)."""
    per_turn = stats.get("per_turn")
    if per_turn:
        return (f"{per_turn['conversations']:,} conversations -> {per_turn['examples']:,} examples: the template "
                "renders history differently, one example per assistant turn (its prompt as inference renders it)")
    if fmt in ("chat", "sharegpt"):
        return "one sequence per conversation (the template renders each turn the same way once later turns follow)"
    return None


def drop_summary(drops: list[str]) -> str:
    names = {DROP_EMPTY: "empty response", DROP_TOO_LONG: "prompt longer than --seq-length",
             DROP_NO_RESPONSE: "no response left after truncation", DROP_NO_ASSISTANT: "answer with no assistant message",
             DROP_SAME: "chosen and rejected identical"}
    parts = [f"{drops.count(k)} {v}" for k, v in names.items() if drops.count(k)]
    return ", ".join(parts)


def all_dropped_hint(drops: list[str], seq_length: int) -> str:
    if drops.count(DROP_SAME) == len(drops):
        return "in every pair the chosen and rejected answers are the same, so DPO has nothing to prefer; check the " \
               "data and --columns"
    if drops.count(DROP_EMPTY) + drops.count(DROP_NO_ASSISTANT) == len(drops):
        return "every response (output, completion, assistant turn or text) is empty; check --format and --columns"
    return f"raise --seq-length (now {seq_length}) or shorten the prompts"


def prepared_position(manifest: dict[str, Any], row: int) -> int | None:
    """Where row `row` (0 = the first) of the source is in its prepared data, which is shuffled with the seed;
    None when rows were dropped (which ones is not recorded) or the manifest does not say."""
    stats, seed = manifest.get("stats", {}), manifest.get("options", {}).get("seed")
    selected = stats.get("rows_selected")
    if seed is None or selected is None or stats.get("rows_kept") != selected or row >= selected:
        return None
    from datasets import Dataset

    # The same shuffle prepare made (it depends on the number of rows and the seed only).
    order = shuffled_order(Dataset.from_dict({"row": list(range(selected))}).shuffle(seed=seed))
    return order.index(row)
