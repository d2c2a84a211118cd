"""What `generate` and `chat` talk to: the model behind TARGET, and how its training rendered prompts.

    >>> from ftcli.inference.target import TargetOptions, load_target
    >>> target = load_target("runs/lora-1", TargetOptions())
    >>> target.kind, target.fmt, target.template.name      # ('run', 'alpaca', 'alpaca')

TARGET is what ftcli.targets finds (the same rules as `ftcli eval`): a run folder (`ftcli_run.json`:
the base, method, format and template come from its manifest; an adapter is attached to its base
unmerged, a QLoRA base is loaded in 4-bit as it was trained), an adapter folder
(`adapter_config.json`), an exported folder (`ftcli_export.json`, which carries the run's record),
a model folder, a hub id or a `builtin:` name. A bare model renders prompts with its chat template
when it has one, else uses the prompt as is.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import ConfigError


@dataclass
class TargetOptions:
    template: str = "auto"  # auto: as the run trained; alpaca | model | FILE.jinja override it
    dtype: str = "auto"  # auto: the run's training dtype (a bare model: bfloat16 on CUDA, float32 on CPU)
    device: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    base: str | None = None  # the base model, overriding the recorded one (adapters, --compare-base)


@dataclass
class Target:
    ref: str
    kind: str  # "run" | "adapter" | "export" | "model"
    model: Any
    tokenizer: Any
    fmt: str  # the data format prompts are read as: alpaca | prompt-completion | chat | sharegpt | text
    template: Any  # ftcli.data.templates.TemplateSpec
    device: str
    base: str | None = None  # the base model (what --compare-base runs)
    adapter: bool = False  # the model is base + an unmerged peft adapter
    load_base: Any = None  # () -> the base model, loaded as the target's model is
    base_model_cache: Any = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.ref} ({self.fmt}, template {self.template.name})"

    @contextmanager
    def base_model(self) -> Iterator[Any]:
        """The untuned base: the adapter switched off, or the recorded base loaded once beside the model."""
        if self.adapter:
            with self.model.disable_adapter():
                yield self.model
            return
        if not self.base:
            raise ConfigError(f"--compare-base: {self.ref} is a model of its own, with no base recorded",
                              hint="compare a run, an adapter or an export, or pass --base")
        if self.base_model_cache is None:
            self.base_model_cache = self.load_base()
        yield self.base_model_cache


def load_target(ref: str, options: TargetOptions) -> Target:
    """Load TARGET for generation (ftcli.targets: found and loaded as `eval` does, as it was trained): model in
    eval mode with the KV cache on, tokenizer, and the format and template its prompts are rendered with."""
    from ftcli.config import build_run_config
    from ftcli.models import load_adapter_tokenizer, load_tokenizer, resolve_device
    from ftcli.targets import find_target, load_target_model

    info = find_target(ref, base=options.base)
    if info.scores:
        raise ConfigError(f"{ref} is a reward model (a score head): it scores answers and generates no text",
                          hint=f"score preference pairs with `ftcli eval {ref} --dataset PAIRS.jsonl`, or score "
                               "completions in Python with ftcli.evaluation.reward_model.load_reward_scorer")
    device = resolve_device(options.device)
    recorded = info.run_config
    dtype = options.dtype if options.dtype != "auto" else (info.trained_dtype or "auto")
    # What loading needs of the run's config (the method's 4-bit rule, attention); the rest is not read here.
    config = build_run_config({**{k: recorded[k] for k in ("method", "attn_implementation") if k in recorded},
                               "model": info.model, "dtype": dtype, "device": device})
    trust = options.trust_remote_code or info.trust_remote_code
    info.trust_remote_code = trust
    if options.revision and info.kind == "model":
        info.revision = options.revision
    if info.adapter is not None:
        tokenizer = load_adapter_tokenizer(info.adapter, info.model, revision=info.revision_of(info.model),
                                           trust_remote_code=trust)
    else:
        tokenizer = load_tokenizer(info.ref, revision=info.revision_of(info.ref), trust_remote_code=trust)
    fmt, spec = rendering(info.data.get("format"), info.data.get("template"), options.template, tokenizer, ref,
                          folder=Path(ref).expanduser())
    if spec.is_chat and options.template == "auto" and info.template_kwargs:
        spec = spec.with_kwargs(info.template_kwargs)  # the switches training rendered with (enable_thinking=...)
    model = _ready(load_target_model(info, config, device))
    kind = "export" if info.exported else info.kind

    def load_base() -> Any:
        return _ready(load_target_model(info, config, device, base_only=True))

    return Target(ref, kind, model, tokenizer, fmt, spec, device, base=info.base,
                  adapter=info.adapter is not None, load_base=load_base)


def _ready(model: Any) -> Any:
    model.eval()
    model.config.use_cache = True  # runs trained with gradient checkpointing saved use_cache=False
    return model


def rendering(fmt: str | None, trained: str | None, wanted: str, tokenizer: Any, ref: str,
              folder: Path | None = None) -> tuple[str, Any]:
    """(format, TemplateSpec): the run's own rendering, or `--template`'s; a bare model: its chat template if any.
    A run trained with a Jinja file (`file:<sha256 prefix>`) finds its text in `folder` (the run's kept copy), or
    as the chat template of the tokenizer it saved (a run or an export of it)."""
    from ftcli.data.templates import TemplateSpec, resolve_template

    if fmt is None:  # no training record: a chat model chats, anything else continues the prompt as given
        if wanted == "alpaca":
            fmt = "alpaca"
        elif wanted != "auto" or getattr(tokenizer, "chat_template", None):
            fmt = "chat"
        else:
            fmt = "prompt-completion"
        return fmt, resolve_template(wanted, fmt, tokenizer, model=ref)
    if wanted != "auto":
        return fmt, resolve_template(wanted, fmt, tokenizer, model=ref)
    if trained in (None, "", "model"):
        return fmt, resolve_template("model" if trained == "model" else "auto", fmt, tokenizer, model=ref)
    if trained.startswith("file:"):
        return fmt, TemplateSpec(trained, _trained_template_text(trained, tokenizer, ref, folder))
    return fmt, TemplateSpec(trained)


def _trained_template_text(trained: str, tokenizer: Any, ref: str, folder: Path | None) -> str:
    import hashlib

    from ftcli.chain import TEMPLATE_COPY

    digest = trained.removeprefix("file:")
    kept = folder / TEMPLATE_COPY if folder is not None else None
    candidates = [kept.read_text(encoding="utf-8") if kept is not None and kept.is_file() else None,
                  getattr(tokenizer, "chat_template", None)]
    for text in candidates:
        if isinstance(text, str) and hashlib.sha256(text.encode("utf-8")).hexdigest().startswith(digest):
            return text
    raise ConfigError(f"{ref} was trained with a chat template file (sha256 {digest}...) that it does not hold",
                      hint="pass that template with --template FILE.jinja")
