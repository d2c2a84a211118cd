"""`ftcli chat TARGET`: talk to a model turn by turn, the history rendered by its chat template each turn.

    $ ftcli chat runs/chat-lora-1 --system "You are terse."
    $ printf 'Hi\nWhat did I just say?\n' | ftcli chat runs/chat-lora-1      # turns from stdin, one a line

Registered in ftcli/cli/__init__.py; the work happens in ftcli/inference/chat.py.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Optional

import typer

from ftcli.cli.common import GENERATION_PARAMETERS, generation_settings, run_guarded, target_argument, with_options

OUTPUT = inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[str], typer.Option("--output", "-o", metavar="<path>", help="Save the conversation to this .jsonl file (one row per "
                                 "answer: the rendered prompt, the reply, tokens, stop reason).")])


def chat(values: dict) -> None:
    """Chat with a run, adapter, export or model (/reset, /system TEXT, /exit); reads turns from stdin when piped."""

    def go() -> None:
        from ftcli.preflight import refuse_missing_path

        refuse_missing_path(values["target"], "TARGET")  # before the imports, and before a hub lookup
        refuse_missing_path(values.get("base"), "--base")
        from ftcli.inference.chat import ChatOptions, run_chat
        from ftcli.models import without_bitsandbytes
        from ftcli.targets import target_uses_bitsandbytes

        decoding, load = generation_settings(values, temperature=0.7, top_p=0.9)
        with without_bitsandbytes(not target_uses_bitsandbytes(values["target"], values.get("base"))):
            run_chat(ChatOptions(target=values["target"], system=values.get("system"), decoding=decoding,
                                 load=load, output=values.get("output")))

    from ftcli.system import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM / SIGHUP end it like Ctrl-C: one line, exit 130, what was done kept
        run_guarded(go)


TARGET = target_argument("A run folder, an adapter folder, an exported folder, a model folder, a hub id or "
                         "builtin:tiny-llama (trained with a chat template, or pass --template).")
command = with_options(chat, [TARGET, *GENERATION_PARAMETERS, OUTPUT])
