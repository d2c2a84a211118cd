"""`ftcli chat`: a multi-turn conversation with a model, its history rendered by the chat template each turn.

    $ ftcli chat runs/chat-lora-1
    you> What is the capital of France?
    Paris.
    you> /system Answer in French.
    you> /reset
    you> /exit                                   (or Ctrl-D)

    $ printf 'Hi\\nAnd then?\\n' | ftcli chat runs/chat-lora-1      # turns from stdin, one per line

The whole conversation so far (with `--system` or `/system` first) goes through the same
renderer as training (ftcli.data.pipeline.encode_prompt) before every answer, so the model sees
exactly the text `apply_chat_template` gives for that history. Replies stream on a terminal.
A target whose training did not use a chat template is refused (its prompts were single turns
in another format: `ftcli generate` renders those), unless `--template` names a chat template.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ftcli.console import console, err_console
from ftcli.data.pipeline import THINK_CLOSE, THINK_OPEN
from ftcli.errors import ConfigError, DataError
from ftcli.system import Terminated
from ftcli.inference.generate import Decoding, check_output_file, complete, output_lock, print_piece
from ftcli.inference.stream import WordWrap
from ftcli.inference.target import TargetOptions, load_target

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit (or Ctrl-D); "
        "Ctrl-C stops an answer")


@dataclass
class ChatOptions:
    target: str
    system: str | None = None
    decoding: Decoding = field(default_factory=lambda: Decoding(temperature=0.7, top_p=0.9))
    load: TargetOptions = field(default_factory=TargetOptions)
    output: str | None = None  # a .jsonl transcript: one row per answer


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)  # every answer: rendered prompt, reply, tokens

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.turns


def run_chat(opts: ChatOptions, lines: Iterable[str] | None = None) -> Conversation:
    """Chat until /exit or the end of input; returns the conversation (what was said, in order)."""
    opts.decoding.check()
    if lines is None and sys.stdin is None:  # `ftcli chat ... <&-`
        raise ConfigError("chat reads its turns from stdin, and stdin is closed", hint="run it on a terminal, or pipe "
                          "the turns in (printf 'Hi\\n' | ftcli chat TARGET)")
    if opts.output is not None:
        check_output_file(opts.output, overwrite=False)
    with output_lock(opts.output, overwrite=False):
        return _chat(opts, lines)


def _chat(opts: ChatOptions, lines: Iterable[str] | None) -> Conversation:
    from ftcli.training.setup import quiet_libraries

    quiet_libraries()
    target = load_target(opts.target, opts.load)
    if not target.template.is_chat and target.kind == "model":
        raise ConfigError(f"{target.ref} has no chat template to render a conversation with",
                          hint="pass --template FILE.jinja (a chat template), or use `ftcli generate` to continue a "
                               "prompt")
    if not target.template.is_chat:
        raise ConfigError(f"{target.ref} was trained on single-turn prompts with the {target.template.name} template, "
                          "not a chat template", hint="use `ftcli generate` for it, or pass --template model (or a "
                          "Jinja file) to chat in a template it was not trained on")
    interactive = lines is None and sys.stdin.isatty()
    err_console.print(f"[bold]ftcli chat[/] {target.label} on {target.device}", soft_wrap=True)
    if interactive:
        err_console.print(f"[dim]{HELP}[/]")
    conversation = Conversation(system=opts.system)
    try:
        for text in (lines if lines is not None else _read_turns(interactive)):
            if not _handle(text, conversation, target, opts.decoding, interactive):
                break
    finally:  # Ctrl-C too: what was said so far is kept
        if opts.output is not None:
            from ftcli.files import write_atomic

            write_atomic(Path(opts.output).expanduser(), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in conversation.log))
    return conversation


def _read_turns(interactive: bool) -> Iterator[str]:
    from ftcli.data.sources import check_text

    number = 0
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ") if interactive else _stdin_line()
        except Terminated:  # SIGTERM / SIGHUP: the command ends (exit 130), the transcript kept
            raise
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: the chat ends
            if interactive:
                console.print()  # the shell's prompt on a line of its own, not after `you>`
            return
        except UnicodeDecodeError:  # a console that decodes strictly
            raise DataError(f"chat input line {number + 1}: not valid UTF-8", hint="send UTF-8 text") from None
        if not interactive and line == "":
            return
        number += 1
        check_text(line, f"chat input line {number}")  # a byte that is not UTF-8: the chat ends, its transcript kept
        yield line.rstrip("\n")


def _stdin_line() -> str:
    """One line of piped input, a byte that is not UTF-8 kept as a surrogate (refused by check_text on its line,
    where a strict text wrapper would fail on the block it read ahead)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return sys.stdin.readline()
    return buffer.readline().decode("utf-8", errors="surrogateescape")


def _handle(text: str, conversation: Conversation, target: Any, decoding: Decoding, interactive: bool) -> bool:
    """One line from the user: a command, or a turn the model answers. False ends the chat."""
    from ftcli.data.formats import Example
    from ftcli.inference.prompts import render

    text = text.removesuffix("\r")  # a CRLF line's \r is no part of the turn
    stripped = text.strip()
    if not stripped:
        return True
    if stripped in ("/exit", "/quit"):
        return False
    if stripped == "/reset":
        conversation.turns.clear()
        err_console.print("[dim](conversation reset)[/]")
        return True
    if stripped == "/system" or stripped.startswith("/system "):
        conversation.system = stripped.removeprefix("/system").strip() or None
        err_console.print(f"[dim](system prompt {'set' if conversation.system else 'cleared'})[/]")
        return True
    if stripped.startswith("/") and not stripped.startswith("//"):
        err_console.print(f"[yellow]unknown command {stripped.split()[0]}[/]; {HELP}")
        return True
    conversation.turns.append({"role": "user", "content": text.removeprefix("/") if stripped.startswith("//")
                               else text})
    try:
        ids = render(target, Example("chat", messages=conversation.messages()))
    except DataError as exc:  # this turn cannot be rendered (a system role the template refuses...): not the chat
        conversation.turns.pop()
        from rich.markup import escape

        err_console.print(f"[yellow]turn not sent:[/] {escape(exc.message)}; the conversation so far is kept (/system "
                          "alone clears a system prompt, /reset starts again)", highlight=False, soft_wrap=True)
        return True
    wrap = WordWrap(ReasoningPrinter(), console.width) if interactive else None
    try:
        done = complete(target, ids, decoding, on_text=wrap)
    except KeyboardInterrupt as exc:  # Ctrl-C stops this answer only; Ctrl-C at the prompt ends the chat
        if isinstance(exc, Terminated) or getattr(exc, "terminated", False):
            raise  # SIGTERM / SIGHUP ends the command (exit 130), the transcript kept
        conversation.turns.pop()
        console.print()
        err_console.print("[dim](answer stopped: it and its question are left out of the conversation; Ctrl-C "
                          "again at the prompt, /exit or Ctrl-D ends the chat)[/]")
        return True
    if wrap is not None:
        wrap.finish()
        console.print()
    else:
        ReasoningPrinter()(done.text)
        console.print()
    err_console.print(f"[dim]\\[{done.summary()}][/]")
    conversation.turns.append(assistant_turn(done.text))
    conversation.log.append({"turn": len(conversation.log) + 1, "system": conversation.system, "user": text,
                             "rendered_prompt": target.tokenizer.decode(ids, skip_special_tokens=False),
                             "assistant": done.text, "completion_ids": done.ids, "prompt_tokens": len(ids),
                             "new_tokens": done.new_tokens, "stop_reason": done.stop_reason})
    return True


def assistant_turn(text: str) -> dict[str, str]:
    """A reply as the history keeps it: a reasoning block (`<think>...</think>`, or reasoning the generation
    prompt opened) goes to `reasoning_content`, so the template drops or keeps it for later turns as it does for
    the conversations it was trained on."""
    if THINK_CLOSE not in text:
        return {"role": "assistant", "content": text}
    reasoning, _, content = text.partition(THINK_CLOSE)
    return {"role": "assistant", "content": content.lstrip("\n"),
            "reasoning_content": reasoning.split(THINK_OPEN, 1)[-1].strip("\n")}


class ReasoningPrinter:
    """Prints a reply as it streams, its reasoning (up to `</think>`) dimmed; model text is never Rich markup."""

    def __init__(self) -> None:
        self.seen = ""

    def __call__(self, piece: str) -> None:
        before = self.seen
        self.seen += piece
        if THINK_CLOSE not in self.seen and THINK_OPEN not in self.seen:
            print_piece(piece)
            return
        end = self.seen.find(THINK_CLOSE)
        closed_at = end + len(THINK_CLOSE) if end >= 0 else len(self.seen) + 1
        cut = max(0, min(len(piece), closed_at - len(before)))
        if cut:
            console.print(piece[:cut], end="", markup=False, highlight=False, soft_wrap=True, style="dim")
        if piece[cut:]:
            print_piece(piece[cut:])
