"""The Rich consoles every ftcli command prints through.

    >>> from ftcli.console import console, err_console
    >>> console.print("[bold]done")

Human output goes to stdout; errors and warnings go to stderr. Importing this is cheap (no torch).
"""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
