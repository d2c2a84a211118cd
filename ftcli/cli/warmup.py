"""`ftcli warmup`: compile ahead of the run, without touching the weights.

    $ ftcli warmup --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --batch-size 8

Takes exactly `train`'s options; registered in ftcli/cli/__init__.py.
"""

from __future__ import annotations

from ftcli.cli.common import run_config_from_flags, run_guarded, with_train_options


def warmup(values: dict) -> None:
    """Compile the model for the run these options describe, ahead of it: forward and backward on every
    batch shape, no optimizer step (the weights are untouched). Caches the compiled code for `train --compile`
    and reports compile time, step time, real tokens/s and peak memory (a dry run: does the batch fit?)."""

    def go() -> None:
        from ftcli.preflight import check_run

        config = run_config_from_flags(values)
        check_run(config, "warmup")
        from ftcli.models import without_bitsandbytes
        from ftcli.training.recipe import uses_bitsandbytes
        from ftcli.training.warmup import run_warmup

        with without_bitsandbytes(not uses_bitsandbytes(config)):
            run_warmup(config)

    run_guarded(go)


command = with_train_options(warmup)
