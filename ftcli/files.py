"""Writing files so that a reader never sees half of one, and reading back the JSON ftcli wrote.

    >>> from ftcli.files import write_atomic, write_json_atomic, read_json_object
    >>> write_json_atomic(Path("runs/a/ftcli_run.json"), manifest)             # old file or new, never half
    >>> write_atomic(folder / "ftcli_checkpoint.json", text, durable=True)     # and on disk before it counts

Every atomic write in ftcli goes through `write_atomic`: a temporary file next to the target,
renamed over it, with the permissions the umask gives any new file (0644 under 022). `durable=True`
also flushes the file and its folder to disk (fsync) around the rename, for files whose presence
means "complete" (checkpoint markers).

    >>> with exclusive(Path("runs/a"), "--output-dir"):   # one writer per run folder, cache entry, export
    ...     ...                                          # a second one refuses, naming this process

`exclusive` locks a target that may not exist yet through `.<name>.ftcli-lock` beside it: an OS
lock (flock) held for the life of the block and released by the kernel when the process dies, so a
crashed holder never blocks the next run; the file names the holder (host, pid, command, start).
`read_yaml_document` reads the run's YAML file strictly (UTF-8, one document, no key given twice).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcli.errors import ConfigError, OutputError

LOCK_SUFFIX = ".ftcli-lock"
_umask_lock = threading.Lock()


def current_umask() -> int:
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from open() under the current umask (0644 under 022)."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from mkdir() under the current umask (0755 under 022)."""
    return 0o777 & ~current_umask()


def write_atomic(path: Path, data: bytes | str, durable: bool = False) -> None:
    """Write `data` to `path` through a temporary sibling and one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes the file private (0600); readers under another user need it
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
    """fsync every file under `folder` and the folders themselves; return {relative name: size}.

    On the way, a file a library wrote private (0600: safetensors does) gets the mode the umask gives,
    so what ftcli publishes is readable as the umask says (a serving daemon under another user)."""
    files: dict[str, int] = {}
    wanted = file_mode()
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            with open(path, "rb") as fh:
                if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) == 0o600 != wanted:
                    os.fchmod(fh.fileno(), wanted)
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
    except RecursionError:
        raise ModelError(f"cannot read {path}: its JSON is nested too deeply", hint=hint) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object", hint=hint)
    return data


def output_path(value: str | os.PathLike[str] | None, flag: str, what: str = "folder") -> Path | None:
    """An output path as given: None stays None (the command's default); an empty or blank one is refused,
    since it would mean the current folder (an unset `$OUT` in a script). `what`: a folder or a file."""
    if value is None:
        return None
    if not str(value).strip():
        raise ConfigError(f"{flag} is empty", hint=f"pass a {what} path to {flag} (an unset shell variable gives \"\")")
    return Path(value).expanduser()


def followed(out: Path) -> Path:
    """An output folder as ftcli writes it: absolute, and when it is a symbolic link, the folder the link points to.
    ftcli's lock, checks, `--overwrite` and staging then act on that real folder, and the link itself is left as
    the user made it (never renamed aside or removed)."""
    out = Path(out).expanduser().absolute()
    return out.resolve() if out.is_symlink() else out


def check_writable(out: Path, flag: str, beside: bool = False) -> None:
    """Refuse a folder we could not create or write into: tried on its nearest existing ancestor (with
    `beside`, on its parent's: the folder is written next to `out`, then renamed into place) by creating and
    removing a probe file there, since os.access approves everything for root, /proc and /sys included."""
    parent = out.parent if beside or not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    problem = None
    if not parent.is_dir():
        problem = f"{parent} is a file"
    else:
        try:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".ftcli-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem:
        raise OutputError(f"{flag} {out} is not writable ({problem}: {parent})",
                          hint="pick a folder you can write to")


def lock_path(target: Path) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def read_lock_holder(target: Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock of `target`, as its lock file says; None when there is none."""
    try:
        data = json.loads(lock_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def busy_holder(target: Path) -> dict[str, Any] | None:
    """The holder of a lock just found busy. It writes its record right after taking the lock, so a record not
    readable yet is read again for up to half a second before the holder is called unknown."""
    for _ in range(5):
        holder = read_lock_holder(target)
        if holder:
            return holder
        time.sleep(0.1)
    return None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another ftcli process"
    return (f"ftcli pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started_at')}"
            f" ({holder.get('command')})")


class Held:
    """The lock `exclusive` holds: `share()` turns it into a shared one that processes started for the same work
    (the ranks of a launch, `shared_lock`) join, while every other `exclusive` on the target still refuses."""

    def __init__(self, fd: int, target: Path, what: str):
        self.fd, self.target, self.what = fd, target, what

    def share(self) -> None:
        import fcntl

        try:  # Linux converts a flock in place; where it does not, a claimant that slipped in is refused here
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{self.what} {self.target} is in use by {describe_holder(busy_holder(self.target))}",
                              hint="wait for that run to finish, or pick another folder") from None


@contextmanager
def shared_lock(target: Path, what: str) -> Iterator[None]:
    """Join the shared lock a launcher holds on `target` (Held.share) for the block: the lock then stays held
    while any process of the launch lives. Refused when nobody holds it shared any more (the launcher is gone and
    another process took or freed the target)."""
    import fcntl

    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        raise OutputError(f"{what} {target} is no longer held by the launcher that started this process",
                          hint="start the run again") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{what} {target} is in use by {describe_holder(busy_holder(target))}",
                              hint="start the run again once it is free") from None
        yield
    finally:
        os.close(fd)


@contextmanager
def exclusive(target: Path, what: str, wait: bool = False, announce: Any = None) -> Iterator[Held]:
    """Hold the lock of `target` (a folder or file that may not exist yet) for the block.

    Busy: an OutputError naming the holder, or with `wait` block until it is free (`announce(text)` told
    once). The lock file is removed on the way out; its parent folder is created when missing."""
    import fcntl

    path = lock_path(target)
    created = _make_parents(path.parent, what, target)
    announced = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            _remove_created(created)
            raise OutputError(f"{what} {target} is not writable (cannot create {path}: {exc.strerror})",
                              hint="pick a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not wait:
                raise OutputError(f"{what} {target} is in use by {describe_holder(busy_holder(target))}",
                                  hint="wait for that run to finish, or pick another folder") from None
            if announce is not None and not announced:
                announce(f"waiting for {describe_holder(read_lock_holder(target))} to finish with {target}")
                announced = True
            time.sleep(0.2)
            continue
        # The holder before us may have removed the file after we opened it: lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        from ftcli.system import utc_now

        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": utc_now(),
                  "command": " ".join(["ftcli", *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        yield Held(fd, target, what)
    except BaseException:
        _remove_created(created, keep=path)
        raise
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def _make_parents(folder: Path, what: str, target: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        for created in reversed(missing):
            created.mkdir()
    except OSError as exc:
        _remove_created(missing)
        raise OutputError(f"{what} {target} is not writable (cannot create {exc.filename}: {exc.strerror})",
                          hint="pick a folder you can write to") from None
    return missing


def _remove_created(created: list[Path], keep: Path | None = None) -> None:
    """Remove the folders `_make_parents` created, where they are still empty (a refused command leaves none)."""
    for folder in created:
        try:
            entries = [p for p in folder.iterdir() if p != keep]
            if not entries:
                if keep is not None and keep.parent == folder:
                    keep.unlink(missing_ok=True)
                folder.rmdir()
        except OSError:
            return


def disk_full_note(folder: Path, below: int = 16 * 2**20) -> str:
    """`; the disk holding FOLDER is full (N bytes free)` when it nearly is: libraries that lose the OS error
    (torch.save says "unexpected pos") still get a failure that names its cause. Else ""."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; the disk holding {folder} is full ({free} bytes free)" if free < below else ""


def file_sha256(path: Path) -> str:
    """The file's sha256, read in blocks (never whole into memory)."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ---- what tells a file changed (ftcli.training.checksums, ftcli.data.digests) ----------------------

StatKey = tuple[int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """What tells a file's contents changed: its inode, size and modification time."""
    return st.st_ino, st.st_size, st.st_mtime_ns


# ---- reading the run's YAML file ------------------------------------------------------------------


def read_yaml_document(path: Path, normalize_key: Callable[[str], str]) -> Any:
    """The file's one YAML document, refused (naming the file and line) when it is not UTF-8 text, is not
    valid YAML, or gives one key twice (a top-level key also by `normalize_key(key)`: `batch_size` and
    `batch-size` are one key). The run config's reader (ftcli.config.load_config_file)."""
    import yaml

    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder", hint="pass the YAML file itself to --config")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="check the path given to --config")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}",
                          hint="check the path and its permissions") from None
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}:{line} is not UTF-8 text (byte 0x{raw[exc.start]:02x})",
                          hint="save the file as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(node, path, normalize_key, top=True)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"config file {where} is not valid YAML", hint="fix the syntax at that line") from None
    finally:
        loader.dispose()


def _refuse_repeated_keys(node: Any, path: Path, normalize_key: Callable[[str], str], top: bool,
                          seen_nodes: set[int] | None = None) -> None:
    """YAML keeps the last of two equal keys without a word: refuse them (the run's keys also by their
    snake_case name), in every mapping of the file."""
    import yaml

    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias met again
        return
    seen_nodes.add(id(node))
    children: list[Any] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, tuple[str, int]] = {}
        for key_node, value_node in node.value:
            children.append(value_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            name = normalize_key(key) if top else key
            if name in first:
                was, was_line = first[name]
                same = f"gives '{key}' twice (also on line {was_line})" if was == key else \
                    f"gives '{key}', the same option as '{was}' on line {was_line}"
                raise ConfigError(f"config file {path}:{line} {same}", hint="keep one of them")
            first[name] = (key, line)
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    for child in children:
        _refuse_repeated_keys(child, path, normalize_key, top=False, seen_nodes=seen_nodes)
