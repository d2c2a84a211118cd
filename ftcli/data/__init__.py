"""The data layer: sources -> format -> template -> tokenize with loss masks.

    >>> from ftcli.data import load_training_dataset
    >>> ds, report = load_training_dataset(config, tokenizer)   # columns: input_ids, labels

`sources` reads rows (built-in sample, local files, hub datasets), `alpaca` turns a row into a
prompt and a response with the reference template, `tokenize` builds `input_ids` and `labels`
with the prompt masked (unless `train_on_inputs`) and EOS trained exactly once per example.
"""

from ftcli.data.pipeline import load_training_dataset

__all__ = ["load_training_dataset"]
