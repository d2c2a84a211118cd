"""Where ftcli keeps what it builds and caches (built-in models, prepared data, compile caches).

    >>> from ftcli.paths import ftcli_home
    >>> ftcli_home()  # $FTCLI_HOME, else ~/.cache/ftcli
    >>> home_folder("builtin")  # $FTCLI_HOME/builtin, created: one line (exit 5) when it cannot be
"""

from __future__ import annotations

import os
from pathlib import Path

from ftcli.errors import OutputError


def ftcli_home() -> Path:
    """The root of ftcli's own cache: `$FTCLI_HOME`, else `$XDG_CACHE_HOME/ftcli`, else `~/.cache/ftcli`.

    Refused in one line (OutputError) when it, or the nearest part of it that exists, is not a folder:
    every command that caches would otherwise fail deep inside with NotADirectoryError."""
    env = os.environ.get("FTCLI_HOME")
    if env:
        home, named = Path(env).expanduser(), "FTCLI_HOME"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        home, named = base / "ftcli", "XDG_CACHE_HOME" if xdg else "the cache folder"
    _refuse_non_folder(home, named)
    return home


def home_folder(*parts: str) -> Path:
    """`ftcli_home() / parts...`, created, for a command about to write there: every place that builds or fetches
    into the cache (built-in models, prepared data, the GGUF converter, compile caches) asks here, so a home that
    cannot be created or written (FTCLI_HOME=/proc/ftcli, a read-only disk) is one line and exit 5 everywhere."""
    home = ftcli_home()
    folder = home.joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
        reason = "is not writable"
    except OSError as exc:
        writable, reason = False, f"cannot be created ({exc.strerror or type(exc).__name__})"
    if not writable:
        named = "FTCLI_HOME" if os.environ.get("FTCLI_HOME") else "the cache folder"
        raise OutputError(f"{named} {home} cannot hold ftcli's cache: {folder} {reason}",
                          hint="point FTCLI_HOME at a writable folder (or unset it for ~/.cache/ftcli)")
    return folder


def _refuse_non_folder(home: Path, named: str) -> None:
    existing = home
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if os.path.lexists(existing) and not existing.is_dir():
        what = "a file" if existing.is_file() else "a broken link" if existing.is_symlink() else "something else"
        where = f"{home} ({named})" if named != "FTCLI_HOME" else f"FTCLI_HOME {home}"
        raise OutputError(f"{where} cannot hold ftcli's cache: {existing} is {what} and not a folder",
                          hint="point FTCLI_HOME at a folder (or unset it for ~/.cache/ftcli)")
