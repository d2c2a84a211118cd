"""What an export starts from: the source folder (a run or an adapter), its base model and the merge target.

    >>> from ftcli.export.source import ExportOptions, find_source, resolve_merge_target
    >>> src = find_source(ExportOptions(source="runs/lora-1", output="models/lora-1"))
    >>> src.kind, src.method, src.base      # ('adapter', 'lora', 'builtin:tiny-llama')

Everything here only reads small files (manifests, configs): it runs before any weight is loaded,
so a wrong source, base or option fails at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.chain import resolve_start
from ftcli.errors import ConfigError, ModelError
from ftcli.files import read_json_object
from ftcli.training.checkpoints import MARKER, checkpoint_step, latest_checkpoint, read_marker
from ftcli.training.runfolder import MANIFEST


DTYPES = ("float32", "float16", "bfloat16")
MERGE_TARGETS = ("auto", "dequantized", "original")
# Names that mean "keep the weights quantised": peft can do it, but it rounds most of the adapter away.
QUANTIZED_TARGETS = ("quantized", "quantised", "4bit", "nf4", "int4")
DEFAULT_SHARD_SIZE = "5GB"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ExportOptions:
    source: str
    output: str
    base: str | None = None
    revision: str | None = None
    trust_remote_code: bool | None = None
    dtype: str = "auto"
    merge_into: str = "auto"
    max_shard_size: str = DEFAULT_SHARD_SIZE
    device: str = "cpu"
    verify: bool = True
    overwrite: bool = False
    format: str = "hf"  # hf (a model folder) | gguf (llama.cpp / Ollama)
    gguf_type: str | None = None  # f32 | f16 | bf16 | q8_0; None: bf16 for a bfloat16 model, else f16


@dataclass
class ExportSource:
    """What SOURCE holds, and which base model it belongs to."""

    path: Path
    kind: str  # "adapter" | "model" (a full fine-tune: nothing to merge)
    method: str  # the run's method; "adapter" for a bare adapter folder of unknown training
    base: str  # model reference of the base (the run folder itself for a full fine-tune)
    revision: str | None
    trust_remote_code: bool
    manifest: dict[str, Any] | None = None
    adapter_config: dict[str, Any] | None = None
    # Adapters of earlier runs the adapter was trained on top of (a DPO run continuing an SFT LoRA run, see
    # ftcli.chain): merged into `base`, oldest first, before this adapter is merged.
    earlier_adapters: tuple[str, ...] = ()

    @property
    def head(self) -> str:
        """"classification" for a reward model (its run's objective, a SEQ_CLS adapter or a classifier's config)."""
        from ftcli.targets import _folder_head, run_head

        if self.manifest is not None:
            return run_head(self.manifest.get("config") or {})
        if self.adapter_config is not None:
            return "classification" if self.adapter_config.get("task_type") == "SEQ_CLS" else "causal"
        return _folder_head(self.path)

    @property
    def trained_4bit(self) -> bool:
        """The run's method trained the adapter against a 4-bit base (what its manifest says; False if unknown)."""
        from ftcli.methods import METHODS

        method = METHODS.get(self.method)
        return bool(method and method.loads_4bit)

    @property
    def trained_on_float(self) -> bool:
        """The run's method trained the adapter on the base's float weights (False if unknown)."""
        from ftcli.methods import METHODS

        method = METHODS.get(self.method)
        return bool(method and method.trains_adapter and not method.loads_4bit)


def find_source(opts: ExportOptions) -> ExportSource:
    path = Path(opts.source).expanduser()
    hint = "pass a run folder written by `ftcli train` or a folder with adapter_config.json"
    if not path.exists():
        raise ConfigError(f"export source {path} does not exist", hint=hint)
    if not path.is_dir():
        raise ModelError(f"export source {path} is a file, not a folder", hint=hint)
    if (path / MANIFEST).is_file():
        return _run_source(path, opts)
    if checkpoint_step(path) is not None and (path.parent / MANIFEST).is_file():
        return _checkpoint_source(path, opts)
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter_source(path, opts, manifest=None)
    raise ModelError(f"{path} is neither a run folder (no {MANIFEST}) nor an adapter folder (no {ADAPTER_CONFIG})",
                     hint=hint + ", or a checkpoint-N folder inside a run folder")


def _checkpoint_source(path: Path, opts: ExportOptions) -> ExportSource:
    """A `checkpoint-N` of a run (finished or not): its weights, with the run's manifest for the base and method."""
    if read_marker(path) is None:
        latest = latest_checkpoint(path.parent)
        raise ModelError(f"{path} is not a complete checkpoint (no valid {MARKER}: its writing was interrupted)",
                         hint=f"export {latest} instead" if latest else "export a complete checkpoint or a finished run")
    manifest = _read_json(path.parent / MANIFEST)
    saves = manifest.get("resolved", {}).get("saves")
    if saves == "adapter":
        return _adapter_source(path, opts, manifest)
    return _model_source(path, opts, manifest)


def _run_source(path: Path, opts: ExportOptions) -> ExportSource:
    manifest = _read_json(path / MANIFEST)
    status = manifest.get("status")
    if status != "finished":
        raise ModelError(f"the run in {path} did not finish (status: {status})",
                         hint="export one of its complete checkpoints (SOURCE/checkpoint-N), or resume the run "
                              "with `ftcli train --resume`")
    saves = manifest.get("resolved", {}).get("saves")
    if saves == "adapter":
        return _adapter_source(path, opts, manifest)
    if saves != "model":
        raise ModelError(f"the manifest in {path} does not say what the run saved (resolved.saves = {saves!r})",
                         hint="export a run folder written by `ftcli train`")
    return _model_source(path, opts, manifest)


def _model_source(path: Path, opts: ExportOptions, manifest: dict[str, Any]) -> ExportSource:
    """A full fine-tune's weights (a finished run folder, or one of its checkpoints)."""
    config = manifest.get("config", {})
    if opts.base:
        raise ConfigError(f"--base: {path} is a full fine-tune, a whole model with no base to merge into",
                          hint="drop --base")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ModelError(f"the run folder {path} has no model weights (config.json + *.safetensors)",
                         hint="export a finished full fine-tuning run")
    trust = bool(opts.trust_remote_code if opts.trust_remote_code is not None else config.get("trust_remote_code"))
    return ExportSource(path, "model", config.get("method", "full"), str(path), None, trust, manifest=manifest)


def _adapter_source(path: Path, opts: ExportOptions, manifest: dict[str, Any] | None) -> ExportSource:
    if not (path / ADAPTER_CONFIG).is_file() or not any(path.glob("adapter_model.*")):
        raise ModelError(f"{path} has no adapter ({ADAPTER_CONFIG} + adapter_model.safetensors)",
                         hint="export a finished LoRA or QLoRA run, or an adapter saved by peft")
    adapter_config = _read_json(path / ADAPTER_CONFIG)
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"the adapter in {path} is a {adapter_config.get('peft_type')} adapter",
                         hint="ftcli export merges LoRA adapters (what ftcli trains)")
    config = (manifest or {}).get("config", {})
    base = opts.base or config.get("model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"the adapter in {path} does not record its base model", hint="pass it with --base")
    revision = opts.revision if opts.base else (config.get("revision") or adapter_config.get("revision"))
    trust = bool(opts.trust_remote_code if opts.trust_remote_code is not None else config.get("trust_remote_code"))
    start = resolve_start(str(base))  # an earlier run as the base: its own base, its adapters merged first
    return ExportSource(path, "adapter", config.get("method", "adapter"), str(start.base), revision, trust,
                        manifest=manifest, adapter_config=adapter_config, earlier_adapters=start.adapters)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, hint="the folder looks damaged; export another copy")


def load_base_config(src: ExportSource) -> Any:
    from ftcli.models import load_model_config

    try:
        return load_model_config(src.base, revision=src.revision, trust_remote_code=src.trust_remote_code)
    except ModelError as exc:
        if src.kind == "model":
            raise
        raise ModelError(f"base model of {src.path}: {exc.message}",
                         hint="pass the base model the adapter was trained on with --base (a folder or hub id)"
                         ) from None


def _quantization(config: Any) -> dict[str, Any] | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def is_4bit(config: Any) -> bool:
    qc = _quantization(config)
    return bool(qc and qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit"))


def resolve_merge_target(src: ExportSource, wanted: str, base_config: Any) -> str:
    """"dequantized" | "original" | "none" (a full fine-tune), refusing what would lose the adapter."""
    if src.kind == "model":
        if wanted != "auto":
            raise ConfigError(f"--merge-into {wanted}: {src.path} is a full fine-tune, there is nothing to merge",
                              hint="drop --merge-into")
        return "none"
    qc = _quantization(base_config)
    if qc and not is_4bit(base_config):
        raise ModelError(f"the base {src.base} is stored quantised ({qc.get('quant_method')}); ftcli export merges "
                         "into float or bitsandbytes 4-bit bases", hint="pass the unquantised base with --base")
    if wanted == "auto":
        return "dequantized" if src.trained_4bit or qc else "original"
    if wanted == "original" and qc:
        raise ConfigError(f"--merge-into original: the base {src.base} is stored in 4-bit, it has no original weights",
                          hint="pass the unquantised base with --base, or leave --merge-into at auto")
    if wanted == "dequantized" and src.trained_on_float:
        raise ConfigError(f"--merge-into dequantized: the run in {src.path} trained on the base's float weights "
                          f"(--method {src.method}); there are no 4-bit weights it was trained against",
                          hint="leave --merge-into at auto")
    return wanted


def config_dtype(config: Any) -> str:
    """The dtype a model's config.json records (`dtype`, formerly `torch_dtype`); float32 when it records none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def load_source_tokenizer(src: ExportSource) -> Any:
    """The run's (or adapter's) own tokenizer when it has one, else the base model's."""
    from ftcli.models import load_adapter_tokenizer

    return load_adapter_tokenizer(src.path, src.base, revision=src.revision, trust_remote_code=src.trust_remote_code)


def protected_paths(src: ExportSource) -> list[Path]:
    """Folders an `--overwrite` must never replace: the source, and a local base model."""
    from ftcli.models import resolve_model_source

    paths = [src.path]
    try:
        base = resolve_model_source(src.base)
    except ModelError:
        return paths
    if base.kind != "hub":
        paths.append(Path(base.path))
    return paths


def check_weight_files(src: ExportSource) -> None:
    """Refuse, before anything loads, a safetensors file of the source or of a local base that cannot be read
    whole (ftcli.inspection.weights: the loading core's own check, here with export's hint)."""
    from ftcli.export.merge import weight_files
    from ftcli.models import resolve_model_source
    from ftcli.inspection.weights import check_weight_files as check_files

    files = sorted(src.path.glob("*.safetensors"))
    try:
        base = resolve_model_source(src.base)
    except ModelError:
        base = None
    if base is not None and base.kind != "hub" and Path(base.path) != src.path:
        files += weight_files(Path(base.path))
    check_files(src.path, hint="nothing was written; export from an intact copy (or train again)", files=files)
