"""`ftcli generate`: completions for one or more prompts, rendered as the target's training rendered them.

    $ ftcli generate runs/lora-1 --prompt "Add 2 and 3." --compare-base
    $ ftcli generate runs/chat-1 --prompts-file questions.jsonl --output answers.jsonl

    >>> from ftcli.inference.run import GenerateOptions, run_generate
    >>> rows = run_generate(GenerateOptions(target="runs/lora-1", prompts=["Add 2 and 3."]))

The completions go to stdout (one after another, a blank line between them); what was loaded,
the rendered prompt (`--show-prompt`) and the token counts and speed go to stderr, so
`ftcli generate ... > answers.txt` keeps the answers alone. `--output FILE.jsonl` writes one row
per prompt: prompt, rendered prompt, completion, token counts, stop reason, tokens/s (and the
base's completion with `--compare-base`), atomically, once every prompt is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcli.console import console, err_console
from ftcli.errors import ConfigError
from ftcli.inference.generate import (
    Completion, Decoding, check_output_file, complete, output_lock, print_piece,
)
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
    rows = []
    stream = console.is_terminal and not opts.compare_base
    for number, (prompt, ids) in enumerate(zip(prompts, rendered), 1):
        if opts.show_prompt:
            err_console.print(f"[dim]prompt {number}, as rendered:[/]")
            err_console.print(target.tokenizer.decode(ids, skip_special_tokens=False), markup=False, highlight=False)
        if number > 1:
            console.print()
        tuned = complete(target, ids, opts.decoding, on_text=print_piece if stream else None)
        base = complete(target, ids, opts.decoding, base=True) if opts.compare_base else None
        _show(tuned, base, streamed=stream, title=f"prompt {number}: {_short(prompt.source)}")
        rows.append(_row(prompt, target, ids, tuned, base))
    if opts.output is not None:
        from ftcli.files import write_atomic

        write_atomic(Path(opts.output).expanduser(), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        err_console.print(f"wrote {len(rows)} row(s) to {opts.output}", soft_wrap=True)
    return rows


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
