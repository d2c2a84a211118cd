"""The data layer: sources -> format -> template -> tokenize with loss masks -> prepared folder (cache).

    >>> from ftcli.data import load_training_dataset, explain_example
    >>> ds, report = load_training_dataset(config, tokenizer)   # columns: input_ids, labels, length
    >>> explain_example(ds[0]["input_ids"], ds[0]["labels"], tokenizer)[:2]
    [('<s>', False), ('Below', False)]

`sources` reads rows (built-in sample, local files, folders, globs, hub datasets), `formats`
detects the format and turns a row into an example, `templates` renders it (the reference
Alpaca template, the model's chat template, a Jinja file), `pipeline` tokenizes it with the
loss mask, `prepare` runs all of that in parallel and writes a prepared folder whose manifest
is described there, and `cache` keys, checks and publishes those folders.
"""

from __future__ import annotations

from typing import Any

from ftcli.data.pipeline import DataReport, explain_example
from ftcli.data.shapes import SHAPES, shape_module


def load_training_dataset(config: Any, tokenizer: Any) -> tuple[Any, DataReport]:
    """The training data for `config`: the prepared folder from the cache (built on a miss) or `--dataset`'s.

    The reference recipe for Alpaca data: first `dataset_size` rows, shuffled with the seed,
    the reference Alpaca template. `report.prepared` / `report.reused` say where the data came from."""
    train, report, _ = load_datasets(config, tokenizer)
    return train, report


def load_datasets(config: Any, tokenizer: Any) -> tuple[Any, DataReport, Any]:
    """(training data, its report, the eval set or None): `--eval-split` rows held out of the training
    data, or `--eval-dataset` prepared the same way (see ftcli.data.split)."""
    from ftcli.data.mixture import prepare_data

    shape = shape_module(config)
    prepared = prepare_data(config, tokenizer)
    dataset, report = prepared.dataset, prepared.report
    if getattr(config, "eval_split", None) is not None:
        dataset, eval_set = shape.hold_out(config, dataset, report)
        return dataset, report, eval_set
    if getattr(config, "eval_dataset", None) is not None:
        return dataset, report, shape.prepare_eval(config, tokenizer)
    return dataset, report, None


def prepare_eval_set(config: Any, tokenizer: Any) -> Any:
    """`--eval-dataset` prepared (and cached) as the objective's training data is: examples, pairs, ..."""
    return shape_module(config).prepare_eval(config, tokenizer)


__all__ = ["DataReport", "SHAPES", "explain_example", "load_datasets", "load_training_dataset", "prepare_eval_set",
           "shape_module"]
