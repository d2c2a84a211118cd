"""Streamed answers on a terminal: words wrapped whole at its edge, and an answer that Ctrl-C can stop.

    >>> from ftcli.inference.stream import WordWrap
    >>> wrap = WordWrap(write=print_piece, width=80)
    >>> for piece in pieces: wrap(piece)      # prints whole words, a line break before one that would not fit
    >>> wrap.finish()                          # the last word

`stop_on(event)` is a transformers stopping criterion: `generate` running in a worker thread ends at its next
token once the event is set (Ctrl-C in the reading thread sets it).
"""

from __future__ import annotations

from typing import Any, Callable


class WordWrap:
    """Receives text piece by piece and writes it with a line break before a word that would cross `width`;
    a word longer than a line is written as it comes."""

    def __init__(self, write: Callable[[str], None], width: int):
        self.write = write
        self.width = max(width, 10)
        self.column = 0
        self.word = ""

    def __call__(self, piece: str) -> None:
        for char in piece:
            if char.isspace():
                self._flush_word()
                if char == "\n":
                    self.write("\n")
                    self.column = 0
                elif self.column < self.width:
                    self.write(char)
                    self.column += 1
            else:
                self.word += char
                if len(self.word) >= self.width:  # longer than a line: no boundary to wait for
                    self._flush_word()

    def finish(self) -> None:
        self._flush_word()

    def _flush_word(self) -> None:
        if not self.word:
            return
        if self.column and self.column + len(self.word) > self.width:
            self.write("\n")
            self.column = 0
        self.write(self.word)
        self.column += len(self.word)
        self.word = ""


def stop_on(event: Any) -> Any:
    """A StoppingCriteriaList for `model.generate`: every row is done once `event` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnEvent()])
