"""Writing an export atomically: the output folder's checks, a staging folder beside it, one rename.

    >>> from ftcli.export.staging import check_export_output, staging_folder
    >>> out = check_export_output("models/lora-1", overwrite=False)
    >>> with staging_folder(out, overwrite=False) as stage:
    ...     (stage.path / "config.json").write_text("{}")
    ...     stage.commit()                     # renamed to models/lora-1 only now

A failed, interrupted (Ctrl-C, SIGTERM) or killed export leaves the output folder as it was: the
new export is written and fsynced beside it and swapped in at the end in one atomic exchange (two
renames where the filesystem has no exchange; a kill between them leaves the previous export set
aside, and the next export to that folder puts it back). One export at a time writes a folder (a
lock beside it); what a killed one left is cleaned up by the next, once its process is gone.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import OutputError
from ftcli.system import process_alive
from ftcli.targets import EXPORT_RECORD  # in every export: what `--overwrite` may replace
from ftcli.files import check_writable, fsync_dir, fsync_tree




def check_export_output(path: str | Path, overwrite: bool, protected: list[Path] = ()) -> Path:
    """Refuse a file, a non-empty folder (unless `overwrite`, and then only an earlier ftcli export), a folder
    holding the inputs, or no write access."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file", hint="pass a folder path")
    for keep in protected:
        keep = keep.expanduser().resolve()
        target = out.resolve()
        if target == keep or keep.is_relative_to(target) or target.is_relative_to(keep):
            raise OutputError(f"--output {out} overlaps the folder it exports from ({keep})",
                              hint="write the export to a folder of its own")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"--output {out} is not empty",
                              hint="pick a new folder, or pass --overwrite to replace it once the export is complete")
        if not (out / EXPORT_RECORD).is_file():
            raise OutputError(f"--output {out} is not an ftcli export (no {EXPORT_RECORD}); --overwrite replaces "
                              "only folders ftcli exported", hint="pick a new folder, or empty this one yourself")
    # The export is written next to `out` and renamed: the parent must be writable, even when `out` exists.
    check_writable(out, "--output", beside=True)
    return out


class Staging:
    """A temporary folder next to the output; `commit()` puts it in place of the output in one step."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite
        self.path = _sibling(out, "export")
        self.committed = False

    def commit(self) -> None:
        """fsync the new export, then swap it with the old one (one atomic exchange where the filesystem
        has it; else two renames, the old copy set aside under a name `recover_interrupted` knows)."""
        fsync_tree(self.path)
        if self.out.is_dir() and any(self.out.iterdir()):
            if not self.overwrite:
                raise OutputError(f"--output {self.out} was filled by something else during the export",
                                  hint="pick a new folder, or pass --overwrite")
            if _exchange(self.path, self.out):
                old = self.path  # the staging name now holds the previous export
            else:
                old = _sibling(self.out, "replaced")
                os.rename(self.out, old)
                os.rename(self.path, self.out)
        else:
            if self.out.is_dir():
                self.out.rmdir()
            os.rename(self.path, self.out)
            old = None
        fsync_dir(self.out.parent)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _exchange(new: Path, out: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if sys.platform != "linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(out), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(out))


@contextmanager
def staging_folder(out: Path, overwrite: bool) -> Iterator[Staging]:
    """Write into `.<name>.ftcli-export.<host>.<pid>.<n>` beside `out`; on any failure remove it, `out` untouched.

    Call it holding the output's lock (`exclusive(out, "--output")`), after `recover_interrupted(out)`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Staging(out, overwrite)
    stage.path.mkdir()
    try:
        yield stage
    finally:
        if not stage.committed:
            shutil.rmtree(stage.path, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.ftcli-{kind}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}"


def _stale(out: Path, kind: str) -> list[Path]:
    """This output's `kind` folders whose export process is gone from this host (oldest first)."""
    found = []
    host = socket.gethostname()
    prefix = f".{out.name}.ftcli-{kind}."
    for path in sorted(out.parent.glob(prefix + "*")):
        owner, _, pid = path.name[len(prefix):].rpartition(".")[0].rpartition(".")
        if path.is_dir() and owner == host and pid.isdigit() and not process_alive(int(pid)):
            found.append(path)
    return found


def recover_interrupted(out: Path, announce: Any = None) -> list[Path]:
    """Undo what a killed export left beside `out` (call it holding the output's lock).

    Its staging folder (never complete) is removed. A previous export it had set aside to replace is put
    back when `out` is missing (killed between its two renames), and removed only when `out` is there (the
    new export got in place). Returns the folders removed."""
    removed = []
    for path in _stale(out, "export"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for path in _stale(out, "replaced"):
        if not out.exists():
            os.rename(path, out)
            if announce is not None:
                announce(f"[yellow]note:[/] put back {out}: an export that was replacing it was stopped "
                         "between its two renames")
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
