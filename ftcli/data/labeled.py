"""Labeled completions (`--objective kto`): a prompt with one answer marked desirable or undesirable, tokenized and
masked as DPO's pairs are (ftcli/data/preference.py renders both), and cached like them.

    >>> from ftcli.data.labeled import prepare_labeled
    >>> prepared = prepare_labeled(config, tokenizer)   # cached under <ftcli_home>/datasets/<key>
    >>> prepared.dataset.column_names
    ['prompt_ids', 'completion_ids', 'label', 'length']

The rows a file may hold (after `--columns`, e.g. `--columns completion=answer,label=thumbs_up`):

| columns | rows |
|---|---|
| prompt, completion, label (true/false, or 1/0) | one row each; prompt and completion as strings, or message lists |
| completion (a whole conversation), label | the messages before its last assistant turns are the prompt |
| prompt, chosen, rejected (any form DPO reads) | each pair unpaired: its chosen answer desirable, its rejected one not |

A row's prompt and answer are rendered by the rules of a DPO pair's prompt and chosen answer (the same functions:
SFT's prompt/completion rules for strings, the chat template for messages), truncated the same way (the prompt's
start to `--max-prompt-length`, the answer to the rest of `--seq-length`). Rows with an empty answer or an answer
with no assistant message are dropped and counted; a pair with identical answers is dropped whole (nothing to
prefer). The manifest's `kind` is `labeled`, its stats count the desirable and undesirable rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.data import cache
from ftcli.data.formats import RowError, _messages, column_renames, nested
from ftcli.data.pipeline import (DROP_EMPTY, DROP_NO_ASSISTANT, DROP_NO_RESPONSE, DROP_SAME, INVALID, DataReport,
                                 special_prefix)
from ftcli.data.preference import Pair, _answer, drop_reason, encode_chat_pair, encode_text_pair, row_pair, truncate
from ftcli.errors import DataError

LABELED_FIELDS = ("prompt", "completion", "label", "chosen", "rejected")
COLUMNS = ["prompt_ids", "completion_ids", "label", "length"]
MAP_BATCH = 1000
LABELED_RULES = 1  # which rows are kept (see the module's docstring)


# ---- columns and rows -----------------------------------------------------------------------------------------


def check_labeled_columns(columns: list[str], source: str) -> None:
    """Refuse data that has neither labeled completions nor pairs, in one line naming the file and its columns."""
    if {"completion", "label"} <= set(columns) or {"chosen", "rejected"} <= set(columns):
        return
    found = ", ".join(f"'{c}'" for c in columns) or "none"
    raise DataError(f"dataset {source} has no labeled completions for --objective kto: it needs 'completion' and "
                    f"'label' (or preference pairs: 'chosen' and 'rejected') (columns found: {found})",
                    hint="map your names with --columns completion=COLUMN,label=COLUMN[,prompt=COLUMN] (or "
                         "chosen=COLUMN,rejected=COLUMN)")


def row_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RowError(f"'label' must be true or false (or 1 / 0), got {value!r}")


def row_completion(row: dict[str, Any], keys: dict[str, str]) -> Pair:
    """A labeled row as a Pair whose two answers are its completion (the pair's rendering then applies as is)."""
    role, content = keys.get("role", "role"), keys.get("content", "content")
    prompt, completion = nested(row.get("prompt")), nested(row.get("completion"))
    if isinstance(prompt, dict):
        prompt = [prompt]
    if isinstance(completion, str) and not isinstance(prompt, list):
        if prompt is None:
            raise RowError("a string 'completion' needs a 'prompt' (or give the whole conversation as messages)")
        return Pair(False, str(prompt), completion, completion)
    turns = _answer(completion, role, content, "completion")
    if prompt is None:  # a whole conversation: the messages before its closing assistant turns are the prompt
        start = len(turns)
        while start > 0 and turns[start - 1]["role"] == "assistant":
            start -= 1
        if start == 0:
            raise RowError("the conversation in 'completion' has no prompt before its assistant turn, and there is "
                           "no 'prompt' column")
        return Pair(True, turns[:start], turns[start:], turns[start:])
    p = _messages(prompt, role, content, roles=None) if isinstance(prompt, list) else \
        [{"role": "user", "content": str(prompt)}]
    return Pair(True, p, turns, turns)


def completion_drop(pair: Pair) -> str:
    """Why a labeled row teaches nothing ("" when usable): an empty answer, or one with no assistant message."""
    if isinstance(pair.chosen, str):
        return "" if pair.chosen.strip() else DROP_EMPTY
    if not any(m["role"] == "assistant" for m in pair.chosen):
        return DROP_NO_ASSISTANT
    return "" if any(m["role"] == "assistant" and m["content"].strip() for m in pair.chosen) else DROP_EMPTY


def _encode(pair: Pair, template: Any, tokenizer: Any, prefix: list[int], max_prompt: int, seq_length: int) -> Any:
    if template.is_chat:
        return truncate(encode_chat_pair(pair, template, tokenizer), max_prompt, seq_length)
    if pair.chat:
        raise RowError(f"a conversation needs a chat template, and --template is {template.name}")
    return truncate(encode_text_pair(pair, template, tokenizer, prefix), max_prompt, seq_length)


def encode_labeled_batch(batch: dict[str, list[Any]], indices: list[int], *, keys: dict[str, str], template: Any,
                         tokenizer: Any, max_prompt: int, seq_length: int) -> dict[str, list[Any]]:
    """One `datasets.map` batch of raw rows -> labeled rows (a pair gives two) and the statistics' helper columns."""
    prefix = special_prefix(tokenizer)
    out: dict[str, list[Any]] = {name: [] for name in (*COLUMNS, "prompt_cut", "completion_cut", "drop", "row")}

    def emit(prompt: list[int], completion: list[int], label: bool, prompt_cut: bool, cut: bool, drop: str,
             row: int) -> None:
        for name, value in zip(("prompt_ids", "completion_ids", "label", "length", "prompt_cut", "completion_cut",
                                "drop", "row"), (prompt, completion, label, len(prompt) + len(completion),
                                                 prompt_cut, cut, drop, row)):
            out[name].append(value)

    paired = "label" not in batch
    for i, index in enumerate(indices):
        row = {k: v[i] for k, v in batch.items()}
        try:
            if paired:
                pair = row_pair(row, keys)
                reason = drop_reason(pair)
                if reason:
                    emit([], [], True, False, False, reason, index)
                    continue
                enc = _encode(pair, template, tokenizer, prefix, max_prompt, seq_length)
                emit(enc.prompt_ids, enc.chosen_ids, True, enc.prompt_cut, enc.chosen_cut, enc.drop, index)
                emit(enc.prompt_ids, enc.rejected_ids, False, enc.prompt_cut, enc.rejected_cut, enc.drop, index)
                continue
            label = row_label(row.get("label"))
            pair = row_completion(row, keys)
            reason = completion_drop(pair)
            if reason:
                emit([], [], label, False, False, reason, index)
                continue
            enc = _encode(pair, template, tokenizer, prefix, max_prompt, seq_length)
            emit(enc.prompt_ids, enc.chosen_ids, label, enc.prompt_cut, enc.chosen_cut, enc.drop, index)
        except RowError as exc:
            emit([], [], False, False, False, INVALID + str(exc), index)
    return out


# ---- preparing and caching ------------------------------------------------------------------------------------


def prepare_labeled(config: Any, tokenizer: Any, *, output: str | Path | None = None, overwrite: bool = False,
                    num_proc: int | None = None, use_cache: bool = True) -> Any:
    """The prepared labeled rows for `config` (a `Prepared`): reused from the content-keyed cache or an
    `ftcli prepare --output-dir` folder, or built (under the entry's lock), as DPO's pairs are."""
    from ftcli.data.prepare import _quiet_datasets, expected_options
    from ftcli.data.preference_prepare import prepare_keyed
    from ftcli.objectives.dpo import max_prompt_length

    _quiet_datasets()
    if not isinstance(config.dataset, str):
        raise DataError("--objective kto trains on one dataset, not a mixture",
                        hint="pass one --dataset (merge the files into one, or a folder of them)")
    extra = {"labeled": LABELED_RULES, "max_prompt_length": max_prompt_length(config)}
    if cache.is_prepared_folder(config.dataset):
        folder = Path(config.dataset).expanduser()
        manifest = cache.check_prepared(folder, cache.read_prepared_manifest(folder),
                                        {**expected_options(config, tokenizer), **extra})
        problem = cache.untrusted(manifest) or cache.damaged(folder, manifest)
        if problem:
            raise DataError(f"prepared dataset {folder} is damaged: {problem}",
                            hint="prepare it again (`ftcli prepare ... --output-dir FOLDER --overwrite`)")
        return _load(folder, manifest, reused=True)
    return prepare_keyed(config, tokenizer, extra, _load, _build, output=output, overwrite=overwrite,
                         use_cache=use_cache)


def _load(folder: Path, manifest: dict[str, Any], reused: bool) -> Any:
    from datasets import load_from_disk

    from ftcli.data.prepare import Prepared

    return Prepared(load_from_disk(str(folder)), labeled_report(manifest, folder, reused), manifest, folder, reused)


def _build(config: Any, tokenizer: Any, loaded: Any, fields: dict[str, Any], key: str, final: Path,
           template_text: str | None, inherited: Any) -> Any:
    import shutil

    from ftcli.data.prepare import template_identity
    from ftcli.data.preference_prepare import _message_keys
    from ftcli.data.stats import all_dropped_hint, drop_summary, raise_first_invalid
    from ftcli.data.templates import resolve_template
    from ftcli.objectives.dpo import max_prompt_length

    started = time.perf_counter()
    ds = loaded.dataset
    if len(ds) == 0:
        raise DataError(f"dataset {config.dataset} is empty (0 rows)", hint="check the file(s)")
    renames = column_renames(config.columns, ds.column_names, LABELED_FIELDS, "labeled data", config.dataset,
                             ("role", "content"))
    ds = ds.rename_columns(renames) if renames else ds
    check_labeled_columns(ds.column_names, config.dataset)
    paired = "label" not in ds.column_names or "completion" not in ds.column_names
    wanted = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion", "label")
    ds = ds.select_columns([c for c in wanted if c in ds.column_names])
    template = resolve_template(config.template, _format(ds, _message_keys(config), paired), tokenizer,
                                model=config.model or "the model", text=template_text, inherited=inherited,
                                kwargs=config.template_kwargs)
    rows_read = len(ds)
    size = rows_read if config.dataset_size is None else min(config.dataset_size, rows_read)
    selected = ds.select(range(size)) if size < rows_read else ds
    build = cache.new_build_dir(final)
    try:
        (build / "work").mkdir()
        mapped = selected.map(encode_labeled_batch, batched=True, batch_size=MAP_BATCH, with_indices=True,
                              remove_columns=selected.column_names, cache_file_name=str(build / "work" / "map.arrow"),
                              new_fingerprint=f"ftcli-labeled-{key[:24]}",
                              fn_kwargs=dict(keys=_message_keys(config), template=template, tokenizer=tokenizer,
                                             max_prompt=max_prompt_length(config), seq_length=config.seq_length))
        drops = mapped.data.column("drop").to_pylist()
        raise_first_invalid(drops, config.dataset, mapped.data.column("row").to_pylist())
        kept_idx = [i for i, d in enumerate(drops) if not d]
        if not kept_idx:
            raise DataError(f"every row of {config.dataset} was dropped ({drop_summary(drops)})",
                            hint=all_dropped_hint(drops, config.seq_length))
        # Shuffled after unpairing, so that a pair's two rows are not side by side in KTO's data-order batches.
        kept = mapped.select(kept_idx).shuffle(seed=config.seed)
        stats = labeled_stats(kept, drops, rows_read, size, tokenizer.eos_token_id, paired)
        kept.select_columns(COLUMNS).save_to_disk(str(build / "data"))
        fmt = _format(ds, _message_keys(config), paired)
        manifest = {
            "layout": cache.LAYOUT_VERSION, "complete": True, "ftcli_version": __version__,
            "created_at": _now(), "key": key, "key_fields": fields, "kind": "labeled",
            "options": {"tokenizer": fields["tokenizer"], "seq_length": config.seq_length,
                        "train_on_inputs": config.train_on_inputs, "format": fmt,
                        "template": template_identity(template),
                        "columns": dict(sorted((config.columns or {}).items())) or None,
                        "dataset_size": config.dataset_size, "seed": config.seed, "labeled": LABELED_RULES,
                        "max_prompt_length": max_prompt_length(config)},
            "source": {"ref": config.dataset, "kind": loaded.source_kind, "fingerprint": loaded.fingerprint,
                       "files": loaded.files, "split": config.dataset_split, "revision": config.dataset_revision},
            "format": fmt, "template": template_identity(template),
            "template_digest": template.digest, "stats": stats, "columns": COLUMNS,
            "build": {"num_proc": 1, "seconds": round(time.perf_counter() - started, 3)},
        }
        manifest["data_files"] = cache.data_files(build / "data")
        cache.write_manifest(build / "data", manifest)
        cache.publish(build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _load(final, manifest, reused=False)


def _format(ds: Any, keys: dict[str, str], paired: bool) -> str:
    """"chat" when the first readable of the leading rows is a conversation (its shape picks the template)."""
    from ftcli.data.preference_prepare import FORMAT_PROBE_ROWS

    read = row_pair if paired else row_completion
    for i in range(min(len(ds), FORMAT_PROBE_ROWS)):
        try:
            return "chat" if read(ds[i], keys).chat else "prompt-completion"
        except RowError:
            continue
    return "prompt-completion"


def _now() -> str:
    from ftcli.system import utc_now

    return utc_now()


def labeled_stats(kept: Any, drops: list[str], rows_read: int, rows_selected: int, eos_id: int,
                  paired: bool) -> dict[str, Any]:
    cols = kept.select_columns(["prompt_ids", "completion_ids", "label", "prompt_cut", "completion_cut"]).to_dict()
    prompts = [len(p) for p in cols["prompt_ids"]]
    answers = [len(c) for c in cols["completion_ids"]]
    desirable = sum(1 for label in cols["label"] if label)
    lengths = sorted(p + a for p, a in zip(prompts, answers))
    return {
        "rows_read": rows_read, "rows_selected": rows_selected, "rows_kept": len(kept), "paired": paired,
        "desirable": desirable, "undesirable": len(kept) - desirable,
        "dropped": {"empty": drops.count(DROP_EMPTY), "too_long": 0, "no_response": drops.count(DROP_NO_RESPONSE),
                    "no_assistant": drops.count(DROP_NO_ASSISTANT), "same": drops.count(DROP_SAME)},
        "tokens": sum(prompts) + sum(answers), "loss_tokens": sum(answers),
        "prompt_truncated": sum(cols["prompt_cut"]), "completion_truncated": sum(cols["completion_cut"]),
        "truncated": sum(1 for p, c in zip(cols["prompt_cut"], cols["completion_cut"]) if p or c),
        "eos_trained_once": sum(1 for c in cols["completion_ids"] if c.count(eos_id) == 1 and c[-1] == eos_id),
        "length": {"min": lengths[0], "max": lengths[-1], "p50": lengths[len(lengths) // 2]},
    }


def labeled_report(manifest: dict[str, Any], folder: Path, reused: bool) -> DataReport:
    from ftcli.data.specs import dataset_label

    s, src = manifest["stats"], manifest["source"]
    report = DataReport(
        source=dataset_label(src["ref"]), source_kind=src["kind"], fingerprint=src["fingerprint"],
        rows_read=s["rows_read"], rows_selected=s["rows_selected"], rows_used=s["rows_kept"],
        dropped_empty_output=s["dropped"]["empty"], dropped_no_response=s["dropped"]["no_response"],
        truncated=s["truncated"], tokens=s["tokens"], loss_tokens=s["loss_tokens"],
        eos_trained_once=s["eos_trained_once"], max_length=s["length"]["max"], format=manifest["format"],
        template=manifest["template"], prepared=str(folder), reused=reused, stats=s)
    dropped = sum(s["dropped"].values())
    if dropped:
        report.notes.append(f"{dropped:,} {'pairs' if s['paired'] else 'rows'} dropped (" + ", ".join(
            f"{n:,} {name.replace('_', ' ')}" for name, n in s["dropped"].items() if n) + ")")
    if s["paired"]:
        report.notes.append(f"preference pairs unpaired for KTO: {s['desirable']:,} desirable (chosen) and "
                            f"{s['undesirable']:,} undesirable (rejected) rows")
    return report


def labeled_table(manifest: dict[str, Any]) -> Any:
    """What `ftcli prepare` shows of prepared labeled rows."""
    from rich.table import Table

    s, options = manifest["stats"], manifest["options"]
    table = Table(show_header=False, title="prepared labeled completions")
    table.add_row("format / template", f"labeled completions ({manifest['format']}) / {manifest['template']}")
    table.add_row("loss", "each completion + its EOS / end of turn (prompts masked)")
    table.add_row("rows", f"{s['rows_read']:,} read, {s['rows_selected']:,} selected, {s['rows_kept']:,} kept "
                          f"({s['desirable']:,} desirable, {s['undesirable']:,} undesirable"
                          f"{'; pairs unpaired' if s['paired'] else ''})")
    table.add_row("dropped", ", ".join(f"{n:,} {name.replace('_', ' ')}" for name, n in s["dropped"].items()))
    table.add_row("tokens", f"{s['tokens']:,} ({s['loss_tokens']:,} completion tokens in the loss)")
    table.add_row("length (prompt + completion)", f"min {s['length']['min']}  p50 {s['length']['p50']}  "
                                                  f"max {s['length']['max']}")
    table.add_row("truncated", f"{s['prompt_truncated']:,} prompts at --max-prompt-length "
                               f"{options['max_prompt_length']}; {s['completion_truncated']:,} completions at "
                               f"--seq-length {options['seq_length']}")
    return table


# ---- held-out rows --------------------------------------------------------------------------------------------


def labeled_tokens(dataset: Any) -> tuple[int, int]:
    """(tokens the model reads, the completions' tokens) of prepared labeled rows."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    prompt, completion = (int(pc.sum(pc.list_value_length(table[c])).as_py() or 0)
                          for c in ("prompt_ids", "completion_ids"))
    return prompt + completion, completion


def hold_out_labeled(config: Any, dataset: Any, report: DataReport) -> tuple[Any, Any]:
    from ftcli.data.split import hold_out

    return hold_out(config, dataset, report, count=labeled_tokens, unit="labeled rows")


def prepare_eval_labeled(config: Any, tokenizer: Any) -> Any:
    from ftcli.data.split import prepare_eval_dataset

    return prepare_eval_dataset(config, tokenizer, prepare=prepare_labeled)


# The shape module's names (ftcli.data.SHAPES).
prepare = prepare_labeled
hold_out = hold_out_labeled
prepare_eval = prepare_eval_labeled
