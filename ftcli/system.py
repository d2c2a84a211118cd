"""Facts about the machine and the software a run used: peak memory, library versions.

    >>> from ftcli.system import peak_memory, format_bytes
    >>> kind, used = peak_memory("cpu"); format_bytes(used)
    '412.3 MiB'
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Iterator

LIBRARIES = ("ftcli", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers")


def peak_memory(device: str) -> tuple[str, int]:
    """("cuda peak allocated", bytes) on CUDA; ("cpu peak RSS", bytes) otherwise."""
    if device.startswith("cuda"):
        import torch

        return "cuda peak allocated", int(torch.cuda.max_memory_allocated(device))
    hwm = own_peak_rss()
    if hwm is not None:
        return "cpu peak RSS", hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return "cpu peak RSS", int(rss if sys.platform == "darwin" else rss * 1024)


def own_peak_rss() -> int | None:
    """This process's own peak resident memory in bytes (Linux: VmHWM), or None where /proc has no such line.

    Not getrusage's ru_maxrss: a process started from a larger one (an FSDP rank from its launcher, any
    subprocess of a test or bench) carries its parent's high-water mark across fork/vfork and exec there, so
    its ru_maxrss is at least the parent's peak whatever it used itself."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    """The current time as recorded in manifests and cards: ISO 8601, UTC, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine (ours, or another user's we may not signal)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an interrupt: the command ends (exit 130), where a Ctrl-C may end less (chat: an
    answer, or the chat with exit 0 at its prompt)."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`) and SIGHUP (the terminal closed) end the block like Ctrl-C (KeyboardInterrupt:
    what the command removes, keeps or records on the way out, then exit 130) instead of killing the process where
    it stands. Only the main thread can install it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, _terminated) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Set by ftcli's launcher for its ranks: the launcher's pid. A rank dies with the process that started it.
LAUNCHER_PID_ENV = "FTCLI_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a rank started by ftcli's launcher: be killed (SIGKILL) the moment the launcher dies, however it dies,
    and exit at once when it is already gone. Without this a SIGKILLed launcher leaves its ranks training.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a rank still stops when a peer's connection drops."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    # Asked after the death signal is armed: a launcher that died before that has made this process an orphan.
    if str(os.getppid()) != launcher:
        os._exit(1)
