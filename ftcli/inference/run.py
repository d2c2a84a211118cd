"""`ftcli generate`: completions for one or more prompts, rendered as the target's training rendered them.

    $ ftcli generate runs/lora-1 --prompt "Add 2 and 3." --compare-base
    $ ftcli generate runs/chat-1 --prompts-file questions.jsonl --output answers.jsonl

    >>> from ftcli.inference.run import GenerateOptions, run_generate
    >>> rows = run_generate(GenerateOptions(target="runs/lora-1", prompts=["Add 2 and 3."]))

The completions go to stdout (one after another, a blank line between them); what was loaded,
the rendered prompt (`--show-prompt`) and the token counts and speed go to stderr, so
`ftcli generate ... > answers.txt` keeps the answers alone. `--output FILE.jsonl` writes one row
per prompt: prompt, rendered prompt, completion, token counts, stop reason, tokens/s (and the
base's completion with `--compare-base`) as each prompt is done: the rows go to a hidden temporary
file beside it (`.NAME.*.partial`), renamed to FILE when every prompt is done, or, on Ctrl-C,
SIGTERM, a full disk or an error, with the rows finished so far (each row whole; the last line
says how many of how many). A name that appears is never a half-written row.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcli.console import console, err_console
from ftcli.errors import ConfigError
from ftcli.inference.generate import (AnswerInterrupted, Completion, Decoding, check_output_file, complete,
                                     output_lock, print_piece)
from ftcli.inference.prompts import Prompt, prompt_example, read_prompts_file, render
from ftcli.inference.target import TargetOptions, load_target


@dataclass
class GenerateOptions:
    target: str
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    extra_input: str = ""
    system: str | None = None
    output: str | None = None
    overwrite: bool = False
    compare_base: bool = False
    show_prompt: bool = False
    decoding: Decoding = field(default_factory=Decoding)
    load: TargetOptions = field(default_factory=TargetOptions)


def run_generate(opts: GenerateOptions) -> list[dict[str, Any]]:
    _check(opts)
    with output_lock(opts.output, opts.overwrite):
        return _generate(opts)


def _generate(opts: GenerateOptions) -> list[dict[str, Any]]:
    from ftcli.training.setup import quiet_libraries

    quiet_libraries()
    target = load_target(opts.target, opts.load)
    prompts = read_prompts_file(Path(opts.prompts_file), target) if opts.prompts_file else \
        [Prompt(text, prompt_example(target, text, opts.extra_input)) for text in opts.prompts]
    rendered = [render(target, p.example, opts.system) for p in prompts]  # every prompt checked before any runs
    err_console.print(f"[bold]ftcli generate[/] {target.label} on {target.device}", soft_wrap=True)
    rows: list[dict[str, Any]] = []
    stream = console.is_terminal and not opts.compare_base
    with rows_file(Path(opts.output).expanduser() if opts.output is not None else None, len(prompts)) as add:
        _generate_all(opts, target, prompts, rendered, stream, rows, add)
    return rows


def _generate_all(opts: GenerateOptions, target: Any, prompts: list[Prompt], rendered: list[list[int]], stream: bool,
                  rows: list[dict[str, Any]], add: Any) -> None:
    for number, (prompt, ids) in enumerate(zip(prompts, rendered), 1):
        if opts.show_prompt:
            err_console.print(f"[dim]prompt {number}, as rendered:[/]")
            err_console.print(target.tokenizer.decode(ids, skip_special_tokens=False), markup=False, highlight=False)
        if number > 1:
            console.print()
        try:
            tuned = complete(target, ids, opts.decoding, on_text=print_piece if stream else None)
        except AnswerInterrupted:
            console.print()  # the streamed answer stopped mid-line
            raise
        base = complete(target, ids, opts.decoding, base=True) if opts.compare_base else None
        _show(tuned, base, streamed=stream, title=f"prompt {number}: {_short(prompt.source)}")
        rows.append(_row(prompt, target, ids, tuned, base))
        add(rows[-1])


@contextmanager
def rows_file(path: Path | None, total: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """`add(row)` writes a row through at once to a temporary file beside `path`; the file becomes `path` when the
    block ends, however it ends, if it holds a row (a write the disk refused is cut back to the last whole row)."""
    if path is None:
        yield lambda row: None
        return
    import os
    import tempfile

    from ftcli.files import file_mode

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    written = {"rows": 0, "bytes": 0}

    def add(row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, written["bytes"])
            raise
        written["rows"] += 1
        written["bytes"] += len(data)

    done = False
    try:
        os.fchmod(fd, file_mode())
        yield add
        done = True
    finally:
        os.close(fd)
        if written["rows"]:
            os.replace(tmp, path)
            how = f"wrote {written['rows']} row(s)" if done else \
                f"kept the {written['rows']} finished row(s) of {total}"
            err_console.print(f"{how} to {path}", soft_wrap=True)
        else:
            Path(tmp).unlink(missing_ok=True)


def _check(opts: GenerateOptions) -> None:
    if not opts.prompts and not opts.prompts_file:
        raise ConfigError("nothing to generate for", hint="pass --prompt TEXT (once or more) or --prompts-file FILE")
    if any(not text.strip() for text in opts.prompts):
        raise ConfigError("--prompt is empty", hint="give the text the model should answer")
    if opts.prompts and opts.prompts_file:
        raise ConfigError("--prompt and --prompts-file are two ways to give the prompts", hint="pass one")
    opts.decoding.check()
    if opts.output is not None:
        check_output_file(opts.output, opts.overwrite)
    if opts.compare_base:  # before loading anything: a model of its own has no base to compare with
        from ftcli.targets import find_target

        info = find_target(opts.target, base=opts.load.base)
        if info.adapter is None and not info.base:
            raise ConfigError(f"--compare-base: {opts.target} is a model of its own, with no base recorded",
                              hint="compare a run, an adapter or an export, or pass --base")


def _short(source: Any, width: int = 60) -> str:
    from rich.markup import escape

    text = " ".join((source if isinstance(source, str) else json.dumps(source, ensure_ascii=False)).split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def _show(tuned: Completion, base: Completion | None, streamed: bool, title: str) -> None:
    if base is None:
        if streamed:
            console.print()
        else:
            console.print(tuned.text, markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"[dim]\\[{tuned.summary()}][/]")
        return
    if console.is_terminal:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, title_justify="left", show_lines=True, expand=True)
        table.add_column("tuned")
        table.add_column("base")
        table.add_row(Text(tuned.text), Text(base.text))  # model output is text, never Rich markup
        console.print(table)
    else:
        console.print("tuned:", markup=False)
        console.print(tuned.text, markup=False, highlight=False, soft_wrap=True)
        console.print("base:", markup=False)
        console.print(base.text, markup=False, highlight=False, soft_wrap=True)
    err_console.print(f"[dim]\\[tuned: {tuned.summary()}][/]")
    err_console.print(f"[dim]\\[base: {base.summary()}][/]")


def _row(prompt: Prompt, target: Any, ids: list[int], tuned: Completion, base: Completion | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "prompt": prompt.source,
        "rendered_prompt": target.tokenizer.decode(ids, skip_special_tokens=False),
        "completion": tuned.text,
        "prompt_tokens": len(ids),
        "new_tokens": tuned.new_tokens,
        "completion_ids": tuned.ids,
        "stop_reason": tuned.stop_reason,
        "tokens_per_second": round(tuned.tokens_per_second, 2),
    }
    if base is not None:
        row.update(base_completion=base.text, base_new_tokens=base.new_tokens, base_completion_ids=base.ids,
                   base_stop_reason=base.stop_reason)
    return row
