"""Which llama.cpp pre-tokenizer a Hugging Face BPE tokenizer needs, read from its own `tokenizer.json`.

    >>> from ftcli.export.gguf.pretokenizer import llama_cpp_pre_tokenizer
    >>> llama_cpp_pre_tokenizer(Path("models/tiny/tokenizer.json"))   # ('gpt-2', None) or (None, 'why not')

llama.cpp's converter recognises a BPE pre-tokenizer by hashing the ids of a test string and
refuses any hash it has not seen (ftcli's built-in tiny model, any tokenizer trained by a user).
The split rules themselves are in `tokenizer.json`: when they are, exactly, one of the rule sets
llama.cpp implements (src/llama-vocab.cpp), its name is returned; anything else (a normalizer,
another regex, a prefix space, byte fallback...) is refused, because llama.cpp would split the
text differently and the model would read other ids than it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# GPT-2's split rule: a plain `ByteLevel(use_regex=True)` pre-tokenizer uses it (tokenizers' byte_level.rs).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's split rule (and its llama.cpp name), written by a `Split` before a regex-free `ByteLevel`.
SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
}


def llama_cpp_pre_tokenizer(tokenizer_json: Path) -> tuple[str | None, str | None]:
    """(llama.cpp pre-tokenizer name, None), or (None, the reason it cannot be determined)."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"its {tokenizer_json.name} cannot be read ({type(exc).__name__})"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"its model is {model.get('type')!r}, not a byte-level BPE"
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "its BPE uses byte fallback or word prefixes/suffixes, which llama.cpp's BPE does not"
    if spec.get("normalizer") is not None:
        return None, f"it normalizes text first ({_kind(spec['normalizer'])}), which llama.cpp's BPE does not"
    if _kind(spec.get("decoder")) != "ByteLevel":
        return None, f"its decoder is {_kind(spec.get('decoder'))}, not ByteLevel"
    return _pre(spec.get("pre_tokenizer"))


def _pre(pre: Any) -> tuple[str | None, str | None]:
    kind = _kind(pre)
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            return None, "its ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's gpt-2 rule does not"
        if pre.get("use_regex", True):
            return "gpt-2", None
        return None, "its ByteLevel pre-tokenizer splits nothing (use_regex false)"
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) == 2 and _kind(steps[0]) == "Split" and _kind(steps[1]) == "ByteLevel":
            split, level = steps
            regex = (split.get("pattern") or {}).get("Regex")
            if (regex in SPLIT_REGEXES and split.get("behavior") == "Isolated" and not split.get("invert")
                    and not level.get("use_regex", True) and not level.get("add_prefix_space")):
                return SPLIT_REGEXES[regex], None
        return None, "its pre-tokenizer sequence is not one llama.cpp implements"
    return None, f"its pre-tokenizer is {kind}, which llama.cpp has no rule for"


def _kind(part: Any) -> str:
    return str(part.get("type")) if isinstance(part, dict) else repr(part)
