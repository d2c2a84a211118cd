"""`ftcli train`: fine-tune a model with one of the methods, into a reproducible run folder.

    $ ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --max-steps 20

The run itself happens in ftcli/training/run.py; `--method fsdp` (and any method on several
processes) first goes through the launcher, whose ranks rerun this command.
"""

from __future__ import annotations

import sys

from ftcli.cli.common import run_config_from_flags, run_guarded, with_train_options


def train(values: dict) -> None:
    """Fine-tune a model (full, LoRA, QLoRA or FSDP), with live progress and a reproducible run folder."""

    def go() -> None:
        from ftcli.preflight import check_run

        run_config = run_config_from_flags(values)
        check_run(run_config, "train")  # before the imports: a typo or a missing file is one line at once
        from ftcli.training.launch import launch, needs_launch

        if needs_launch(run_config):
            # This process only starts and watches the ranks; each of them reruns this command and trains.
            launch(run_config, sys.argv[1:])
            return
        from ftcli.training.run import run_training

        run_training(run_config, command=["ftcli", *sys.argv[1:]])

    from ftcli.system import sigterm_as_interrupt

    # SIGTERM ends the command like Ctrl-C at any point (loading included: one line, exit 130, the manifest
    # recorded, the lock released); once training starts, the run's guard turns it into a clean stop instead.
    with sigterm_as_interrupt():
        run_guarded(go)


command = with_train_options(train)
