"""Prepared-data folders: the cache key, the manifest, atomic writes, and the "does it match?" check.

    >>> from ftcli.data.cache import cache_key, cache_dir, read_prepared_manifest
    >>> folder = cache_dir(cache_key(config, tokenizer, source_fingerprint))  # <ftcli_home>/datasets/<key>
    >>> read_prepared_manifest(folder)  # None unless the folder is complete

A prepared folder holds the tokenized dataset (`datasets.save_to_disk`: columns `input_ids`,
`labels`, `length`) and `ftcli_prepared.json` (keys documented in `ftcli.data.prepare`). It is
built in a temporary folder next to its final place, the manifest is written last and the folder
is then renamed into place, so a killed `prepare` never leaves a folder that looks complete; a
folder without a complete manifest is never used.

The cache key covers everything that changes the tokens: the data's content fingerprint (file
bytes, built-in rows or hub revision), the tokenizer (vocabulary, merges, normalisation,
special tokens, chat template: not its path), format, columns, template (a Jinja file by its
content), mask options, sequence length, dataset size, seed, the `--eval-split` when one is
given (the rows it holds out are chosen from the prepared folder), the ftcli version and the
layout version below.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.errors import DataError
from ftcli.files import write_json_atomic
from ftcli.paths import ftcli_home
from ftcli.system import process_alive

MANIFEST_NAME = "ftcli_prepared.json"
LAYOUT_VERSION = 1  # bump when the prepared columns or their meaning change


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what the tokenizer does to text: its files' content, special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocabulary, merges, normaliser, pre/post-processor, added tokens
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    chat_template = getattr(tokenizer, "chat_template", None)
    state = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_id": tokenizer.eos_token_id,
        "bos_id": tokenizer.bos_token_id,
        "chat_template": chat_template if isinstance(chat_template, (str, type(None))) else
        json.dumps(chat_template, sort_keys=True),
        # How the tokenizer wraps text (BOS in front or not): behaviour, whatever the config says.
        "probe": tokenizer("Hello world", add_special_tokens=True)["input_ids"],
    }
    h.update(json.dumps(state, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def template_key(template: str) -> str:
    """`--template` for the key: the name, or a Jinja file's content hash."""
    path = Path(template).expanduser()
    if template not in ("auto", "alpaca", "model") and path.is_file():
        return "file-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return template


def key_fields(config: Any, tokenizer_fp: str, source_fp: str) -> dict[str, Any]:
    fields = {
        "layout": LAYOUT_VERSION,
        "ftcli_version": __version__,
        "source": source_fp,
        "split": config.dataset_split,
        "revision": config.dataset_revision,
        "format": config.format,
        "columns": dict(sorted((config.columns or {}).items())),
        "template": template_key(config.template),
        "train_on_inputs": config.train_on_inputs,
        "seq_length": config.seq_length,
        "dataset_size": config.dataset_size,
        "seed": config.seed,
        "tokenizer": tokenizer_fp,
    }
    # Only when asked for, so that every run without a held-out split keeps its key.
    if getattr(config, "eval_split", None) is not None:
        fields["eval_split"] = config.eval_split
    return fields


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cache_root() -> Path:
    return ftcli_home() / "datasets"


def cache_dir(key: str) -> Path:
    return cache_root() / key


def read_prepared_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepared folder, else None."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return None
    if not (Path(folder) / "dataset_info.json").is_file():
        return None
    return manifest


def is_prepared_folder(ref: str) -> bool:
    path = Path(ref).expanduser()
    return path.is_dir() and ((path / MANIFEST_NAME).exists() or (path / "state.json").exists())


def temp_dir_for(final: Path) -> Path:
    """A fresh build folder next to `final` (same filesystem, so the last rename is atomic).

    Build folders left by killed processes (their pid is gone) are removed on the way."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def remove_stale_builds(parent: Path) -> None:
    for leftover in parent.glob(".*.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if not kind.endswith((".tmp", ".work", ".old")) or not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(folder / MANIFEST_NAME, manifest)


def publish(tmp: Path, final: Path, replace: bool = False) -> Path:
    """Rename the finished build into place. If another process got there first with a complete
    folder, keep theirs (same key, same content) and drop ours."""
    if replace and final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    elif final.exists() and read_prepared_manifest(final) is None:
        # Not ours to trust and not complete: an interrupted older layout; move it out of the way.
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if read_prepared_manifest(final) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def differences(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """`name: prepared X, asked Y` for every expected value the manifest does not have."""
    out = []
    for name, want in expected.items():
        have = manifest.get("options", {}).get(name)
        if have != want:
            out.append(f"{name}: prepared {_show(have)}, asked {_show(want)}")
    return out


def _show(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]
    return json.dumps(value) if not isinstance(value, str) else value


def check_prepared(folder: Path, manifest: dict[str, Any] | None, expected: dict[str, Any]) -> dict[str, Any]:
    """Refuse a prepared folder that is incomplete or was prepared differently from what is asked."""
    if manifest is None:
        raise DataError(f"{folder} is not a complete prepared dataset (no complete {MANIFEST_NAME})",
                        hint="run `ftcli prepare` again; an interrupted prepare never produces a usable folder")
    if manifest.get("layout") != LAYOUT_VERSION:
        raise DataError(f"{folder} was prepared by ftcli {manifest.get('ftcli_version')} in an older layout",
                        hint="run `ftcli prepare` again with this ftcli")
    diffs = differences(manifest, expected)
    if diffs:
        raise DataError(f"prepared dataset {folder} does not match this run: {'; '.join(diffs)}",
                        hint="pass the same options as `ftcli prepare` did, or prepare the data again")
    return manifest
