"""What `generate` and `chat` talk to: the model behind TARGET, and how its training rendered prompts.

    >>> from ftcli.inference.target import TargetOptions, load_target
    >>> target = load_target("runs/lora-1", TargetOptions())
    >>> target.kind, target.fmt, target.template.name      # ('run', 'alpaca', 'alpaca')

TARGET is a run folder (`ftcli_run.json`: the base, method, format and template come from its
manifest; an adapter is attached to its base unmerged, a QLoRA base is loaded in 4-bit as it was
trained), an adapter folder (`adapter_config.json`), an exported folder (`ftcli_export.json`,
which carries the run's record), a model folder, a hub id or a `builtin:` name. A bare model
renders prompts with its chat template when it has one, else uses the prompt as is.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import ConfigError, ModelError
from ftcli.files import read_json_object

RUN_MANIFEST = "ftcli_run.json"
EXPORT_RECORD = "ftcli_export.json"
ADAPTER_CONFIG = "adapter_config.json"
DAMAGED = "the folder looks damaged; pass another copy"


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
    base_load: dict[str, Any] = field(default_factory=dict)  # how to load `base` (dtype, device, revision)
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
            from ftcli.models import load_model

            self.base_model_cache = _ready(load_model(self.base, **self.base_load))
        yield self.base_model_cache


def load_target(ref: str, options: TargetOptions) -> Target:
    """Load TARGET for generation: model (eval mode, KV cache on), tokenizer, format and template."""
    from ftcli.models import resolve_device

    device = resolve_device(options.device)
    path = Path(ref).expanduser()
    if path.is_dir() and (path / RUN_MANIFEST).is_file():
        return _run_target(ref, path, options, device)
    if path.is_dir() and (path / EXPORT_RECORD).is_file():
        return _export_target(ref, path, options, device)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return _adapter_target(ref, path, options, device, manifest=None)
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"{ref} is not a model, run, adapter or export folder (no config.json, {RUN_MANIFEST}, "
                         f"{ADAPTER_CONFIG} or {EXPORT_RECORD})",
                         hint="pass a run folder from `ftcli train`, an export, an adapter or a model folder")
    return _model_target(ref, ref, "model", options, device, fmt=None, template=None, base=options.base)


def _run_target(ref: str, path: Path, options: TargetOptions, device: str) -> Target:
    manifest = read_json_object(path / RUN_MANIFEST, hint=DAMAGED)
    if manifest.get("status") != "finished":
        raise ModelError(f"the run in {ref} did not finish (status: {manifest.get('status')})",
                         hint="try a finished run, or resume this one with `ftcli train --resume`")
    saves = (manifest.get("resolved") or {}).get("saves")
    if saves == "adapter":
        return _adapter_target(ref, path, options, device, manifest=manifest)
    config, data = manifest.get("config") or {}, manifest.get("data") or {}
    dtype = options.dtype if options.dtype != "auto" else (manifest.get("resolved") or {}).get("dtype", "auto")
    return _model_target(ref, str(path), "run", options, device, fmt=data.get("format"),
                         template=data.get("template"), base=options.base or config.get("model"), dtype=dtype,
                         base_config=config)


def _export_target(ref: str, path: Path, options: TargetOptions, device: str) -> Target:
    record = read_json_object(path / EXPORT_RECORD, hint=DAMAGED)
    run = record.get("run") or {}
    data = run.get("data") or {}
    return _model_target(ref, str(path), "export", options, device, fmt=data.get("format"),
                         template=data.get("template"), base=options.base or record.get("base_model"),
                         base_config=run.get("config") or {})


def _model_target(ref: str, folder: str, kind: str, options: TargetOptions, device: str, *, fmt: str | None,
                  template: str | None, base: str | None, dtype: str | None = None,
                  base_config: dict[str, Any] | None = None) -> Target:
    from ftcli.models import load_model, load_tokenizer

    load = dict(dtype=dtype or options.dtype, device=device, revision=options.revision,
                trust_remote_code=options.trust_remote_code)
    tokenizer = load_tokenizer(folder, revision=options.revision, trust_remote_code=options.trust_remote_code)
    fmt, spec = rendering(fmt, template, options.template, tokenizer, ref)
    model = _ready(load_model(folder, **load))
    # The base loads like the model (dtype, device), pinned as the run pinned it (a --base: unpinned).
    recorded = base_config or {}
    base_load = {**load, "revision": None if options.base else recorded.get("revision"),
                 "trust_remote_code": bool(recorded.get("trust_remote_code")) or options.trust_remote_code}
    return Target(ref, kind, model, tokenizer, fmt, spec, device, base=base, base_load=base_load)


def _adapter_target(ref: str, path: Path, options: TargetOptions, device: str,
                    manifest: dict[str, Any] | None) -> Target:
    from ftcli.methods import METHODS
    from ftcli.methods.qlora import keep_cpu_inference_in_compute_dtype
    from ftcli.models import attach_adapter, load_adapter_tokenizer, load_model

    adapter_config = read_json_object(path / ADAPTER_CONFIG, hint=DAMAGED)
    config, data = (manifest or {}).get("config") or {}, (manifest or {}).get("data") or {}
    base = options.base or config.get("model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"the adapter in {ref} does not record its base model", hint="pass it with --base")
    trained_dtype = ((manifest or {}).get("resolved") or {}).get("dtype", "auto")
    dtype = options.dtype if options.dtype != "auto" else trained_dtype
    revision = options.revision if options.base else config.get("revision")
    trust = options.trust_remote_code or bool(config.get("trust_remote_code"))
    load: dict[str, Any] = dict(dtype=dtype, device=device, revision=revision, trust_remote_code=trust)
    method = METHODS.get(config.get("method", ""))
    if method is not None and method.loads_4bit:
        # The base the adapter was trained against: loaded in 4-bit exactly as in training.
        from ftcli.config import RunConfig

        run_config = RunConfig.model_validate({**config, "dtype": dtype})
        load.update(method.load_options(run_config, device))
    tokenizer = load_adapter_tokenizer(path, base, revision=revision, trust_remote_code=trust)
    fmt, spec = rendering(data.get("format"), data.get("template"), options.template, tokenizer, ref)
    model = attach_adapter(load_model(base, **load), path)
    keep_cpu_inference_in_compute_dtype(model)  # the 4-bit kernel training used on CPU; no-op otherwise
    kind = "run" if manifest else "adapter"
    return Target(ref, kind, _ready(model), tokenizer, fmt, spec, device, base=base, adapter=True)


def _ready(model: Any) -> Any:
    model.eval()
    model.config.use_cache = True  # runs trained with gradient checkpointing saved use_cache=False
    return model


def rendering(fmt: str | None, trained: str | None, wanted: str, tokenizer: Any, ref: str) -> tuple[str, Any]:
    """(format, TemplateSpec): the run's own rendering, or `--template`'s; a bare model: its chat template if any."""
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
        file = Path(trained.removeprefix("file:"))
        if not file.is_file():
            raise ConfigError(f"{ref} was trained with the chat template {file}, which is not there any more",
                              hint="pass the same template with --template FILE.jinja")
        return fmt, TemplateSpec(trained, file.read_text(encoding="utf-8"))
    return fmt, TemplateSpec(trained)
