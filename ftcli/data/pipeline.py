"""Rows -> Alpaca prompt/response -> `input_ids` + `labels`, the way ftcli trains on them.

    >>> from ftcli.data.pipeline import tokenize_pairs
    >>> rows = tokenize_pairs([("Q: 2+3? A: ", "5")], tokenizer, seq_length=64, train_on_inputs=False)

Loss masks: the prompt's labels are -100 unless `train_on_inputs`; the response and exactly one
EOS after it are always in the loss. A response that already ends with the EOS text (data made
for the reference scripts, which append it) does not get a second one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftcli.data.alpaca import ALPACA_REQUIRED, format_alpaca
from ftcli.data.sources import load_rows
from ftcli.errors import DataError

IGNORE = -100


@dataclass
class DataReport:
    source: str
    source_kind: str
    fingerprint: str
    rows_read: int
    rows_selected: int
    rows_used: int = 0
    dropped_empty_output: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    eos_trained_once: int = 0  # examples whose final EOS is a target exactly once (all but truncated ones)
    max_length: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_training_dataset(config: Any, tokenizer: Any) -> tuple[Any, DataReport]:
    """The reference recipe: first `dataset_size` rows, shuffled with the seed, Alpaca-formatted, tokenized."""
    from datasets import Dataset

    loaded = load_rows(config.dataset, split=config.dataset_split, revision=None)
    ds = loaded.dataset
    missing = [c for c in ALPACA_REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"dataset {config.dataset} has no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(ds.column_names)})",
                        hint="use Alpaca-format data with instruction / input / output columns")
    report = DataReport(config.dataset, loaded.source_kind, loaded.fingerprint, rows_read=len(ds), rows_selected=0)
    size = len(ds) if config.dataset_size is None else min(config.dataset_size, len(ds))
    if "dataset_size" in config.model_fields_set and config.dataset_size is not None and config.dataset_size > len(ds):
        report.notes.append(f"--dataset-size {config.dataset_size} > {len(ds)} rows: using all rows")
    ds = ds.select(range(size)).shuffle(seed=config.seed)
    report.rows_selected = len(ds)

    pairs = []
    for row in ds:
        prompt, response = format_alpaca(row)
        if not response.strip():
            report.dropped_empty_output += 1
            continue
        pairs.append((prompt, response))
    examples = tokenize_pairs(pairs, tokenizer, config.seq_length, config.train_on_inputs, report)
    if not examples["input_ids"]:
        raise DataError(f"dataset {config.dataset} has no usable rows after formatting "
                        f"({report.dropped_empty_output} empty outputs, {report.dropped_prompt_too_long} prompts "
                        f"longer than --seq-length {config.seq_length})",
                        hint="check the data, or raise --seq-length")
    return Dataset.from_dict(examples), report


def special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS for Llama-style tokenizers)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return list(with_special[:start])
    return []


def tokenize_pairs(
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    seq_length: int,
    train_on_inputs: bool,
    report: DataReport | None = None,
) -> dict[str, list[list[int]]]:
    """Tokenize (prompt, response) pairs in batch into input_ids and labels (see module doc)."""
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    prefix = special_prefix(tokenizer)
    prompts = [p for p, _ in pairs]
    responses = [r[: -len(eos_text)] if eos_text and r.endswith(eos_text) else r for _, r in pairs]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if pairs else []
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if pairs else []
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        head = prefix + list(p_ids)
        tail = list(r_ids) + [eos_id]
        ids = head + tail
        labels = (list(head) if train_on_inputs else [IGNORE] * len(head)) + tail
        if len(ids) > seq_length:
            # Keep the start, as training and inference see it; the cut response loses its EOS on purpose:
            # the model must not learn to stop where the text was merely truncated.
            ids, labels = ids[:seq_length], labels[:seq_length]
            if report is not None:
                report.truncated += 1
            if all(t == IGNORE for t in labels[1:]):
                if report is not None:
                    report.dropped_prompt_too_long += 1
                continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    if report is not None:
        report.rows_used = len(out["input_ids"])
        report.tokens = sum(len(x) for x in out["input_ids"])
        report.loss_tokens = sum(sum(1 for t in lab if t != IGNORE) for lab in out["labels"])
        report.max_length = max((len(x) for x in out["input_ids"]), default=0)
        report.eos_trained_once = sum(1 for n in eos_loss_counts(out["labels"], eos_id) if n == 1)
    return out


def eos_loss_counts(labels: list[list[int]], eos_id: int) -> list[int]:
    """How many times EOS is a training target in each example (1 for every untruncated example)."""
    return [sum(1 for t in lab if t == eos_id) for lab in labels]
