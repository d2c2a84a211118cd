"""Preference pairs (`--objective dpo`): a prompt with a chosen and a rejected answer, tokenized and masked.

    >>> from ftcli.data.preference_prepare import prepare_pairs      # the cache, statistics, held-out pairs
    >>> prepared = prepare_pairs(config, tokenizer)   # cached under <ftcli_home>/datasets/<key>
    >>> prepared.dataset.column_names
    ['prompt_ids', 'chosen_ids', 'rejected_ids', 'length']

The shapes a row may have (after `--columns`, e.g. `--columns prompt=question,chosen=good,rejected=bad`):

| prompt | chosen / rejected | rendered as |
|---|---|---|
| a string | strings | SFT's prompt/completion rules: as is (`--template auto`), Alpaca, or a chat template |
| none | strings (whole texts) | the same; the prompt is their shared leading text, up to a whitespace |
| none (or a copy of the first turn) | message lists | their shared leading messages are the prompt (HH, UltraFeedback) |
| a message list (or a string) | strings, one assistant message, or answer-only message lists | the chat template |

The rendering is SFT's (ftcli/data/pipeline.py, templates.py): plain strings get the tokenizer's special
prefix before the prompt and one EOS after each answer (an answer that already ends with the EOS text
does not get a second); conversations are rendered with the model's chat template (or `--template FILE`),
each answer is what the template adds after the prompt's generation prompt (its end-of-turn token
included), and EOS is appended after it unless the template already ends with it. The answer tokens are
the trained ones (`chosen_ids`, `rejected_ids`), the prompt (`prompt_ids`) is masked.

Truncation keeps the prompt's start, cut to `--max-prompt-length` (default: half of `--seq-length`), and cuts
each answer to what is left of `--seq-length` (a cut answer loses its EOS, as in SFT). A pair where one answer
is cut and the other is not is counted (`cut_differently`) and reported: the two are then compared on
unequal terms. A pair with an empty answer, an answer with no assistant message, or identical chosen and rejected
answers (with or without a prompt: nothing to prefer) is dropped, each reason counted and reported; a row with no
chosen/rejected pair at all is refused, and so is data where every pair is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftcli.data.formats import Example, RowError, _messages, column_renames, nested
from ftcli.data.pipeline import (DROP_EMPTY, DROP_NO_ASSISTANT, DROP_NO_RESPONSE, DROP_SAME, INVALID, special_prefix,
                                 token_ids)
from ftcli.data.templates import NotPrefixStable, example_to_pair, render_chat, render_turns
from ftcli.errors import DataError

PAIR_FIELDS = ("prompt", "chosen", "rejected")
COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "length"]
MAP_BATCH = 1000


@dataclass
class Pair:
    """One row as a pair: text (strings) or chat (message lists: the prompt and each answer's turns)."""

    chat: bool
    prompt: Any  # str | list[dict]
    chosen: Any
    rejected: Any


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_cut: bool = False
    chosen_cut: bool = False
    rejected_cut: bool = False
    drop: str = ""


# ---- columns and shapes ---------------------------------------------------------------------------------------


def pair_renames(columns: dict[str, str] | None, available: list[str], source: str) -> dict[str, str]:
    """`--columns prompt=...,chosen=...,rejected=...` as dataset renames (column -> field), checked against the data."""
    return column_renames(columns, available, PAIR_FIELDS, "preference data", source, ("role", "content"))


def check_pair_columns(columns: list[str], source: str, objective: str = "dpo") -> None:
    """Refuse data without a chosen/rejected pair, in one line naming the file and the columns found."""
    missing = [f for f in ("chosen", "rejected") if f not in columns]
    if missing:
        found = ", ".join(f"'{c}'" for c in columns) or "none"
        raise DataError(f"dataset {source} has no chosen/rejected pair for --objective {objective}: no column "
                        f"{' or '.join(repr(m) for m in missing)} (columns found: {found})",
                        hint="preference data needs 'chosen' and 'rejected' (and optionally 'prompt'); map your "
                             "names with --columns chosen=COLUMN,rejected=COLUMN[,prompt=COLUMN]")


def row_pair(row: dict[str, Any], keys: dict[str, str]) -> Pair:
    """A raw row as a Pair (RowError when its values are unusable)."""
    role, content = keys.get("role", "role"), keys.get("content", "content")
    prompt, chosen, rejected = (nested(row.get(k)) for k in ("prompt", "chosen", "rejected"))
    if isinstance(prompt, dict):  # one message where a list is expected
        prompt = [prompt]
    if chosen == rejected and chosen is not None:  # nothing to prefer, in any shape: dropped (DROP_SAME) by the caller
        return Pair(not isinstance(chosen, str), prompt, chosen, rejected)
    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
        if prompt is None:  # whole texts (Anthropic HH as strings): the shared leading words are the prompt
            shared = shared_text(chosen, rejected)
            return Pair(False, chosen[:shared], chosen[shared:], rejected[shared:])
        return Pair(False, str(prompt), chosen, rejected)
    c, r = _answer(chosen, role, content, "chosen"), _answer(rejected, role, content, "rejected")
    shared = 0
    while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
        shared += 1
    if shared:  # whole conversations (HH, UltraFeedback, whose `prompt` column only repeats the first turn)
        return Pair(True, c[:shared], c[shared:], r[shared:])
    if prompt is None:
        raise RowError("chosen and rejected share no leading messages, and there is no 'prompt' column: "
                       "the prompt must be the conversation both answers continue")
    p = _messages(prompt, role, content, roles=None) if isinstance(prompt, list) else \
        [{"role": "user", "content": str(prompt)}]
    return Pair(True, p, c, r)


def shared_text(a: str, b: str) -> int:
    """Where two texts part, moved back to just after the last whitespace they share (an answer starts a word)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    return n


def _answer(value: Any, role: str, content: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(f"'{name}' must be a string, an assistant message or a list of messages, "
                       f"got {type(value).__name__}")
    return _messages(value, role, content, roles=None)


def drop_reason(pair: Pair) -> str:
    """Why a pair teaches nothing ("" when it is usable): an empty answer, an answer with no assistant message, or
    two identical answers (DPO's loss stays at log 2 on them), in that order."""
    if pair.chosen == pair.rejected:
        return DROP_EMPTY if isinstance(pair.chosen, str) and not pair.chosen.strip() else DROP_SAME
    for answer in (pair.chosen, pair.rejected):
        if isinstance(answer, str):
            if not answer.strip():
                return DROP_EMPTY
        elif not any(m["role"] == "assistant" for m in answer):
            return DROP_NO_ASSISTANT
        elif not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
            return DROP_EMPTY
    return ""


# ---- rendering and tokenizing ---------------------------------------------------------------------------------


def encode_text_pair(pair: Pair, template: Any, tokenizer: Any, prefix: list[int]) -> EncodedPair:
    """Strings under a text template (as is, or Alpaca): SFT's encode_pairs for each answer."""
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    texts = [example_to_pair(Example("pair", prompt=pair.prompt, response=answer), template)
             for answer in (pair.chosen, pair.rejected)]
    answers = [a[: -len(eos_text)] if eos_text and a.endswith(eos_text) else a for _, a in texts]
    prompt, chosen, rejected = token_ids(tokenizer, [texts[0][0], *answers])
    return EncodedPair(prefix + list(prompt), list(chosen) + [eos_id], list(rejected) + [eos_id])


def encode_chat_pair(pair: Pair, template: Any, tokenizer: Any) -> EncodedPair:
    """Conversations under a chat template: each side rendered whole, the answer starting where its first turn
    after the prompt starts (the token that overlaps it is the answer's, as in SFT's chat masks)."""
    prompt = pair.prompt if pair.chat else [{"role": "user", "content": pair.prompt}]
    sides = []
    for answer in (pair.chosen, pair.rejected):
        turns = answer if pair.chat else [{"role": "assistant", "content": answer}]
        sides.append(_chat_side(prompt, turns, template, tokenizer))
    (p1, a1), (p2, a2) = sides
    shared = 0
    while shared < min(len(p1), len(p2)) and p1[shared] == p2[shared]:
        shared += 1
    # The prompt tokens of both sides are the same but for a merge across the boundary: that tail is answer.
    return EncodedPair(p1[:shared], p1[shared:] + a1, p2[shared:] + a2)


def _chat_side(prompt: list[dict[str, str]], turns: list[dict[str, str]], template: Any,
               tokenizer: Any) -> tuple[list[int], list[int]]:
    messages = [*prompt, *turns]
    if not any(m["role"] == "assistant" for m in turns):
        raise RowError("an answer has no assistant message")
    before = sum(1 for m in prompt if m["role"] == "assistant")
    try:
        text, spans = render_chat(messages, tokenizer, template)
        start = spans[before][0]
    except NotPrefixStable:  # a template that drops earlier reasoning: the answer as inference renders it
        text, spans = render_turns(messages[: len(prompt) + 1], tokenizer, template)[-1]
        if len(turns) > 1:
            raise RowError("an answer of several turns needs a chat template that renders earlier turns the same "
                           "way once later turns follow; give each answer as one assistant message") from None
        start = spans[0][0]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    cut = next((i for i, (_, end) in enumerate(offsets) if end > start), len(ids))
    answer = ids[cut:]
    if not text.rstrip().endswith(tokenizer.eos_token or "\0"):
        answer.append(tokenizer.eos_token_id)
    return ids[:cut], answer


def truncate(encoded: EncodedPair, max_prompt: int, seq_length: int) -> EncodedPair:
    """Keep the prompt's start (at most `max_prompt` tokens), then cut each answer to the rest of `seq_length`."""
    if len(encoded.prompt_ids) > max_prompt:
        encoded.prompt_ids, encoded.prompt_cut = encoded.prompt_ids[:max_prompt], True
    room = seq_length - len(encoded.prompt_ids)
    encoded.chosen_cut, encoded.rejected_cut = len(encoded.chosen_ids) > room, len(encoded.rejected_ids) > room
    encoded.chosen_ids, encoded.rejected_ids = encoded.chosen_ids[:room], encoded.rejected_ids[:room]
    if not encoded.chosen_ids or not encoded.rejected_ids:
        encoded.drop = DROP_NO_RESPONSE
    return encoded


def encode_pairs_batch(batch: dict[str, list[Any]], *, keys: dict[str, str], template: Any, tokenizer: Any,
                       max_prompt: int, seq_length: int) -> dict[str, list[Any]]:
    """One `datasets.map` batch of raw rows -> the pair columns and the statistics' helper columns."""
    n = len(next(iter(batch.values()))) if batch else 0
    prefix = special_prefix(tokenizer)
    out: dict[str, list[Any]] = {name: [] for name in (*COLUMNS, "prompt_cut", "chosen_cut", "rejected_cut",
                                                       "drop")}
    for i in range(n):
        try:
            pair = row_pair({k: v[i] for k, v in batch.items()}, keys)
            reason = drop_reason(pair)
            if reason:
                encoded = EncodedPair([], [], [], drop=reason)
            elif template.is_chat:
                encoded = truncate(encode_chat_pair(pair, template, tokenizer), max_prompt, seq_length)
            elif pair.chat:
                raise RowError(f"a conversation needs a chat template, and --template is {template.name}")
            else:
                encoded = truncate(encode_text_pair(pair, template, tokenizer, prefix), max_prompt, seq_length)
        except RowError as exc:
            encoded = EncodedPair([], [], [], drop=INVALID + str(exc))
        out["prompt_ids"].append(encoded.prompt_ids)
        out["chosen_ids"].append(encoded.chosen_ids)
        out["rejected_ids"].append(encoded.rejected_ids)
        out["length"].append(len(encoded.prompt_ids) + max(len(encoded.chosen_ids), len(encoded.rejected_ids)))
        out["prompt_cut"].append(encoded.prompt_cut)
        out["chosen_cut"].append(encoded.chosen_cut)
        out["rejected_cut"].append(encoded.rejected_cut)
        out["drop"].append(encoded.drop)
    return out


def explain_pair(row: dict[str, Any], tokenizer: Any) -> dict[str, list[tuple[str, bool]]]:
    """A prepared pair as {"chosen": [(token text, in the loss)], "rejected": [...]}: the prompt masked."""
    from ftcli.data.pipeline import IGNORE, explain_example

    out = {}
    for side in ("chosen", "rejected"):
        ids = list(row["prompt_ids"]) + list(row[f"{side}_ids"])
        labels = [IGNORE] * len(row["prompt_ids"]) + list(row[f"{side}_ids"])
        out[side] = explain_example(ids, labels, tokenizer)
    return out

