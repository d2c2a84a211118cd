"""Where training rows come from: the built-in sample, a local JSON/JSONL file, or a hub dataset.

    >>> from ftcli.data.sources import load_rows
    >>> rows = load_rows("builtin:alpaca-sample")
    >>> rows.source_kind, len(rows.dataset)
    ('builtin', 400)

Every failure is a `DataError` naming the file and line (or hub id) and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.builtin import builtin_dataset_rows, is_builtin
from ftcli.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl")


@dataclass
class LoadedRows:
    dataset: Any  # datasets.Dataset
    source_kind: str  # "builtin" | "local" | "hub"
    fingerprint: str  # changes whenever the data's content changes


def load_rows(ref: str, *, split: str = "train", revision: str | None = None) -> LoadedRows:
    from datasets import Dataset

    if is_builtin(ref):
        try:
            rows = builtin_dataset_rows(ref)
        except ValueError as exc:
            raise DataError(str(exc), hint="use builtin:alpaca-sample, a local .json/.jsonl file or a hub id") from None
        blob = json.dumps(rows, sort_keys=True).encode()
        return LoadedRows(Dataset.from_list(rows), "builtin", "sha256:" + hashlib.sha256(blob).hexdigest())
    path = Path(ref).expanduser()
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or ref.startswith((".", "/", "~")):
        rows = read_local_rows(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return LoadedRows(Dataset.from_list(rows), "local", "sha256:" + digest)
    return _load_hub(ref, split=split, revision=revision)


def read_local_rows(path: Path) -> list[dict[str, Any]]:
    """Read a .jsonl (one object per line) or .json (an array of objects) file, naming the bad line."""
    if not path.exists():
        raise DataError(f"dataset file {path} does not exist", hint="check the path given to --dataset")
    if path.is_dir():
        raise DataError(f"dataset {path} is a folder", hint="pass one .json or .jsonl file")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"dataset file {path} has an unsupported type '{path.suffix}'",
                        hint="use a .json (array of objects) or .jsonl (one object per line) file")
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", hint="fix the file at that line") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} style wrappers
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON array of objects", hint="write [{\"instruction\": ...}, ...]")
    return data


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
                            hint="fix or delete that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}",
                            hint="write one {\"instruction\": ..., \"output\": ...} object per line")
        rows.append(row)
    return rows


def _load_hub(ref: str, *, split: str, revision: str | None) -> LoadedRows:
    import datasets

    try:
        ds = datasets.load_dataset(ref, split=split, revision=revision)
    except FileNotFoundError:
        raise DataError(f"dataset {ref} is neither a local file nor a dataset in the local cache or on the hub",
                        hint="check the path or id; offline, pass a local .json/.jsonl file") from None
    except ConnectionError:
        raise DataError(f"dataset {ref} is not in the local cache and the hub is unreachable",
                        hint="pass a local .json/.jsonl file, or download it on a connected machine and set "
                             "HF_HUB_OFFLINE=1") from None
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"dataset {ref} has no split '{split}'", hint="pick one with --dataset-split") from None
        raise DataError(f"cannot load dataset {ref}: {exc}") from None
    except Exception as exc:  # the hub client raises many unrelated types; keep it to one line
        if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower():
            raise DataError(f"dataset {ref} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it",
                            hint="pass a local .json/.jsonl file, or unset HF_HUB_OFFLINE") from None
        raise DataError(f"cannot load dataset {ref}: {type(exc).__name__}: {exc}") from None
    return LoadedRows(ds, "hub", f"hub:{ref}@{revision or 'default'}:{ds._fingerprint}")
