"""How examples become batches: length grouping, padding-free rows, packing (see README "Performance").

    >>> from ftcli import batching
    >>> batching.training_args(config, "cpu")     # SFTConfig arguments
    >>> batching.data_collator(config, tokenizer)  # None: the trainer's own collator
"""

from __future__ import annotations

from typing import Any


def training_args(config: Any, device: str) -> dict[str, Any]:
    """The SFTConfig arguments that decide batching."""
    return {"packing": False}


def data_collator(config: Any, tokenizer: Any) -> Any:
    """The collator for `config`, or None for the trainer's default (pad to the longest in the batch)."""
    return None
