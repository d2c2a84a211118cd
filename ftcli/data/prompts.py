"""Prompts (`--objective grpo`): a prompt column, rendered as `ftcli generate` renders a prompt, plus any other
columns, which the reward functions receive as keyword lists.

    >>> from ftcli.data.prompts import prepare_prompts
    >>> prepared = prepare_prompts(config, tokenizer)   # cached under <ftcli_home>/datasets/<key>, like SFT data
    >>> prepared.dataset.column_names
    ['prompt', 'prompt_ids', 'answer']

A row's `prompt` (after `--columns`, e.g. `--columns prompt=question,answer=solution`) is a string (rendered with
SFT's prompt/completion rules: as is with `--template auto`, Alpaca, or a chat template as a user turn) or a message
list ending with a user turn (the chat template, with the generation prompt). The tokens are those of
`ftcli.data.pipeline.encode_prompt`, the one renderer of `ftcli generate`; the prepared `prompt` column holds them
decoded (the text the model continues, handed to the rewards as `prompts`). A prompt that leaves less than
`--max-completion-length` tokens of `--seq-length` is dropped and counted (a cut prompt is another question); an
empty one too. The rows are shuffled with `--seed`.

The manifest has `kind: prompts` and `stats`: rows_read, rows_selected, rows_kept, dropped {empty, too_long},
tokens (the prompts'), columns (the others), length {min, p50, max} of the prompts.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.data import cache
from ftcli.data.formats import Example, RowError, _messages
from ftcli.data.prompt_rows import prompt_renames
from ftcli.data.pipeline import DataReport
from ftcli.errors import DataError

PROMPT_RULES = 1  # bumped when what is kept or how it is rendered changes


def prompt_room(config: Any) -> int:
    """The longest prompt a completion of --max-completion-length still fits after, within --seq-length."""
    return config.seq_length - config.max_completion_length


def prepare_prompts(config: Any, tokenizer: Any, *, output: str | Path | None = None, overwrite: bool = False,
                    num_proc: int | None = None, use_cache: bool = True) -> Any:
    """The prepared prompts for `config`: reused from the content-keyed cache, or built (under the entry's lock)."""
    from ftcli.data.prepare import _quiet_datasets
    from ftcli.data.preference_prepare import prepare_keyed

    _quiet_datasets()
    if not isinstance(config.dataset, str):
        raise DataError("--objective grpo trains on one prompts dataset, not a mixture",
                        hint="pass one --dataset (merge the files into one, or a folder of them)")
    if cache.is_prepared_folder(config.dataset):
        return _use_prepared(config)
    extra = {"prompts": True, "prompt_room": prompt_room(config), "prompt_rules": PROMPT_RULES}
    return prepare_keyed(config, tokenizer, extra, _load, _build, output=output, overwrite=overwrite,
                         use_cache=use_cache)


def _load(folder: Path, manifest: dict[str, Any], reused: bool) -> Any:
    from datasets import load_from_disk

    from ftcli.data.prepare import Prepared

    return Prepared(load_from_disk(str(folder)), prompts_report(manifest, folder, reused), manifest, folder, reused)


def _use_prepared(config: Any) -> Any:
    folder = Path(config.dataset).expanduser()
    manifest = cache.read_prepared_manifest(folder)
    if manifest is None or manifest.get("kind") != "prompts":
        raise DataError(f"{folder} is not a prepared prompts dataset (--objective grpo)",
                        hint="prepare it with `ftcli prepare --objective grpo ...`, or pass the data file")
    expected = {"seq_length": config.seq_length, "prompt_room": prompt_room(config)}
    manifest = cache.check_prepared(folder, manifest, expected)
    problem = cache.untrusted(manifest) or cache.damaged(folder, manifest)
    if problem:
        raise DataError(f"prepared dataset {folder} is damaged: {problem}",
                        hint="prepare it again (`ftcli prepare ... --output-dir FOLDER --overwrite`)")
    return _load(folder, manifest, reused=True)


def row_example(prompt: Any, keys: dict[str, str], index: int) -> Example:
    """A row's prompt as an example of its shape: a string as a prompt, a message list as a chat."""
    if isinstance(prompt, str):
        return Example("pair", prompt=prompt)
    if isinstance(prompt, list):
        try:
            return Example("chat", messages=_messages(prompt, keys.get("role", "role"), keys.get("content", "content"),
                                                      None))
        except RowError as exc:
            raise DataError(f"row {index}: the prompt's messages cannot be read: {exc}", hint="fix that row") from None
    raise DataError(f"row {index}: the prompt is a {type(prompt).__name__}, not a string or a message list",
                    hint="write each prompt as text, or as [{\"role\": \"user\", \"content\": ...}]")


def _build(config: Any, tokenizer: Any, loaded: Any, fields: dict[str, Any], key: str, final: Path,
           template_text: str | None, inherited: Any) -> Any:
    from datasets import Dataset

    from ftcli.data.prepare import template_identity
    from ftcli.data.templates import resolve_template

    started = time.perf_counter()
    ds = loaded.dataset
    if len(ds) == 0:
        raise DataError(f"dataset {config.dataset} is empty (0 rows)", hint="check the file(s)")
    renames = prompt_renames(config.columns, ds.column_names, config.dataset)
    ds = ds.rename_columns(renames) if renames else ds
    if "prompt" not in ds.column_names:
        raise DataError(f"{config.dataset} has no 'prompt' column (columns found: {', '.join(ds.column_names)})",
                        hint="name the prompt column with --columns prompt=YOURS")
    rows = ds.to_list()
    size = len(rows) if config.dataset_size is None else min(config.dataset_size, len(rows))
    keys = {k: v for k, v in (config.columns or {}).items() if k in ("role", "content")}
    fmt = "chat" if isinstance(rows[0]["prompt"], list) else "prompt-completion"
    template = resolve_template(config.template, fmt, tokenizer, model=config.model or "the model", text=template_text,
                                inherited=inherited, kwargs=config.template_kwargs)
    kept, dropped, lengths = encode_rows(rows[:size], keys, template, tokenizer, prompt_room(config))
    if not kept:
        raise DataError(f"every row of {config.dataset} was dropped ({dropped['empty']} empty, {dropped['too_long']} "
                        f"longer than {prompt_room(config)} tokens)",
                        hint="give a larger --seq-length or a smaller --max-completion-length")
    dataset = Dataset.from_list(kept).shuffle(seed=config.seed).flatten_indices()
    others = [c for c in dataset.column_names if c not in ("prompt", "prompt_ids")]
    lengths.sort()
    stats = {"rows_read": len(rows), "rows_selected": size, "rows_kept": len(kept), "dropped": dropped,
             "tokens": sum(lengths), "columns": others,
             "length": {"min": lengths[0], "p50": lengths[len(lengths) // 2], "max": lengths[-1]}}
    build = cache.new_build_dir(final)
    try:
        dataset.save_to_disk(str(build / "data"))
        manifest = {
            "layout": cache.LAYOUT_VERSION, "complete": True, "ftcli_version": __version__,
            "created_at": _now(), "key": key, "key_fields": fields, "kind": "prompts",
            "options": {"tokenizer": fields["tokenizer"], "seq_length": config.seq_length,
                        "prompt_room": prompt_room(config), "format": fmt, "template": template_identity(template),
                        "columns": dict(sorted((config.columns or {}).items())) or None,
                        "dataset_size": config.dataset_size, "seed": config.seed, "train_on_inputs": False},
            "source": {"ref": config.dataset, "kind": loaded.source_kind, "fingerprint": loaded.fingerprint,
                       "files": loaded.files, "split": config.dataset_split, "revision": config.dataset_revision},
            "format": fmt, "template": template_identity(template), "template_digest": template.digest,
            "stats": stats, "columns": dataset.column_names,
            "build": {"num_proc": 1, "seconds": round(time.perf_counter() - started, 3)},
        }
        manifest["data_files"] = cache.data_files(build / "data")
        cache.write_manifest(build / "data", manifest)
        cache.publish(build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _load(final, manifest, reused=False)


def encode_rows(rows: list[dict[str, Any]], keys: dict[str, str], template: Any, tokenizer: Any,
                room: int) -> tuple[list[dict[str, Any]], dict[str, int], list[int]]:
    """(kept rows with `prompt` as rendered text and `prompt_ids`, drop counts, the kept prompts' lengths)."""
    from ftcli.data.pipeline import encode_prompt

    kept, lengths = [], []
    dropped = {"empty": 0, "too_long": 0}
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
            dropped["empty"] += 1
            continue
        example = row_example(prompt, keys, i)
        try:
            ids = encode_prompt(example, template, tokenizer)
        except RowError as exc:
            raise DataError(f"row {i}: cannot render the prompt: {exc}", hint="fix that row") from None
        if len(ids) > room:
            dropped["too_long"] += 1
            continue
        kept.append({**row, "prompt": tokenizer.decode(ids, skip_special_tokens=True), "prompt_ids": ids})
        lengths.append(len(ids))
    return kept, dropped, lengths


def _now() -> str:
    from ftcli.system import utc_now

    return utc_now()


def prompts_report(manifest: dict[str, Any], folder: Path, reused: bool) -> DataReport:
    from ftcli.data.specs import dataset_label

    s, src = manifest["stats"], manifest["source"]
    report = DataReport(
        source=dataset_label(src["ref"]), source_kind=src["kind"], fingerprint=src["fingerprint"],
        rows_read=s["rows_read"], rows_selected=s["rows_selected"], rows_used=s["rows_kept"],
        dropped_empty_output=s["dropped"]["empty"], dropped_prompt_too_long=s["dropped"]["too_long"],
        tokens=s["tokens"], max_length=s["length"]["max"], format=manifest["format"], template=manifest["template"],
        prepared=str(folder), reused=reused, stats=s)
    if s["dropped"]["too_long"]:
        report.notes.append(f"{s['dropped']['too_long']:,} prompts dropped: longer than "
                            f"{manifest['options']['prompt_room']} tokens (--seq-length minus --max-completion-length)")
    return report


def prompts_table(manifest: dict[str, Any]) -> Any:
    """What `ftcli prepare` shows of prepared prompts."""
    from rich.table import Table

    s = manifest["stats"]
    table = Table(show_header=False, title="prepared prompts")
    table.add_row("format / template", f"prompts ({manifest['format']}) / {manifest['template']}")
    table.add_row("rows", f"{s['rows_read']:,} read, {s['rows_selected']:,} selected, {s['rows_kept']:,} kept")
    table.add_row("dropped", f"{s['dropped']['empty']:,} empty, {s['dropped']['too_long']:,} longer than "
                             f"{manifest['options']['prompt_room']} tokens")
    table.add_row("prompt tokens", f"{s['tokens']:,}; min {s['length']['min']}  p50 {s['length']['p50']}  "
                                   f"max {s['length']['max']}")
    table.add_row("reward columns", ", ".join(s["columns"]) or "none (the rewards get prompts and completions)")
    return table


def hold_out_prompts(config: Any, dataset: Any, report: DataReport) -> tuple[Any, Any]:
    raise DataError("--eval-split: a GRPO run is measured by its reward on held-out prompts, not an eval loss",
                    hint="drop it, and after training run `ftcli eval RUN --reward ... --dataset PROMPTS`")


def prepare_eval_prompts(config: Any, tokenizer: Any) -> Any:
    raise DataError("--eval-dataset: a GRPO run is measured by its reward on held-out prompts, not an eval loss",
                    hint="drop it, and after training run `ftcli eval RUN --reward ... --dataset PROMPTS`")


# The shape module's names (ftcli.data.SHAPES).
prepare = prepare_prompts
hold_out = hold_out_prompts
prepare_eval = prepare_eval_prompts
