"""File digests computed once: a file's sha256 is reused while the file is provably the one that was hashed.

    >>> from ftcli.data.digests import file_sha256
    >>> file_sha256(Path("data.jsonl"))       # hashed in full the first time, then reused while unchanged
    '5f2c...'

What is trusted: a full sha256 of the file, taken once, is reused as long as the file's size, modification time
(`mtime_ns`), status-change time (`ctime_ns`) and inode are those recorded with it and a sample of its content (16
blocks of 4 KiB spread over the file, the first and last included) hashes the same. Every write to a file moves its
ctime to now, and so does setting its mtime back (`touch -d`, `os.utime`): no program sets a ctime back, so an edit
that keeps the size and the mtime is still seen. The sample also catches damage that bypasses the file system (a
disk's bit rot, a raw block copy) when it falls in a sampled block. A record is only kept when the file's last
change is more than 2 seconds older than the hash (a file still being written within the file system's timestamp
granularity would otherwise look unchanged), and anything unreadable is simply hashed again.

Records of data files live in `<FTCLI_HOME>/file-digests/` (one small JSON per file path, best effort: a home that
cannot be written only means hashing again); records of a prepared folder's own files live in its manifest
(`ftcli.data.cache.data_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ftcli.files import file_sha256 as full_digest  # the whole file, read in blocks

SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 4096
RACY_NS = 2_000_000_000  # a change this recent may share its timestamp with a later one
IDENTITY = ("size", "mtime_ns", "ctime_ns", "inode")


def identity(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def sample_digest(path: Path, size: int) -> str:
    """sha256 of SAMPLE_BLOCKS blocks spread evenly over the file (the whole file when it is small)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            h.update(fh.read())
        else:
            step = (size - SAMPLE_BLOCK) / (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                fh.seek(int(i * step))
                h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()


def record_for(path: Path, sha256: str, before: os.stat_result, racy_check: bool = True) -> dict[str, Any] | None:
    """What to keep about `path`, hashed to `sha256` while its status was `before`: None when the file changed
    meanwhile, or (with `racy_check`) changed too recently for its timestamps to tell a later change apart."""
    try:
        after = path.stat()
    except OSError:
        return None
    if identity(after) != identity(before):
        return None
    if racy_check and time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) < RACY_NS:
        return None
    try:
        return {**identity(after), "sample": sample_digest(path, after.st_size), "sha256": sha256}
    except OSError:
        return None


def still_valid(path: Path, record: Any) -> bool:
    """Whether `path` is still the file `record` describes (identity and sampled content)."""
    if not isinstance(record, dict) or any(not isinstance(record.get(k), int) for k in IDENTITY):
        return False
    try:
        st = path.stat()
        return identity(st) == {k: record[k] for k in IDENTITY} and sample_digest(path, st.st_size) == record.get("sample")
    except OSError:
        return False


def _index_file(path: Path) -> Path | None:
    from ftcli.paths import ftcli_home

    try:
        home = ftcli_home()
    except Exception:  # noqa: BLE001 - an unusable home: hash again, say nothing here
        return None
    name = hashlib.sha256(str(path.absolute()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return home / "file-digests" / f"{name}.json"


def known_sha256(path: Path) -> str | None:
    """The recorded sha256 of data file `path`, if its record still holds."""
    index = _index_file(path)
    if index is None:
        return None
    try:
        record = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("path") != str(path.absolute()) or not still_valid(path, record):
        return None
    digest = record.get("sha256")
    return digest if isinstance(digest, str) else None


def remember(path: Path, sha256: str, before: os.stat_result) -> None:
    """Keep `sha256` as the digest of data file `path` (hashed while its status was `before`), best effort."""
    record = record_for(path, sha256, before)
    index = _index_file(path)
    if record is None or index is None:
        return
    from ftcli.files import write_json_atomic

    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(index, {"path": str(path.absolute()), **record})
    except OSError:
        pass


def file_sha256(path: Path) -> str:
    """sha256 of data file `path`: the recorded one while the file is unchanged, else hashed (and recorded)."""
    known = known_sha256(path)
    if known is not None:
        return known
    before = path.stat()
    digest = full_digest(path)
    remember(path, digest, before)
    return digest
