"""`ftcli prepare`: format, tokenize and cache a dataset, with `train`'s own flags.

    $ ftcli prepare --model builtin:tiny-llama --dataset data.jsonl --seq-length 512
    $ ftcli train --method lora --model builtin:tiny-llama --dataset data.jsonl --seq-length 512   # reuses it

Registered in ftcli/cli/__init__.py. Heavy imports stay inside the command body so `ftcli --help`
stays fast.
"""

from __future__ import annotations

import copy
import inspect
from typing import Annotated, Any, Optional

import typer

from ftcli.cli.common import DATA, restyled, run_config_from_flags, run_guarded, with_default, with_train_options


def prepare(values: dict) -> None:
    """Format, tokenize and cache a dataset; `ftcli train` with the same flags reuses it.

    Without --output-dir the prepared data goes to the cache (<FTCLI_HOME>/datasets); with it, to that
    folder, which `ftcli train --dataset FOLDER` then uses. --overwrite rebuilds. A whole `train`
    command line is accepted too: train's other options (not listed here) change nothing in the data."""
    num_proc = values.pop("num_proc", None)

    def go() -> None:
        from ftcli.errors import ConfigError
        from ftcli.preflight import check_run

        if num_proc is not None and num_proc < 1:
            raise ConfigError(f"--num-proc must be >= 1 (got {num_proc})", hint="pass 1 or more processes")
        config = run_config_from_flags(values)
        check_run(config, "prepare")  # before the imports: a typo or a missing file is one line at once
        from ftcli.data.mixture import prepare_data
        from ftcli.data.prepare import check_output_dir
        from ftcli.files import output_path
        from ftcli.models import load_tokenizer

        out = output_path(config.output_dir, "--output-dir")
        if out is not None:  # before the tokenizer loads: a refused folder costs nothing and gets nothing written
            check_output_dir(out, config.overwrite)
        tokenizer = load_tokenizer(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
        prepared = prepare_data(config, tokenizer, output=config.output_dir, overwrite=config.overwrite,
                                   num_proc=num_proc, use_cache=not config.overwrite)
        print_prepared(prepared, config)
        if config.eval_dataset is not None:
            from ftcli.console import console
            from ftcli.data import prepare_eval_set

            # Into the cache, where `train --eval-dataset` with the same flags finds it.
            held = prepare_eval_set(config, tokenizer)
            console.print(f"eval: {held.examples:,} examples, {held.loss_tokens:,} loss tokens ({held.source}), "
                          f"cached in {held.report.prepared}", soft_wrap=True)

    def guarded() -> None:
        from ftcli.system import sigterm_as_interrupt

        with sigterm_as_interrupt():
            go()

    run_guarded(guarded)


def print_prepared(prepared: Any, config: Any) -> None:
    """What `prepare` tells the user: rows, drops and why, lengths, truncation, loss share, padding."""
    from rich.table import Table

    from ftcli.console import console

    m = prepared.manifest
    if m.get("kind") in ("preference", "labeled"):  # DPO's pairs, KTO's labeled rows: their own tables
        _print_pairs(prepared)
        return
    if m.get("kind") == "prompts":
        _print_prompts(prepared)
        return
    s = m["stats"]
    d = s["dropped"]
    length = s["length"]
    pad = _padding_at(prepared, s["padding"], config.batch_size or 1)
    if prepared.reused:
        console.print(f"[bold]already prepared[/] (cache hit): {prepared.folder}")
    else:
        b = m["build"]
        console.print(f"[bold]prepared[/] {prepared.folder} in {b['seconds']:.1f} s "
                      f"({b['tokens_per_second']:,.0f} tokens/s, {b['num_proc']} process"
                      f"{'es' if b['num_proc'] > 1 else ''})")
    table = Table(show_header=False, title="prepared data")
    table.add_row("format / template", f"{m['format']} / {m['template']}")
    from ftcli.data.stats import rendering_note

    table.add_row("loss", "whole text" if m["options"]["train_on_inputs"] else "responses + EOS (prompts masked)")
    if rendering_note(s, m["format"]):
        table.add_row("conversations", rendering_note(s, m["format"]))
    table.add_row("rows", f"{s['rows_read']:,} read, {s['rows_selected']:,} selected, {s['rows_kept']:,} kept")
    table.add_row("dropped", f"{d['empty']:,} empty, {d['too_long']:,} too long (prompt > --seq-length), "
                             f"{d['no_response']:,} no response left after truncation")
    table.add_row("tokens", f"{s['tokens']:,} ({s['loss_tokens']:,} in the loss: {s['loss_token_share']:.1%})")
    table.add_row("length (tokens)", f"min {length['min']}  p50 {length['p50']}  p90 {length['p90']}  "
                                     f"p95 {length['p95']}  p99 {length['p99']}  max {length['max']}")
    table.add_row("truncated", f"{s['truncated']:,} rows ({s['truncated_share']:.1%}) at --seq-length "
                               f"{m['options']['seq_length']}")
    table.add_row(f"padding at batch size {pad['batch_size']}",
                  f"{pad['in_order']:.1%} in data order, {pad['length_grouped']:.1%} grouped by length")
    console.print(table)
    if prepared.report.sources:
        console.print(source_table(prepared.report.sources))
    for note in prepared.report.notes:
        console.print(f"[yellow]note:[/] {note}")


def _padding_at(prepared: Any, recorded: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The padding shares at the batch size asked: a cache hit's manifest has them at its build's batch size."""
    if recorded.get("batch_size") == batch_size or "length" not in prepared.dataset.column_names:
        return recorded
    import numpy as np

    from ftcli.data.stats import padding_waste

    lengths = np.asarray(prepared.dataset["length"], dtype=np.int64)
    return {"batch_size": batch_size, "in_order": padding_waste(lengths, batch_size),
            "length_grouped": padding_waste(np.sort(lengths)[::-1], batch_size)}


def _print_prompts(prepared: Any) -> None:
    from ftcli.console import console
    from ftcli.data.prompts import prompts_table

    where = "already prepared[/] (cache hit):" if prepared.reused else "prepared[/]"
    console.print(f"[bold]{where} {prepared.folder}")
    console.print(prompts_table(prepared.manifest))
    for note in prepared.report.notes:
        console.print(f"[yellow]note:[/] {note}")


def _print_pairs(prepared: Any) -> None:
    from ftcli.console import console
    from ftcli.data.labeled import labeled_table
    from ftcli.data.preference_prepare import pairs_table

    where = "already prepared[/] (cache hit):" if prepared.reused else "prepared[/]"
    console.print(f"[bold]{where} {prepared.folder}")
    table = labeled_table if prepared.manifest.get("kind") == "labeled" else pairs_table
    console.print(table(prepared.manifest))
    for note in prepared.report.notes:
        console.print(f"[yellow]note:[/] {note}")


def source_table(sources: list[dict[str, Any]]) -> Any:
    """A mixture's sources: weight and share, format / template, rows read / prepared / used, tokens."""
    from rich.table import Table

    table = Table(title="mixture")
    for name in ("source", "weight (share)", "format / template", "rows read / prepared / used", "tokens (loss)"):
        table.add_column(name, justify="left" if name in ("source", "format / template") else "right")
    for s in sources:
        table.add_row(s["ref"], f"{s['weight']:g} ({s['share']:.1%})", f"{s['format']} / {s['template']}",
                      f"{s['rows_read']:,} / {s['rows_available']:,} / {s['rows_used']:,}",
                      f"{s['tokens']:,} ({s['loss_tokens']:,})")
    return table


NUM_PROC = inspect.Parameter(
    "num_proc", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[int], typer.Option(
        help=with_default("Tokenizer processes.", default="1 below 20,000 rows, else one per core (at most 8); "
                          "env FTCLI_NUM_PROC"), rich_help_panel=DATA)])


def _output_dir_as_text(param: inspect.Parameter) -> inspect.Parameter:
    """`--output-dir` as the text given: typed `Path`, Click turns "" into "." (the current folder)."""
    option = copy.copy(param.annotation.__metadata__[0])  # train's own option stays as it is
    option.metavar = option.metavar or "<path>"
    option.help = with_default("Prepared-data folder, for `ftcli train --dataset FOLDER`.",
                               default="the cache, <FTCLI_HOME>/datasets/<key>")
    return param.replace(annotation=Annotated[Optional[str], option])


# The train options prepare reads: what the data, its tokenizer, its shape and its cache key depend on.
SHOWN = frozenset({"model", "revision", "trust_remote_code", "dataset", "dataset_split", "dataset_size",
                   "dataset_revision", "format", "columns", "template", "template_kwargs", "tools", "train_reasoning",
                   "train_on_inputs", "seq_length", "seed", "batch_size", "objective", "max_prompt_length", "eval_dataset", "eval_split", "output_dir",
                   "overwrite", "config",
                   "max_completion_length"})  # GRPO: the prompts kept leave it room within --seq-length
# In prepare's help, the options that shape the data sit with the data.
IN_DATA = {"objective": None, "seq_length": None, "seed": None,
           "batch_size": with_default("The batch size the padding figures are for (train's, for --method).",
                                      "batch_size")}


def _for_prepare(param: inspect.Parameter) -> inspect.Parameter:
    if param.name == "output_dir":
        return _output_dir_as_text(param)
    if param.name in IN_DATA:
        help_text = IN_DATA[param.name] or param.annotation.__metadata__[0].help
        return restyled(param, rich_help_panel=DATA, help=help_text)
    return param


command = with_train_options(prepare, NUM_PROC, shown=SHOWN)
command.__signature__ = command.__signature__.replace(parameters=[  # type: ignore[attr-defined]
    _for_prepare(p) for p in command.__signature__.parameters.values()])
command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
