"""Examples -> `input_ids` + `labels`, the way ftcli trains on them.

    >>> from ftcli.data.pipeline import tokenize_pairs
    >>> rows = tokenize_pairs([("Q: 2+3? A: ", "5")], tokenizer, seq_length=64, train_on_inputs=False)

Loss masks: the prompt's labels are -100 unless `train_on_inputs`; the response and exactly one
EOS after it are always in the loss. A response that already ends with the EOS text (data made
for the reference scripts, which append it) does not get a second one. In a conversation every
assistant turn is trained, end-of-turn token included (see `ftcli.data.templates`), and EOS is
appended once after the last one unless the template already ends with it. An example longer
than `seq_length` keeps its start and loses its EOS: the model must not learn to stop where the
text was merely cut.

`encode_batch` is what `datasets.map` runs in each worker process: format -> template ->
tokenize -> labels, with one `drop` reason per row ("" when kept). `encode_prompt` is the same
rendering cut where the response starts: what `ftcli generate` and `ftcli chat` feed the model,
so inference sees exactly the prompts training did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftcli.data.formats import Example, RowError, row_to_example
from ftcli.data.templates import NotPrefixStable, example_to_messages, example_to_pair, render_chat, render_turns, trainable

IGNORE = -100
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # how reasoning is written inside a turn by most thinking models

# Why a row is dropped (the `drop` column; "" = kept).
DROP_EMPTY = "empty"  # no response / no assistant turn / empty text
DROP_TOO_LONG = "too_long"  # the prompt alone is longer than --seq-length
DROP_NO_RESPONSE = "no_response"  # the prompt fits, but truncation leaves no trained token
DROP_SAME = "same_answers"  # a preference pair whose chosen and rejected answers are identical (nothing to learn)
DROP_NO_ASSISTANT = "no_assistant"  # a preference answer given as messages with no assistant message
INVALID = "invalid: "  # prefix of a row whose values are unusable (an error, not a drop)


@dataclass
class DataReport:
    source: str
    source_kind: str
    fingerprint: str
    rows_read: int
    rows_selected: int
    rows_used: int = 0
    dropped_empty_output: int = 0
    dropped_prompt_too_long: int = 0
    dropped_no_response: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    eos_trained_once: int = 0  # examples whose final EOS is a target exactly once (all but truncated ones)
    max_length: int = 0
    format: str = ""
    template: str = ""
    prepared: str | None = None  # the prepared folder the data was read from or written to
    reused: bool = False  # True when that folder already existed (a cache hit or --dataset <prepared folder>)
    stats: dict[str, Any] = field(default_factory=dict)  # the manifest's statistics (see ftcli.data.prepare)
    # A mixture's sources (ftcli.data.mixture): ref, weight, share, format, template, rows_read, rows_used, tokens...
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS for Llama-style tokenizers)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start:start + len(bare)] == bare:
            return list(with_special[:start])
    return []


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    drop: str = ""


def _cut(ids: list[int], labels: list[int], seq_length: int, prompt_len: int) -> Encoded:
    """Truncate to `seq_length`; decide whether anything trainable is left."""
    if len(ids) <= seq_length:
        return Encoded(ids, labels, False)
    # Keep the start, as training and inference see it; the cut response loses its EOS on purpose.
    ids, labels = ids[:seq_length], labels[:seq_length]
    if all(t == IGNORE for t in labels[1:]):
        return Encoded(ids, labels, True, DROP_TOO_LONG if prompt_len > seq_length else DROP_NO_RESPONSE)
    return Encoded(ids, labels, True)


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, straight from the Rust tokenizer when there
    is one: the same ids without building a Python dict per text (a sixth of the time on large datasets)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def encode_pairs(pairs: list[tuple[str, str]], tokenizer: Any, seq_length: int, train_on_inputs: bool,
                 prefix: list[int] | None = None) -> list[Encoded]:
    """(prompt, response) pairs -> Encoded, tokenized in one batch: prompt and response apart, as ftcli always has."""
    if not pairs:
        return []
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    prefix = special_prefix(tokenizer) if prefix is None else prefix
    prompts = [p for p, _ in pairs]
    responses = [r[: -len(eos_text)] if eos_text and r.endswith(eos_text) else r for _, r in pairs]
    prompt_ids = token_ids(tokenizer, prompts)
    response_ids = token_ids(tokenizer, responses)
    out = []
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        head = prefix + list(p_ids)
        tail = list(r_ids) + [eos_id]
        labels = (list(head) if train_on_inputs else [IGNORE] * len(head)) + tail
        out.append(_cut(head + tail, labels, seq_length, len(head)))
    return out


def encode_chats(chats: list[tuple[str, list[tuple[int, int]]]], tokenizer: Any, seq_length: int,
                 train_on_inputs: bool, ends: list[bool] | None = None) -> list[Encoded]:
    """(rendered conversation, trained character spans) -> Encoded. `ends`: whether each text ends the conversation
    (EOS follows it; an example of an earlier turn, rendered one per assistant turn, ends where the turn ends)."""
    if not chats:
        return []
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    enc = tokenizer([text for text, _ in chats], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for n, ((text, spans), ids, offsets) in enumerate(zip(chats, enc["input_ids"], enc["offset_mapping"])):
        ids = list(ids)
        # A token is trained when it overlaps an assistant span: a first token that also carries the
        # generation prompt's trailing space ("ASSISTANT:" + " 3") is still the answer's.
        trained = [any(start < b and end > a for a, b in spans) for start, end in offsets]
        if (ends is None or ends[n]) and not text.rstrip().endswith(eos_text):
            ids.append(eos_id)
            trained.append(True)
        labels = [t if (keep or train_on_inputs) else IGNORE for t, keep in zip(ids, trained)]
        first = next((i for i, keep in enumerate(trained) if keep), len(ids))
        out.append(_cut(ids, labels, seq_length, first))
    return out


def encode_prompt(example: Example, template: Any, tokenizer: Any, system: str | None = None) -> list[int]:
    """The token ids a trained model sees before its response, rendered and tokenized exactly as
    `encode_pairs` / `encode_chats` did for training: what generation continues from.

    Pairs (Alpaca, prompt/completion): the tokenizer's special prefix + the prompt's tokens. Chat
    templates: the conversation (plus `system`, first) rendered with the generation prompt, tokenized
    without special tokens, as training tokenized the whole conversation. Text: the text itself."""
    if template.is_chat and example.kind != "text":
        messages = list(example_to_messages(example))
        if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages.pop()  # a single-turn example's empty response: the turn to generate
        if system is not None:
            messages = [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]
        if not messages or messages[-1]["role"] == "assistant":
            raise RowError("the conversation must end with a user turn for the model to answer")
        try:
            text = template.apply(tokenizer, messages, True, tools=example.tools)
        except Exception as exc:  # jinja2 TemplateError, raise_exception(...) in the template, ...
            raise RowError(f"the chat template fails on this conversation: {exc}") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt = example.response if example.kind == "text" else example_to_pair(example, template)[0]
    return special_prefix(tokenizer) + list(token_ids(tokenizer, [prompt])[0])


def _turn_tail(template: Any, tokenizer: Any) -> str:
    """What a chat template writes after an assistant turn's content (`<|im_end|>\n`, `<end>\n`...)."""
    marker = "ftcli-end-of-turn-probe"
    try:
        text = template.apply(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                              False)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe: EOS alone stops
        return ""
    return text[text.find(marker) + len(marker):] if marker in text else ""


def end_of_turn_ids(template: Any, tokenizer: Any) -> list[int]:
    """The special tokens a chat template closes an assistant turn with (e.g. `<|im_end|>`): what training put
    in the loss after each answer, so generation stops there. Empty for text templates (they end with EOS)."""
    if not template.is_chat:
        return []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [i for i in tokenizer(_turn_tail(template, tokenizer), add_special_tokens=False)["input_ids"]
            if i in special][:1]


def end_of_turn_text(template: Any, tokenizer: Any) -> str | None:
    """A chat template's end of turn written as plain text (no special token for it, e.g. `<end>`): the text
    generation must stop at, as training put it in the loss after every answer but the last. None otherwise."""
    if not template.is_chat or end_of_turn_ids(template, tokenizer):
        return None
    tail = _turn_tail(template, tokenizer).strip()
    if not tail or (tokenizer.eos_token and tail.startswith(tokenizer.eos_token)):
        return None
    return tail.split()[0]


def without_reasoning(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The trained spans less the reasoning inside each `<think>...</think>` (`--no-train-reasoning`): the tags and
    the answer after them stay trained, so the model still learns to open and close its reasoning."""
    out = []
    for start, end in spans:
        cursor = start
        while (opened := text.find(THINK_OPEN, cursor, end)) >= 0:
            closed = text.find(THINK_CLOSE, opened, end)
            if closed < 0:
                break
            out.append((cursor, opened + len(THINK_OPEN)))
            cursor = closed
        out.append((cursor, end))
    return [(a, b) for a, b in out if b > a]


def encode_batch(batch: dict[str, list[Any]], indices: list[int] | None = None, *, fmt: str,
                 keys: dict[str, str] | None, template: Any, tokenizer: Any, seq_length: int,
                 train_on_inputs: bool, train_reasoning: bool = True) -> dict[str, list[Any]]:
    """One `datasets.map` batch of raw rows -> input_ids, labels, length, loss_tokens, truncated, eos_once, drop,
    and the row each example came from (`row`) and whether that row was rendered one example per assistant turn
    (`per_turn`: a template that renders history differently, see ftcli.data.templates.render_turns)."""
    n = len(next(iter(batch.values()))) if batch else 0
    results: list[list[Encoded] | str] = [DROP_EMPTY] * n
    per_turn = [False] * n
    pairs: list[tuple[str, str]] = []
    chats: list[tuple[str, list[tuple[int, int]]]] = []
    ends: list[bool] = []
    pair_pos: list[int] = []
    chat_pos: list[int] = []
    for i in range(n):
        try:
            example = row_to_example({k: v[i] for k, v in batch.items()}, fmt, keys)
            if template.is_chat and example.kind != "text":
                messages = example_to_messages(example)
                if not any(trainable(m) for m in messages):
                    continue
                try:
                    rendered = [render_chat(messages, tokenizer, template, example.tools)]
                except NotPrefixStable:
                    rendered, per_turn[i] = render_turns(messages, tokenizer, template, example.tools), True
                if not train_reasoning:
                    rendered = [(text, without_reasoning(text, spans)) for text, spans in rendered]
                chats.extend(rendered)
                chat_pos.extend([i] * len(rendered))
                ends.extend([False] * (len(rendered) - 1) + [True])
            else:
                prompt, response = ("", example.response) if example.kind == "text" \
                    else example_to_pair(example, template)
                if not response.strip():
                    continue
                pairs.append((prompt, response))
                pair_pos.append(i)
        except RowError as exc:
            results[i] = INVALID + str(exc)
    for pos, encoded in zip(pair_pos, encode_pairs(pairs, tokenizer, seq_length, train_on_inputs)):
        results[pos] = [encoded]
    for pos, encoded in zip(chat_pos, encode_chats(chats, tokenizer, seq_length, train_on_inputs, ends)):
        results[pos] = [*(results[pos] if isinstance(results[pos], list) else []), encoded]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "loss_tokens": [], "truncated": [],
                                 "eos_once": [], "drop": [], "row": [], "per_turn": []}
    eos_id = tokenizer.eos_token_id
    for i, result in enumerate(results):
        for r in result if isinstance(result, list) else [Encoded([], [], False, result)]:
            out["input_ids"].append(r.input_ids)
            out["labels"].append(r.labels)
            out["length"].append(len(r.input_ids))
            out["loss_tokens"].append(len(r.labels) - r.labels.count(IGNORE))
            out["truncated"].append(r.truncated)
            out["eos_once"].append(r.labels.count(eos_id) == 1)
            out["drop"].append(r.drop)
            out["row"].append(indices[i] if indices is not None else i)
            out["per_turn"].append(per_turn[i])
    return out


def tokenize_pairs(
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    seq_length: int,
    train_on_inputs: bool,
    report: DataReport | None = None,
) -> dict[str, list[list[int]]]:
    """Tokenize (prompt, response) pairs in batch into input_ids and labels (see module doc)."""
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for encoded in encode_pairs(pairs, tokenizer, seq_length, train_on_inputs):
        if report is not None:
            report.truncated += encoded.truncated
            report.dropped_prompt_too_long += encoded.drop == DROP_TOO_LONG
            report.dropped_no_response += encoded.drop == DROP_NO_RESPONSE
        if encoded.drop:
            continue
        out["input_ids"].append(encoded.input_ids)
        out["labels"].append(encoded.labels)
    if report is not None:
        report.rows_used = len(out["input_ids"])
        report.tokens = sum(len(x) for x in out["input_ids"])
        report.loss_tokens = sum(sum(1 for t in lab if t != IGNORE) for lab in out["labels"])
        report.max_length = max((len(x) for x in out["input_ids"]), default=0)
        report.eos_trained_once = sum(1 for n in eos_loss_counts(out["labels"], tokenizer.eos_token_id) if n == 1)
    return out


def eos_loss_counts(labels: list[list[int]], eos_id: int) -> list[int]:
    """How many times EOS is a training target in each example (1 for every untruncated example)."""
    return [sum(1 for t in lab if t == eos_id) for lab in labels]


def explain_example(input_ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """One example as (token text, in the loss) pairs, in order: what `inspect` shows and tests check.

    A token is "in the loss" when its label is not -100 (the label at position 0 is never predicted,
    but it is shown as stored)."""
    texts = tokenizer.convert_ids_to_tokens(list(input_ids))
    pieces = []
    for tid, text in zip(input_ids, texts):
        decoded = tokenizer.decode([tid]) if tid not in tokenizer.all_special_ids else text
        pieces.append(decoded)
    return [(piece, label != IGNORE) for piece, label in zip(pieces, labels)]
