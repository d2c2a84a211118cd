"""`ftcli generate TARGET --prompt TEXT`: try a model, its prompts rendered exactly as its training rendered them.

    $ ftcli generate runs/lora-1 --prompt "Add 2 and 3."
    $ ftcli generate runs/lora-1 --prompt "Add 2 and 3." --compare-base --show-prompt
    $ ftcli generate runs/chat-1 --prompts-file questions.jsonl --output answers.jsonl

Registered in ftcli/cli/__init__.py; the work happens in ftcli/inference/ (imported inside the
command, so `ftcli --help` stays light).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftcli.cli.common import (
    GENERATION, GENERATION_PARAMETERS, generation_settings, run_guarded, target_argument, with_options,
)

PROMPTS = "Prompts"


def _option(name: str, annotation: object) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


OWN = [
    _option("prompt", Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", metavar="TEXT", help="A prompt, in the run's terms: the instruction (Alpaca), the prompt, the user's turn "
        "(chat) or the text to continue. Repeat for several.", rich_help_panel=PROMPTS, show_default=False)]),
    _option("input", Annotated[Optional[str], typer.Option(
        "--input", help="Alpaca runs: the instruction's input (context).", rich_help_panel=PROMPTS)]),
    _option("prompts_file", Annotated[Optional[Path], typer.Option(
        help=".txt (one prompt a line) or .jsonl in the training data's columns without the answer "
             "(instruction/input, prompt, messages, conversations).", rich_help_panel=PROMPTS)]),
    _option("output", Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="<path>", help="Write one JSON row per prompt (prompt, rendered prompt, completion, tokens, stop "
        "reason) to this .jsonl file.", rich_help_panel=PROMPTS)]),
    _option("overwrite", Annotated[Optional[bool], typer.Option(
        "--overwrite", help="Replace an existing --output file.", rich_help_panel=PROMPTS)]),
    _option("compare_base", Annotated[Optional[bool], typer.Option(
        "--compare-base", help="Also generate with the untuned base model, for the same rendered prompt.",
        rich_help_panel=GENERATION)]),
    _option("show_prompt", Annotated[Optional[bool], typer.Option(
        "--show-prompt", help="Print each rendered prompt, special tokens included (on stderr).",
        rich_help_panel=GENERATION)]),
]


def generate(values: dict) -> None:
    """Generate completions with a run, adapter, export or model, prompts rendered as its training rendered them."""

    def go() -> None:
        from ftcli.preflight import refuse_missing_path

        refuse_missing_path(values["target"], "TARGET")  # before the imports, and before a hub lookup
        refuse_missing_path(values.get("base"), "--base")
        from ftcli.inference.run import GenerateOptions, run_generate
        from ftcli.models import without_bitsandbytes
        from ftcli.targets import target_uses_bitsandbytes

        decoding, load = generation_settings(values, temperature=0.0, top_p=1.0)
        with without_bitsandbytes(not target_uses_bitsandbytes(values["target"], values.get("base"))):
            run_generate(GenerateOptions(
                target=values["target"], prompts=list(values.get("prompt") or []),
                prompts_file=str(values["prompts_file"]) if values.get("prompts_file") else None,
                extra_input=values.get("input") or "", system=values.get("system"),
                output=values.get("output"), overwrite=bool(values.get("overwrite")),
                compare_base=bool(values.get("compare_base")), show_prompt=bool(values.get("show_prompt")),
                decoding=decoding, load=load))

    from ftcli.system import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM / SIGHUP end it like Ctrl-C: one line, exit 130, what was done kept
        run_guarded(go)


TARGET = target_argument("A run folder, an adapter folder, an exported folder, a model folder, a hub id or "
                         "builtin:tiny-llama.")
command = with_options(generate, [TARGET, *GENERATION_PARAMETERS, *OWN])
