"""The ftcli command line: one thin function per command; the work happens in the package.

    $ ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --max-steps 20

Heavy libraries (torch, transformers, trl, peft, datasets) are imported inside command bodies
only, so `ftcli --help` stays fast.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ftcli import __version__

if TYPE_CHECKING:
    from ftcli.config import RunConfig

class FtcliGroup(typer.core.TyperGroup):
    """The command group, letting `--resume` stand alone: a bare `--resume` (last, or followed by another
    option) means `--resume latest`. Click options take a value or none, never an optional one."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_resume_to_latest(args))


def bare_resume_to_latest(args: list[str]) -> list[str]:
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("latest")
    return out


app = typer.Typer(
    cls=FtcliGroup,
    name="ftcli",
    help="Fine-tune causal language models: full, LoRA, from one command line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}

DATA = "Data"
MODEL = "Model"
TRAIN = "Training"
LORA = "LoRA"
OUTPUT = "Output"
DIST = "Processes and machines"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ftcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Fine-tune causal language models with the Hugging Face stack, from one tool."""
    _state["debug"] = debug


def _run(fn, *args, **kwargs):
    """Turn a user-caused `FtcliError` into one line on stderr and its exit code."""
    from ftcli.console import err_console
    from ftcli.errors import EXIT_INTERRUPTED, FtcliError

    try:
        return fn(*args, **kwargs)
    except FtcliError as exc:
        if _state["debug"]:
            raise
        from rich.markup import escape

        # Messages quote paths, library errors and code: `[...]` in them is text, not Rich markup.
        err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", soft_wrap=True)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            from ftcli.training.launch import record_rank_error

            record_rank_error(exc.one_line())
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def train(
    method: Annotated[Optional[str], typer.Option(help="full | lora | qlora | fsdp.", rich_help_panel=TRAIN)] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Hub id, local folder or builtin:tiny-llama. [default: the reference model of the method]",
        rich_help_panel=MODEL)] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of the model.",
                                                    rich_help_panel=MODEL)] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option(
        "--trust-remote-code", help="Run code shipped with the model (off by default).",
        rich_help_panel=MODEL)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="auto | float32 | float16 | bfloat16. auto: bfloat16 on CUDA, float32 on CPU.",
        rich_help_panel=MODEL)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N.", rich_help_panel=MODEL)] = None,
    attn_implementation: Annotated[Optional[str], typer.Option(
        help="auto | sdpa | eager | flash_attention_2. auto: FlashAttention 2 when installed on CUDA, else SDPA.",
        rich_help_panel=MODEL)] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Hub id, local .jsonl/.json/.csv/.parquet/.txt file, folder, glob, builtin:alpaca-sample or a "
        "prepared folder. [default: tatsu-lab/alpaca]",
        rich_help_panel=DATA)] = None,
    dataset_split: Annotated[Optional[str], typer.Option(help="Split of a hub dataset. [default: train]",
                                                         rich_help_panel=DATA)] = None,
    dataset_size: Annotated[Optional[int], typer.Option(
        help="Use the first N rows, then shuffle with --seed. [default: 500]", rich_help_panel=DATA)] = None,
    dataset_revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of the dataset.",
                                                            rich_help_panel=DATA)] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="auto | alpaca | prompt-completion | chat | sharegpt | text. auto: detected from the columns.",
        rich_help_panel=DATA)] = None,
    columns: Annotated[Optional[str], typer.Option(
        help="Map the format's fields to your column names, e.g. instruction=question,output=answer.",
        rich_help_panel=DATA)] = None,
    template: Annotated[Optional[str], typer.Option(
        help="auto | alpaca | model (the model's chat template) | path to a Jinja file. auto: Alpaca template for "
        "Alpaca data, the model's chat template for chat data.", rich_help_panel=DATA)] = None,
    train_on_inputs: Annotated[Optional[bool], typer.Option(
        "--train-on-inputs", help="Put the prompt in the loss too (the reference scripts' behaviour). "
        "Default: only the response and its EOS.", rich_help_panel=DATA)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Per-device batch size. [default: 8 full, 4 lora]",
                                                      rich_help_panel=TRAIN)] = None,
    seq_length: Annotated[Optional[int], typer.Option(help="Maximum tokens per example. [default: 2048]",
                                                      rich_help_panel=TRAIN)] = None,
    num_epochs: Annotated[Optional[float], typer.Option(help="Epochs. [default: 1]", rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (overrides epochs).",
                                                     rich_help_panel=TRAIN)] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option(
        help="Micro-batches per optimizer step. [default: 1]", rich_help_panel=TRAIN)] = None,
    learning_rate: Annotated[Optional[float], typer.Option(
        "--learning-rate", "--lr", help="Peak learning rate. [default: 5e-5 full, 1e-4 lora]",
        rich_help_panel=TRAIN)] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory.",
        rich_help_panel=TRAIN)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling and training. [default: 42]",
                                                rich_help_panel=TRAIN)] = None,
    group_by_length: Annotated[Optional[bool], typer.Option(
        "--group-by-length/--no-group-by-length", help="Batch examples of similar length together (less padding).",
        rich_help_panel=TRAIN)] = None,
    padding_free: Annotated[Optional[bool], typer.Option(
        "--padding-free/--no-padding-free", help="Concatenate each batch into one padding-free row.",
        rich_help_panel=TRAIN)] = None,
    packing: Annotated[Optional[bool], typer.Option(
        "--packing/--no-packing", help="Pack several examples into each --seq-length row (no cross-attention).",
        rich_help_panel=TRAIN)] = None,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile", help="torch.compile the model (compiles during the first steps; no throw-away training).",
        rich_help_panel=TRAIN)] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="LoRA rank r. [default: 8]", rich_help_panel=LORA)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha. [default: 16]",
                                                        rich_help_panel=LORA)] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="LoRA dropout. [default: 0]",
                                                          rich_help_panel=LORA)] = None,
    lora_target_modules: Annotated[Optional[str], typer.Option(
        help="Comma-separated module names, or all-linear. [default: the seven Llama projections; qlora: all-linear]",
        rich_help_panel=LORA)] = None,
    full_parameters: Annotated[Optional[bool], typer.Option(
        "--full-parameters", help="fsdp: train every weight instead of LoRA adapters.", rich_help_panel=DIST)] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        help="fsdp: processes to start on this machine (one per GPU). [default: 1]", rich_help_panel=DIST)] = None,
    nnodes: Annotated[Optional[int], typer.Option(help="fsdp: number of machines. [default: 1]",
                                                  rich_help_panel=DIST)] = None,
    node_rank: Annotated[Optional[int], typer.Option(help="fsdp: rank of this machine, 0..nnodes-1. [default: 0]",
                                                     rich_help_panel=DIST)] = None,
    master_addr: Annotated[Optional[str], typer.Option(help="fsdp: address of machine 0. [default: 127.0.0.1]",
                                                       rich_help_panel=DIST)] = None,
    master_port: Annotated[Optional[int], typer.Option(help="fsdp: port on machine 0. [default: 29500]",
                                                       rich_help_panel=DIST)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        help="fsdp: host:port of a c10d rendezvous (instead of --master-addr/--master-port).",
        rich_help_panel=DIST)] = None,
    save_steps: Annotated[Optional[int], typer.Option(
        help="Save a checkpoint every N optimizer steps and at the end of each epoch. [default: none; Ctrl-C / "
        "SIGTERM always save one]", rich_help_panel=OUTPUT)] = None,
    save_total_limit: Annotated[Optional[int], typer.Option(
        help="Keep at most N checkpoints (the newest complete one is never deleted).", rich_help_panel=OUTPUT)] = None,
    resume: Annotated[Optional[str], typer.Option(
        metavar="[PATH]",
        help="Resume from the latest complete checkpoint in --output-dir (bare `--resume`) or from PATH "
        "(a checkpoint-N folder or a run folder). Refused when the method, model, data, batch size, "
        "accumulation or seed differ, unless --force.", rich_help_panel=OUTPUT)] = None,
    force: Annotated[Optional[bool], typer.Option(
        "--force", help="Resume even though the config differs from the checkpoint's.", rich_help_panel=OUTPUT)] = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        help="Run folder: model/adapter, tokenizer, manifest, logs. [default: runs/<method>-<time>]",
        rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a non-empty --output-dir.",
                                                      rich_help_panel=OUTPUT)] = None,
    log_dir: Annotated[Optional[Path], typer.Option(help="TensorBoard folder. [default: <output-dir>/logs]",
                                                    rich_help_panel=OUTPUT)] = None,
    logging_steps: Annotated[Optional[int], typer.Option(help="Log every N steps. [default: 1]",
                                                         rich_help_panel=OUTPUT)] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="YAML file with the same keys as these flags (snake_case); flags override it.",
        rich_help_panel=OUTPUT)] = None,
) -> None:
    """Fine-tune a model: full fine-tuning or LoRA, with live progress and a reproducible run folder."""
    values = dict(locals())

    def go() -> None:
        from ftcli.training.launch import launch, needs_launch

        run_config = run_config_from_flags(values)
        if needs_launch(run_config):
            # This process only starts and watches the ranks; each of them reruns this command and trains.
            launch(run_config, sys.argv[1:])
            return
        from ftcli.training.run import run_training

        run_training(run_config, command=["ftcli", *sys.argv[1:]])

    _run(go)


def run_config_from_flags(values: dict) -> RunConfig:
    """The `train` options as given (None = not given) + `--config` file -> a validated RunConfig.

    Shared by every command that takes the train options (`train`, `warmup`)."""
    from ftcli.config import build_run_config

    flags = {k: v for k, v in values.items() if k != "config" and v is not None}
    if "columns" in flags:
        flags["columns"] = parse_columns(flags["columns"])
    if "lora_target_modules" in flags:
        flags["lora_target_modules"] = [m.strip() for m in flags["lora_target_modules"].split(",") if m.strip()]
    for key in ("output_dir", "log_dir"):
        if key in flags:
            flags[key] = str(flags[key])
    return build_run_config(flags, config_file=values.get("config"))


def with_train_options(body):
    """A command function with exactly `train`'s options, calling `body(values)` with them.

    `values` maps each option name to what was given (None when not given); turn it into a
    RunConfig with `run_config_from_flags(values)`."""
    def command(**values):
        return body(values)

    command.__signature__ = inspect.signature(train, eval_str=True)
    command.__annotations__ = dict(train.__annotations__)
    command.__doc__ = body.__doc__
    command.__name__ = body.__name__
    return command


def parse_columns(text: str) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"}."""
    from ftcli.errors import ConfigError

    mapping: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ConfigError(f"--columns: '{part}' is not FIELD=COLUMN",
                              hint="write e.g. --columns instruction=question,output=answer")
        mapping[field.strip()] = column.strip()
    return mapping


# The other commands live in their own modules; importing them registers them on `app`.
import ftcli.cli.prepare, ftcli.cli.export, ftcli.cli.warmup, ftcli.cli.inspect  # noqa: E402,F401


def entrypoint() -> None:
    app()
