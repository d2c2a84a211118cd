"""Writing an export atomically: the output folder's checks, a staging folder beside it, one rename.

    >>> from ftcli.export.staging import check_export_output, staging_folder
    >>> out = check_export_output("models/lora-1", overwrite=False)
    >>> with staging_folder(out, overwrite=False) as stage:
    ...     (stage.path / "config.json").write_text("{}")
    ...     stage.commit()                     # renamed to models/lora-1 only now

A failed, interrupted (Ctrl-C, SIGTERM) or killed export leaves no output folder; the staging
folder of a killed export is removed by the next export to the same folder, once its process is
gone from this host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import OutputError
from ftcli.system import process_alive
from ftcli.files import check_writable


def check_export_output(path: str | Path, overwrite: bool, protected: list[Path] = ()) -> Path:
    """Refuse a file, a non-empty folder (unless `overwrite`), a folder holding the inputs, or no write access."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file", hint="pass a folder path")
    for keep in protected:
        keep = keep.expanduser().resolve()
        target = out.resolve()
        if target == keep or keep.is_relative_to(target) or target.is_relative_to(keep):
            raise OutputError(f"--output {out} overlaps the folder it exports from ({keep})",
                              hint="write the export to a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--output {out} is not empty",
                          hint="pick a new folder, or pass --overwrite to replace it once the export is complete")
    # The export is written next to `out` and renamed: the parent must be writable, even when `out` exists.
    check_writable(out, "--output", beside=True)
    return out


class Staging:
    """A temporary folder next to the output; `commit()` renames it into place."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite
        self.path = _sibling(out, "export")
        self.committed = False

    def commit(self) -> None:
        old = None
        if self.out.is_dir() and any(self.out.iterdir()):
            if not self.overwrite:
                raise OutputError(f"--output {self.out} was filled by something else during the export",
                                  hint="pick a new folder, or pass --overwrite")
            old = _sibling(self.out, "replaced")
            os.rename(self.out, old)
        elif self.out.is_dir():
            self.out.rmdir()
        os.rename(self.path, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_folder(out: Path, overwrite: bool) -> Iterator[Staging]:
    """Write into `.<name>.ftcli-export.<host>.<pid>.<n>` beside `out`; on any failure remove it, `out` untouched.

    Folders left by exports that were killed (their process no longer runs on this host) are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    stage = Staging(out, overwrite)
    stage.path.mkdir()
    try:
        yield stage
    finally:
        if not stage.committed:
            shutil.rmtree(stage.path, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.ftcli-{kind}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}"


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove this output's temporary folders whose export process is gone; others' are left alone."""
    removed = []
    host = socket.gethostname()
    for kind in ("export", "replaced"):
        prefix = f".{out.name}.ftcli-{kind}."
        for path in out.parent.glob(prefix + "*"):
            owner, _, rest = path.name[len(prefix):].rpartition(".")[0].rpartition(".")
            if not path.is_dir() or owner != host or not rest.isdigit() or process_alive(int(rest)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the export like Ctrl-C does: the temporary folder is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
