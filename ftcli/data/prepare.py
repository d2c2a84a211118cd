"""Prepare a dataset: read -> format -> template -> tokenize + mask (in parallel) -> prepared folder.

    >>> from ftcli.data.prepare import prepare_dataset
    >>> prepared = prepare_dataset(config, tokenizer)        # cached under <ftcli_home>/datasets/<key>
    >>> prepared.dataset.column_names, prepared.reused
    (['input_ids', 'labels', 'length'], False)

`ftcli train` and `ftcli prepare` both come through here with the same options, so a `prepare`
run is reused by the `train` run with the same flags (a cache hit parses no raw data; the key is computed from
the files' sha256, and a build files its rows under the hash of the very bytes it parsed, should the files
change in between). `--dataset <prepared folder>` reads that folder after checking its manifest.

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
- `data_files`: {name: {`size`, `sha256`, `mtime_ns`, `ctime_ns`, `inode`, `sample`}} of every other file, checked
  before each use (`cache.damaged`: a damaged cache entry is rebuilt, a damaged `--dataset FOLDER` refused).

Read a prepared folder with `datasets.load_from_disk(folder)` and
`cache.read_prepared_manifest(folder)` (None unless complete); show an example with
`ftcli.data.explain_example(ids, labels, tokenizer)`.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ftcli import __version__
from ftcli.console import console
from ftcli.data import cache
from ftcli.data.formats import FORMATS, MESSAGE_KEYS, check_one_format, column_renames, detect_format
from ftcli.data.pipeline import INVALID, DataReport, encode_batch
from ftcli.data.specs import dataset_label
from ftcli.data.sources import LoadedRows, load_rows, source_fingerprint
from ftcli.data.stats import all_dropped_hint, drop_summary, measure, raise_first_invalid, shuffled_order
from ftcli.data.templates import TemplateSpec, inherited_for, read_template, resolve_template, template_file
from ftcli.errors import ConfigError, DataError, OutputError
from ftcli.files import check_writable, exclusive, output_path
from ftcli.system import utc_now

MAP_BATCH = 1000
# Below this many rows another process costs more (start-up, pickling the tokenizer, writing
# shards) than it saves. From there one process per core: the Python half of the work (rendering,
# labels, Arrow) runs on one core per process, and the Rust tokenizer's own threads are off wherever
# TOKENIZERS_PARALLELISM=false (and in datasets' worker processes): bench/scale_prepare.py.
PARALLEL_MIN_ROWS = 20_000
PARALLEL_MIN_CORES = 2
SHARD_BYTES = 500 << 20  # datasets' own largest shard when saving
HELPER_COLUMNS = ["loss_tokens", "truncated", "eos_once", "drop", "row", "per_turn"]


@dataclass
class Prepared:
    dataset: Any  # datasets.Dataset: input_ids, labels, length
    report: DataReport
    manifest: dict[str, Any]
    folder: Path
    reused: bool


def default_num_proc(rows: int) -> int:
    """Worker processes for tokenizing `rows` rows: 1 for small data or 1 core, else one per core (at most 8)."""
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
    """The prepared data for `config`: reused from the cache (or a prepared `--dataset` folder), or built.

    A cache entry is built under its lock (a second identical run waits, then reuses it); an explicit
    `output` folder is locked too, and a second writer is refused."""
    _quiet_datasets()
    if cache.is_prepared_folder(config.dataset):
        return _use_prepared_folder(config, tokenizer)
    final = output_path(output, "--output-dir") if output is not None else None
    if final is not None:
        check_output_dir(final, overwrite)
    path = template_file(config.template)
    template_text = read_template(path) if path is not None else None
    inherited = inherited_for(config)
    tokenizer_fp = cache.tokenizer_fingerprint(tokenizer)
    loaded: LoadedRows | None = None
    source_fp = source_fingerprint(config.dataset, split=config.dataset_split, revision=config.dataset_revision)
    if source_fp is None:  # a hub id: its content is known once datasets has resolved it
        loaded = _read(config)
        source_fp = loaded.fingerprint
    fields = cache.key_fields(config, tokenizer_fp, source_fp, template_text, inherited)
    job = _Job(config, tokenizer, template_text, num_proc, inherited)
    try:
        if final is None:
            return _cached(job, loaded, fields, use_cache)
        with exclusive(final, "--output-dir"):
            cache.remove_stale_builds(final)  # a killed build gives back the folder it had set aside
            check_output_dir(final, overwrite)  # again, now that no other prepare can be writing it
            loaded = loaded or _read(config)
            fields = {**fields, "source": loaded.fingerprint}  # the content parsed, whatever was hashed before
            return _build(job, loaded, fields, cache.cache_key(fields), final)
    finally:
        while _scratches:
            shutil.rmtree(_scratches.pop(), ignore_errors=True)


@dataclass
class _Job:
    config: Any
    tokenizer: Any
    template_text: str | None
    num_proc: int | None
    inherited: Any = None  # ftcli.chain.InheritedTemplate: how the run --model continues rendered
    notes: list[str] = field(default_factory=list)


def check_output_dir(final: Path, overwrite: bool) -> None:
    """Refuse an explicit `--output-dir` that cannot become a prepared folder, before anything is written."""
    if final.exists() and not final.is_dir():
        raise OutputError(f"--output-dir {final} is a file", hint="pass a folder path (it is created if missing)")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise OutputError(f"prepared-data folder {final} exists and is not empty",
                              hint="pass --overwrite to replace it, or choose another --output-dir")
        if not (final / cache.MANIFEST_NAME).is_file():
            raise OutputError(f"--output-dir {final} holds files that are not a dataset ftcli prepared "
                              f"(no {cache.MANIFEST_NAME})",
                              hint="--overwrite replaces only a folder `ftcli prepare` wrote; choose another "
                                   "--output-dir")
    check_writable(final, "--output-dir", beside=True)


def _cached(job: _Job, loaded: LoadedRows | None, fields: dict[str, Any], use_cache: bool) -> Prepared:
    """The cache entry of `fields`: a trusted, undamaged hit, or built under the entry's lock."""
    cache.sweep_cache()
    while True:
        key = cache.cache_key(fields)
        final = cache.cache_dir(key)
        hit = _cache_hit(job, final, key) if use_cache else None
        if hit is not None:
            return hit
        with exclusive(final, "prepared-data cache entry", wait=True, announce=_announce):
            hit = _cache_hit(job, final, key, quiet=True) if use_cache else None
            if hit is not None:  # built by the run we waited for
                return hit
            loaded = loaded or _read(job.config)
            if loaded.fingerprint == fields["source"]:
                return _build(job, loaded, fields, key, final)
        # The data changed after it was fingerprinted: file the rows read under their own content.
        fields = {**fields, "source": loaded.fingerprint}


def _cache_hit(job: _Job, final: Path, key: str, quiet: bool = False) -> Prepared | None:
    """The complete entry at `final`, if its manifest agrees with `key` and its files are intact."""
    manifest = cache.read_prepared_manifest(final)
    if manifest is None:
        return None
    problem = "a different key" if manifest.get("key") != key else cache.untrusted(manifest) \
        or cache.damaged(final, manifest)
    if problem is None:
        try:
            return _load(final, manifest, reused=True)
        except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types for a damaged file
            problem = f"it cannot be read ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})" \
                if str(exc).strip() else f"it cannot be read ({type(exc).__name__})"
    if not quiet:
        job.notes.append(f"cache entry {final} is damaged ({problem}): rebuilding it")
    return None


def _announce(text: str) -> None:
    console.print(f"[yellow]note:[/] {text}", soft_wrap=True)


def _read(config: Any) -> LoadedRows:
    with _status(f"reading {config.dataset}"):
        return load_rows(config.dataset, split=config.dataset_split, revision=config.dataset_revision,
                         scratch=_new_scratch)


_scratches: list[Path] = []  # folders the rows being prepared were streamed into, removed once prepared


def _new_scratch() -> Path | None:
    """A build folder in the cache for rows read in chunks, removed once prepared (a killed process's: by
    `cache.sweep_cache`); None where the cache cannot hold one."""
    try:
        folder = cache.new_build_dir(cache.cache_root() / "rows")
    except (OSError, OutputError):
        return None
    _scratches.append(folder)
    return folder


def _build(job: _Job, loaded: LoadedRows, fields: dict[str, Any], key: str, final: Path) -> Prepared:
    """Tokenize `loaded` into a build folder beside `final`, then publish it there (fsynced, one rename)."""
    config, tokenizer = job.config, job.tokenizer
    started = time.perf_counter()
    ds = loaded.dataset
    rows_read = len(ds)
    if rows_read == 0:
        raise DataError(f"dataset {config.dataset} is empty (0 rows)",
                        hint="check the file(s): blank lines and header-only CSV files hold no rows")
    renames = column_renames(config.columns, ds.column_names)
    if renames:
        ds = ds.rename_columns(renames)
    fmt = detect_format(ds.column_names, config.format, config.dataset)
    check_one_format(loaded.shapes, renames, fmt, config.dataset)
    template = resolve_template(config.template, fmt, tokenizer, model=config.model or "the model",
                                text=job.template_text, inherited=job.inherited, kwargs=config.template_kwargs)
    size = rows_read if config.dataset_size is None else min(config.dataset_size, rows_read)
    if "dataset_size" in config.model_fields_set and config.dataset_size is not None \
            and config.dataset_size > rows_read:
        job.notes.append(f"--dataset-size {config.dataset_size} > {rows_read} rows: using all rows")
    needed = [c for c in (*FORMATS[fmt][0], *FORMATS[fmt][1]) if c in ds.column_names]
    ds = ds.select_columns(needed)
    selected = ds.select(range(size)) if size < rows_read else ds
    procs = job.num_proc or default_num_proc(size)
    procs = max(1, min(procs, size // MAP_BATCH or 1))
    build, full = None, False
    try:
        build = cache.new_build_dir(final)
        kept, stats = _tokenize(job, selected, fmt, template, key, procs, build / "work", rows_read, size)
        with _status(f"writing {len(kept):,} examples"):
            # Large data is written by worker processes, a shard each, so that no process maps all of it.
            big = procs > 1 and kept.data.nbytes > SHARD_BYTES
            kept.save_to_disk(str(build / "data"), num_proc=procs if big else None)
        del kept
        seconds = time.perf_counter() - started
        manifest = _manifest(config, tokenizer, loaded, fields, key, fmt, template, stats, procs, seconds)
        manifest["data_files"] = cache.data_files(build / "data")
        cache.write_manifest(build / "data", manifest)  # last: a folder without it is never used
        cache.publish(build, final)
    except OSError as exc:
        if not _no_space(exc):
            raise
        full = True  # raised below, outside this handler: the error's frames (and the files they hold open) go
    finally:
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)
    if full:
        raise OutputError(f"no space left on the device writing the prepared dataset {final}",
                          hint="free some space, or point --output-dir (or FTCLI_HOME) elsewhere")
    prepared = _load(final, manifest, reused=False)
    prepared.report.notes[:0] = job.notes
    return prepared


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def _tokenize(job: _Job, selected: Any, fmt: str, template: TemplateSpec, key: str, procs: int, work: Path,
              rows_read: int, size: int) -> tuple[Any, dict[str, Any]]:
    """Rows -> the kept examples (shuffled with the seed, then drops left out: the reference order) and their
    statistics. Where each row is one example (all but chat templates) the rows are shuffled before tokenizing (the
    same permutation), so the tokens come out in training order and are saved as read, not gathered. Columns are
    handled as Arrow and NumPy arrays, not Python lists."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    config = job.config
    keys = {k: v for k, v in (config.columns or {}).items() if k in MESSAGE_KEYS}
    work.mkdir(parents=True, exist_ok=True)
    one_per_row = not template.is_chat
    source = selected.shuffle(seed=config.seed) if one_per_row else selected
    with _map_progress(size, procs):
        mapped = source.map(
            encode_batch, batched=True, with_indices=True, batch_size=MAP_BATCH,
            num_proc=procs if procs > 1 else None,
            remove_columns=source.column_names, cache_file_name=str(work / "map.arrow"),
            new_fingerprint=f"ftcli-{key[:24]}", desc="tokenizing",
            fn_kwargs=dict(fmt=fmt, keys=keys, template=template, tokenizer=job.tokenizer,
                           seq_length=config.seq_length, train_on_inputs=config.train_on_inputs,
                           train_reasoning=config.train_reasoning))
    rows_order = shuffled_order(source, as_array=True) if one_per_row else None  # position -> source row (NumPy)
    _raise_invalid(mapped, rows_order, config.dataset)
    shuffled = mapped if one_per_row else mapped.shuffle(seed=config.seed)  # row i is row order[i] of mapped
    order = np.arange(len(mapped)) if one_per_row else shuffled_order(shuffled, as_array=True)
    drops = mapped.data.column("drop").take(pa.array(order)) if not one_per_row else mapped.data.column("drop")
    kept_idx = np.flatnonzero(pc.equal(drops, "").to_numpy(zero_copy_only=False))
    dropped = [d for d in drops.to_pylist() if d] if len(kept_idx) < len(order) else []
    if not len(kept_idx):
        raise DataError(f"every row of {config.dataset} was dropped ({drop_summary(dropped)})",
                        hint=all_dropped_hint(dropped, config.seq_length))
    kept = shuffled.select(kept_idx) if len(kept_idx) < len(order) else shuffled
    stats = measure(mapped, order[kept_idx], dropped, rows_read, size, config.batch_size)
    per_turn = mapped.data.column("per_turn").to_numpy(zero_copy_only=False).astype(bool)
    if per_turn.any():  # only then: a template that renders prefixes stably keeps its manifest as it was
        split = mapped.data.column("row").to_numpy()[per_turn]
        stats["per_turn"] = {"conversations": int(np.unique(split).size), "examples": int(split.size)}
    return kept.remove_columns(HELPER_COLUMNS), stats


def _raise_invalid(mapped: Any, rows_order: Any, ref: str) -> None:
    """The first invalid row, in the order of the source, as one error (if there is one)."""
    import numpy as np
    import pyarrow.compute as pc

    drops = mapped.data.column("drop")
    if not pc.any(pc.starts_with(drops, INVALID)).as_py():
        return
    rows = mapped.data.column("row").to_numpy()
    rows = rows_order[rows] if rows_order is not None else rows
    in_source_order = np.argsort(rows, kind="stable")
    raise_first_invalid(drops.take(in_source_order).to_pylist(), ref, rows[in_source_order].tolist())


def _load(folder: Path, manifest: dict[str, Any], *, reused: bool) -> Prepared:
    from datasets import load_from_disk

    dataset = load_from_disk(str(folder))
    return Prepared(dataset, report_from_manifest(manifest, folder, reused), manifest, folder, reused)


def _use_prepared_folder(config: Any, tokenizer: Any) -> Prepared:
    folder = Path(config.dataset).expanduser()
    manifest = cache.check_prepared(folder, cache.read_prepared_manifest(folder), expected_options(config, tokenizer))
    problem = cache.untrusted(manifest) or cache.damaged(folder, manifest)
    hint = "prepare it again (`ftcli prepare ... --output-dir FOLDER --overwrite`)"
    if problem:
        raise DataError(f"prepared dataset {folder} is damaged: {problem}", hint=hint)
    try:
        prepared = _load(folder, manifest, reused=True)
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types for a damaged file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"prepared dataset {folder} is damaged: {type(exc).__name__}: {first}", hint=hint) from None
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
    elif (inherited := inherited_for(config)) is not None and inherited.is_chat:
        expected["template"] = inherited.name
    if config.columns:
        expected["columns"] = dict(sorted(config.columns.items()))
    for name in ("dataset_size", "seed"):
        if name in config.model_fields_set:
            expected[name] = getattr(config, name)
    return expected


def _file_identity(path: str) -> str:
    file = template_file(path)
    key = cache.template_key(path, read_template(file) if file is not None else None)
    return "file:" + key.removeprefix("file-sha256:")[:16] if key.startswith("file-sha256:") else f"file:{path}"


def template_identity(spec: TemplateSpec) -> str:
    if spec.name.startswith("file:") and spec.chat_template is not None:  # the text rendered, not a second read
        return "file:" + cache.template_key(spec.name, spec.chat_template).removeprefix("file-sha256:")[:16]
    return spec.name


def report_from_manifest(manifest: dict[str, Any], folder: Path, reused: bool) -> DataReport:
    s = manifest["stats"]
    src = manifest["source"]
    return DataReport(
        source=dataset_label(src["ref"]), source_kind=src["kind"], fingerprint=src["fingerprint"], rows_read=s["rows_read"],
        rows_selected=s["rows_selected"], rows_used=s["rows_kept"], dropped_empty_output=s["dropped"]["empty"],
        dropped_prompt_too_long=s["dropped"]["too_long"], dropped_no_response=s["dropped"]["no_response"],
        truncated=s["truncated"], tokens=s["tokens"], loss_tokens=s["loss_tokens"],
        eos_trained_once=s["eos_trained_once"], max_length=s["length"]["max"], format=manifest["format"],
        template=manifest["template"], prepared=str(folder), reused=reused, stats=s,
        sources=[dict(source) for source in manifest.get("mixture", {}).get("sources", [])])


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
