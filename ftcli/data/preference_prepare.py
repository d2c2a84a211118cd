"""Preparing preference pairs: the content-keyed cache, statistics, held-out pairs (rules: ftcli.data.preference).

    >>> from ftcli.data.preference_prepare import prepare_pairs
    >>> prepared = prepare_pairs(config, tokenizer)   # cached under <ftcli_home>/datasets/<key>, like SFT data
    >>> prepared.manifest["stats"]["cut_differently"]
    0

The cache key is SFT's (ftcli.data.cache.key_fields: data content, tokenizer, template, --seq-length, size, seed)
plus `pairs` and the resolved `--max-prompt-length`; the folder's manifest has `kind: preference` and its own
`stats`: rows_read, rows_selected, rows_kept, dropped {empty, no_response, no_assistant, same}, tokens, loss_tokens (both answers),
prompt_truncated, chosen_truncated, rejected_truncated, truncated, cut_differently, eos_trained_once, length.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.data import cache
from ftcli.data.pipeline import DROP_EMPTY, DROP_NO_ASSISTANT, DROP_NO_RESPONSE, DROP_SAME, DataReport
from ftcli.data.formats import RowError
from ftcli.data.preference import (COLUMNS, MAP_BATCH, PAIR_FIELDS, check_pair_columns, encode_pairs_batch,
                                   pair_renames, row_pair)
from ftcli.errors import DataError


# ---- preparing and caching ------------------------------------------------------------------------------------

PAIR_RULES = 2  # which pairs are kept (2: identical answers and answers without an assistant turn are dropped)


def prepare_pairs(config: Any, tokenizer: Any, *, output: str | Path | None = None, overwrite: bool = False,
                  num_proc: int | None = None, use_cache: bool = True) -> Any:
    """The prepared pairs for `config` (a `Prepared`, as ftcli.data.prepare gives SFT data): reused from the
    content-keyed cache or an `ftcli prepare --output-dir` folder, or built (under the entry's lock)."""
    from ftcli.objectives.dpo import max_prompt_length
    from ftcli.data.prepare import _quiet_datasets

    _quiet_datasets()
    if not isinstance(config.dataset, str):
        raise DataError(f"--objective {config.objective} trains on one preference dataset, not a mixture",
                        hint="pass one --dataset (merge the files into one, or a folder of them)")
    if cache.is_prepared_folder(config.dataset):
        return _use_prepared_pairs(config, tokenizer)
    extra = {"pairs": True, "max_prompt_length": max_prompt_length(config), "pair_rules": PAIR_RULES}
    return prepare_keyed(config, tokenizer, extra, _load, _build_pairs, output=output, overwrite=overwrite,
                         use_cache=use_cache)


def prepare_keyed(config: Any, tokenizer: Any, extra: dict[str, Any], load: Any, build: Any, *,
                  output: str | Path | None, overwrite: bool, use_cache: bool) -> Any:
    """The content-keyed prepare of a data shape (pairs here; KTO's labeled rows, GRPO's prompts): the cache key from
    the source, tokenizer, template and the shape's `extra` fields; under the entry's lock, a trusted entry is
    `load(folder, manifest, reused=True)`, else `build(config, tokenizer, loaded, fields, key, final, template_text,
    inherited)` writes it (an `ftcli prepare --output-dir` folder is always built)."""
    from ftcli.data.prepare import check_output_dir
    from ftcli.data.sources import load_rows, source_fingerprint
    from ftcli.data.templates import inherited_for, read_template, template_file
    from ftcli.files import exclusive, output_path

    path = template_file(config.template)
    template_text = read_template(path) if path is not None else None
    inherited = inherited_for(config)
    loaded = None
    source_fp = source_fingerprint(config.dataset, split=config.dataset_split, revision=config.dataset_revision)
    if source_fp is None:
        loaded = load_rows(config.dataset, split=config.dataset_split, revision=config.dataset_revision)
        source_fp = loaded.fingerprint
    fields = {**cache.key_fields(config, cache.tokenizer_fingerprint(tokenizer), source_fp, template_text, inherited),
              **extra}
    key = cache.cache_key(fields)
    final = output_path(output, "--output-dir") if output is not None else cache.cache_dir(key)
    if output is not None:
        check_output_dir(final, overwrite)
    with exclusive(final, "--output-dir" if output is not None else "prepared-data cache entry",
                   wait=output is None):
        if output is None and use_cache:
            manifest = cache.read_prepared_manifest(final)
            if manifest is not None and manifest.get("key") == key and not cache.untrusted(manifest) \
                    and not cache.damaged(final, manifest):
                return load(final, manifest, reused=True)
        elif output is not None:
            cache.remove_stale_builds(final)
            check_output_dir(final, overwrite)
        loaded = loaded or load_rows(config.dataset, split=config.dataset_split, revision=config.dataset_revision)
        return build(config, tokenizer, loaded, fields, key, final, template_text, inherited)



def _load(folder: Path, manifest: dict[str, Any], reused: bool) -> Any:
    from datasets import load_from_disk

    from ftcli.data.prepare import Prepared

    return Prepared(load_from_disk(str(folder)), pair_report(manifest, folder, reused), manifest, folder, reused)


def _use_prepared_pairs(config: Any, tokenizer: Any) -> Any:
    from ftcli.objectives.dpo import max_prompt_length
    from ftcli.data.prepare import expected_options

    folder = Path(config.dataset).expanduser()
    manifest = cache.read_prepared_manifest(folder)
    expected = {**expected_options(config, tokenizer), "pairs": True, "max_prompt_length": max_prompt_length(config)}
    manifest = cache.check_prepared(folder, manifest, expected)
    problem = cache.untrusted(manifest) or cache.damaged(folder, manifest)
    if problem:
        raise DataError(f"prepared dataset {folder} is damaged: {problem}",
                        hint="prepare it again (`ftcli prepare ... --output-dir FOLDER --overwrite`)")
    return _load(folder, manifest, reused=True)


def _build_pairs(config: Any, tokenizer: Any, loaded: Any, fields: dict[str, Any], key: str, final: Path,
                 template_text: str | None, inherited: Any = None) -> Any:
    import shutil

    from ftcli.objectives.dpo import max_prompt_length
    from ftcli.data.prepare import template_identity
    from ftcli.data.stats import all_dropped_hint, drop_summary, raise_first_invalid, shuffled_order
    from ftcli.data.templates import resolve_template

    started = time.perf_counter()
    ds = loaded.dataset
    if len(ds) == 0:
        raise DataError(f"dataset {config.dataset} is empty (0 rows)", hint="check the file(s)")
    renames = pair_renames(config.columns, ds.column_names, config.dataset)
    ds = ds.rename_columns(renames) if renames else ds
    check_pair_columns(ds.column_names, config.dataset, getattr(config, "objective", "dpo"))
    ds = ds.select_columns([c for c in PAIR_FIELDS if c in ds.column_names])
    first = _first_pair(ds, _message_keys(config))
    fmt = "chat" if first is not None and first.chat else "prompt-completion"
    template = resolve_template(config.template, fmt, tokenizer, model=config.model or "the model", text=template_text,
                                inherited=inherited, kwargs=config.template_kwargs)
    rows_read = len(ds)
    size = rows_read if config.dataset_size is None else min(config.dataset_size, rows_read)
    selected = ds.select(range(size)) if size < rows_read else ds
    build = cache.new_build_dir(final)
    try:
        (build / "work").mkdir()
        mapped = selected.map(encode_pairs_batch, batched=True, batch_size=MAP_BATCH, remove_columns=selected.column_names,
                              cache_file_name=str(build / "work" / "map.arrow"), new_fingerprint=f"ftcli-pairs-{key[:24]}",
                              fn_kwargs=dict(keys=_message_keys(config), template=template, tokenizer=tokenizer,
                                             max_prompt=max_prompt_length(config), seq_length=config.seq_length))
        drops_in_order = mapped.data.column("drop").to_pylist()
        raise_first_invalid(drops_in_order, config.dataset)
        shuffled = mapped.shuffle(seed=config.seed)
        order = shuffled_order(shuffled)
        kept_idx = [i for i, j in enumerate(order) if not drops_in_order[j]]
        if not kept_idx:
            raise DataError(f"every row of {config.dataset} was dropped ({drop_summary(drops_in_order)})",
                            hint=all_dropped_hint(drops_in_order, config.seq_length))
        kept = shuffled.select(kept_idx)
        stats = pair_stats(kept, drops_in_order, rows_read, size, tokenizer.eos_token_id)
        kept.select_columns(COLUMNS).save_to_disk(str(build / "data"))
        manifest = {
            "layout": cache.LAYOUT_VERSION, "complete": True, "ftcli_version": __version__,
            "created_at": _now(), "key": key, "key_fields": fields, "kind": "preference",
            "options": {"tokenizer": fields["tokenizer"], "seq_length": config.seq_length,
                        "train_on_inputs": config.train_on_inputs, "format": fmt,
                        "template": template_identity(template),
                        "columns": dict(sorted((config.columns or {}).items())) or None,
                        "dataset_size": config.dataset_size, "seed": config.seed, "pairs": True,
                        "max_prompt_length": max_prompt_length(config)},
            "source": {"ref": config.dataset, "kind": loaded.source_kind, "fingerprint": loaded.fingerprint,
                       "files": loaded.files, "split": config.dataset_split, "revision": config.dataset_revision},
            "format": fmt, "template": template_identity(template),  # as SFT names them: what inference renders
            "template_digest": template.digest, "stats": stats, "columns": COLUMNS,
            "build": {"num_proc": 1, "seconds": round(time.perf_counter() - started, 3)},
        }
        manifest["build"]["tokens_per_second"] = round(stats["tokens"] / max(manifest["build"]["seconds"], 1e-9), 1)
        manifest["data_files"] = cache.data_files(build / "data")
        cache.write_manifest(build / "data", manifest)
        cache.publish(build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _load(final, manifest, reused=False)


FORMAT_PROBE_ROWS = 100


def _first_pair(ds: Any, keys: dict[str, str]) -> Any:
    """The first of the leading rows that reads as a pair (its shape picks the format), or None: a malformed row is
    reported by the map below, in one line naming its row, wherever it is."""
    for i in range(min(len(ds), FORMAT_PROBE_ROWS)):
        try:
            return row_pair(ds[i], keys)
        except RowError:
            continue
    return None


def _message_keys(config: Any) -> dict[str, str]:
    return {k: v for k, v in (config.columns or {}).items() if k in ("role", "content")}


def _now() -> str:
    from ftcli.system import utc_now

    return utc_now()


def pair_stats(kept: Any, drops: list[str], rows_read: int, rows_selected: int, eos_id: int) -> dict[str, Any]:
    """Counts of the kept pairs: tokens, the answers' tokens (the loss), cuts, and answers ending in EOS once."""
    cols = kept.select_columns(["prompt_ids", "chosen_ids", "rejected_ids", "prompt_cut", "chosen_cut",
                                "rejected_cut"]).to_dict()
    prompts = [len(p) for p in cols["prompt_ids"]]
    answers = [len(c) + len(r) for c, r in zip(cols["chosen_ids"], cols["rejected_ids"])]
    eos_once = sum(1 for c, r in zip(cols["chosen_ids"], cols["rejected_ids"])
                   if c.count(eos_id) == 1 and c[-1] == eos_id and r.count(eos_id) == 1 and r[-1] == eos_id)
    cut = [p or c or r for p, c, r in zip(cols["prompt_cut"], cols["chosen_cut"], cols["rejected_cut"])]
    lengths = sorted(p + max(len(c), len(r)) for p, c, r in zip(prompts, cols["chosen_ids"], cols["rejected_ids"]))
    return {
        "rows_read": rows_read, "rows_selected": rows_selected, "rows_kept": len(kept),
        "dropped": {"empty": drops.count(DROP_EMPTY), "too_long": 0, "no_response": drops.count(DROP_NO_RESPONSE),
                    "no_assistant": drops.count(DROP_NO_ASSISTANT), "same": drops.count(DROP_SAME)},
        "tokens": 2 * sum(prompts) + sum(answers), "loss_tokens": sum(answers),
        "prompt_truncated": sum(cols["prompt_cut"]), "chosen_truncated": sum(cols["chosen_cut"]),
        "rejected_truncated": sum(cols["rejected_cut"]), "truncated": sum(cut),
        "cut_differently": sum(1 for c, r in zip(cols["chosen_cut"], cols["rejected_cut"]) if c != r),
        "eos_trained_once": eos_once,
        "length": {"min": lengths[0], "max": lengths[-1], "p50": lengths[len(lengths) // 2]},
    }


def pair_report(manifest: dict[str, Any], folder: Path, reused: bool) -> DataReport:
    s, src = manifest["stats"], manifest["source"]
    from ftcli.data.specs import dataset_label

    report = DataReport(
        source=dataset_label(src["ref"]), source_kind=src["kind"], fingerprint=src["fingerprint"],
        rows_read=s["rows_read"], rows_selected=s["rows_selected"], rows_used=s["rows_kept"],
        dropped_empty_output=s["dropped"]["empty"], dropped_no_response=s["dropped"]["no_response"],
        truncated=s["truncated"], tokens=s["tokens"], loss_tokens=s["loss_tokens"],
        eos_trained_once=s["eos_trained_once"], max_length=s["length"]["max"], format=manifest["format"],
        template=manifest["template"], prepared=str(folder), reused=reused, stats=s)
    report.notes.extend(pair_notes(s, manifest["options"]))
    return report


DROP_NAMES = (("empty", "an empty answer"), ("no_assistant", "an answer with no assistant message"),
              ("same", "identical chosen and rejected answers (nothing to prefer)"),
              ("no_response", "no answer left after truncation"))


def pair_notes(s: dict[str, Any], options: dict[str, Any]) -> list[str]:
    notes = []
    dropped = [(s["dropped"].get(key, 0), text) for key, text in DROP_NAMES]
    if any(n for n, _ in dropped):
        notes.append(f"{sum(n for n, _ in dropped):,} pairs dropped: "
                     + ", ".join(f"{n:,} with {text}" for n, text in dropped if n))
    if s["prompt_truncated"]:
        notes.append(f"{s['prompt_truncated']:,} prompts cut to --max-prompt-length {options['max_prompt_length']} "
                     "(their start kept)")
    if s["cut_differently"]:
        notes.append(f"{s['cut_differently']:,} pairs have one answer cut at --seq-length {options['seq_length']} "
                     "and the other whole: they are compared on unequal terms (a longer --seq-length avoids it)")
    return notes


# ---- held-out pairs -------------------------------------------------------------------------------------------


def pair_tokens(dataset: Any) -> tuple[int, int]:
    """(tokens the model reads: the prompt twice and both answers, the answers' tokens) of prepared pairs."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    prompt, chosen, rejected = (int(pc.sum(pc.list_value_length(table[c])).as_py() or 0)
                                for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return 2 * prompt + chosen + rejected, chosen + rejected


def hold_out_pairs(config: Any, dataset: Any, report: DataReport) -> tuple[Any, Any]:
    """`--eval-split`: pairs held out of the prepared training pairs (ftcli.data.split's choice of rows)."""
    from ftcli.data.split import hold_out

    return hold_out(config, dataset, report, count=pair_tokens, unit="pairs")


def prepare_eval_pairs(config: Any, tokenizer: Any) -> Any:
    """`--eval-dataset`: every pair of it, prepared (and cached) the way `--dataset` is."""
    from ftcli.data.split import prepare_eval_dataset

    return prepare_eval_dataset(config, tokenizer, prepare=prepare_pairs)


def pairs_table(manifest: dict[str, Any]) -> Any:
    """What `ftcli prepare` shows of prepared pairs."""
    from rich.table import Table

    s, options = manifest["stats"], manifest["options"]
    table = Table(show_header=False, title="prepared preference pairs")
    table.add_row("format / template", f"preference pairs ({manifest['format']}) / {manifest['template']}")
    table.add_row("loss", "both answers + their EOS / end of turn (prompts masked)")
    table.add_row("pairs", f"{s['rows_read']:,} read, {s['rows_selected']:,} selected, {s['rows_kept']:,} kept")
    table.add_row("dropped", ", ".join(f"{s['dropped'].get(key, 0):,} with {text}" for key, text in DROP_NAMES))
    table.add_row("tokens", f"{s['tokens']:,} ({s['loss_tokens']:,} answer tokens in the loss)")
    table.add_row("length (prompt + longer answer)", f"min {s['length']['min']}  p50 {s['length']['p50']}  "
                                                     f"max {s['length']['max']}")
    table.add_row("truncated", f"{s['prompt_truncated']:,} prompts at --max-prompt-length "
                               f"{options['max_prompt_length']}; {s['chosen_truncated']:,} chosen and "
                               f"{s['rejected_truncated']:,} rejected answers at --seq-length {options['seq_length']}; "
                               f"{s['cut_differently']:,} pairs cut differently")
    table.add_row("EOS trained once", f"{s['eos_trained_once']:,} of {s['rows_kept']:,} pairs (both answers)")
    return table


# The shape module's names (ftcli.data.SHAPES).
prepare = prepare_pairs
hold_out = hold_out_pairs
prepare_eval = prepare_eval_pairs
