"""Writing files so that a reader never sees half of one, and reading back the JSON ftcli wrote.

    >>> from ftcli.files import write_atomic, write_json_atomic, read_json_object
    >>> write_json_atomic(Path("runs/a/ftcli_run.json"), manifest)             # old file or new, never half
    >>> write_atomic(folder / "ftcli_checkpoint.json", text, durable=True)     # and on disk before it counts

Every atomic write in ftcli goes through `write_atomic`: a temporary file next to the target,
renamed over it. `durable=True` also flushes the file and its folder to disk (fsync) around the
rename, for files whose presence means "complete" (checkpoint markers).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, durable: bool = False) -> None:
    """Write `data` to `path` through a temporary sibling and one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any], durable: bool = False) -> None:
    """JSON (indented, one trailing newline) written with `write_atomic`."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", durable=durable)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> dict[str, int]:
    """fsync every file under `folder` and the folders themselves; return {relative name: size}."""
    files: dict[str, int] = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(path.relative_to(folder))] = path.stat().st_size
        fsync_dir(Path(root))
    return files


def read_json_object(path: Path, hint: str) -> dict[str, Any]:
    """A JSON object ftcli wrote (manifest, adapter config, marker): a ModelError naming the file if damaged."""
    from ftcli.errors import ModelError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", hint=hint) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object", hint=hint)
    return data
