"""The eval set of a run: rows held out of `--dataset` (`--eval-split`) or a dataset of its own (`--eval-dataset`).

    >>> from ftcli.data.split import split_indices
    >>> split_indices(10, 0.2, seed=42)        # (training rows in their order, held-out rows)
    ([0, 1, 2, 4, 5, 6, 7, 9], [3, 8])

A held-out split is chosen from `--seed` alone among the prepared (tokenized, masked, shuffled)
examples, so the same flags always hold out the same examples, and none of them is ever trained on:
the training set is what is left, in its own order. `--eval-dataset` is prepared exactly like
`--dataset` (same format, template, loss mask, sequence length and cache), every row of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ftcli.data.pipeline import DataReport
from ftcli.data.specs import dataset_label
from ftcli.errors import DataError


@dataclass
class EvalSet:
    """What a run evaluates on, and where it came from."""

    dataset: Any  # datasets.Dataset: input_ids, labels, length
    source: str  # "--eval-dataset data/dev.jsonl" or "--eval-split 0.1 of data/train.jsonl"
    examples: int
    tokens: int
    loss_tokens: int
    fingerprint: str
    report: DataReport | None = None  # the eval dataset's own preparation report (--eval-dataset)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "examples": self.examples, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "fingerprint": self.fingerprint}


def held_out_rows(total: int, spec: int | float) -> int:
    """How many of `total` examples `--eval-split spec` holds out: N rows, or the fraction (at least one)."""
    if isinstance(spec, float):
        return max(1, round(spec * total))
    return int(spec)


def split_indices(total: int, spec: int | float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of `total` examples, each in ascending order, chosen from `seed`."""
    import numpy as np

    n = held_out_rows(total, spec)
    perm = np.random.default_rng(int(seed)).permutation(total)
    return sorted(int(i) for i in perm[n:]), sorted(int(i) for i in perm[:n])


def split_fingerprint(fingerprint: str, spec: int | float, seed: int) -> str:
    """The training data's fingerprint once `--eval-split` has taken its rows out."""
    return f"{fingerprint};eval_split={spec};seed={seed}"


def count_tokens(dataset: Any) -> tuple[int, int]:
    """(tokens, tokens in the loss) of a prepared dataset."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    tokens = int(pc.sum(table["length"]).as_py() or 0) if "length" in table.column_names else \
        int(pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0)
    labels = pc.list_flatten(table["labels"])
    return tokens, int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)


def hold_out(config: Any, dataset: Any, report: DataReport, count: Any = None,
             unit: str = "examples") -> tuple[Any, EvalSet]:
    """Split `--eval-split` rows off the prepared training data; the report then describes the training part.
    `count(dataset)` -> (tokens, loss tokens) of prepared rows (default: examples' `count_tokens`); `unit` names
    the rows in errors (DPO's pairs: ftcli.data.preference_prepare)."""
    count = count or count_tokens
    total = len(dataset)
    n = held_out_rows(total, config.eval_split)
    if n >= total:
        raise DataError(f"--eval-split {config.eval_split}: holds out {n} of the {total} {unit} of "
                        f"{dataset_label(config.dataset)}, which leaves nothing to train on",
                        hint=f"hold out fewer rows (below {total}) or a smaller fraction")
    train_idx, eval_idx = split_indices(total, config.eval_split, config.seed)
    train, held = dataset.select(train_idx), dataset.select(eval_idx)
    tokens, loss_tokens = count(held)
    report.fingerprint = split_fingerprint(report.fingerprint, config.eval_split, config.seed)
    report.rows_used = len(train)
    report.tokens -= tokens
    report.loss_tokens -= loss_tokens
    source = f"--eval-split {config.eval_split} of {dataset_label(config.dataset)}"
    return train, EvalSet(held, source, len(held), tokens, loss_tokens, report.fingerprint)


def prepare_eval_dataset(config: Any, tokenizer: Any, flag: str = "--eval-dataset",
                         prepare: Any = None) -> EvalSet:
    """`--eval-dataset`: every row of it, prepared (and cached) the way `--dataset` is (`prepare(config,
    tokenizer)`, default ftcli.data.prepare's; DPO's pairs: ftcli.data.preference_prepare). Errors name `flag`."""
    from ftcli.data.prepare import prepare_dataset

    prepare = prepare or prepare_dataset
    eval_config = config.model_copy(update={"dataset": config.eval_dataset, "dataset_size": None,
                                            "eval_dataset": None, "eval_split": None})
    # Not asked for on this command line: a prepared eval folder is used with whatever size it holds.
    eval_config.__pydantic_fields_set__.discard("dataset_size")
    try:
        prepared = prepare(eval_config, tokenizer)
    except DataError as exc:
        hint = re.sub(r"--dataset\b(?!-)", flag, exc.hint) if exc.hint else None
        raise DataError(f"{flag}: {exc.message}", hint=hint) from None
    report = prepared.report
    return EvalSet(prepared.dataset, f"{flag} {config.eval_dataset}", report.rows_used, report.tokens,
                   report.loss_tokens, report.fingerprint, report)


# The "examples" shape's eval set (ftcli.data.SHAPES; its training data is prepared by ftcli.data.mixture).
prepare_eval = prepare_eval_dataset
