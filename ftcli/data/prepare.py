"""Prepare a dataset: read -> format -> template -> tokenize + mask (in parallel) -> prepared folder.

    >>> from ftcli.data.prepare import prepare_dataset
    >>> prepared = prepare_dataset(config, tokenizer)        # cached under <ftcli_home>/datasets/<key>
    >>> prepared.dataset.column_names, prepared.reused
    (['input_ids', 'labels', 'length'], False)

`ftcli train` and `ftcli prepare` both come through here with the same options, so a `prepare`
run is reused by the `train` run with the same flags (a cache hit reads no raw data at all; the
key is computed from the files' bytes). `--dataset <prepared folder>` reads that folder after
checking that its manifest matches what is asked.

The manifest, `ftcli_prepared.json` (every key is written on every prepare):

- `layout`, `complete`: the folder's layout version (`cache.LAYOUT_VERSION`); `true` once all is written.
- `ftcli_version`, `created_at` (UTC), `key`: who wrote it, when, and the cache key (hash of `key_fields`).
- `key_fields`: what the key covers: `source` fingerprint, `split`, `revision`, requested `format`,
  `columns`, `template` (a Jinja file by content), `train_on_inputs`, `seq_length`, `dataset_size`,
  `seed`, `tokenizer` fingerprint, `ftcli_version`, `layout`.
- `options`: what `train` compares before using the folder: `tokenizer`, `seq_length`,
  `train_on_inputs`, `format` (detected), `template` (resolved: `alpaca`, `plain`, `model`,
  `file:<sha>`, `none`), `columns`, `dataset_size`, `seed`.
- `source`: `ref` (as given), `kind` (builtin, local, hub), `fingerprint`, `files` (local files
  read), `split`, `revision`.
- `format`, `template`, `template_digest`: the detected format, the resolved template, a hash of its text.
- `tokenizer`: `fingerprint`, `name_or_path`, `eos_token`, `bos_token`, `pad_token`, `chat_template_digest`.
- `stats`: `rows_read`, `rows_selected` (after `--dataset-size`), `rows_kept`, `dropped` {`empty`,
  `too_long` (prompt longer than seq_length), `no_response` (nothing trained left after
  truncation)}, `tokens`, `loss_tokens`, `loss_token_share`, `truncated`, `truncated_share`,
  `eos_trained_once`, `length` {`min`, `mean`, `p50`, `p90`, `p95`, `p99`, `max`}, `padding`
  {`batch_size`, `in_order`, `length_grouped`}: the share of padded batches that is padding, with
  batches in training order or sorted by length.
- `columns`: the dataset's columns: `input_ids`, `labels` (-100 = not in the loss), `length`.
- `build`: `num_proc`, `seconds`, `tokens_per_second`.

Read a prepared folder with `datasets.load_from_disk(folder)` and
`cache.read_prepared_manifest(folder)` (None unless complete); show an example with
`ftcli.data.explain_example(ids, labels, tokenizer)`.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ftcli import __version__
from ftcli.console import console
from ftcli.data import cache
from ftcli.data.formats import FORMATS, MESSAGE_KEYS, column_renames, detect_format
from ftcli.data.pipeline import DROP_EMPTY, DROP_NO_RESPONSE, DROP_TOO_LONG, INVALID, DataReport, encode_batch
from ftcli.data.sources import LoadedRows, load_rows, source_fingerprint
from ftcli.data.templates import TemplateSpec, resolve_template
from ftcli.errors import ConfigError, DataError, OutputError
from ftcli.system import utc_now

MAP_BATCH = 1000
# Below this many rows another process costs more (start-up, pickling the tokenizer, writing
# shards) than it saves. With 2 cores, 2 processes were no faster than 1 (bench/prepare.py): in one
# process the Rust tokenizer already runs its batches on both cores, and datasets turns that off
# in worker processes. So processes are used from 3 cores up.
PARALLEL_MIN_ROWS = 20_000
PARALLEL_MIN_CORES = 3
HELPER_COLUMNS = ["loss_tokens", "truncated", "eos_once", "drop"]


@dataclass
class Prepared:
    dataset: Any  # datasets.Dataset: input_ids, labels, length
    report: DataReport
    manifest: dict[str, Any]
    folder: Path
    reused: bool


def default_num_proc(rows: int) -> int:
    """Worker processes for tokenizing `rows` rows: 1 for small data or 2 cores, else one per core (at most 8)."""
    env = os.environ.get("FTCLI_NUM_PROC", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"FTCLI_NUM_PROC={env} is not a number of processes", hint="set it to 1 or more")
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if rows < PARALLEL_MIN_ROWS or cores < PARALLEL_MIN_CORES:
        return 1
    return min(cores, 8)


def prepare_dataset(config: Any, tokenizer: Any, *, output: str | Path | None = None, overwrite: bool = False,
                    num_proc: int | None = None, use_cache: bool = True) -> Prepared:
    """The prepared data for `config`: reused from the cache (or a prepared `--dataset` folder), or built."""
    _quiet_datasets()
    if cache.is_prepared_folder(config.dataset):
        return _use_prepared_folder(config, tokenizer)
    tokenizer_fp = cache.tokenizer_fingerprint(tokenizer)
    loaded: LoadedRows | None = None
    source_fp = source_fingerprint(config.dataset, split=config.dataset_split, revision=config.dataset_revision)
    if source_fp is None:  # a hub id: its content is known once datasets has resolved it
        loaded = _read(config)
        source_fp = loaded.fingerprint
    fields = cache.key_fields(config, tokenizer_fp, source_fp)
    key = cache.cache_key(fields)
    final = Path(output).expanduser() if output else cache.cache_dir(key)
    if output is None and use_cache:
        manifest = cache.read_prepared_manifest(final)
        if manifest is not None and manifest.get("key") == key:
            return _load(final, manifest, config, reused=True)
    elif output is not None and final.exists() and any(final.iterdir()) and not overwrite:
        raise OutputError(f"prepared-data folder {final} exists and is not empty",
                          hint="pass --overwrite to replace it, or choose another --output-dir")
    loaded = loaded or _read(config)
    return _build(config, tokenizer, loaded, fields, key, final, overwrite=overwrite, num_proc=num_proc)


def _read(config: Any) -> LoadedRows:
    with _status(f"reading {config.dataset}"):
        return load_rows(config.dataset, split=config.dataset_split, revision=config.dataset_revision)


def _build(config: Any, tokenizer: Any, loaded: LoadedRows, fields: dict[str, Any], key: str, final: Path, *,
           overwrite: bool, num_proc: int | None) -> Prepared:
    started = time.perf_counter()
    ds = loaded.dataset
    rows_read = len(ds)
    if rows_read == 0:
        raise DataError(f"dataset {config.dataset} is empty (0 rows)",
                        hint="check the file(s): blank lines and header-only CSV files hold no rows")
    notes: list[str] = []
    renames = column_renames(config.columns, ds.column_names)
    if renames:
        ds = ds.rename_columns(renames)
    fmt = detect_format(ds.column_names, config.format, config.dataset)
    template = resolve_template(config.template, fmt, tokenizer, model=config.model or "the model")
    size = rows_read if config.dataset_size is None else min(config.dataset_size, rows_read)
    if "dataset_size" in config.model_fields_set and config.dataset_size is not None \
            and config.dataset_size > rows_read:
        notes.append(f"--dataset-size {config.dataset_size} > {rows_read} rows: using all rows")
    needed = [c for c in (*FORMATS[fmt][0], *FORMATS[fmt][1]) if c in ds.column_names]
    ds = ds.select_columns(needed)
    selected = ds.select(range(size)) if size < rows_read else ds
    procs = num_proc or default_num_proc(size)
    procs = max(1, min(procs, size // MAP_BATCH or 1))
    keys = {k: v for k, v in (config.columns or {}).items() if k in MESSAGE_KEYS}

    work = final.parent / f".{final.name}.work-{os.getpid()}"
    tmp = cache.temp_dir_for(final)
    try:
        work.mkdir(parents=True, exist_ok=True)
        with _map_progress(size, procs):
            mapped = selected.map(
                encode_batch, batched=True, batch_size=MAP_BATCH, num_proc=procs if procs > 1 else None,
                remove_columns=selected.column_names, cache_file_name=str(work / "map.arrow"),
                new_fingerprint=f"ftcli-{key[:24]}", desc="tokenizing",
                fn_kwargs=dict(fmt=fmt, keys=keys, template=template, tokenizer=tokenizer,
                               seq_length=config.seq_length, train_on_inputs=config.train_on_inputs))
        drops_in_order = mapped.data.column("drop").to_pylist()
        _raise_first_invalid(drops_in_order, config.dataset)
        # Shuffle all selected rows, then drop: the order of the rows kept is the reference order.
        shuffled = mapped.shuffle(seed=config.seed)
        order = shuffled_order(shuffled)
        drops = [drops_in_order[i] for i in order]
        kept_idx = [i for i, d in enumerate(drops) if not d]
        if not kept_idx:
            raise DataError(f"every row of {config.dataset} was dropped ({_drop_summary(drops)})",
                            hint=_all_dropped_hint(drops, config.seq_length))
        kept = shuffled.select(kept_idx) if len(kept_idx) < len(drops) else shuffled
        stats = _stats(mapped, [order[i] for i in kept_idx], drops, rows_read, size, config.batch_size)
        kept = kept.remove_columns(HELPER_COLUMNS)
        with _status(f"writing {len(kept):,} examples"):
            kept.save_to_disk(str(tmp))
        seconds = time.perf_counter() - started
        manifest = _manifest(config, tokenizer, loaded, fields, key, fmt, template, stats, procs, seconds)
        cache.write_manifest(tmp, manifest)  # last: a folder without it is never used
        cache.publish(tmp, final, replace=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    del mapped, shuffled, kept
    prepared = _load(final, manifest, config, reused=False)
    prepared.report.notes[:0] = notes
    return prepared


def _load(folder: Path, manifest: dict[str, Any], config: Any, *, reused: bool) -> Prepared:
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    return Prepared(dataset, report_from_manifest(manifest, folder, reused), manifest, folder, reused)


def _use_prepared_folder(config: Any, tokenizer: Any) -> Prepared:
    folder = Path(config.dataset).expanduser()
    manifest = cache.check_prepared(folder, cache.read_prepared_manifest(folder), expected_options(config, tokenizer))
    prepared = _load(folder, manifest, config, reused=True)
    opts = manifest["options"]
    prepared.report.notes.append(f"using the prepared dataset {folder} ({opts['format']} data, dataset size "
                                 f"{opts['dataset_size']}, seed {opts['seed']})")
    return prepared


def expected_options(config: Any, tokenizer: Any) -> dict[str, Any]:
    """What a prepared folder's `options` must say to be used by this run.

    Always compared: tokenizer, seq_length, train_on_inputs. The format, template and columns when
    asked for explicitly (`auto` accepts what the data was detected as); dataset size and seed when
    given on this command line or config file (otherwise the prepared folder *is* the selection)."""
    expected: dict[str, Any] = {"tokenizer": cache.tokenizer_fingerprint(tokenizer),
                                "seq_length": config.seq_length, "train_on_inputs": config.train_on_inputs}
    if config.format != "auto":
        expected["format"] = config.format
    if config.template != "auto":
        expected["template"] = config.template if config.template in ("alpaca", "model") \
            else _file_identity(config.template)
    if config.columns:
        expected["columns"] = dict(sorted(config.columns.items()))
    for name in ("dataset_size", "seed"):
        if name in config.model_fields_set:
            expected[name] = getattr(config, name)
    return expected


def _file_identity(path: str) -> str:
    key = cache.template_key(path)
    return "file:" + key.removeprefix("file-sha256:")[:16] if key.startswith("file-sha256:") else f"file:{path}"


def template_identity(spec: TemplateSpec) -> str:
    if spec.name.startswith("file:"):
        return _file_identity(spec.name.removeprefix("file:"))
    return spec.name


def report_from_manifest(manifest: dict[str, Any], folder: Path, reused: bool) -> DataReport:
    s = manifest["stats"]
    src = manifest["source"]
    return DataReport(
        source=src["ref"], source_kind=src["kind"], fingerprint=src["fingerprint"], rows_read=s["rows_read"],
        rows_selected=s["rows_selected"], rows_used=s["rows_kept"], dropped_empty_output=s["dropped"]["empty"],
        dropped_prompt_too_long=s["dropped"]["too_long"], dropped_no_response=s["dropped"]["no_response"],
        truncated=s["truncated"], tokens=s["tokens"], loss_tokens=s["loss_tokens"],
        eos_trained_once=s["eos_trained_once"], max_length=s["length"]["max"], format=manifest["format"],
        template=manifest["template"], prepared=str(folder), reused=reused, stats=s)


def shuffled_order(shuffled: Any) -> list[int]:
    """Row i of the shuffled dataset is row order[i] of the unshuffled one."""
    indices = shuffled._indices  # datasets keeps a shuffle as an indices mapping until it is flattened
    return indices.column(0).to_pylist() if indices is not None else list(range(len(shuffled)))


def _stats(mapped: Any, kept_rows: list[int], drops: list[str], rows_read: int, rows_selected: int,
           batch_size: int | None) -> dict[str, Any]:
    """Statistics of the kept rows (`kept_rows`: their indices in `mapped`, in training order)."""
    import numpy as np

    def column(name: str) -> Any:
        return mapped.data.column(name).to_numpy()[kept_rows]

    lengths = column("length").astype(np.int64)
    loss = int(column("loss_tokens").sum())
    truncated = int(column("truncated").sum())
    eos_once = int(column("eos_once").sum())
    tokens = int(lengths.sum())
    bs = batch_size or 1
    pct = {f"p{q}": int(np.percentile(lengths, q, method="higher")) for q in (50, 90, 95, 99)}
    return {
        "rows_read": rows_read,
        "rows_selected": rows_selected,
        "rows_kept": len(lengths),
        "dropped": {"empty": drops.count(DROP_EMPTY), "too_long": drops.count(DROP_TOO_LONG),
                    "no_response": drops.count(DROP_NO_RESPONSE)},
        "tokens": tokens,
        "loss_tokens": loss,
        "loss_token_share": round(loss / tokens, 4) if tokens else 0.0,
        "truncated": truncated,
        "truncated_share": round(truncated / len(lengths), 4),
        "eos_trained_once": eos_once,
        "length": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1), **pct,
                   "max": int(lengths.max())},
        "padding": {"batch_size": bs, "in_order": padding_waste(lengths, bs),
                    "length_grouped": padding_waste(np.sort(lengths)[::-1], bs)},
    }


def padding_waste(lengths: Any, batch_size: int) -> float:
    """Share of the padded batches (each padded to its longest row) that is padding."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        padded += int(chunk.max()) * len(chunk)
    return round(1 - int(lengths.sum()) / padded, 4)


def _manifest(config: Any, tokenizer: Any, loaded: LoadedRows, fields: dict[str, Any], key: str, fmt: str,
              template: TemplateSpec, stats: dict[str, Any], procs: int, seconds: float) -> dict[str, Any]:
    identity = template_identity(template)
    return {
        "layout": cache.LAYOUT_VERSION,
        "complete": True,
        "ftcli_version": __version__,
        "created_at": utc_now(),
        "key": key,
        "key_fields": fields,
        "options": {"tokenizer": fields["tokenizer"], "seq_length": config.seq_length,
                    "train_on_inputs": config.train_on_inputs, "format": fmt, "template": identity,
                    "columns": dict(sorted((config.columns or {}).items())) or None,
                    "dataset_size": config.dataset_size, "seed": config.seed},
        "source": {"ref": config.dataset, "kind": loaded.source_kind, "fingerprint": loaded.fingerprint,
                   "files": loaded.files, "split": config.dataset_split, "revision": config.dataset_revision},
        "format": fmt,
        "template": identity,
        "template_digest": template.digest,
        "tokenizer": {"fingerprint": fields["tokenizer"], "name_or_path": getattr(tokenizer, "name_or_path", None),
                      "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                      "pad_token": tokenizer.pad_token,
                      "chat_template_digest": TemplateSpec("x", tokenizer.chat_template).digest
                      if isinstance(getattr(tokenizer, "chat_template", None), str) else None},
        "stats": stats,
        "columns": ["input_ids", "labels", "length"],
        "build": {"num_proc": procs, "seconds": round(seconds, 3),
                  "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9), 1)},
    }


def _raise_first_invalid(drops: list[str], ref: str) -> None:
    for i, d in enumerate(drops):
        if d.startswith(INVALID):
            count = sum(1 for x in drops if x.startswith(INVALID))
            more = f" ({count - 1} more rows like it)" if count > 1 else ""
            raise DataError(f"{ref}: row {i + 1}: {d.removeprefix(INVALID)}{more}",
                            hint="fix the row(s), or pick the right --format / --columns")


def _drop_summary(drops: list[str]) -> str:
    names = {DROP_EMPTY: "empty response", DROP_TOO_LONG: "prompt longer than --seq-length",
             DROP_NO_RESPONSE: "no response left after truncation"}
    parts = [f"{drops.count(k)} {v}" for k, v in names.items() if drops.count(k)]
    return ", ".join(parts)


def _all_dropped_hint(drops: list[str], seq_length: int) -> str:
    if drops.count(DROP_EMPTY) == len(drops):
        return "every response (output, completion, assistant turn or text) is empty; check --format and --columns"
    return f"raise --seq-length (now {seq_length}) or shorten the prompts"


def _quiet_datasets() -> None:
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # "Repo card metadata block was not found" for local repository copies


@contextmanager
def _status(text: str) -> Iterator[None]:
    if console.is_terminal and not console.quiet:
        with console.status(text):
            yield
    else:
        yield


@contextmanager
def _map_progress(total: int, procs: int) -> Iterator[None]:
    """A Rich progress bar fed by `datasets.map`'s own progress updates (which arrive from every worker)."""
    if not console.is_terminal or console.quiet:
        yield
        return
    import datasets.arrow_dataset as arrow_dataset
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(f"[bold]tokenizing[/] ({procs} process{'es' if procs > 1 else ''})"), BarColumn(),
                        MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True)
    task = progress.add_task("tokenizing", total=total)

    class _Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: Any) -> None:
            return None

        def update(self, n: int = 1) -> None:
            progress.advance(task, n)

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

    original = getattr(arrow_dataset, "hf_tqdm", None)
    arrow_dataset.hf_tqdm = _Bar
    try:
        with progress:
            yield
    finally:
        arrow_dataset.hf_tqdm = original
