"""Every command's `--help`, laid out to fit the terminal: no option name is ever cut.

    >>> from ftcli.cli.helpformat import print_command_help
    >>> print_command_help(command, ctx)      # what FtcliCommand.format_help does

Each panel (an option's `rich_help_panel`) is a two-column table: the names (every long and short
form, the negative form of a switch on its own line, then the value's placeholder) never wrap and
are as wide as the panel's longest; the description takes the rest and is wrapped by the terminal,
never by line breaks in the source. Where that leaves the description too little room, each option
is printed on its own line with its description indented below it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from rich.console import Console, Group
from rich.highlighter import RegexHighlighter
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

# Below this many columns for the descriptions, options are stacked (name line, description below).
MIN_DESCRIPTION_WIDTH = 28
OPTIONS_PANEL = "Options"
ARGUMENTS_PANEL = "Arguments"


class _FlagHighlighter(RegexHighlighter):
    """Option names in descriptions, and the `[default: ...]` notes."""

    base_style = "help."
    highlights = [r"(?P<option>(?<![\w-])--?[a-zA-Z][\w-]*)", r"(?P<default>\[(default|required|x[<>]=?)[^\]]*\])"]


def help_console() -> Console:
    """The console help is printed on: TERMINAL_WIDTH (else COLUMNS, else the terminal) columns wide."""
    from rich.theme import Theme

    width = os.environ.get("TERMINAL_WIDTH")
    return Console(width=int(width) if width and width.isdigit() else None, highlight=False,
                   theme=Theme({"help.option": "bold cyan", "help.default": "dim"}))


def paragraphs(text: str) -> str:
    """Source text -> paragraphs: single line breaks (from wrapped docstrings) become spaces."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text or "").split("\n\n") if p.strip())


def _type_text(param: Any, ctx: Any) -> str:
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.metavar:
        return param.metavar
    return (param.display_type(ctx) or "").replace(" range", "")  # the range is a note of its own


def _is_argument(param: Any) -> bool:
    return param.param_type_name == "argument"


def _argument_name(param: Any) -> str:
    return param.metavar or param.name.upper()


def _names(param: Any, ctx: Any) -> Text:
    """`--learning-rate, --lr <float>`; a switch's negative form on the next line."""
    if _is_argument(param):
        return Text(_argument_name(param), style="bold cyan")
    text = Text(", ".join(sorted(param.opts, key=lambda o: not o.startswith("--"))), style="bold cyan")
    kind = _type_text(param, ctx)
    if kind:
        text.append(f" {kind}", style="yellow")
    if param.secondary_opts:
        text.append("\n" + ", ".join(param.secondary_opts), style="bold magenta")
    return text


def _notes(param: Any, ctx: Any) -> list[str]:
    """The `[default: ...]`, `[required]` and range notes Click/Typer would add."""
    notes = []
    if param.required:
        notes.append("[required]")
    else:
        show = getattr(param, "show_default", None)
        if isinstance(show, str):
            notes.append(f"[default: {show}]")
        elif show is not False and (show or ctx.show_default):
            default = param.get_default(ctx, call=False)
            if getattr(param, "is_flag", False) and param.secondary_opts and isinstance(default, bool):
                notes.append(f"[default: {(param.opts if default else param.secondary_opts)[0]}]")
            elif default not in (None, False, (), []) and not callable(default) and not getattr(param, "is_flag", False):
                notes.append(f"[default: {default}]")
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None or high is not None:
        parts = ([f"x>={low}"] if low is not None else []) + ([f"x<={high}"] if high is not None else [])
        notes.append(f"[{' '.join(parts)}]")
    return notes


def _description(param: Any, ctx: Any) -> Text:
    text = Text.from_markup(paragraphs(getattr(param, "help", None) or ""))
    for note in _notes(param, ctx):
        text.append((" " if text.plain else "") + note)
    _FlagHighlighter().highlight(text)
    return text


def _panel(title: str, params: list[Any], ctx: Any, width: int) -> Panel:
    rows = [(_names(p, ctx), _description(p, ctx)) for p in params]
    names_width = max(cell.cell_len if "\n" not in cell.plain else max(map(len, cell.plain.split("\n")))
                      for cell, _ in rows)
    # Panel border and padding: 4 columns; the gap between names and description: 2.
    if width - 4 - names_width - 2 >= MIN_DESCRIPTION_WIDTH:
        table = Table.grid(padding=(0, 2), expand=True)
        table.add_column(no_wrap=True, min_width=names_width)
        table.add_column(ratio=1, overflow="fold")
        for names, description in rows:
            table.add_row(names, description)
        body: Any = table
    else:
        body = Group(*(Group(names, Padding(description, (0, 0, 0, 4))) for names, description in rows))
    return Panel(body, title=title, title_align="left", border_style="dim")


def print_command_help(command: Any, ctx: Any) -> None:
    """Usage, the command's help text, then one panel per help panel: arguments, named panels, plain options."""
    console = help_console()
    width = console.width
    arguments = [p for p in command.get_params(ctx) if _is_argument(p)]
    usage = " ".join([ctx.command_path, "[OPTIONS]", *(
        _argument_name(p) if p.required else f"[{_argument_name(p)}]" for p in arguments)])
    console.print(Padding(Text.assemble(("Usage: ", "yellow"), (usage, "bold")), (1, 1, 0, 1)))
    text = paragraphs(command.help or "")
    if text:
        first, _, rest = text.partition("\n\n")
        console.print(Padding(Text.from_markup(first), (1, 1, 0, 1)))
        if rest:
            console.print(Padding(Text.from_markup(rest, style="dim"), (1, 1, 0, 1)))
    console.print()
    panels: dict[str, list[Any]] = {}
    params, owners = objective_params(command.get_params(ctx), ctx)
    for param in params:
        if getattr(param, "hidden", False):
            continue
        default = ARGUMENTS_PANEL if param.param_type_name == "argument" else OPTIONS_PANEL
        panels.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(param)
    order = [ARGUMENTS_PANEL, *(p for p in panels if p not in (ARGUMENTS_PANEL, OPTIONS_PANEL)), OPTIONS_PANEL]
    named = [p for p in order[1:-1] if panels.get(p)]
    if named and [p.name for p in panels.get(OPTIONS_PANEL, [])] == ["help"]:
        panels[named[-1]] += panels.pop(OPTIONS_PANEL)  # `--help` alone needs no panel of its own
    for title in order:
        if panels.get(title):
            console.print(_panel(title, panels[title], ctx, width))
    if owners:
        console.print(_objectives_panel(owners, ctx))


def objective_params(params: list[Any], ctx: Any) -> tuple[list[Any], dict[str, list[str]]]:
    """The options an objective owns are described under `--objective NAME --help` only (each objective has a
    handful; all of them together would double train's help): (the parameters to describe, {objective: its
    flags} to list in one panel, empty when `--objective` was given before `--help`)."""
    from ftcli.objectives import OBJECTIVE_OPTIONS, OBJECTIVES

    if not any(p.name == "objective" for p in params):  # generate's --temperature is its own
        return params, {}
    chosen = (ctx.params or {}).get("objective")
    owned = {p.name: p for p in params if p.name in OBJECTIVE_OPTIONS}
    if chosen in OBJECTIVES:
        return [p for p in params if p.name not in owned or p.name in OBJECTIVES[chosen].options], {}
    owners = {name: [owned[o].opts[0] for o in objective.options if o in owned]
              for name, objective in OBJECTIVES.items()}
    return [p for p in params if p.name not in owned], {k: v for k, v in owners.items() if v}


def _objectives_panel(owners: dict[str, list[str]], ctx: Any) -> Panel:
    table = Table.grid(padding=(0, 2), expand=True)
    table.add_column(no_wrap=True)
    table.add_column(ratio=1)
    for name, flags in owners.items():
        table.add_row(Text(name, style="bold"), Text(" ".join(flags), style="help.option"))
    hint = Text(f"{ctx.command_path} --objective NAME --help describes them.", style="dim")
    return Panel(Group(table, hint), title="Options of each objective", title_align="left", border_style="dim")
