"""Where ftcli keeps what it builds and caches (built-in models, prepared data).

    >>> from ftcli.paths import ftcli_home
    >>> ftcli_home()  # $FTCLI_HOME, else ~/.cache/ftcli
"""

from __future__ import annotations

import os
from pathlib import Path


def ftcli_home() -> Path:
    """The root of ftcli's own cache: `$FTCLI_HOME`, else `$XDG_CACHE_HOME/ftcli`, else `~/.cache/ftcli`."""
    env = os.environ.get("FTCLI_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ftcli"
