"""Dataset formats: which one a dataset is (from its columns, or `--format`), and one row as an example.

    >>> from ftcli.data.formats import detect_format, row_to_example
    >>> detect_format(["instruction", "input", "output"], "auto", "data.jsonl")
    'alpaca'
    >>> row_to_example({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ...                "sharegpt")
    Example(kind='chat', prompt='', response='', messages=[{'role': 'user', 'content': 'Hi'}, ...], ...)

| format | columns | example kind |
|---|---|---|
| alpaca | instruction, output (input optional) | prompt + response (the Alpaca template) |
| prompt-completion | prompt, completion | prompt + response |
| chat | messages: [{role, content}, ...] (tools optional) | conversation |
| sharegpt | conversations: [{from, value}, ...] (tools optional) | conversation (human -> user, gpt -> assistant) |
| text | text | the whole text is trained |

One dataset has one format: rows (or whole files of a folder) that lack the detected format's
fields but fit another one are refused with the files and formats named, never dropped as empty.

Conversations as today's models are trained on them (see ftcli.data.templates for how they render):
`content` may be a string or a list of parts (`[{"type": "text", "text": ...}]`, the OpenAI shape: the text
parts joined; any other part is refused, naming it: ftcli trains text only); an assistant message may
carry `reasoning_content` (or `thinking`) and `tool_calls` (`arguments` given as a JSON string are read
as the object templates expect); `tool` messages (results, with `tool_call_id` / `name`) are context,
never trained; a `tools` column (JSON schemas, a list or a JSON string) is handed to the template.
ShareGPT's `function_call` turns are assistant tool calls, `observation` turns tool results. A lone
message object where a list is expected is a one-message list.

`--columns instruction=question,output=answer` names the data's columns for the format's
fields; `role=...` / `content=...` (chat) and `from=...` / `value=...` (sharegpt) name the keys
inside each message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftcli.errors import ConfigError, DataError

# Required, then optional fields of each format, in detection order.
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt-completion": (("prompt", "completion"), ()),
    "chat": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("tools",)),
    "text": (("text",), ()),
}
MESSAGE_KEYS = ("role", "content", "from", "value")  # --columns fields that name keys inside messages
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
                  "tool": "tool", "function_response": "tool", "observation": "tool",
                  "function_call": "assistant"}
# Keys of a message handed to the chat template as they are, besides role and content.
PASSED_KEYS = ("reasoning_content", "thinking", "tool_call_id", "name")


# A nested value (a list of messages, tool schemas) kept as JSON text in the dataset, where Arrow cannot hold the
# row's values as one type (ftcli.data.sources): read back by `nested`.
NESTED_JSON = "\x00ftcli-json:"


def as_nested_json(value: Any) -> Any:
    import json

    return NESTED_JSON + json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def nested(value: Any) -> Any:
    """A value as the data gave it (undoing as_nested_json)."""
    import json

    if isinstance(value, str) and value.startswith(NESTED_JSON):
        return json.loads(value[len(NESTED_JSON):])
    return value


@dataclass
class Example:
    """One row, formatted: a (prompt, response) pair, a conversation, or raw text."""

    kind: str  # "alpaca" (instruction + input) | "pair" (prompt) | "chat" (messages) | "text"
    prompt: str = ""
    response: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    instruction: str = ""
    input: str = ""
    tools: list[dict[str, Any]] | None = None  # JSON schemas of the tools a conversation may call


class RowError(ValueError):
    """A row that has the right columns but unusable values (the message says why)."""


def expected_formats() -> str:
    """`alpaca (instruction, output[, input]); prompt-completion (prompt, completion); ...` for error messages."""
    parts = []
    for name, (required, optional) in FORMATS.items():
        fields = ", ".join(f"'{f}'" for f in required) + "".join(f"[, '{f}']" for f in optional)
        parts.append(f"{name} ({fields})")
    return "; ".join(parts)


def column_renames(columns: dict[str, str] | None, available: list[str], fields: Any = None,
                   kind: str = "any format", source: str = "the data",
                   message_keys: tuple[str, ...] = MESSAGE_KEYS) -> dict[str, str]:
    """`--columns` (field -> column) as dataset renames (column -> field), checked against the data. `fields`:
    the fields the data may have (default: those of every SFT format; DPO's pairs pass theirs), `kind` names
    them in the error; `message_keys` are fields naming keys inside messages (not columns)."""
    if not columns:
        return {}
    fields = set(fields) if fields is not None else {f for req, opt in FORMATS.values() for f in (*req, *opt)}
    renames = {}
    for fld, col in columns.items():
        if fld in message_keys:
            continue
        if fld not in fields:
            raise ConfigError(f"--columns {fld}={col}: '{fld}' is not a field of {kind}",
                              hint=f"fields: {', '.join(sorted(fields | set(message_keys)))}")
        if col not in available:
            # `Answer ` (a CSV header with a stray space) is mapped by `output=Answer` when that is unambiguous.
            alike = [c for c in available if c.strip() == col.strip()]
            if len(alike) != 1:
                found = ", ".join(f"'{c}'" for c in available) or "none"
                raise DataError(f"--columns {fld}={col}: {source} has no column '{col}' (columns found: {found})",
                                hint="check the column name")
            col = alike[0]
        if col != fld:
            renames[col] = fld
    return renames


def detect_format(columns: list[str], requested: str, source: str) -> str:
    """The format of a dataset with these (already renamed) columns; a DataError that lists both sides."""
    found = ", ".join(f"'{c}'" for c in columns) or "none"
    if "chosen" in columns and "rejected" in columns and fitting_format(set(columns)) is None:
        raise DataError(f"dataset {source} holds preference pairs (columns found: {found}), which SFT cannot train on",
                        hint="add --objective dpo to train on the pairs")
    if requested != "auto":
        required = FORMATS[requested][0]
        missing = [f for f in required if f not in columns]
        if missing:
            raise DataError(f"dataset {source} has no column {', '.join(repr(m) for m in missing)} for "
                            f"--format {requested} (columns found: {found})",
                            hint="map your names with --columns, e.g. --columns "
                                 + ",".join(f"{m}=YOUR_COLUMN" for m in missing))
        return requested
    for name, (required, _) in FORMATS.items():
        if all(f in columns for f in required):
            return name
    raise DataError(f"dataset {source} fits no known format: columns found: {found}; formats expected: "
                    f"{expected_formats()}",
                    hint="rename the columns, map them with --columns (e.g. instruction=question,output=answer) "
                         "or pick --format")


def fitting_format(keys: set[str] | frozenset[str]) -> str | None:
    """The first format (in detection order) whose required fields are all among `keys`."""
    return next((name for name, (required, _) in FORMATS.items() if all(f in keys for f in required)), None)


def check_one_format(shapes: list[Any] | None, renames: dict[str, str], fmt: str, source: str) -> None:
    """Refuse rows that lack `fmt`'s fields but fit another format (a folder of Alpaca and chat files, say):
    read as `fmt` they would be dropped as empty. `shapes`: the rows' key sets (sources.RowShape)."""
    foreign = []
    for shape in shapes or []:
        keys = {renames.get(k, k) for k in shape.keys}
        other = fitting_format(keys)
        if other is not None and other != fmt and not all(f in keys for f in FORMATS[fmt][0]):
            foreign.append((shape, other))
    if not foreign:
        return
    kinds: dict[tuple[str, str], list[int]] = {}
    for shape in shapes or []:
        keys = {renames.get(k, k) for k in shape.keys}
        kind = fmt if all(f in keys for f in FORMATS[fmt][0]) else fitting_format(keys)
        if kind is not None:
            entry = kinds.setdefault((shape.file, kind), [0, shape.first])
            entry[0] += shape.rows
            entry[1] = min(entry[1], shape.first)
    listing = "; ".join(f"{file}: {count} {kind} row{'s' if count != 1 else ''} (from row {first})"
                        for (file, kind), (count, first) in kinds.items())
    raise DataError(f"dataset {source} mixes formats ({listing}); read as {fmt}, the "
                    f"{'/'.join(sorted({o for _, o in foreign}))} rows would be dropped as empty",
                    hint="give one dataset one format: convert those rows or files, or pass the files apart")


def row_to_example(row: dict[str, Any], fmt: str, keys: dict[str, str] | None = None) -> Example:
    """One row of format `fmt` as an Example; RowError for unusable values."""
    keys = keys or {}
    row = {k: nested(v) for k, v in row.items()}
    if fmt == "alpaca":
        return Example("alpaca", response=_text(row.get("output")), instruction=_text(row.get("instruction")),
                       input=_text(row.get("input")))
    if fmt == "prompt-completion":
        return Example("pair", prompt=_text(row.get("prompt")), response=_text(row.get("completion")))
    if fmt == "text":
        return Example("text", response=_text(row.get("text")))
    if fmt == "chat":
        turns = row.get("messages")
        return Example("chat", messages=_messages(turns, keys.get("role", "role"), keys.get("content", "content"),
                                                  roles=None), tools=_tools(row.get("tools")))
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" not in turns[0] \
                and "role" in turns[0] and "from" not in keys:
            return Example("chat", messages=_messages(turns, "role", "content", roles=SHAREGPT_ROLES),
                           tools=_tools(row.get("tools")))
        return Example("chat", messages=_messages(turns, keys.get("from", "from"), keys.get("value", "value"),
                                                  roles=SHAREGPT_ROLES), tools=_tools(row.get("tools")))
    raise ValueError(f"unknown format {fmt}")


def _messages(turns: Any, role_key: str, content_key: str, roles: dict[str, str] | None) -> list[dict[str, Any]]:
    if isinstance(turns, dict):  # one message where a list is expected
        turns = [turns]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RowError(f"expected a list of {{{role_key}, {content_key}}} objects, got {type(turns).__name__}")
    out = []
    for n, turn in enumerate(turns, 1):
        if role_key not in turn or turn[role_key] is None:
            raise RowError(f"a message has no '{role_key}' (keys: {', '.join(turn)})")
        given = str(turn[role_key])
        role = roles.get(given.lower(), given) if roles is not None else given
        message: dict[str, Any] = {"role": role, "content": content_text(turn.get(content_key), n)}
        if roles is not None and given.lower() == "function_call":  # ShareGPT: the call is the turn's value
            message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(turn.get(content_key), n)}
        for key in PASSED_KEYS:
            if turn.get(key) is not None:
                message[key] = turn[key] if key in ("tool_call_id", "name") else content_text(turn[key], n)
        if turn.get("tool_calls"):
            message["tool_calls"] = _tool_calls(turn["tool_calls"], n)
        out.append(message)
    return out


def content_text(value: Any, message: int = 0) -> str:
    """A message's content as text: a string, or the text parts of a list of parts joined (the OpenAI shape)."""
    if isinstance(value, dict) and "type" in value:
        value = [value]
    if isinstance(value, list):
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if isinstance(part, str):
                texts.append(part)
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                where = f"message {message}" if message else "a message"
                raise RowError(f"{where} has a '{kind}' content part: ftcli trains on text only (no images, audio "
                               "or files yet); drop that part or the row")
        return "".join(texts)
    return _text(value)


def _tool_calls(value: Any, message: int) -> list[dict[str, Any]]:
    """Tool calls as chat templates read them: {"type": "function", "function": {"name", "arguments": {...}}}."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError(f"message {message}: its tool call is not JSON ({value[:60]!r})") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError(f"message {message}: a tool call needs a function name, got {str(call)[:80]}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, dict):  # read through Arrow, an object has every other call's keys, as null
            arguments = {k: v for k, v in arguments.items() if v is not None}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise RowError(f"message {message}: the arguments of tool call {function['name']!r} are not "
                               "JSON") from None
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call, dict) and call.get("id") is not None:
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """A row's `tools` (JSON schemas): a list, one schema, or their JSON text; None when absent or empty."""
    import json

    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError(f"'tools' is not JSON ({value[:60]!r})") from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError("'tools' must be a list of JSON schemas")
    return value or None


def _text(value: Any) -> str:
    return "" if value is None else str(value)
