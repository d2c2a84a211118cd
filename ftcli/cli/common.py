"""What every command shares: the error wrapper, the help panels and `train`'s option set (defined in options.py).

    >>> from ftcli.cli.common import run_guarded, with_train_options, run_config_from_flags
    >>> def warmup(values: dict) -> None:
    ...     "Compile ahead of the run."
    ...     run_guarded(lambda: run_warmup(run_config_from_flags(values)))
    >>> command = with_train_options(warmup)   # a Typer command with exactly `train`'s flags

Command modules import from here and never from each other. Heavy libraries are imported only
inside command bodies, so `ftcli --help` stays fast and free of torch. `train`'s options and the
help texts' defaults are defined in ftcli/cli/options.py and re-exported here.
"""

import errno
import importlib
import inspect
import os
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.markup import escape


# train's options and the help texts' defaults live in ftcli.cli.options; command modules take them from here.
from ftcli.cli.options import (DATA, DIST, EVAL, LORA, MODEL, OUTPUT, TRAIN, TRAIN_SIGNATURE,  # noqa: F401
                               default_text, format_default, method_help, parse_columns, restyled, run_config_from_flags,
                               with_default, with_options, with_train_options)

state = {"debug": False}


def _hide_switch_types(command: Any, ctx: Any) -> None:
    """A switch (`--overwrite`, `--help`) takes no value: show no `<bool>` type placeholder next to it."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class FtcliCommand(typer.core.TyperCommand):
    """Every ftcli command: its help laid out to fit the terminal (ftcli/cli/helpformat.py), its text
    wrapped by the terminal (the docstring's own line breaks joined), in `ftcli --help`'s list too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ftcli.cli.helpformat import paragraphs

        super().__init__(*args, **kwargs)
        self.help = paragraphs(self.help) if self.help else self.help

    def format_help(self, ctx, formatter) -> None:
        from ftcli.cli.helpformat import print_command_help

        print_command_help(self, ctx)


class FtcliGroup(typer.core.TyperGroup):
    """The command group, letting `--resume` stand alone: a bare `--resume` (last, or followed by another
    option) means `--resume latest`. Click options take a value or none, never an optional one."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_resume_to_latest(args))

    def make_context(self, info_name, args, parent=None, **extra):
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)

    def format_help(self, ctx, formatter) -> None:
        _hide_switch_types(self, ctx)
        super().format_help(ctx, formatter)


def _click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, all click errors): Typer's own copy of click (newer Typer vendors it) and click's."""
    usage, every = [], []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(module.UsageError)
        every.append(module.ClickException)
    return tuple(usage), tuple(every)


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A usage error (unknown option, bad value, missing argument) as the one line every ftcli error is:
    `error: <what>; see '<command> --help'`, exit 2, instead of click's boxed multi-line report."""
    from ftcli.console import err_console

    usage, every = _click_errors()
    try:
        yield
    except every as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise typer.Exit(exc.exit_code) from None  # bare `ftcli`: the help is printed, no error line below it
        text = escape(" ".join(exc.format_message().split()))
        if isinstance(exc, usage):
            text = text.rstrip(".")
            where = exc.ctx.command_path if exc.ctx is not None else "ftcli"
            text += f"; see '{escape(where)} --help'"
        err_console.print(f"[bold red]error:[/] {text}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def bare_resume_to_latest(args: list[str]) -> list[str]:
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("latest")
    return out


def run_guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a command body; a user-caused `FtcliError` becomes one line on stderr and its exit code."""
    from ftcli.console import err_console
    from ftcli.errors import EXIT_INTERRUPTED, FtcliError

    try:
        return fn(*args, **kwargs)
    except FtcliError as exc:
        if state["debug"]:
            raise
        # Messages quote paths, library errors and code: `[...]` in them is text, not Rich markup.
        err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", soft_wrap=True)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            from ftcli.training.launch import record_rank_error

            record_rank_error(exc.one_line())
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        problem = out_of_room(exc)
        if problem is None or state["debug"]:
            raise
        from ftcli.errors import EXIT_OUTPUT

        err_console.print(f"[bold red]error:[/] {escape(problem)}; free some space (or write to another disk) and "
                          "run the command again", soft_wrap=True)
        raise typer.Exit(EXIT_OUTPUT) from None


# The disk cannot take what a command writes: one line, not a traceback. Libraries that write files
# (safetensors, torch.save) wrap the OS error in their own, with the OS text in the message.
OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def out_of_room(exc: BaseException) -> str | None:
    """`no space left on device writing FILE` when `exc` (or what caused it) is the disk being full."""
    texts = {os.strerror(code): code for code in OUT_OF_ROOM}
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in OUT_OF_ROOM:
            where = f" writing {seen.filename}" if seen.filename else ""
            return os.strerror(seen.errno).lower() + where
        for text in texts:
            if text in str(seen):
                return text.lower()
        seen = seen.__cause__ or seen.__context__
    return None


# ---- generate's and chat's options ------------------------------------------------------------------

GENERATION = "Generation"


def generation_options(
    template: Annotated[Optional[str], typer.Option(
        help=with_default("auto | alpaca | model (the model's chat template) | path to a Jinja file.",
                          default="auto: as the run's training rendered its data; a bare model: its chat template "
                                  "if it has one, else the prompt as is"), rich_help_panel=GENERATION)] = None,
    system: Annotated[Optional[str], typer.Option(
        help="System prompt, first in the conversation (chat templates only).", rich_help_panel=GENERATION)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=with_default("Most tokens to generate per answer.", default="256"), rich_help_panel=GENERATION)] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=with_default("Sampling temperature; 0 is greedy.", default="0 for generate, 0.7 for chat"),
        rich_help_panel=GENERATION)] = None,
    top_p: Annotated[Optional[float], typer.Option(
        help=with_default("Nucleus sampling: keep the smallest set of tokens with this much probability.",
                          default="1 for generate, 0.9 for chat"), rich_help_panel=GENERATION)] = None,
    top_k: Annotated[Optional[int], typer.Option(
        help=with_default("Sample among the K most likely tokens; 0 is off.", default="0"),
        rich_help_panel=GENERATION)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(
        help=with_default("Penalty on tokens already generated (1 is none).", default="1"),
        rich_help_panel=GENERATION)] = None,
    seed: Annotated[Optional[int], typer.Option(
        help=with_default("Seed of the sampling (set before each answer).", default="42"),
        rich_help_panel=GENERATION)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help=with_default("auto | float32 | float16 | bfloat16.", default="auto: the dtype the run trained in; a "
                          "bare model: bfloat16 on CUDA, float32 on CPU"), rich_help_panel=MODEL)] = None,
    device: Annotated[Optional[str], typer.Option(help=with_default("auto | cpu | cuda | cuda:N.", "device"),
                                                  rich_help_panel=MODEL)] = None,
    base: Annotated[Optional[str], typer.Option(
        help=with_default("Base model (hub id, folder, builtin:...) for an adapter or --compare-base.",
                          default="the one the run, adapter or export records"), rich_help_panel=MODEL)] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of a hub-id TARGET (or of --base).",
                                                    rich_help_panel=MODEL)] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option(
        "--trust-remote-code", help=with_default("Run code shipped with the model.", default="off, unless the "
                                                 "run used it"), rich_help_panel=MODEL)] = None,
) -> None:
    """The options `generate` and `chat` share; never run itself."""


GENERATION_PARAMETERS = list(inspect.signature(generation_options).parameters.values())


def target_argument(help_text: str) -> inspect.Parameter:
    return inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        str, typer.Argument(help=help_text, show_default=False)])


def generation_settings(values: dict, temperature: float, top_p: float) -> tuple[Any, Any]:
    """(Decoding, TargetOptions) from the shared options, with the command's own sampling defaults."""
    from ftcli.inference.generate import Decoding
    from ftcli.inference.target import TargetOptions

    def given(key: str, default: Any) -> Any:
        return default if values.get(key) is None else values[key]

    decoding = Decoding(max_new_tokens=given("max_new_tokens", 256), temperature=given("temperature", temperature),
                        top_p=given("top_p", top_p), top_k=given("top_k", 0),
                        repetition_penalty=given("repetition_penalty", 1.0), seed=given("seed", 42))
    load = TargetOptions(template=given("template", "auto"), dtype=given("dtype", "auto"),
                         device=given("device", "auto"), revision=values.get("revision"),
                         trust_remote_code=bool(values.get("trust_remote_code")), base=values.get("base"))
    return decoding, load

