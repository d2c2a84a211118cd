"""`ftcli warmup`: compile ahead of the run, without touching the weights.

    $ ftcli warmup --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --batch-size 8

Accepts `train`'s options (a whole `train --compile` command line); its help lists those that change what
is compiled. Registered in ftcli/cli/__init__.py.
"""

from __future__ import annotations

from ftcli.cli.common import run_config_from_flags, run_guarded, with_train_options


def warmup(values: dict) -> None:
    """Compile the model for the run these options describe, ahead of it: forward and backward on every
    batch shape, no optimizer step (the weights are untouched). Caches the compiled code for `train --compile`
    and reports compile time, step time, real tokens/s and peak memory (a dry run: does the batch fit?).

    A whole `train` command line is accepted too: train's other options (not listed here) change nothing
    in what is compiled."""

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


# The train options that change what warmup compiles and measures: the model, the data (hence the batch
# shapes), the shape options and the adapter. The optimizer, schedule, evaluation and output are never used.
SHOWN = frozenset({"method", "model", "revision", "trust_remote_code", "dtype", "device", "attn_implementation",
                   "dataset", "dataset_split", "dataset_size", "dataset_revision", "format", "columns", "template",
                   "template_kwargs", "tools", "train_on_inputs", "batch_size", "seq_length", "gradient_checkpointing",
                   "seed", "group_by_length", "padding_free", "packing", "liger", "eval_split", "lora_rank", "lora_alpha", "lora_dropout",
                   "lora_target_modules", "use_dora", "use_rslora", "lora_init", "lora_bias", "config"})
command = with_train_options(warmup, shown=SHOWN)
