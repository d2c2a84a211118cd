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


def load_training_dataset(config: Any, tokenizer: Any) -> tuple[Any, DataReport]:
    """The training data for `config`: the prepared folder from the cache (built on a miss) or `--dataset`'s.

    The reference recipe for Alpaca data: first `dataset_size` rows, shuffled with the seed,
    the reference Alpaca template. `report.prepared` / `report.reused` say where the data came from."""
    from ftcli.data.prepare import prepare_dataset

    prepared = prepare_dataset(config, tokenizer)
    return prepared.dataset, prepared.report


__all__ = ["DataReport", "explain_example", "load_training_dataset"]
