"""`ftcli warmup`: compile ahead of the run, without touching the weights."""

from __future__ import annotations

from typing import Any


def warm_compile_cache(config: Any, plan: Any, tokenizer: Any, dataset: Any, device: str) -> None:
    """Called by `train --compile` before the trainer is built (the compile cache is not wired yet)."""
