"""The prompt format that travels with a GGUF: chat template, EOS / end-of-turn ids, BOS, Ollama's Modelfile.

    >>> from ftcli.export.gguf.prompt import prompt_format, modelfile
    >>> prompt = prompt_format(src, tokenizer)
    >>> prompt.chat_template, prompt.eos_id, prompt.eot_id, prompt.add_bos
    >>> text = modelfile(prompt, "model-f16.gguf")

The run's manifest records how training rendered examples (its data format and template). A chat
run's GGUF carries that chat template; an Alpaca run's carries a chat template that renders the
Alpaca prompt (`ftcli.data.alpaca`) around the user's message; a prompt-completion or text run's
renders the message as it is. `add_bos` is whether training put BOS before the prompt: llama.cpp
(`--jinja`) drops a BOS the template rendered and adds one itself only when the file says so, so
this keeps the ids the model sees identical to training's. `probes` are the fixed prompts rendered
as training would have (text and ids): what the checks compare on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcli.data.alpaca import ALPACA_PROMPT_TEMPLATE

ALPACA_NAME = "alpaca"
# Ollama's ChatML template (Go text/template), written when the run's template renders exactly ChatML.
CHATML_OLLAMA = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")
_PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]


@dataclass
class Probe:
    prompt: str  # the fixed prompt (ftcli.export.merge.VERIFY_PROMPTS)
    text: str  # rendered as training rendered it, BOS included as text where training had one
    ids: list[int]  # the ids training would have fed the model


@dataclass
class PromptFormat:
    fmt: str  # the run's data format (alpaca, chat, ...; "unknown" without a manifest)
    template: str  # the run's template name (alpaca, model, plain, file:..., none)
    chat_template: str
    add_bos: bool
    eos_id: int | None
    eot_id: int | None
    bos_token: str | None
    eos_token: str | None
    eot_token: str | None
    ollama_template: str | None  # None: the format cannot be written as an Ollama TEMPLATE exactly
    ollama_note: str
    probes: list[Probe] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"format": self.fmt, "template": self.template, "add_bos": self.add_bos, "eos_id": self.eos_id,
                "eot_id": self.eot_id, "chat_template": self.chat_template,
                "ollama_template": self.ollama_template is not None}


def prompt_format(src: Any, tokenizer: Any) -> PromptFormat:
    """How the run rendered prompts (its manifest), as a GGUF chat template and special ids."""
    from ftcli.data.pipeline import end_of_turn_ids, special_prefix
    from ftcli.inference.target import rendering

    data = (src.manifest or {}).get("data") or {}
    fmt, spec = rendering(data.get("format"), data.get("template"), "auto", tokenizer, str(src.path),
                          folder=Path(src.path))
    kwargs = ((src.manifest or {}).get("config") or {}).get("template_kwargs")
    if spec.is_chat and kwargs:
        spec = spec.with_kwargs(kwargs)
    bos = tokenizer.bos_token
    prefix = special_prefix(tokenizer)
    eot_token = None
    if spec.is_chat:
        template = spec.baked_template  # --template-kwargs set inside it: llama.cpp renders as training did
        first = spec.apply(tokenizer, [{"role": "user", "content": "x"}], True)
        add_bos = bool(bos) and first.startswith(bos)
        eot = end_of_turn_ids(spec, tokenizer)
        eot_id = eot[0] if eot and eot[0] != tokenizer.eos_token_id else None
        eot_token = tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None
    else:
        add_bos = bool(prefix) and bool(bos) and prefix == [tokenizer.bos_token_id]
        template = alpaca_chat_template(add_bos) if spec.name == ALPACA_NAME else raw_chat_template(add_bos)
        eot_id = None
    prompt = PromptFormat(fmt, spec.name, template, add_bos, tokenizer.eos_token_id, eot_id, bos,
                          tokenizer.eos_token, eot_token, None, "")
    prompt.ollama_template, prompt.ollama_note = _ollama(prompt, spec, tokenizer)
    prompt.probes = probes(fmt, spec, tokenizer)
    return prompt


def probes(fmt: str, spec: Any, tokenizer: Any) -> list[Probe]:
    """The fixed prompts as training would have rendered and tokenized them."""
    from types import SimpleNamespace

    from ftcli.data.pipeline import encode_prompt
    from ftcli.export.merge import VERIFY_PROMPTS
    from ftcli.inference.prompts import prompt_example

    found = []
    for text in VERIFY_PROMPTS:
        example = prompt_example(SimpleNamespace(fmt=fmt, ref="the run"), text)
        ids = encode_prompt(example, spec, tokenizer)
        found.append(Probe(text, render_training_text(example, spec, tokenizer), ids))
    return found


def render_training_text(example: Any, spec: Any, tokenizer: Any) -> str:
    """The prompt's text as training rendered it (the BOS training put in front written as its token text)."""
    from ftcli.data.pipeline import special_prefix
    from ftcli.data.templates import example_to_messages, example_to_pair

    if spec.is_chat and example.kind != "text":
        messages = [m for m in example_to_messages(example) if m["role"] != "assistant" or m["content"]]
        return spec.apply(tokenizer, messages, True)
    text = example.response if example.kind == "text" else example_to_pair(example, spec)[0]
    prefix = special_prefix(tokenizer)
    return (tokenizer.decode(prefix) if prefix else "") + text


def alpaca_chat_template(bos: bool) -> str:
    """A chat template that renders the Alpaca prompt training used (instruction = the user's message, no
    input), and a reply followed by EOS; a system message cannot be expressed and is refused."""
    head, middle, tail, _ = ALPACA_PROMPT_TEMPLATE.split("{}")
    start = "bos_token + " if bos else ""
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{{{ {start}{json.dumps(head)} + message['content'] + {json.dumps(middle + tail)} }}}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ message['content'] + eos_token }}"
            "{%- else -%}"
            "{{ raise_exception('the Alpaca prompt format has no ' + message['role'] + ' message') }}"
            "{%- endif -%}"
            "{%- endfor -%}")


def raw_chat_template(bos: bool) -> str:
    """A prompt-completion or text run: the user's message is the prompt, as it is."""
    start = "{{ bos_token }}" if bos else ""
    return (start + "{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
            "{%- else -%}{{ message['content'] }}{%- endif -%}"
            "{%- endfor -%}")


def _ollama(prompt: PromptFormat, spec: Any, tokenizer: Any) -> tuple[str | None, str]:
    if spec.name == ALPACA_NAME:
        head, middle, tail, _ = ALPACA_PROMPT_TEMPLATE.split("{}")
        return head + "{{ .Prompt }}" + middle + tail, "the Alpaca prompt training used (one turn; no system)"
    if not spec.is_chat:
        return "{{ .Prompt }}", "the prompt as it is, as training used it"
    try:
        rendered = spec.apply(tokenizer, _PROBE_CHAT, True)
    except Exception:  # noqa: BLE001 - a template that refuses a system turn: not ChatML
        rendered = None
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in _PROBE_CHAT)
    if rendered == chatml + "<|im_start|>assistant\n" and not prompt.add_bos:
        return CHATML_OLLAMA, "ChatML, as the run's chat template renders it"
    return None, ("the run's chat template is not one ftcli can write as an Ollama template exactly; Ollama "
                  "picks a template for the GGUF's tokenizer.chat_template itself, which may differ: check it, or "
                  "use llama.cpp with --jinja, which runs the template itself")


def modelfile(prompt: PromptFormat, gguf_name: str) -> str:
    """The Ollama Modelfile beside the GGUF: FROM, TEMPLATE where exact (a note where not), the stop tokens."""
    lines = ["# Ollama Modelfile written by `ftcli export --format gguf`.",
             "#   ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if prompt.ollama_template is not None:
        lines += [f"# Prompt format: {prompt.ollama_note}.", f'TEMPLATE """{prompt.ollama_template}"""', ""]
    else:
        lines += [f"# No TEMPLATE: {prompt.ollama_note}.", ""]
    for token in dict.fromkeys(t for t in (prompt.eot_token, prompt.eos_token) if t):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"
