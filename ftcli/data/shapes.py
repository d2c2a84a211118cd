"""The shapes of rows an objective trains on, and the module that prepares each.

    >>> from ftcli.data.shapes import shape_module
    >>> shape_module(config).prepare_eval(config, tokenizer)     # --eval-dataset, prepared as training data is

A new objective that trains on rows of a new shape adds its module here, one line; its Objective names the
shape (`Objective.data`). Importing this module must not import torch.
"""

from __future__ import annotations

from typing import Any

# The data shape an objective trains on (Objective.data) -> the module that prepares it. Each module has
# `prepare(config, tokenizer, *, output, overwrite, num_proc, use_cache) -> Prepared`, `hold_out(config, dataset,
# report) -> (train, eval set)` and `prepare_eval(config, tokenizer) -> eval set`; "examples" is SFT's.
SHAPES: dict[str, str] = {
    "examples": "ftcli.data.split",
    "pairs": "ftcli.data.preference_prepare",
    "labeled": "ftcli.data.labeled",  # KTO's: a prompt with one answer and a desirable/undesirable label
    "prompts": "ftcli.data.prompts",
}


def shape_of(config: Any) -> str:
    """The shape of the rows `config`'s objective trains on (a name in SHAPES)."""
    from ftcli.objectives import OBJECTIVES

    return OBJECTIVES[getattr(config, "objective", "sft")].data


def shape_module(config: Any) -> Any:
    """The module that prepares the rows `config`'s objective trains on (see SHAPES)."""
    import importlib

    return importlib.import_module(SHAPES[shape_of(config)])
