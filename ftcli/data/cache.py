"""Prepared-data folders: the cache key, the manifest, atomic writes, and the "does it match?" check.

    >>> from ftcli.data.cache import cache_key, cache_dir, read_prepared_manifest
    >>> folder = cache_dir(cache_key(config, tokenizer, source_fingerprint))  # <ftcli_home>/datasets/<key>
    >>> read_prepared_manifest(folder)  # None unless the folder is complete

A prepared folder holds the tokenized dataset (`datasets.save_to_disk`: columns `input_ids`,
`labels`, `length`) and `ftcli_prepared.json` (keys documented in `ftcli.data.prepare`), which
records every data file's size and sha256. It is built in `.<name>.ftcli-build.<host>.<pid>.<n>/`
next to its final place (a marker file inside names the target and process), the manifest is
written last, everything is fsynced, and the folder is then renamed into place: a killed `prepare`
never leaves a folder that looks complete, and a folder without a complete manifest is never used.
Only such marked build folders of the target being written, of a process gone on this host, are
ever removed (and in the cache, ftcli's own folder, those of any entry). A cache entry is built under
its lock (`ftcli.files.exclusive`); an entry whose files no longer match their record, or whose
manifest's fingerprints disagree with its key, is rebuilt.

The cache key covers everything that changes the tokens: the data's content fingerprint (file
bytes, built-in rows or hub revision), the tokenizer (vocabulary, merges, normalisation,
special tokens, chat template: not its path), format, columns, template (a Jinja file by its
content), mask options, sequence length, dataset size, seed, the `--eval-split` when one is
given (the rows it holds out are chosen from the prepared folder), the ftcli version and the
layout version below.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.data import digests
from ftcli.errors import DataError, OutputError
from ftcli.files import LOCK_SUFFIX, exclusive, fsync_dir, fsync_tree, write_json_atomic
from ftcli.paths import ftcli_home
from ftcli.system import process_alive, utc_now

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


def template_key(template: str, text: str | None = None) -> str:
    """`--template` for the key: the name, or a Jinja file's content hash (of `text`, when it was read)."""
    path = Path(template).expanduser()
    if text is not None:
        return "file-sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    if template not in ("auto", "alpaca", "model") and path.is_file():
        return "file-sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return template


def key_fields(config: Any, tokenizer_fp: str, source_fp: str, template_text: str | None = None,
               inherited: Any = None) -> dict[str, Any]:
    fields = {
        "layout": LAYOUT_VERSION,
        "ftcli_version": __version__,
        "source": source_fp,
        "split": config.dataset_split,
        "revision": config.dataset_revision,
        "format": config.format,
        "columns": dict(sorted((config.columns or {}).items())),
        "template": template_key(config.template, template_text),
        "train_on_inputs": config.train_on_inputs,
        "seq_length": config.seq_length,
        "dataset_size": config.dataset_size,
        "seed": config.seed,
        "tokenizer": tokenizer_fp,
    }
    if getattr(config, "train_reasoning", True) is False:
        fields["train_reasoning"] = False
    if getattr(config, "template_kwargs", None):
        fields["template_kwargs"] = dict(sorted(config.template_kwargs.items()))
    if inherited is not None:  # `--template auto` continuing a run renders as that run did (ftcli.chain)
        fields["inherited_template"] = inherited.key
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


BUILD_TAG = "ftcli-build"
BUILD_MARKER = "ftcli-build.json"
_build_numbers = itertools.count()


def build_prefix(final: Path) -> str:
    return f".{final.name}.{BUILD_TAG}."


def new_build_dir(final: Path) -> Path:
    """A fresh build folder next to `final` (same filesystem, so publishing is one rename).

    Named `.<name>.ftcli-build.<host>.<pid>.<n>` with a marker inside naming its target, so that
    only ftcli's own leftovers are ever recognised (`remove_stale_builds`). Inside: `work/` (the
    tokenizer's scratch), `data/` (what becomes `final`) and, while replacing, `old/` (the old `final`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(final)
    while True:
        build = final.parent / f"{build_prefix(final)}{socket.gethostname()}.{os.getpid()}.{next(_build_numbers)}"
        try:
            build.mkdir()
            break
        except FileExistsError:
            continue
    try:
        write_json_atomic(build / BUILD_MARKER, {"target": str(final.absolute()), "host": socket.gethostname(),
                                                 "pid": os.getpid(), "created_at": utc_now()})
    except BaseException:  # a full disk, a signal: the caller never learns the folder's name, so remove it here
        shutil.rmtree(build, ignore_errors=True)
        raise
    return build


def remove_stale_builds(final: Path) -> list[Path]:
    """Remove the build folders of `final` whose process is gone (this host only, marker checked).

    A build killed between setting the old `final` aside and putting the new one in place gives the
    old one back first. Nothing else in the parent folder is looked at."""
    removed = []
    prefix = build_prefix(final)
    for build in final.parent.glob(glob.escape(prefix) + "*"):
        host, _, rest = build.name[len(prefix):].rpartition(".")[0].rpartition(".")
        if build.is_symlink() or not build.is_dir() or host != socket.gethostname() or not rest.isdigit() \
                or process_alive(int(rest)) or not _marked_for(build, final, int(rest)):
            continue
        old = build / "old"
        if old.is_dir() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(build, ignore_errors=True)
        removed.append(build)
    return removed


def sweep_cache() -> None:
    """Remove what killed prepares left in the cache (ftcli's own folder): their marked build folders and
    lock files, each entry's under its lock, skipping any entry another live process holds."""
    root = cache_root()
    if not root.is_dir():
        return
    names = {p.name[1:].split(f".{BUILD_TAG}.")[0] for p in root.glob(f".*.{BUILD_TAG}.*")}
    names |= {p.name[1:-len(LOCK_SUFFIX)] for p in root.glob(f".*{LOCK_SUFFIX}")}
    for name in sorted(n for n in names if n):
        try:
            with exclusive(root / name, "prepared-data cache entry"):
                remove_stale_builds(root / name)
        except OutputError:
            continue  # in use: its holder is alive and cleans up after itself


def _marked_for(build: Path, final: Path, pid: int) -> bool:
    try:
        marker = json.loads((build / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("target") == str(final.absolute()) and marker.get("pid") == pid


def data_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256, mtime_ns, ctime_ns, inode, sample}} of every file of a prepared folder but its
    manifest: what `damaged` checks. The files are flushed (and given their final mode) first, so that what is
    recorded is what the published folder holds."""
    fsync_tree(Path(folder))
    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        before = path.stat()
        sha256 = digests.full_digest(path)
        record = digests.record_for(path, sha256, before, racy_check=False) or {"size": before.st_size,
                                                                                 "sha256": sha256}
        out[str(path.relative_to(folder))] = {"size": record.pop("size"), "sha256": record.pop("sha256"), **record}
    return out


def damaged(folder: Path, manifest: dict[str, Any]) -> str | None:
    """`FILE: why` for the first data file that is missing or differs from the manifest's record, else None.

    A file whose size, times, inode and sampled content are those recorded at build time is not hashed again
    (`ftcli.data.digests`): a write changes its ctime, a copy its inode; anything else is hashed in full."""
    recorded = manifest.get("data_files")
    if not isinstance(recorded, dict):
        return None  # written before files were recorded: only a failed load tells
    for name, want in recorded.items():
        path = Path(folder) / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path}: missing"
        if not isinstance(want, dict) or size != want.get("size"):
            return f"{path}: {size} bytes, {want.get('size') if isinstance(want, dict) else '?'} when prepared"
    for name, want in recorded.items():
        path = Path(folder) / name
        if digests.still_valid(path, want):
            continue
        try:
            actual = digests.full_digest(path)
        except OSError:
            return f"{path}: unreadable"
        if actual != want.get("sha256"):
            return f"{path}: its content changed since it was prepared (checksum differs)"
    return None


def untrusted(manifest: dict[str, Any]) -> str | None:
    """Why a manifest's key does not follow from what it records (an entry filed under other content), or None."""
    fields = manifest.get("key_fields")
    if not isinstance(fields, dict) or cache_key(fields) != manifest.get("key"):
        return "its key does not match the options it records"
    source = manifest.get("source")
    if not isinstance(source, dict) or source.get("fingerprint") != fields.get("source"):
        return "its data fingerprint does not match its key's"
    return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(folder / MANIFEST_NAME, manifest, durable=True)


def publish(build: Path, final: Path) -> Path:
    """Put the finished `build/data` in place of `final`, both flushed to disk first (fsync).

    An existing `final` is set aside in `build/old` (removed with the build folder, or given back by
    `remove_stale_builds` if this process dies between the two renames)."""
    data, old = build / "data", build / "old"
    fsync_tree(data)
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(data, final)
    except BaseException:  # an error or a signal between the two renames: the old folder goes back
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
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
