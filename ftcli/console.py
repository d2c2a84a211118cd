"""The Rich consoles every ftcli command prints through.

    >>> from ftcli.console import console, err_console
    >>> console.print("[bold]done")

Human output goes to stdout; errors and warnings go to stderr. Importing this is cheap (no torch).
Messages interpolate paths, model names and library errors, which can hold `[...]`: a string that
is not valid Rich markup is printed as plain text instead of raising (escape user text with
`rich.markup.escape` where the styling matters).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.errors import MarkupError


class _Console(Console):
    def render_str(self, text: str, **kwargs: Any):  # noqa: ANN201 (rich's own return type)
        try:
            return super().render_str(text, **kwargs)
        except MarkupError:
            return super().render_str(text, **{**kwargs, "markup": False})


console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)
