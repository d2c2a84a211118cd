"""Data mixtures: several `--dataset SOURCE[:WEIGHT]`, each prepared on its own, mixed in proportion.

    $ ftcli train ... --dataset alpaca.jsonl --dataset chat.jsonl:0.25     # 80% / 20% of the examples

    >>> from ftcli.data.mixture import prepare_data
    >>> prepared = prepare_data(config, tokenizer)     # one source: ftcli.data.prepare.prepare_dataset itself

What a mixture is:

- Each source is prepared exactly as it would be alone (`ftcli.data.prepare`, its own cache entry
  with its own key, every row of it): its own detected format, rendered by the template `--template`
  resolves for that format (`auto`: the Alpaca template for Alpaca data, the model's chat template
  for chat data). `--format`, `--columns`, `--template`, `--seq-length` and `--train-on-inputs`
  apply to every source. Changing a weight or `--dataset-size` re-uses every source's entry.
- The weights (1 when not given) are the mixture's proportions: source i contributes
  `round(weight_i / sum(weights) * N)` of the N examples (largest remainders, so the counts add
  up to N), taken from the start of its prepared examples (already shuffled with `--seed`).
- N, the mixture's size, is `--dataset-size` when given, else the largest that needs no source
  repeated (the source with the fewest examples for its share decides). No example is ever
  repeated: a `--dataset-size` that would need more examples of a source than it has is refused,
  naming the source and the largest size that fits.
- The N examples are then shuffled together with `--seed`, so the mixture is deterministic from
  the seed. `--eval-split` holds its rows out of the whole mixture (as of one source's data).
- The mixture's data fingerprint (the resume identity) covers each source's content fingerprint,
  format, template, share (weight / sum of the weights: `a:3 b:1` and `a:6 b:2` are one mixture)
  and count, and the seed. The mixed examples are a prepared folder
  (in the cache under a key of the sources' keys, their shares, `--dataset-size` and the seed, or
  `prepare --output-dir`), whose manifest has the usual keys (`format`/`template`: the sources'
  joined with `+`) and `mixture`: `sources` ({ref, weight, share, format, template, fingerprint,
  rows_read, rows_available (prepared examples), rows_used, tokens, loss_tokens, prepared, key}),
  `size`, `seed`. `--dataset FOLDER` trains on it like on any prepared folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.data import cache
from ftcli.data.prepare import (
    Prepared,
    _announce,
    _load,
    _no_space,
    check_output_dir,
    prepare_dataset,
)
from ftcli.data.specs import dataset_label, mixture_specs, split_weight
from ftcli.data.split import count_tokens
from ftcli.data.stats import measure
from ftcli.errors import DataError, OutputError
from ftcli.files import exclusive, output_path
from ftcli.system import utc_now


def prepare_data(config: Any, tokenizer: Any, *, output: str | Path | None = None, overwrite: bool = False,
                 num_proc: int | None = None, use_cache: bool = True) -> Prepared:
    """`prepare_dataset` for one source, `prepare_mixture` for several; another shape's own module for an objective
    that trains on other rows (ftcli.data.SHAPES: preference pairs, ...)."""
    from ftcli.data.shapes import shape_module, shape_of

    if shape_of(config) != "examples":
        return shape_module(config).prepare(config, tokenizer, output=output, overwrite=overwrite, num_proc=num_proc,
                                            use_cache=use_cache)
    for spec in [config.dataset] if isinstance(config.dataset, str) else config.dataset:
        _check_not_a_weight(spec)
    if mixture_specs(config.dataset) is None:
        return prepare_dataset(config, tokenizer, output=output, overwrite=overwrite, num_proc=num_proc,
                               use_cache=use_cache)
    return prepare_mixture(config, tokenizer, output=output, overwrite=overwrite, num_proc=num_proc,
                           use_cache=use_cache)


def _check_not_a_weight(spec: str) -> None:
    """`a.jsonl:abc` where a.jsonl exists: say that the text after the colon is read as a name, not a weight."""
    head, sep, tail = spec.rpartition(":")
    if split_weight(spec)[1] is not None or not sep or not head or spec.startswith("builtin:"):
        return
    if not Path(spec).expanduser().exists() and Path(head).expanduser().exists():
        raise DataError(f"dataset {spec} does not exist: '{tail}' is not a number, so it is part of the name, not "
                        f"a weight", hint=f"write the weight as a number above 0, e.g. --dataset {head}:0.5")


@dataclass
class _Part:
    ref: str
    weight: float
    prepared: Prepared
    count: int = 0
    share: Fraction = Fraction(0)  # weight / the sum of the weights: 3:1 and 6:2 are the same mixture


def source_config(config: Any, ref: str) -> Any:
    """The config that prepares one source of a mixture alone: every row of it, no eval split."""
    sub = config.model_copy(update={"dataset": ref, "dataset_size": None, "eval_split": None, "eval_dataset": None})
    sub.__pydantic_fields_set__.discard("dataset_size")
    return sub


def prepare_mixture(config: Any, tokenizer: Any, *, output: str | Path | None = None, overwrite: bool = False,
                    num_proc: int | None = None, use_cache: bool = True) -> Prepared:
    """Prepare each source (cached on its own), then the mixed examples (cached, or in `output`)."""
    specs = mixture_specs(config.dataset) or []
    final = output_path(output, "--output-dir") if output is not None else None
    if final is not None:
        check_output_dir(final, overwrite)
    for ref, _ in specs:
        if cache.is_prepared_folder(ref):
            raise DataError(f"--dataset {ref} is a prepared folder, which cannot be part of a mixture",
                            hint="mix the raw sources (each is prepared and cached on its own), or train on "
                                 "the prepared folder alone")
    parts = [_Part(ref, weight, prepare_dataset(source_config(config, ref), tokenizer, num_proc=num_proc,
                                                use_cache=use_cache)) for ref, weight in specs]
    notes = allocate(parts, config.dataset_size)
    fingerprint = mixture_fingerprint(parts, config.seed)
    fields = {"layout": cache.LAYOUT_VERSION, "ftcli_version": __version__, "source": fingerprint,
              "mixture": [{"key": p.prepared.manifest["key"], "share": str(p.share)} for p in parts],
              "dataset_size": config.dataset_size, "seed": config.seed,
              "tokenizer": parts[0].prepared.manifest["key_fields"]["tokenizer"]}
    key = cache.cache_key(fields)
    if final is None:
        final = cache.cache_dir(key)
        with exclusive(final, "prepared-data cache entry", wait=True, announce=_announce):
            hit = _hit(final, key) if use_cache else None
            prepared = hit or _build(config, tokenizer, parts, fields, key, final)
    else:
        with exclusive(final, "--output-dir"):
            cache.remove_stale_builds(final)  # a killed build gives back the folder it had set aside
            check_output_dir(final, overwrite)  # again, now that no other prepare can be writing it
            prepared = _build(config, tokenizer, parts, fields, key, final)
    # A cache hit was recorded by whoever built it: the sources as this run names them, and where they are now.
    prepared.report.source = dataset_label(config.dataset)
    for source, part in zip(prepared.report.sources, parts):
        source.update(ref=part.ref, prepared=str(part.prepared.folder), reused=part.prepared.reused)
    prepared.report.notes[:0] = [n for p in parts for n in p.prepared.report.notes] + notes
    return prepared


def allocate(parts: list[_Part], size: int | None) -> list[str]:
    """Set each part's count: its share of the mixture's size (see the module doc); notes for the user."""
    weights = [Fraction(str(p.weight)) for p in parts]
    shares = [w / sum(weights) for w in weights]
    available = [len(p.prepared.dataset) for p in parts]
    largest = min(int(a / s) for a, s in zip(available, shares))
    total = largest if size is None else size
    exact = [s * total for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    for part, count, have, share in zip(parts, counts, available, shares):
        part.share = share
        if count > have:
            raise DataError(f"--dataset-size {size}: the mixture needs {count:,} examples of {part.ref} "
                            f"({float(share):.1%} of {size:,}), which has {have:,} once prepared; no example "
                            f"is repeated", hint=f"use --dataset-size {largest} or less (the largest that "
                                                 f"repeats no source), or give {part.ref} a lower weight")
        part.count = count
    return [f"{p.ref} contributes no example to a mixture of {total:,} (weight {p.weight:g})"
            for p in parts if p.count == 0]


def mixture_fingerprint(parts: list[_Part], seed: int) -> str:
    """What the mixed examples are made of: each source's content, format, template, share and count."""
    record = {"sources": [{"fingerprint": p.prepared.report.fingerprint, "format": p.prepared.manifest["format"],
                           "template": p.prepared.manifest["template"], "share": str(p.share), "rows": p.count}
                          for p in parts], "seed": seed}
    return "sha256:" + hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _hit(final: Path, key: str) -> Prepared | None:
    manifest = cache.read_prepared_manifest(final)
    if manifest is None or manifest.get("key") != key or cache.untrusted(manifest) or cache.damaged(final, manifest):
        return None
    try:
        return _load(final, manifest, reused=True)
    except Exception:  # noqa: BLE001 - datasets/pyarrow raise many types for a damaged file: rebuild it
        return None


def mix(parts: list[_Part], seed: int) -> Any:
    """The first `count` examples of each part, shuffled together with `seed`."""
    import numpy as np
    from datasets import concatenate_datasets

    pieces = [p.prepared.dataset.select(range(p.count)) for p in parts if p.count]
    mixed = concatenate_datasets(pieces)
    return mixed.select(np.random.default_rng(int(seed)).permutation(len(mixed)).tolist())


def _build(config: Any, tokenizer: Any, parts: list[_Part], fields: dict[str, Any], key: str, final: Path) -> Prepared:
    started = time.perf_counter()
    mixed = mix(parts, config.seed)
    build, full = None, False
    try:
        build = cache.new_build_dir(final)
        mixed.save_to_disk(str(build / "data"))
        manifest = _manifest(config, parts, fields, key, mixed, time.perf_counter() - started, tokenizer.eos_token_id)
        manifest["data_files"] = cache.data_files(build / "data")
        cache.write_manifest(build / "data", manifest)  # last: a folder without it is never used
        cache.publish(build, final)
    except OSError as exc:
        if not _no_space(exc):
            raise
        full = True
    finally:
        if build is not None:
            shutil.rmtree(build, ignore_errors=True)
    if full:
        raise OutputError(f"no space left on the device writing the prepared mixture {final}",
                          hint="free some space, or point --output-dir (or FTCLI_HOME) elsewhere")
    return _load(final, manifest, reused=False)


def _joined(values: list[str]) -> str:
    return "+".join(dict.fromkeys(values))


def _manifest(config: Any, parts: list[_Part], fields: dict[str, Any], key: str, mixed: Any,
              seconds: float, eos_id: int) -> dict[str, Any]:
    first = parts[0].prepared.manifest
    manifests = [p.prepared.manifest for p in parts]
    fmt, template = _joined([m["format"] for m in manifests]), _joined([m["template"] for m in manifests])
    stats = mixture_stats(mixed, parts, config, eos_id)
    return {
        "layout": cache.LAYOUT_VERSION, "complete": True, "ftcli_version": __version__, "created_at": utc_now(),
        "key": key, "key_fields": fields,
        "options": {**first["options"], "format": fmt, "template": template, "dataset_size": config.dataset_size,
                    "seed": config.seed},
        "source": {"ref": list(config.dataset), "kind": "mixture", "fingerprint": fields["source"],
                   "files": [f for m in manifests for f in (m["source"].get("files") or [])],
                   "split": config.dataset_split, "revision": config.dataset_revision},
        "format": fmt, "template": template,
        "template_digest": _joined([m["template_digest"] or "" for m in manifests]),
        "tokenizer": first["tokenizer"],
        "stats": stats,
        "columns": ["input_ids", "labels", "length"],
        "build": {"num_proc": 1, "seconds": round(seconds, 3),
                  "tokens_per_second": round(stats["tokens"] / max(seconds, 1e-9), 1)},
        "mixture": {"size": len(mixed), "seed": config.seed, "sources": [_source_record(p) for p in parts]},
    }


def _source_record(part: _Part) -> dict[str, Any]:
    m = part.prepared.manifest
    tokens, loss_tokens = count_tokens(part.prepared.dataset.select(range(part.count))) if part.count else (0, 0)
    return {"ref": part.ref, "weight": part.weight, "share": round(float(part.share), 6), "format": m["format"],
            "template": m["template"], "fingerprint": m["source"]["fingerprint"], "rows_read": m["stats"]["rows_read"],
            "rows_available": len(part.prepared.dataset), "rows_used": part.count, "tokens": tokens,
            "loss_tokens": loss_tokens, "prepared": str(part.prepared.folder), "key": m["key"]}


def mixture_stats(mixed: Any, parts: list[_Part], config: Any, eos_id: int) -> dict[str, Any]:
    """The manifest's `stats` of the mixed examples; `dropped`, `rows_read`/`rows_selected` are the sources' sums.

    `truncated`: examples cut at --seq-length (that long, without their final EOS)."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import Dataset

    table = mixed.with_format("arrow")[:]
    n = table.num_rows
    labels, ids = table["labels"], table["input_ids"]
    flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
    loss = np.bincount(parents, weights=flat != -100, minlength=n).astype(np.int64)
    eos_once = np.bincount(parents, weights=flat == eos_id, minlength=n) == 1
    lengths = np.asarray(table["length"].to_numpy(zero_copy_only=False), dtype=np.int64)
    flat_ids = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
    last = flat_ids[np.cumsum(lengths) - 1] if n else np.array([], dtype=np.int64)
    truncated = (lengths >= config.seq_length) & (last != eos_id)
    measured = Dataset.from_dict({"length": lengths, "loss_tokens": loss, "truncated": truncated,
                                  "eos_once": eos_once})
    subs = [p.prepared.manifest["stats"] for p in parts]
    stats = measure(measured, list(range(n)), [], sum(s["rows_read"] for s in subs),
                    sum(s["rows_selected"] for s in subs), config.batch_size)
    stats["dropped"] = {k: sum(s["dropped"][k] for s in subs) for k in ("empty", "too_long", "no_response")}
    return stats

