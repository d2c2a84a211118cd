"""Templates: how an example becomes text, and which characters of that text are trained.

    >>> from ftcli.data.templates import resolve_template, render_chat
    >>> spec = resolve_template("auto", "chat", tokenizer, model="builtin:tiny-llama")
    >>> text, spans = render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ...                           tokenizer, spec.chat_template)
    >>> text[spans[0][0]:spans[0][1]]
    'Hello<|im_end|>\\n'

`--template` (resolved against the data's format):

| data | auto | alpaca | model | FILE.jinja |
|---|---|---|---|---|
| alpaca | the reference Alpaca template | same | user/assistant chat | user/assistant chat |
| prompt-completion | prompt + completion, as is | prompt as instruction | user/assistant chat | user/assistant chat |
| chat, sharegpt | the model's chat template | error | the model's chat template | the file |
| text | the text, as is | error | error | error |

With `auto`, a run that continues another (`--model RUN`, ftcli.chain.inherited_template) renders as that
run did instead: its chat template (the model's, or the Jinja text it kept) for every format but raw text,
or its Alpaca / plain prompt for single-turn data (conversations then need `--template model`).

A Jinja file is a chat template with the same contract as a tokenizer's (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`): the one to use at inference too. A model
without a chat template gets a clear error (a DataError naming `--template FILE.jinja`); ftcli
does not invent a default conversation format that inference would not know about.

Chat masks do not need `{% generation %}` markers: each assistant turn is located by rendering
the conversation prefix by prefix. What the template adds between "the conversation so far,
with the assistant's generation prompt" and "the conversation including that assistant turn"
is the turn the model must produce (its content and end-of-turn token, e.g. `<|im_end|>`); that
is trained, the rest is not. A template that renders earlier turns differently once later turns
exist (so no prefix lines up) is refused for that row with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.data.alpaca import format_alpaca
from ftcli.data.formats import Example, RowError
from ftcli.errors import ConfigError, DataError, ModelError

TEMPLATE_CHOICES = ("auto", "alpaca", "model")


@dataclass(frozen=True)
class TemplateSpec:
    name: str  # "alpaca" | "plain" | "model" | "file:<path>" | "none"
    chat_template: str | None = None  # the Jinja chat template, for "model" and "file:..."
    kwargs: tuple[tuple[str, Any], ...] = ()  # --template-kwargs (enable_thinking=false, ...), as sorted pairs

    @property
    def digest(self) -> str:
        text = self.chat_template or self.name
        if self.kwargs:  # only when given: every run without them keeps its digest
            text += json.dumps(dict(self.kwargs), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None

    @property
    def baked_template(self) -> str | None:
        """The chat template with `--template-kwargs` set at its top (`{%- set enable_thinking = false -%}`), for
        a runtime that renders the template itself (llama.cpp, Ollama) and would not pass them."""
        if self.chat_template is None or not self.kwargs:
            return self.chat_template
        sets = "".join(f"{{%- set {key} = {_jinja_literal(value)} -%}}\n" for key, value in self.kwargs)
        return sets + self.chat_template

    def with_kwargs(self, kwargs: dict[str, Any] | None) -> TemplateSpec:
        return TemplateSpec(self.name, self.chat_template, tuple(sorted((kwargs or {}).items())))

    def apply(self, tokenizer: Any, messages: list[dict[str, Any]], generation: bool,
              tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as the chat template renders it (with `--template-kwargs` and the row's tools): the
        one call every command renders through, training and inference alike."""
        kwargs = dict(self.kwargs)
        default_tools = kwargs.pop("tools", None)  # --tools: for the conversations without their own
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             chat_template=self.chat_template, tools=tools or default_tools, **kwargs)


def template_file(template: str) -> Path | None:
    """The Jinja file `--template` names, or None for a template name (auto, alpaca, model)."""
    if template in TEMPLATE_CHOICES:
        return None
    path = Path(template).expanduser()
    if not path.is_file():
        raise ConfigError(f"--template {template}: no such file, and not one of {', '.join(TEMPLATE_CHOICES)}",
                          hint="pass auto, alpaca, model, or the path to a Jinja chat template")
    return path


def read_template(path: Path) -> str:
    """A `--template` file's text (read once: what the cache key hashes is what renders), syntax-checked."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"--template {path} is not UTF-8 text", hint="save the Jinja template as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"--template {path}: cannot read it ({exc.strerror or exc})",
                          hint="check the file's permissions") from None
    problem = jinja_syntax_error(text)
    if problem:
        raise ConfigError(f"--template {path}:{problem}", hint="fix the template at that line")
    return text


def jinja_syntax_error(text: str) -> str | None:
    """`LINE: Jinja syntax error: MESSAGE` when the template does not compile (as transformers compiles it)."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # another transformers: jinja2's own parser, without the {% generation %} tag
        compile_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"{exc.lineno}: Jinja syntax error: {exc.message}"
    return None


def resolve_template(template: str, fmt: str, tokenizer: Any, model: str = "the model",
                     text: str | None = None, inherited: Any = None,
                     kwargs: dict[str, Any] | None = None) -> TemplateSpec:
    """The template for `fmt` data given `--template` (see the module's table); `text`: the file's, if read.
    `inherited` (ftcli.chain.InheritedTemplate): how the run `--model` continues rendered, used for `auto`.
    `kwargs` (`--template-kwargs`): handed to a chat template on every rendering."""
    spec = _resolve(template, fmt, tokenizer, model, text, inherited)
    if not kwargs:
        return spec
    if not spec.is_chat:
        raise ConfigError(f"--template-kwargs apply to a chat template, and this {fmt} data renders with the "
                          f"{spec.name} template", hint="drop --template-kwargs, or pass --template model or a Jinja file")
    return spec.with_kwargs(kwargs)


def _resolve(template: str, fmt: str, tokenizer: Any, model: str, text: str | None, inherited: Any) -> TemplateSpec:
    if template == "auto" and inherited is not None and fmt != "text":
        return _inherit(inherited, fmt, tokenizer, model)
    path = template_file(template)
    if path is not None:
        if fmt == "text":
            raise ConfigError("--template applies to instruction and chat data, not --format text",
                              hint="drop --template for raw text")
        return TemplateSpec(f"file:{path}", text if text is not None else read_template(path))
    if fmt == "text":
        if template != "auto":
            raise ConfigError(f"--template {template} applies to instruction and chat data, not --format text",
                              hint="drop --template for raw text")
        return TemplateSpec("none")
    if template == "alpaca":
        if fmt in ("chat", "sharegpt"):
            raise ConfigError(f"--template alpaca needs single-turn data, not --format {fmt}",
                              hint="use --template model (the model's chat template) or a Jinja file")
        return TemplateSpec("alpaca")
    if template == "auto" and fmt == "alpaca":
        return TemplateSpec("alpaca")
    if template == "auto" and fmt == "prompt-completion":
        return TemplateSpec("plain")
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):  # several named templates: the default one is what inference uses
        chat_template = chat_template.get("default")
    if not chat_template:
        raise DataError(f"{fmt} data is rendered with the model's chat template, and {model} has none",
                        hint="pass --template FILE.jinja (a chat template, also to use at inference), or use a "
                             "model that ships one" + ("; or --template alpaca" if fmt != "chat" and
                                                       fmt != "sharegpt" else ""))
    problem = jinja_syntax_error(chat_template)
    if problem:
        raise ModelError(f"the chat template of {model} does not compile: line {problem}",
                         hint="fix chat_template in the model's tokenizer files, or pass --template FILE.jinja")
    return TemplateSpec("model", chat_template)


def inherited_for(config: Any) -> Any:
    """How the run that `--model` continues rendered (ftcli.chain.InheritedTemplate), when `--template` is auto."""
    if getattr(config, "template", "auto") != "auto":
        return None
    from ftcli.chain import inherited_template

    return inherited_template(getattr(config, "model", None))


def keep_template(config: Any, identity: str, folder: Path) -> None:
    """A run rendered with a Jinja file (`identity` file:<sha256 prefix>) keeps the text it rendered with in its
    folder (ftcli.chain.TEMPLATE_COPY: generate, chat, eval, export and a continuing run read it there), checked
    against the prepared data's record of it."""
    from ftcli.chain import TEMPLATE_COPY
    from ftcli.files import write_atomic

    if not identity.startswith("file:") or "+" in identity:
        return
    path = template_file(config.template)
    inherited = inherited_for(config)
    text = read_template(path) if path is not None else inherited.text if inherited is not None else None
    if text is None or not hashlib.sha256(text.encode("utf-8")).hexdigest().startswith(identity.removeprefix("file:")):
        raise ConfigError(f"--template {config.template} changed while the run was starting: its data was rendered "
                          "with another text", hint="leave the file as it is during a run, and start it again")
    write_atomic(folder / TEMPLATE_COPY, text)


def _inherit(inherited: Any, fmt: str, tokenizer: Any, model: str) -> TemplateSpec:
    """A continued run renders as the run it continues did: its chat template (the model's, or the Jinja file it
    kept) for every format, or its Alpaca / plain prompt for single-turn data; conversations after a single-turn
    run are refused in one line, as they cannot be rendered that way."""
    if inherited.name == "model":
        return resolve_template("model", fmt, tokenizer, model=model)
    if inherited.text is not None:
        return TemplateSpec(inherited.name, inherited.text)
    if fmt in ("chat", "sharegpt"):
        raise DataError(f"--model {inherited.run} was trained on single-turn prompts with the {inherited.name} "
                        f"template, and this data is {fmt} (conversations), which needs a chat template",
                        hint="pass --template model (the model's chat template) to train the conversations with it "
                             "anyway, or use single-turn data")
    if inherited.name == "alpaca":
        return TemplateSpec("alpaca")
    return resolve_template("auto", fmt, tokenizer, model=model)


def example_to_pair(example: Example, spec: TemplateSpec) -> tuple[str, str]:
    """A single-turn example under a text template: (prompt, response)."""
    if example.kind == "alpaca":
        return format_alpaca({"instruction": example.instruction, "input": example.input,
                              "output": example.response})
    if example.kind == "pair" and spec.name == "alpaca":
        return format_alpaca({"instruction": example.prompt, "input": "", "output": example.response})
    return example.prompt, example.response


def example_to_messages(example: Example) -> list[dict[str, str]]:
    """A single-turn example as a user/assistant conversation (for chat templates)."""
    if example.kind == "chat":
        return example.messages
    if example.kind == "alpaca":
        user = example.instruction + (f"\n\n{example.input}" if example.input.strip() else "")
    else:
        user = example.prompt
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example.response}]


def _jinja_literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    return json.dumps(value)


class NotPrefixStable(RowError):
    """The template renders earlier turns differently once later turns follow (it drops earlier reasoning, say)."""


def trainable(message: dict[str, Any]) -> bool:
    """An assistant turn with something to learn: text, reasoning or tool calls."""
    return message["role"] == "assistant" and bool(str(message.get("content") or "").strip()
                                                    or message.get("tool_calls")
                                                    or str(message.get("reasoning_content") or "").strip())


def render_chat(messages: list[dict[str, Any]], tokenizer: Any, template: TemplateSpec,
                tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one text, and the character spans of its assistant turns (trained).

    Trailing turns after the last assistant turn are dropped: nothing after them would be trained.
    NotPrefixStable when the template renders a prefix differently once later turns follow (then
    `render_turns` renders one example per assistant turn); RowError when the template fails."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    messages = messages[: last + 1]
    render = _renderer(tokenizer, template, tools)
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else _render_empty_prefix(render)
        upto = render(messages[: i + 1], False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise NotPrefixStable("the chat template renders earlier turns differently once later turns follow")
        spans.append((len(before), len(upto)))
    return full, spans


def render_turns(messages: list[dict[str, Any]], tokenizer: Any, template: TemplateSpec,
                 tools: list[dict[str, Any]] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """One example per trainable assistant turn i, exactly as inference renders it: the text of
    `messages[:i+1]`, trained from where the prompt `messages[:i]` + the generation prompt ends. Where a template's
    generation prompt and its rendering of the answer part ways (it drops the answer's reasoning, say), the answer
    is trained from where they part, and never before the end of the conversation so far."""
    render = _renderer(tokenizer, template, tools)
    out = []
    for i, message in enumerate(messages):
        if not trainable(message):
            continue
        prompt = render(messages[:i], True) if i else _render_empty_prefix(render)
        text = render(messages[: i + 1], False)
        start = len(prompt)
        if not text.startswith(prompt):
            history = render(messages[:i], False) if i else ""
            start = next((n for n, (a, b) in enumerate(zip(prompt, text)) if a != b), min(len(prompt), len(text)))
            if not text.startswith(history) or start < len(history):
                raise RowError(f"the chat template renders the conversation before assistant turn {i + 1} "
                               "differently once that turn follows, so its answer cannot be located")
        out.append((text, [(start, len(text))]))
    return out


def _renderer(tokenizer: Any, template: TemplateSpec, tools: list[dict[str, Any]] | None) -> Any:
    def render(msgs: list[dict[str, Any]], generation: bool) -> str:
        try:
            return template.apply(tokenizer, msgs, generation, tools=tools)
        except Exception as exc:  # jinja2 TemplateError, raise_exception(...) in the template, ...
            raise RowError(f"the chat template fails on this conversation: {exc}") from None

    if tools or dict(template.kwargs).get("tools"):
        check_renders_tools(tokenizer, template, tools or dict(template.kwargs)["tools"])
    return render


def check_renders_tools(tokenizer: Any, template: TemplateSpec, tools: list[dict[str, Any]]) -> None:
    """Refuse (RowError) a row with tools under a template that does not render them: trained without the schemas,
    the model would learn calls it was never shown."""
    probe = [{"role": "user", "content": "x"}]
    bare = TemplateSpec(template.name, template.chat_template, tuple((k, v) for k, v in template.kwargs if k != "tools"))
    try:
        with_tools = bare.apply(tokenizer, probe, True, tools=tools)
        without = bare.apply(tokenizer, probe, True)
    except Exception as exc:  # noqa: BLE001 - the template fails on tools: the same one line
        raise RowError(f"the chat template fails when given the row's tools: {exc}") from None
    if with_tools == without:
        raise RowError("the row has tools and the chat template does not render them (it ignores `tools`): pass "
                       "--template FILE.jinja with a template that renders tools, or drop the tools (column or --tools)")


def _render_empty_prefix(render: Any) -> str:
    try:
        return render([], True)
    except RowError:
        return ""
