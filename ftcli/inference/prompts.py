"""Prompts for a target, rendered by the data layer's own code exactly as its training data was.

    >>> from ftcli.inference.prompts import prompt_example, render
    >>> example = prompt_example(target, "Add 2 and 3.", extra_input="")     # an Alpaca run: the instruction
    >>> ids = render(target, example, system=None)                        # the prompt training saw, as ids

`--prompt TEXT` means what the run's format makes of one field: the instruction (Alpaca, with
`--input`), the prompt (prompt/completion), the user's turn (chat, ShareGPT) or the text to
continue (text). A `--prompts-file` is `.txt` (one prompt a line) or `.jsonl` in the run's own
columns without the answer (`instruction`/`input`, `prompt`, `messages`, `conversations`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import ConfigError, DataError


@dataclass
class Prompt:
    source: Any  # what the user gave: the text, or the JSONL row
    example: Any  # ftcli.data.formats.Example


def prompt_example(target: Any, text: str, extra_input: str = "") -> Any:
    """`--prompt TEXT` (and `--input`) as an example of the target's format."""
    from ftcli.data.formats import Example

    from ftcli.data.sources import check_text

    if not text.strip():
        raise ConfigError("--prompt is empty", hint="give the text the model should answer")
    check_text(text, "--prompt")
    check_text(extra_input, "--input")
    if target.fmt == "alpaca":
        return Example("alpaca", instruction=text, input=extra_input)
    if extra_input:
        raise ConfigError(f"--input applies to Alpaca-format runs; {target.ref} reads prompts as {target.fmt}",
                          hint="put the whole prompt in --prompt")
    if target.fmt in ("chat", "sharegpt"):
        return Example("chat", messages=[{"role": "user", "content": text}])
    if target.fmt == "text":
        return Example("text", response=text)
    return Example("pair", prompt=text)


def render(target: Any, example: Any, system: str | None = None) -> list[int]:
    """The prompt's token ids, as training tokenized everything before a response."""
    from ftcli.data.formats import RowError
    from ftcli.data.pipeline import encode_prompt

    if system is not None and not target.template.is_chat:
        raise ConfigError(f"--system needs a chat template; {target.ref} renders prompts with the "
                          f"{target.template.name} template", hint="drop --system, or pass --template model")
    try:
        return encode_prompt(example, target.template, target.tokenizer, system=system)
    except RowError as exc:
        raise DataError(f"cannot render the prompt for {target.ref}: {exc}",
                        hint="end the conversation with a user turn; check the template") from None


def read_prompts_file(path: Path, target: Any) -> list[Prompt]:
    """A `.txt` (one prompt per non-blank line) or `.jsonl` file (rows in the run's columns) as prompts."""
    from ftcli.data.formats import FORMATS, RowError, row_to_example
    from ftcli.data.sources import check_text

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "is not a regular file" if path.exists() else \
            "does not exist"
        raise DataError(f"--prompts-file {path} {what}", hint="check the path")
    text = _read_text(path)
    if path.suffix.lower() == ".txt":
        prompts = [Prompt(line, prompt_example(target, line)) for line in text.splitlines() if line.strip()]
    elif path.suffix.lower() == ".jsonl":
        prompts = []
        fields = FORMATS[target.fmt][0]
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"--prompts-file {path}:{number} is not JSON: {exc}",
                                hint="write one JSON object per line") from None
            check_text(row, f"--prompts-file {path}:{number}")
            prompt_fields = [f for f in fields if f not in ("output", "completion")]
            if not isinstance(row, dict) or not any(f in row for f in prompt_fields):
                raise DataError(f"--prompts-file {path}:{number} has none of the fields {target.ref} reads prompts "
                                f"from ({', '.join(prompt_fields)}; format {target.fmt})",
                                hint="write rows like the training data, without the answer, or use a .txt file")
            try:
                example = row_to_example(row, target.fmt)
            except RowError as exc:
                raise DataError(f"--prompts-file {path}:{number}: {exc}", hint="fix that row") from None
            if not _has_text(example):  # as `--prompt ""` is refused
                raise DataError(f"--prompts-file {path}:{number}: the prompt is empty (null or \"\" in "
                                f"{', '.join(prompt_fields)})", hint="give that row the text the model should answer, "
                                "or remove it")
            prompts.append(Prompt(row, example))
    else:
        raise DataError(f"--prompts-file {path}: a {path.suffix or 'suffix-less'} file",
                        hint="use .txt (one prompt a line) or .jsonl (rows in the training data's columns)")
    if not prompts:
        raise DataError(f"--prompts-file {path} holds no prompt", hint="write one prompt per line")
    return prompts


def _read_text(path: Path) -> str:
    """The file as UTF-8; bytes that are not: one line naming the file and line, as the training data reader does."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"--prompts-file {path}:{line}: not valid UTF-8", hint="save the file as UTF-8") from None


def _has_text(example: Any) -> bool:
    """Whether a prompt row gives the model anything to answer (its instruction, prompt, text or a message)."""
    if example.kind == "alpaca":
        return bool(example.instruction.strip())
    if example.kind == "pair":
        return bool(example.prompt.strip())
    if example.kind == "text":
        return bool(example.response.strip())
    return any(str(m.get("content") or "").strip() or m.get("tool_calls") for m in example.messages)
