"""The Alpaca instruction template, byte for byte as the reference scripts use it.

    >>> from ftcli.data.alpaca import format_alpaca
    >>> prompt, response = format_alpaca({"instruction": "Add 2 and 3.", "input": "", "output": "5"})
    >>> prompt.endswith("### Response: "), response
    (True, '5')
"""

from __future__ import annotations

from typing import Any

ALPACA_PROMPT_TEMPLATE = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
### Instruction: {}

### Input: {}

### Response: {}"""

ALPACA_REQUIRED = ("instruction", "output")
ALPACA_COLUMNS = ("instruction", "input", "output")


def format_alpaca(row: dict[str, Any]) -> tuple[str, str]:
    """Split one Alpaca row into (prompt, response): prompt + response is the reference text minus EOS."""
    instruction = _text(row.get("instruction"))
    extra = _text(row.get("input"))
    output = _text(row.get("output"))
    return ALPACA_PROMPT_TEMPLATE.format(instruction, extra, ""), output


def _text(value: Any) -> str:
    return "" if value is None else str(value)
