"""The ftcli command line: the app, and ONE explicit list of its commands (the order `--help` shows).

    $ ftcli train --method lora --model builtin:tiny-llama --dataset builtin:alpaca-sample --max-steps 20

Each command is a thin module in this package (ftcli/cli/<name>.py, exposing `command`) that
imports shared pieces from `ftcli.cli.common` and never another command. Heavy libraries (torch,
transformers, trl, peft, datasets) are imported inside command bodies only, so `ftcli --help`
stays fast.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ftcli import __version__
from ftcli.cli import chat, export, generate, inspect, prepare, train, warmup
from ftcli.cli import eval as eval_cmd
from ftcli.cli.common import FtcliCommand, FtcliGroup, state
from ftcli.methods import METHODS
from ftcli.rewards import MODEL_KIND, register_kind
from ftcli.rewards.model import load as load_reward_model

# --reward-model RUN (and --reward model:RUN): a reward model ftcli trained, as a reward of GRPO or `eval --reward`.
register_kind(MODEL_KIND, load_reward_model)

# (name, command function): registered in this order, which is the order `ftcli --help` lists them.
COMMANDS = [
    ("train", train.command),
    ("prepare", prepare.command),
    ("warmup", warmup.command),
    ("export", export.command),
    ("generate", generate.command),
    ("chat", chat.command),
    ("inspect", inspect.command),
    ("eval", eval_cmd.command),
]

app = typer.Typer(
    cls=FtcliGroup,
    name="ftcli",
    help=f"Fine-tune causal language models ({', '.join(METHODS)}) from one command line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


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
    state["debug"] = debug


for _name, _command in COMMANDS:
    app.command(_name, cls=FtcliCommand)(_command)


def entrypoint() -> None:
    app()
