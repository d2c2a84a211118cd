"""`ftcli export`: one standalone model folder out of a run (or an adapter), merged, verified and written atomically.

    $ ftcli export runs/lora-1 --output models/lora-1
    $ ftcli export runs/qlora-1 --output models/qlora-1 --dtype bfloat16 --max-shard-size 2GB

    >>> from ftcli.export.run import ExportOptions, export_model
    >>> result = export_model(ExportOptions(source="runs/lora-1", output="models/lora-1"))
    >>> result.comparison.max_difference   # merged vs base + adapter, largest logit difference

SOURCE is a run folder (`ftcli_run.json`: the base model, method and training record come from it)
or a bare adapter folder (`adapter_config.json`: the base comes from `base_model_name_or_path`);
`--base` overrides the base either way. A full fine-tune's run folder is re-saved (dtype, shards,
card) with nothing to merge. The steps, in the order that keeps one copy of the model in memory:

1. check everything the user can get wrong (source, base, options, output folder) before loading;
2. load the base in the output dtype (QLoRA: in 4-bit, as trained) and attach the adapter;
3. run the fixed prompts through base + adapter: the reference logits;
4. merge in place (`ftcli.export.merge`), cast, check every weight is finite, run the prompts again and
   compare with a tolerance suited to the dtype;
5. save shards, config, generation config, tokenizer + chat template and a model card into a
   temporary folder next to DIR, then rename it to DIR. A failed or interrupted export leaves no DIR.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ftcli.console import console
from ftcli.errors import ConfigError, ModelError, OutputError, RunFailed
from ftcli.export.merge import model_bytes
from ftcli.export.modelcard import export_record, write_model_card
from ftcli.training.runfolder import MANIFEST, PROBE, check_writable, read_json_object
from ftcli.system import format_bytes, process_alive

DTYPES = ("float32", "float16", "bfloat16")
MERGE_TARGETS = ("auto", "dequantized", "original")
# Names that mean "keep the weights quantised": peft can do it, but it rounds most of the adapter away.
QUANTIZED_TARGETS = ("quantized", "quantised", "4bit", "nf4", "int4")
DEFAULT_SHARD_SIZE = "5GB"
EXPORT_RECORD = "ftcli_export.json"
CARD = "README.md"
NARROWED = ".ftcli-narrowed"  # inside the staging folder: the base cast to the output dtype, removed after loading
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SHARD_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMG]i?B)?$", re.IGNORECASE)

ORIGINAL_NOTE = ("merging into the original weights: the adapter was trained against the 4-bit weights, so the "
                 "merged model keeps the base's full precision but loses the adapter's compensation for "
                 "quantisation error and will differ slightly from the model you trained "
                 "(the default, --merge-into dequantized, reproduces it)")


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


@dataclass
class ExportResult:
    output: Path
    dtype: str
    merge_into: str
    comparison: Any  # ftcli.export.merge.Comparison, or None when not verified
    adapter_effect: float | None
    model_bytes: int
    files: list[str] = field(default_factory=list)


def export_model(opts: ExportOptions) -> ExportResult:
    from ftcli.models import resolve_device

    _check_options(opts)
    src = find_source(opts)
    base_config = _load_base_config(src)
    merge_into = resolve_merge_target(src, opts.merge_into, base_config)
    dtype_name = opts.dtype if opts.dtype != "auto" else config_dtype(base_config)
    out = check_export_output(opts.output, opts.overwrite, protected=_protected_paths(src))
    device = resolve_device(opts.device)
    console.print(f"[bold]ftcli export[/] {src.path} -> {out} (base {src.base}, {src.method}, "
                  f"{'merge into ' + merge_into + ' weights' if src.kind == 'adapter' else 're-save'}, {dtype_name})")
    if merge_into == "original" and src.method == "qlora":
        console.print(f"[yellow]note:[/] {ORIGINAL_NOTE}")
    if src.kind == "adapter" and src.method == "adapter" and merge_into == "original":
        console.print("[yellow]note:[/] no run manifest: if this adapter was trained with QLoRA, "
                      "pass --merge-into dequantized to merge into the 4-bit weights it was trained against")
    _quiet_libraries()
    from ftcli.export.merge import return_freed_memory_promptly

    return_freed_memory_promptly()
    tokenizer = _load_tokenizer(src)
    with _sigterm_as_interrupt(), staging_folder(out, opts.overwrite) as stage:
        scratch = stage.path / NARROWED
        model, comparison, effect = build_model(src, merge_into, dtype_name, device, tokenizer, opts.verify,
                                                base_is_4bit=_is_4bit(base_config), scratch=scratch)
        shutil.rmtree(scratch, ignore_errors=True)  # loaded (and still mapped) weights outlive the files
        size = model_bytes(model)
        model.save_pretrained(str(stage.path), max_shard_size=_shard_size(opts.max_shard_size))
        del model  # the weights are on disk; free them before the small files
        tokenizer.save_pretrained(str(stage.path))
        files = sorted(p.name for p in stage.path.iterdir())
        record = export_record(src, opts, merge_into, dtype_name, comparison, effect, files)
        write_model_card(stage.path / CARD, src, record, title=out.name)
        (stage.path / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        stage.commit()
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    console.print(f"exported {len(shards)} safetensors shard(s), {format_bytes(size)} of {dtype_name} weights, "
                  f"to {out}")
    return ExportResult(out, dtype_name, merge_into, comparison, effect, size, files)


def build_model(src: ExportSource, merge_into: str, dtype_name: str, device: str, tokenizer: Any, verify: bool,
                base_is_4bit: bool = False, scratch: Path | None = None) -> tuple[Any, Any, float | None]:
    """Load, take the reference logits, merge in place, cast, check: (model, comparison or None, adapter effect)."""
    import torch

    from ftcli.export import merge
    from ftcli.methods import qlora
    from ftcli.models import load_model

    dtype = getattr(torch, dtype_name)
    probe = src.path / PROBE
    load = dict(device=device, revision=src.revision, trust_remote_code=src.trust_remote_code)
    if src.kind == "model":
        model = load_model(_narrowed(str(src.path), dtype_name, scratch), dtype=dtype_name, **load)
        ref, inputs = _probe_reference(probe) if verify else (None, [])
        effect = None
    else:
        if merge_into == "dequantized":
            compute = (src.manifest or {}).get("resolved", {}).get("dtype") or dtype_name
            # A base stored in 4-bit brings its own quantisation config; a float base is quantised as QLoRA did.
            quant = None if base_is_4bit else qlora.quantization_config(getattr(torch, compute))
            base = load_model(src.base, dtype=compute, quantization_config=quant, **load)
            merge.release_file_mapping(base)
        else:
            base = load_model(_narrowed(src.base, dtype_name, scratch), dtype=dtype_name, **load)
        model = merge.attach_adapter(base, src.path)
        # The same 4-bit kernel as training on CPU (see ftcli.methods.qlora); a no-op without 4-bit layers.
        qlora.keep_cpu_inference_in_compute_dtype(model)
        inputs = merge.verification_inputs(tokenizer, probe) if verify else []
        reference = merge.reference_logits(model, inputs) if verify else None
        ref, effect = (reference.logits, reference.adapter_effect) if reference else (None, None)
        if merge_into == "dequantized":
            model = merge.merge_into_dequantized(model, dtype)
        else:
            model = merge.merge_into_weights(model)
    merge.cast_in_place(model, dtype)
    model.config.dtype = dtype
    bad = merge.non_finite_weights(model)
    if bad:
        raise RunFailed(f"the merged model has non-finite weights in {len(bad)} tensor(s), first {bad[0]}",
                        hint="the adapter (or the base) holds NaN/inf values; nothing was written")
    if ref is None:
        if verify and src.kind == "model":
            console.print(f"[yellow]note:[/] no {PROBE} in {src.path}: nothing to verify the re-saved model against")
        return model, None, effect
    return model, verify_logits(model, inputs, ref, effect, dtype_name, src), effect


def verify_logits(model: Any, inputs: list[Any], ref: list[Any], effect: float | None, dtype_name: str,
                  src: ExportSource) -> Any:
    """Run the prompts through the finished model and compare with the reference; fail beyond the tolerance."""
    from ftcli.export import merge

    comparison = merge.compare(merge.forward_logits(model, inputs), ref, dtype_name)
    what = "base + adapter" if src.kind == "adapter" else "the run's probe logits"
    effect_text = f"; the adapter itself moves them by up to {effect:.4g}" if effect is not None else ""
    console.print(f"verify: largest logit difference vs {what} {comparison.max_difference:.3g} "
                  f"(tolerance {comparison.tolerance:.3g}, {len(inputs)} prompt(s){effect_text})")
    if not comparison.ok:
        raise RunFailed(f"verification failed: the exported model's logits differ from {what} by "
                        f"{comparison.max_difference:.4g}, more than the {dtype_name} tolerance "
                        f"{comparison.tolerance:.4g}", hint="nothing was written; try --dtype float32, or pass "
                        "--no-verify to write it anyway")
    if effect is not None and effect <= comparison.tolerance:
        console.print(f"[yellow]note:[/] the adapter changes the logits by at most {effect:.3g}, within the "
                      "tolerance: it may be untrained, and the check cannot tell a merged adapter from a lost one")
    return comparison


def _narrowed(ref: str, dtype_name: str, scratch: Path | None) -> str:
    """`ref`, or a copy of its checkpoint cast to the 16-bit output dtype when it stores wider floats (local only)."""
    from ftcli.export import merge
    from ftcli.models import resolve_model_source

    source = resolve_model_source(ref)
    folder = Path(source.path)
    if scratch is None or source.kind == "hub" or not merge.needs_narrowing(folder, dtype_name):
        return ref
    merge.narrow_checkpoint(folder, scratch, dtype_name)
    return str(scratch)


def _probe_reference(probe: Path) -> tuple[list[Any] | None, list[Any]]:
    from ftcli.export.merge import read_probe

    if not probe.is_file():
        return None, []
    saved = read_probe(probe)
    return [saved["logits"].float()], [saved["input_ids"]]


# --- the source and the base --------------------------------------------------------------------------------------


def find_source(opts: ExportOptions) -> ExportSource:
    path = Path(opts.source).expanduser()
    hint = "pass a run folder written by `ftcli train` or a folder with adapter_config.json"
    if not path.exists():
        raise ModelError(f"export source {path} does not exist", hint=hint)
    if not path.is_dir():
        raise ModelError(f"export source {path} is a file, not a folder", hint=hint)
    if (path / MANIFEST).is_file():
        return _run_source(path, opts)
    if (path / ADAPTER_CONFIG).is_file():
        return _adapter_source(path, opts, manifest=None)
    raise ModelError(f"{path} is neither a run folder (no {MANIFEST}) nor an adapter folder (no {ADAPTER_CONFIG})",
                     hint=hint)


def _run_source(path: Path, opts: ExportOptions) -> ExportSource:
    manifest = _read_json(path / MANIFEST)
    status = manifest.get("status")
    if status != "finished":
        raise ModelError(f"the run in {path} did not finish (status: {status})",
                         hint="export a finished run, or resume this one with `ftcli train --resume`")
    saves = manifest.get("resolved", {}).get("saves")
    config = manifest.get("config", {})
    if saves == "adapter":
        return _adapter_source(path, opts, manifest)
    if saves != "model":
        raise ModelError(f"the manifest in {path} does not say what the run saved (resolved.saves = {saves!r})",
                         hint="export a run folder written by `ftcli train`")
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
    return ExportSource(path, "adapter", config.get("method", "adapter"), str(base), revision, trust,
                        manifest=manifest, adapter_config=adapter_config)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, hint="the folder looks damaged; export another copy")


def _load_base_config(src: ExportSource) -> Any:
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


def _is_4bit(config: Any) -> bool:
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
    if qc and not _is_4bit(base_config):
        raise ModelError(f"the base {src.base} is stored quantised ({qc.get('quant_method')}); ftcli export merges "
                         "into float or bitsandbytes 4-bit bases", hint="pass the unquantised base with --base")
    if wanted == "auto":
        return "dequantized" if src.method == "qlora" or qc else "original"
    if wanted == "original" and qc:
        raise ConfigError(f"--merge-into original: the base {src.base} is stored in 4-bit, it has no original weights",
                          hint="pass the unquantised base with --base, or leave --merge-into at auto")
    if wanted == "dequantized" and src.method in ("lora", "fsdp"):
        raise ConfigError(f"--merge-into dequantized: the run in {src.path} trained on the base's float weights "
                          f"(--method {src.method}); there are no 4-bit weights it was trained against",
                          hint="leave --merge-into at auto")
    return wanted


def config_dtype(config: Any) -> str:
    """The dtype a model's config.json records (`dtype`, formerly `torch_dtype`); float32 when it records none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def _load_tokenizer(src: ExportSource) -> Any:
    """The run's (or adapter's) own tokenizer when it has one, else the base model's."""
    from transformers import AutoTokenizer

    from ftcli.models import resolve_model_source

    here = any((src.path / name).is_file() for name in TOKENIZER_FILES)
    where = str(src.path) if here else resolve_model_source(src.base).path
    try:
        return AutoTokenizer.from_pretrained(where, revision=None if here else src.revision,
                                             trust_remote_code=src.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer from {where}: {first}",
                         hint="the source or its base needs tokenizer files (tokenizer.json, tokenizer_config.json)"
                         ) from None


# --- options and the output folder ---------------------------------------------------------------------------------


def _check_options(opts: ExportOptions) -> None:
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype {opts.dtype} is not a dtype", hint="use auto, float32, float16 or bfloat16")
    if opts.merge_into.lower() in QUANTIZED_TARGETS:
        raise ConfigError(f"--merge-into {opts.merge_into}: merging into weights that stay quantised is refused",
                          hint="quantising again after adding the adapter rounds most of its change away; use "
                          "dequantized (the QLoRA default) or original")
    if opts.merge_into not in MERGE_TARGETS:
        raise ConfigError(f"--merge-into {opts.merge_into} is not a merge target",
                          hint="use auto, dequantized (the 4-bit weights a QLoRA adapter trained against) or original")
    if not _SHARD_SIZE.match(opts.max_shard_size.strip()):
        raise ConfigError(f"--max-shard-size {opts.max_shard_size} is not a size",
                          hint="write it like 5GB, 500MB or a number of bytes")


def _shard_size(text: str) -> int | str:
    text = text.strip().replace(" ", "")
    return int(text) if text.isdigit() else text.upper().replace("IB", "iB")


def _protected_paths(src: ExportSource) -> list[Path]:
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


def check_export_output(path: str | Path, overwrite: bool, protected: list[Path] = ()) -> Path:
    """Refuse a file, a non-empty folder (unless `overwrite`), a folder holding the inputs, or no write access."""
    out = Path(path).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out} is a file", hint="pass a folder path")
    for keep in protected:
        keep = keep.expanduser().resolve()
        target = out.resolve()
        if target == keep or keep.is_relative_to(target) or target.is_relative_to(keep):
            raise OutputError(f"--output {out} overlaps the folder it exports from ({keep})",
                              hint="write the export to a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--output {out} is not empty",
                          hint="pick a new folder, or pass --overwrite to replace it once the export is complete")
    # The export is written next to `out` and renamed: the parent must be writable, even when `out` exists.
    check_writable(out, "--output", beside=True)
    return out


class Staging:
    """A temporary folder next to the output; `commit()` renames it into place."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite
        self.path = _sibling(out, "export")
        self.committed = False

    def commit(self) -> None:
        old = None
        if self.out.is_dir() and any(self.out.iterdir()):
            if not self.overwrite:
                raise OutputError(f"--output {self.out} was filled by something else during the export",
                                  hint="pick a new folder, or pass --overwrite")
            old = _sibling(self.out, "replaced")
            os.rename(self.out, old)
        elif self.out.is_dir():
            self.out.rmdir()
        os.rename(self.path, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_folder(out: Path, overwrite: bool) -> Iterator[Staging]:
    """Write into `.<name>.ftcli-export.<host>.<pid>.<n>` beside `out`; on any failure remove it, `out` untouched.

    Folders left by exports that were killed (their process no longer runs on this host) are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    stage = Staging(out, overwrite)
    stage.path.mkdir()
    try:
        yield stage
    finally:
        if not stage.committed:
            shutil.rmtree(stage.path, ignore_errors=True)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.ftcli-{kind}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}"


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove this output's temporary folders whose export process is gone; others' are left alone."""
    removed = []
    host = socket.gethostname()
    for kind in ("export", "replaced"):
        prefix = f".{out.name}.ftcli-{kind}."
        for path in out.parent.glob(prefix + "*"):
            owner, _, rest = path.name[len(prefix):].rpartition(".")[0].rpartition(".")
            if not path.is_dir() or owner != host or not rest.isdigit() or process_alive(int(rest)):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the export like Ctrl-C does: the temporary folder is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- small helpers ---------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Keep the terminal for the export's own lines: no library progress bars or advice.

    Not `train.quiet_libraries`: that one imports `datasets` (pyarrow, pandas), about 80 MiB the
    export never uses, on a command whose peak memory is the point."""
    import logging
    import warnings

    for name in ("bitsandbytes", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
