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
3. run two short inputs (the run's probe input, a fixed prompt) through base + adapter in one batch: the
   reference logits;
4. merge in place (`ftcli.export.merge`), cast, check every weight is finite, run the prompts again and
   compare with a tolerance suited to the dtype;
5. save shards, config, generation config, tokenizer + chat template and a model card into a
   temporary folder next to DIR, then rename it to DIR. A failed or interrupted export leaves no DIR.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcli.console import console
from ftcli.errors import ConfigError, RunFailed
from ftcli.export.gguf import step as gguf_step
from ftcli.export.merge import model_bytes
from ftcli.export.modelcard import export_record, write_model_card
from ftcli.export.source import (
    DTYPES, MERGE_TARGETS, QUANTIZED_TARGETS, ExportOptions, ExportSource, check_weight_files, config_dtype,
    find_source, is_4bit,
    load_base_config, load_source_tokenizer, protected_paths, resolve_merge_target,
)
from ftcli.export.staging import (
    EXPORT_RECORD, check_export_output, recover_interrupted, staging_folder,
)
from ftcli.files import check_writable, exclusive, followed, output_path
from ftcli.models import CAUSAL_HEAD
from ftcli.system import format_bytes, sigterm_as_interrupt
from ftcli.training.runfolder import PROBE

CARD = "README.md"
NARROWED = ".ftcli-narrowed"  # inside the staging folder: the base cast to the output dtype, removed after loading
_SHARD_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]i?B)?$", re.IGNORECASE)

ORIGINAL_NOTE = ("merging into the original weights: the adapter was trained against the 4-bit weights, so the "
                 "merged model keeps the base's full precision but loses the adapter's compensation for "
                 "quantisation error and will differ slightly from the model you trained "
                 "(the default, --merge-into dequantized, reproduces it)")


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
    """Check, then write the export holding its output folder's lock (one export at a time per folder)."""
    _refuse_gguf_classifier(opts)
    _check_options(opts)
    target = followed(output_path(opts.output, "--output"))  # a symlinked export: the folder it points to
    src = find_source(opts)
    check_weight_files(src)
    check_writable(target, "--output", beside=True)
    with exclusive(target, "--output"):
        recover_interrupted(target, announce=console.print)
        return _export(opts, src, check_export_output(target, opts.overwrite, protected=protected_paths(src)))


def _refuse_gguf_classifier(opts: ExportOptions) -> None:
    """`--format gguf` of a reward model, refused before the converter is fetched (a source that cannot be read is
    reported by the steps that follow, as for any export)."""
    from ftcli.errors import FtcliError

    if opts.format != "gguf":
        return
    try:
        src = find_source(opts)
    except FtcliError:
        return
    if src.head != CAUSAL_HEAD:
        raise ConfigError(f"--format gguf: {src.path} is a reward model (a score head, not a language-model head), "
                          "which llama.cpp cannot run as a chat model", hint="export it without --format gguf: the "
                          "folder loads with AutoModelForSequenceClassification")


def _export(opts: ExportOptions, src: ExportSource, out: Path) -> ExportResult:
    from ftcli.models import resolve_device

    base_config = load_base_config(src)
    merge_into = resolve_merge_target(src, opts.merge_into, base_config)
    dtype_name = opts.dtype if opts.dtype != "auto" else config_dtype(base_config)
    device = resolve_device(opts.device)
    earlier = "".join(f" + {a}" for a in src.earlier_adapters)
    console.print(f"[bold]ftcli export[/] {src.path} -> {out} (base {src.base}{earlier}, {src.method}, "
                  f"{'merge into ' + merge_into + ' weights' if src.kind == 'adapter' else 're-save'}, {dtype_name})")
    if src.adapter_config:
        from ftcli.methods.variants import adapter_variant

        variant = adapter_variant(src.adapter_config, ((src.manifest or {}).get("config") or {}).get("lora_init"))
        if variant:
            console.print(f"adapter: {variant}", soft_wrap=True)
    if merge_into == "original" and src.trained_4bit:
        console.print(f"[yellow]note:[/] {ORIGINAL_NOTE}")
    if src.kind == "adapter" and src.manifest is None and merge_into == "original":
        console.print("[yellow]note:[/] no run manifest: if this adapter was trained with QLoRA, "
                      "pass --merge-into dequantized to merge into the 4-bit weights it was trained against")
    _quiet_libraries()
    from ftcli.export.merge import return_freed_memory_promptly

    return_freed_memory_promptly()
    tokenizer = load_source_tokenizer(src)
    gguf = opts.format == "gguf"
    prompt = gguf_step.prepare(src, tokenizer) if gguf else None  # a template it cannot carry fails before loading
    with sigterm_as_interrupt(), staging_folder(out, opts.overwrite) as stage:
        folder = stage.path / gguf_step.MERGED if gguf else stage.path
        folder.mkdir(exist_ok=True)
        scratch = stage.path / NARROWED
        model, comparison, effect = build_model(src, merge_into, dtype_name, device, tokenizer, opts.verify,
                                                base_is_4bit=is_4bit(base_config), scratch=scratch)
        shutil.rmtree(scratch, ignore_errors=True)  # loaded (and still mapped) weights outlive the files
        size = model_bytes(model)
        model.save_pretrained(str(folder), max_shard_size=_shard_size(opts.max_shard_size))
        reference = gguf_step.reference_for(model, prompt, opts.verify) if gguf else None
        del model  # the weights are on disk; free them before the small files
        tokenizer.save_pretrained(str(folder))
        gguf_record = None
        if gguf:
            gguf_type = gguf_step.gguf_type_for(opts.gguf_type, dtype_name)
            gguf_record = gguf_step.write_gguf(folder, stage.path, out.name, gguf_type, prompt, reference,
                                               opts.verify)
            shutil.rmtree(folder)
        files = sorted(p.name for p in stage.path.iterdir())
        record = export_record(src, opts, merge_into, dtype_name, comparison, effect, files)
        record["gguf"] = gguf_record
        write_model_card(stage.path / CARD, src, record, title=out.name)
        (stage.path / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        stage.commit()
    files = sorted(p.name for p in out.iterdir())
    if gguf_record:
        console.print(f"exported {gguf_record['file']} ({gguf_record['type']}) and an Ollama {gguf_step.MODELFILE} "
                      f"to {out}")
    else:
        shards = [f for f in files if f.endswith(".safetensors")]
        console.print(f"exported {len(shards)} safetensors shard(s), {format_bytes(size)} of {dtype_name} weights, "
                      f"to {out}")
    return ExportResult(out, dtype_name, merge_into, comparison, effect, size, files)


def build_model(src: ExportSource, merge_into: str, dtype_name: str, device: str, tokenizer: Any, verify: bool,
                base_is_4bit: bool = False, scratch: Path | None = None) -> tuple[Any, Any, float | None]:
    """Load, take the reference logits, merge in place, cast, check: (model, comparison or None, adapter effect)."""
    import torch

    from ftcli.export import merge
    from ftcli.methods import qlora  # its 4-bit loading and CPU-kernel rule, as in training
    from ftcli.models import attach_adapter, classifier_pad_token_id, load_model

    dtype = getattr(torch, dtype_name)
    probe = src.path / PROBE
    load: dict[str, Any] = dict(device=device, revision=src.revision, trust_remote_code=src.trust_remote_code)
    if src.head != CAUSAL_HEAD:  # a reward model: its classifier, scores compared where logits are
        load.update(head=src.head, pad_token_id=classifier_pad_token_id(tokenizer))
    if src.kind == "model":
        model = load_model(_narrowed(str(src.path), dtype_name, scratch), dtype=dtype_name, **load)
        ref, inputs = _probe_reference(probe) if verify else (None, [])
        effect = None
    else:
        if merge_into == "dequantized":
            compute = dequantized_compute(src, dtype_name)
            # A base stored in 4-bit brings its own quantisation config; a float base is quantised as QLoRA did.
            quant = None if base_is_4bit else qlora.quantization_config(getattr(torch, compute))
            base = load_model(src.base, dtype=compute, quantization_config=quant, **load)
            merge.release_file_mapping(base)
        else:
            base = load_model(_narrowed(src.base, dtype_name, scratch), dtype=dtype_name, **load)
        for earlier in src.earlier_adapters:  # the run continued an earlier fine-tune (ftcli.chain): as it trained
            base = attach_adapter(base, Path(earlier)).merge_and_unload()
        model = attach_adapter(base, src.path)
        # The same 4-bit kernel as training on CPU (see ftcli.methods.qlora); a no-op without 4-bit layers.
        qlora.keep_cpu_inference_in_compute_dtype(model)
        inputs = merge.verification_inputs(tokenizer, probe) if verify else []
        reference = merge.reference_logits(model, inputs, batched=src.head == CAUSAL_HEAD) if verify else None
        ref, effect = (reference.logits, reference.adapter_effect) if reference else (None, None)
        if merge_into == "dequantized":
            model = merge.merge_into_dequantized(model, dtype)
        else:
            model = merge.merge_into_weights(model)
    merge.cast_in_place(model, dtype)
    model.config.dtype = dtype
    if dtype == torch.float32 and getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        # A base loaded in 16 bits (QLoRA's compute dtype) may have picked FlashAttention 2, which has no float32.
        model.set_attn_implementation("sdpa")
    bad = merge.non_finite_weights(model)
    if bad:
        raise RunFailed(f"the merged model has non-finite weights in {len(bad)} tensor(s), first {bad[0]}",
                        hint="the adapter (or the base) holds NaN/inf values; nothing was written")
    if ref is None:
        if verify and src.kind == "model":
            console.print(f"[yellow]note:[/] no {PROBE} in {src.path}: nothing to verify the re-saved model against")
        return model, None, effect
    precision = reference_precision(src, merge_into, dtype_name)
    return model, verify_logits(model, inputs, ref, effect, precision, src), effect


def reference_precision(src: ExportSource, merge_into: str, dtype_name: str) -> str:
    """The precision the comparison is judged in: the less precise of the output dtype and what the reference
    logits were computed in (the run's probe: its compute dtype, TF32 when the run had it on; a QLoRA base
    + adapter: the 4-bit layers' compute dtype)."""
    from ftcli.export import merge

    manifest = src.manifest or {}
    sides = [dtype_name]
    if src.kind == "model":
        sides.append(manifest.get("resolved", {}).get("dtype") or dtype_name)
        if (manifest.get("precision") or {}).get("tf32"):
            sides.append("tf32")
    elif merge_into == "dequantized":
        sides.append(dequantized_compute(src, dtype_name))
    return merge.loosest(*[s for s in sides if s in merge.RELATIVE_TOLERANCE])


def dequantized_compute(src: ExportSource, dtype_name: str) -> str:
    """The compute dtype of the 4-bit base + adapter that gives the reference logits: the run's, or float32 for a
    float32 output (the same 4-bit weights, computed at the output's precision: a tight check, not bfloat16's)."""
    run = (src.manifest or {}).get("resolved", {}).get("dtype") or dtype_name
    return "float32" if dtype_name == "float32" else run


def verify_logits(model: Any, inputs: list[Any], ref: list[Any], effect: float | None, precision: str,
                  src: ExportSource) -> Any:
    """Run the prompts through the finished model and compare with the reference; fail beyond the tolerance of
    `precision` (see `reference_precision`)."""
    from ftcli.export import merge

    comparison = merge.compare(merge.forward_logits(model, inputs, batched=src.head == CAUSAL_HEAD), ref, precision)
    what = "base + adapter" if src.kind == "adapter" else "the run's probe logits"
    effect_text = f"; the adapter itself moves them by up to {effect:.4g}" if effect is not None else ""
    console.print(f"verify: largest logit difference vs {what} {comparison.max_difference:.3g} "
                  f"(tolerance {comparison.tolerance:.3g}, {len(inputs)} prompt(s){effect_text})")
    if not comparison.ok:
        raise RunFailed(f"verification failed: the exported model's logits differ from {what} by "
                        f"{comparison.max_difference:.4g}, more than the {precision} tolerance "
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


def _check_options(opts: ExportOptions) -> None:
    gguf_step.check_gguf_options(opts.format, opts.gguf_type)
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype {opts.dtype} is not a dtype", hint="use auto, float32, float16 or bfloat16")
    if opts.merge_into.lower() in QUANTIZED_TARGETS:
        raise ConfigError(f"--merge-into {opts.merge_into}: merging into weights that stay quantised is refused",
                          hint="quantising again after adding the adapter rounds most of its change away; use "
                          "dequantized (the QLoRA default) or original")
    if opts.merge_into not in MERGE_TARGETS:
        raise ConfigError(f"--merge-into {opts.merge_into} is not a merge target",
                          hint="use auto, dequantized (the 4-bit weights a QLoRA adapter trained against) or original")
    match = _SHARD_SIZE.match(opts.max_shard_size.strip())
    if not match:
        raise ConfigError(f"--max-shard-size {opts.max_shard_size} is not a size",
                          hint="write it like 5GB, 500MB or a number of bytes")
    if float(match.group(1) or 0) <= 0:
        raise ConfigError(f"--max-shard-size {opts.max_shard_size} must be more than zero",
                          hint="write it like 5GB, 500MB or a number of bytes")


def _shard_size(text: str) -> int | str:
    text = text.strip().replace(" ", "")
    return int(text) if text.isdigit() else text.upper().replace("IB", "iB")


def _quiet_libraries() -> None:
    """Keep the terminal for the export's own lines: no library progress bars or advice.

    Not `train.quiet_libraries`: that one imports `datasets` (pyarrow, pandas), about 80 MiB the
    export never uses, on a command whose peak memory is the point."""
    import logging
    import warnings

    for name in ("bitsandbytes", "kernels", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
