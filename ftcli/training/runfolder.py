"""The run folder: what `ftcli train` leaves behind, and the rules for writing it.

    >>> from ftcli.training.runfolder import check_output_dir
    >>> out = check_output_dir("runs/lora-1", overwrite=False)   # refuses a non-empty folder
    >>> out = check_output_dir("runs/lora-1", overwrite=False, resume=True)   # accepts a run folder

Layout: the trained model or adapter and its tokenizer at the top (so `from_pretrained(folder)`
works), `ftcli_run.json` (the manifest: config, versions, data fingerprint, timings, metrics,
status), `ftcli_config.yaml` (the resolved config, reusable with `--config`), `metrics.jsonl`
(one line per logging step), `probe.safetensors` (logits of the final model on a fixed input),
`logs/` (TensorBoard events) unless `--log-dir` points elsewhere, and `checkpoint-N/` folders
(see ftcli.training.checkpoints) when checkpoints are saved.

Rules: one writer per run folder (`claim_run_dir` holds `.NAME.ftcli-lock` beside it for the whole run, so
a second `train` into it refuses, naming the holder; a killed holder's lock is simply taken over);
an --output-dir that is a symbolic link stands for the folder it points to (the link is never moved or removed);
`--overwrite` replaces only a folder holding an ftcli manifest, by renaming it aside to
`.NAME.ftcli-replaced.HOST.PID.N` and removing that once the new run's manifest is written (a copy left
by a killed run is put back, or finished off, by the next run into NAME); the manifest records the host
and pid, so `inspect` can tell a `running` record whose process is gone ("stopped").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import OutputError
from ftcli.files import Held, check_writable, exclusive, followed, lock_path, output_path, shared_lock

MANIFEST = "ftcli_run.json"
CONFIG_COPY = "ftcli_config.yaml"
METRICS = "metrics.jsonl"
PROBE = "probe.safetensors"
# The hidden sibling an --overwrite sets the old run folder aside as: `.NAME.ftcli-replaced.HOST.PID.N`.
REPLACED = ".ftcli-replaced."
# Set by ftcli's own launcher for its ranks: it holds the run folder's lock for them (path of the folder).
LOCK_HELD_ENV = "FTCLI_RUN_LOCK_HELD"


def default_output_dir(method: str) -> Path:
    return (Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()


def check_output_dir(path: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Refuse a file, or a non-empty folder unless `overwrite` (an ftcli run folder only) or `resume`;
    never create anything here.

    With `resume` a non-empty folder is accepted when it is an ftcli run folder (its manifest is there):
    whether its checkpoint fits this run is checked once the data is loaded (ftcli.training.checkpoints)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file", hint="pass a folder path")
    if out.is_dir() and any(out.iterdir()):
        is_run = (out / MANIFEST).is_file()
        if overwrite and not is_run:
            raise OutputError(f"--output-dir {out} is not an ftcli run folder (no {MANIFEST}): --overwrite "
                              "replaces only a run folder ftcli wrote", hint="pick a new or empty folder")
        if not overwrite and not (resume and is_run):
            if resume:
                raise OutputError(f"--output-dir {out} is not empty and is not an ftcli run folder (no {MANIFEST})",
                                  hint="resume into the run's own folder or an empty one, or pass --overwrite")
            raise OutputError(f"--output-dir {out} is not empty", hint=_non_empty_hint(out))
    check_writable(out, "--output-dir")
    return out


def check_log_dir(log_dir: str | None) -> None:
    """A --log-dir that is a file, or that cannot be written, is refused before anything is created."""
    path = output_path(log_dir, "--log-dir")
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise OutputError(f"--log-dir {path} is a file", hint="pass a folder path, or leave --log-dir out")
    check_writable(path, "--log-dir")


def _non_empty_hint(out: Path) -> str:
    """What the folder holds decides the advice: a finished run is exported or replaced, an unfinished one resumed."""
    from ftcli.training.checkpoints import latest_checkpoint

    try:
        status = read_manifest(out).get("status") if (out / MANIFEST).is_file() else None
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "finished":
        return (f"it holds a finished run: use it (`ftcli export {out} --output DIR`, or --model {out} to train on "
                "from it), pick a new folder, or pass --overwrite to replace it")
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        state = f"an unfinished run ({status})" if status else "a run"
        return (f"it holds {state} with a complete checkpoint ({checkpoint.name}): pass --resume to continue it, "
                "pick a new folder, or pass --overwrite to replace its contents")
    return "pick a new folder, or pass --overwrite to replace its contents"


@contextmanager
def claim_run_dir(output_dir: str | None, method: str, overwrite: bool, resume: bool,
                  lock: bool = True, shared: bool = False) -> Iterator[Path]:
    """The run folder, locked for the block (one writer per folder) and checked under that lock.

    Without `output_dir`: `runs/<method>-<time>`, or `-2`, `-3`... when that one is taken or in use, chosen
    under its lock so that two runs started in the same second never share one. Without `lock` (ranks other
    than 0 under another launcher) the folder is only named. With `shared` (ftcli's launcher) the lock is turned
    shared once checked, and its ranks join it (`join_run_lock`): the folder stays locked while any of them lives.
    Parent folders created for the lock are removed again when the run never created its folder."""
    given = output_path(output_dir, "--output-dir")  # "" (an unset $OUT) would mean the current folder
    out = followed(given) if given is not None else None  # a symlinked run folder: the folder it points to
    if not lock:
        yield out or default_output_dir(method)
        return
    missing = _missing_ancestors(out or default_output_dir(method))
    try:
        with ExitStack() as stack:
            out, held = _lock_default(stack, method) if out is None else (out, None)
            if given is not None:
                held = stack.enter_context(exclusive(out, "--output-dir"))
            _recover_replaced(out)
            check_output_dir(out, overwrite, resume=resume)
            if shared:
                held.share()
            yield out
    finally:
        for folder in missing:
            try:
                folder.rmdir()  # only an empty folder this run created for its lock
            except OSError:
                break


def join_run_lock(out: Path) -> Any:
    """A rank of ftcli's launcher joins the launcher's shared lock of the run folder, for the rank's life."""
    return shared_lock(out, "--output-dir")


def _missing_ancestors(out: Path) -> list[Path]:
    missing, parent = [], out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _lock_default(stack: ExitStack, method: str) -> tuple[Path, Held]:
    base = default_output_dir(method)
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            held = stack.enter_context(ExitStack())
            lock = held.enter_context(exclusive(candidate, "--output-dir"))
        except OutputError:
            continue
        if not candidate.exists():
            return candidate, lock
        held.close()
    raise OutputError(f"no free run folder name next to {base}", hint="pass --output-dir")


def replaced_name(out: Path, n: int) -> Path:
    return out.with_name(f".{out.name}{REPLACED}{socket.gethostname()}.{os.getpid()}.{n}")


def _recover_replaced(out: Path) -> None:
    """An --overwrite killed between setting the old run aside and removing it (this host, process gone):
    put the old run back when no new one took its place, else finish removing it."""
    from ftcli.system import process_alive

    pattern = re.compile(rf"\.{re.escape(out.name)}{re.escape(REPLACED)}{re.escape(socket.gethostname())}"
                         rf"\.(\d+)\.\d+")
    if not out.parent.is_dir():
        return
    for leftover in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(leftover.name)
        if not match or leftover.is_symlink() or process_alive(int(match.group(1))) \
                or not (leftover / MANIFEST).is_file():
            continue  # a link set aside by an older ftcli is left for its owner; removing it is not ours to do
        if not put_back(out, leftover) and (out / MANIFEST).is_file():
            shutil.rmtree(leftover)  # a new run recorded itself in its place: finish what that --overwrite began


def put_back(out: Path, aside: Path | None) -> bool:
    """Rename a set-aside run back to `out` when no new run recorded itself there (absent, or left empty)."""
    if aside is None or not aside.is_dir():
        return False
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        return False
    aside.rename(out)
    return True


def create_run_dir(out: Path, overwrite: bool) -> Path | None:
    """Create the run folder (only called once loading succeeded). With `overwrite`, an existing run folder is
    first renamed aside to a hidden sibling; the new folder takes its name; the caller removes the old one
    (`remove_replaced`) once the new run folder holds its manifest. Returns the set-aside folder, if any."""
    aside = None
    if overwrite and out.is_dir() and (out / MANIFEST).is_file():
        n = 1
        while replaced_name(out, n).exists():
            n += 1
        aside = replaced_name(out, n)
        out.rename(aside)
    out.mkdir(parents=True, exist_ok=True)
    return aside


def remove_replaced(aside: Path | None) -> None:
    if aside is not None and aside.is_dir() and REPLACED in aside.name:
        shutil.rmtree(aside, ignore_errors=True)


def lock_is_free(folder: Path) -> bool:
    """Whether no live process holds the run folder's lock (a killed holder's lock file does not count)."""
    import fcntl

    try:
        fd = os.open(lock_path(folder), os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def run_state(folder: Path, manifest: dict[str, Any]) -> str | None:
    """For a manifest that says `running`: "stopped (process N is gone)" when it ran on this host, its process
    is gone and nobody holds the run folder's lock; None otherwise (the status stands)."""
    from ftcli.system import process_alive

    pid = manifest.get("pid")
    if manifest.get("status") != "running" or not isinstance(pid, int):
        return None
    if manifest.get("host") != socket.gethostname() or process_alive(pid) or not lock_is_free(folder):
        return None
    return f"stopped (process {pid} is gone)"


def finished_run(config: Any, out: Path) -> dict[str, Any] | None:
    """The manifest of the finished run in `out` when a bare `--resume` asks for the goal it was trained to (so
    there is nothing to train, with or without checkpoints); None otherwise."""
    from ftcli.config import build_run_config
    from ftcli.training.checkpoints import training_goal

    if config.resume != "latest" or not (Path(out) / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
        recorded = build_run_config({k: v for k, v in manifest.get("config", {}).items()
                                     if k in ("max_steps", "num_epochs")})
    except Exception:  # noqa: BLE001 - an unreadable record: the checkpoint decides, as for any resume
        return None
    if manifest.get("status") != "finished" or training_goal(recorded) != training_goal(config):
        return None
    return manifest


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
