"""The views of `ftcli inspect`: one plain dict per kind of target (what `--json` prints).

    >>> from ftcli.inspection.views import InspectOptions, inspect_run
    >>> inspect_run("runs/lora-1", InspectOptions())["checkpoints"]   # complete by the rule resume uses

Which view a target gets is decided in ftcli/inspection/detect.py; ftcli/inspection/render.py
draws a view. Nothing here loads model weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import ConfigError, DataError, ModelError
from ftcli.files import read_json_object
from ftcli.training.runfolder import MANIFEST, METRICS, run_state



@dataclass
class InspectOptions:
    """The memory-estimate settings (models) and what rows to show (datasets)."""

    batch_size: int | None = None  # None: each method's reference default
    seq_length: int = 2048
    gradient_checkpointing: bool | None = None  # None: each method's default (on for fsdp)
    nproc: int = 1
    gpu_memory: str | None = None
    dtype: str = "auto"  # auto: what `train --dtype auto` resolves to on the device the estimate is for
    lora_rank: int = 8
    example: int = 0
    # Raw dataset files: the tokenizer and the options `train` would use.
    model: str = "builtin:tiny-llama"
    format: str | None = None
    columns: dict[str, str] | None = None  # --columns FIELD=COLUMN, as train reads it
    template: str | None = None
    train_on_inputs: bool | None = None
    # The training objective (ftcli.objectives): the estimate counts its reference and rows; pairs for datasets.
    objective: str | None = None  # None: sft for models; dataset files with chosen/rejected columns read as pairs
    precompute_ref: bool = False
    num_generations: int = 8  # grpo: completions per prompt (the default batch size: one group)
    grpo_beta: float = 0.0  # grpo: a KL term holds a reference model


# ---- models ---------------------------------------------------------------------------------------


def model_objective(architecture: str) -> str:
    """The objective a model's estimate is for by default: the one that trains its head (a score head: the reward
    objective's; the LM head: SFT, the first objective)."""
    from types import SimpleNamespace

    from ftcli.models import head_of_config
    from ftcli.objectives import OBJECTIVES

    head = head_of_config(SimpleNamespace(architectures=[architecture]))
    return next(name for name, o in OBJECTIVES.items() if o.head == head)


def inspect_model(target: str, options: InspectOptions) -> dict[str, Any]:
    from ftcli.config import METHOD_DEFAULTS
    from ftcli.methods import METHODS
    from ftcli.models import CAUSAL_HEAD
    from ftcli.objectives import OBJECTIVES
    from ftcli.inspection.estimate import describe_model, estimate_memory, estimate_setting, fits, parse_size

    gpu = parse_size(options.gpu_memory) if options.gpu_memory else None
    device, dtype, dtype_reason = estimate_setting(options.dtype, options.gpu_memory)
    info = describe_model(target)
    objective = options.objective or model_objective(info.architecture)
    estimates = []
    for method in METHODS:
        if METHODS[method].shards and not OBJECTIVES[objective].shards:
            continue  # refused with this objective (grpo, reward): no column for it
        defaults = METHOD_DEFAULTS[method]
        checkpointing = (options.gradient_checkpointing if options.gradient_checkpointing is not None
                         else bool(defaults["gradient_checkpointing"]))
        samples = OBJECTIVES[options.objective or "sft"].samples
        batch = options.batch_size or (options.num_generations if samples else int(defaults["batch_size"]))
        est = estimate_memory(info, method, batch_size=batch, seq_length=options.seq_length,
                              gradient_checkpointing=checkpointing, nproc=options.nproc, dtype=dtype,
                              lora_rank=options.lora_rank, lora_targets=list(defaults["lora_target_modules"]),
                              objective=objective, precompute_ref=options.precompute_ref,
                              num_generations=options.num_generations, kl_beta=options.grpo_beta, device=device)
        if gpu is not None:
            est.fits = fits(est.total_bytes, gpu)
        estimates.append({**est.to_dict(), "batch_size": batch, "gradient_checkpointing": checkpointing})
    model = info.to_dict()
    model.pop("linear_layers")
    model["reward_model"] = OBJECTIVES[objective].head != CAUSAL_HEAD
    return {
        "model": model,
        "memory": {"objective": objective, "seq_length": options.seq_length,
                   "device": device, "dtype": dtype, "dtype_reason": dtype_reason, "nproc": options.nproc,
                   "gpu_memory_bytes": gpu, "methods": estimates},
    }


# ---- adapters -------------------------------------------------------------------------------------


def adapter_summary(folder: Path) -> dict[str, Any]:
    """An adapter's config and its tensors, counted from the safetensors header (no weights loaded)."""
    config = read_json_object(folder / "adapter_config.json",
                              hint="the adapter folder is damaged; retrain or copy it again")
    weights = folder / "adapter_model.safetensors"
    parameters, tensors = None, None
    if weights.is_file():
        parameters, tensors = _count_tensors(weights)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    return {
        "base_model": config.get("base_model_name_or_path"),
        "peft_type": config.get("peft_type"),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "target_modules": sorted(targets) if targets else targets,
        "trainable_parameters": parameters,
        "tensors": tensors,
        "size_bytes": sum(p.stat().st_size for p in folder.glob("adapter_*") if p.is_file()),
        "weights_file": weights.name if weights.is_file() else None,
    }


def _count_tensors(path: Path) -> tuple[int, int]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            total = 0
            for key in keys:
                count = 1
                for dim in fh.get_slice(key).get_shape():
                    count *= dim
                total += count
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind is one line for the user
        raise ModelError(f"cannot read {path}: {exc}", hint="the file is damaged; retrain or copy it again") from None
    return total, len(keys)


def inspect_adapter(target: str, options: InspectOptions) -> dict[str, Any]:
    return {"adapter": adapter_summary(Path(target).expanduser())}


# ---- runs -----------------------------------------------------------------------------------------


def inspect_run(target: str, options: InspectOptions) -> dict[str, Any]:
    folder = Path(target).expanduser()
    manifest = read_run_manifest(folder)
    resolved = manifest.get("resolved", {})
    log_dir = Path(resolved.get("log_dir") or folder / "logs")
    if not log_dir.is_dir():  # recorded relative to where the run started, or the run folder was moved
        log_dir = folder / "logs"
    stopped = run_state(folder, manifest)
    view: dict[str, Any] = {
        "run": {
            # A `running` record whose process is gone (SIGKILL, power cut) is no longer running.
            "status": "stopped" if stopped else manifest.get("status"),
            "error": stopped or manifest.get("error"),
            "host": manifest.get("host"),
            "pid": manifest.get("pid"),
            "started_at": manifest.get("started_at"),
            "ended_at": manifest.get("ended_at"),
            "command": manifest.get("command"),
            "saves": resolved.get("saves"),
            "device": resolved.get("device"),
            "dtype": resolved.get("dtype"),
            "trainable_parameters": resolved.get("trainable_parameters"),
            "total_parameters": resolved.get("total_parameters"),
            "metrics": manifest.get("metrics"),
            "timings": manifest.get("timings"),
            "data": {k: manifest.get("data", {}).get(k) for k in ("source", "rows_used", "tokens", "loss_tokens",
                                                                  "truncated")},
        },
        "config": manifest.get("config"),
        "checkpoints": run_checkpoints(folder),
        "loss_curve": loss_curve(folder, log_dir),
        "eval_curve": eval_curve(folder),
        "eval": manifest.get("eval"),
    }
    if (folder / "adapter_config.json").is_file():
        view["adapter"] = adapter_summary(folder)
    from ftcli.inspection.prompts import latest_completions, reward_curve

    view["completions"] = latest_completions(folder)  # GRPO's sampled completions (none for other objectives)
    view["reward_curve"] = reward_curve(folder)  # GRPO's mean reward per step (empty for other objectives)
    return view


# The sections of a run manifest that are mappings when ftcli wrote them (absent or null is allowed).
MANIFEST_MAPPINGS = ("config", "resolved", "data", "metrics", "timings", "eval")


def read_run_manifest(folder: Path) -> dict[str, Any]:
    """A run folder's manifest, refused in one line (ModelError, like an unreadable one) when a section that
    ftcli writes as a mapping is something else: the views and tables read them as mappings."""
    hint = "the run folder is damaged or was not written by ftcli"
    manifest = read_json_object(folder / MANIFEST, hint=hint)
    for key in MANIFEST_MAPPINGS:
        value = manifest.get(key)
        if value is not None and not isinstance(value, dict):
            raise ModelError(f"{folder / MANIFEST} is damaged: its '{key}' is not a mapping "
                             f"(a JSON {type(value).__name__})", hint=hint)
    return manifest


def run_checkpoints(folder: Path) -> list[dict[str, Any]]:
    """`checkpoint-N` folders, oldest first; complete by the rule resume uses (its marker present, and every
    file the marker lists there at its recorded size)."""
    from ftcli.training.checkpoints import checkpoint_folders, complete_checkpoints

    complete = {path for _, path in complete_checkpoints(folder)}
    return [{"name": path.name, "step": step, "complete": path in complete}
            for step, path in checkpoint_folders(folder)]


def loss_curve(folder: Path, log_dir: Path) -> dict[str, Any]:
    """The per-step training loss from the TensorBoard events, else from metrics.jsonl."""
    events = sorted(log_dir.rglob("events.out.tfevents.*")) if log_dir.is_dir() else []
    if events:
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            points: dict[int, float] = {}
            for parent in sorted({e.parent for e in events}):
                acc = EventAccumulator(str(parent), size_guidance={"scalars": 0})
                acc.Reload()
                if "train/loss" in acc.Tags().get("scalars", []):
                    for event in acc.Scalars("train/loss"):
                        points[int(event.step)] = float(event.value)
            if points:
                steps = sorted(points)
                return {"source": "tensorboard", "steps": steps, "loss": [points[s] for s in steps]}
        except Exception:  # noqa: BLE001 - unreadable events: fall back to metrics.jsonl
            pass
    metrics = folder / METRICS
    if metrics.is_file():
        steps, values = [], []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
                step = record.get("step")
                steps.append(step if isinstance(step, int) else len(steps) + 1)
                values.append(float(record["loss"]))
        if steps:
            return {"source": METRICS, "steps": steps, "loss": values}
    return {"source": None, "steps": [], "loss": []}


def eval_curve(folder: Path) -> dict[str, Any]:
    """The eval loss at each eval step (metrics.jsonl), empty for a run without an eval set."""
    steps: list[int] = []
    values: list[float] = []
    metrics = folder / METRICS
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("eval_loss"), (int, float)):
                steps.append(record["step"] if isinstance(record.get("step"), int) else 0)
                values.append(float(record["eval_loss"]))
    return {"source": METRICS if steps else None, "steps": steps, "loss": values}


# ---- compile caches -------------------------------------------------------------------------------


def inspect_compile_cache(target: str, options: InspectOptions) -> dict[str, Any]:
    """A `<ftcli home>/compile/<key>` folder left by `ftcli warmup` / `train --compile`: what it was built for."""
    folder = Path(target).expanduser()
    report = read_json_object(folder / "warmup.json", hint="delete the folder; the next `ftcli warmup` rebuilds it")
    artifacts = folder / "artifacts.bin"
    return {"compile_cache": {
        "key": report.get("key"), "shapes": report.get("shapes"), "compile_s": report.get("compile_s"),
        "step_s": report.get("step_s"), "real_tokens_per_second": report.get("real_tokens_per_second"),
        "peak_memory_bytes": report.get("peak_memory_bytes"), "peak_memory_kind": report.get("peak_memory_kind"),
        "artifacts_bytes": artifacts.stat().st_size if artifacts.is_file() else None,
        "inductor_bytes": sum(p.stat().st_size for p in (folder / "inductor").rglob("*") if p.is_file()),
    }}


# ---- data -----------------------------------------------------------------------------------------


def prepared_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest when `folder` is a prepared dataset (complete or not), else None."""
    from ftcli.data import cache

    if not cache.is_prepared_folder(str(folder)):
        return None
    path = folder / cache.MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def inspect_prepared(target: str, options: InspectOptions) -> dict[str, Any]:
    from ftcli.data import cache

    folder = Path(target).expanduser()
    manifest = cache.read_prepared_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder} is an incomplete or damaged prepared dataset (no complete {cache.MANIFEST_NAME})",
                        hint="prepare it again with `ftcli prepare`")
    from ftcli.models import load_tokenizer

    tokenizer_ref = (manifest.get("tokenizer") or {}).get("name_or_path")
    try:
        tokenizer = load_tokenizer(tokenizer_ref) if tokenizer_ref else None
    except Exception:  # noqa: BLE001 - the stats stand without it; the example needs it
        tokenizer = None
    if manifest.get("kind") == "preference":
        return _pair_view(folder, manifest, tokenizer, tokenizer_ref, options)
    if manifest.get("kind") == "prompts":
        from ftcli.inspection.prompts import prompt_view

        return prompt_view(folder, manifest, tokenizer, tokenizer_ref, options)
    return _data_view(folder, manifest, tokenizer, tokenizer_ref, options)


def inspect_dataset(target: str, options: InspectOptions) -> dict[str, Any]:
    """A raw dataset file (or built-in sample): prepared as `train` would (into the same cache), then shown."""
    from ftcli.config import build_run_config
    from ftcli.data.prepare import prepare_dataset
    from ftcli.models import load_tokenizer
    from ftcli.objectives import OBJECTIVES

    flags: dict[str, Any] = {"dataset": target, "model": options.model, "seq_length": options.seq_length,
                             "dataset_size": None, "format": options.format, "template": options.template,
                             "train_on_inputs": options.train_on_inputs, "columns": options.columns}
    if options.objective is not None:
        flags["objective"] = options.objective
    elif _has_pair_columns(target, options.columns):
        flags["objective"] = next(name for name, o in OBJECTIVES.items() if o.pairs)
    config = build_run_config({k: v for k, v in flags.items() if v is not None or k == "dataset_size"})
    tokenizer = load_tokenizer(config.model)
    if OBJECTIVES[config.objective].data == "prompts":
        from ftcli.data.prompts import prepare_prompts
        from ftcli.inspection.prompts import prompt_view

        prepared = prepare_prompts(config, tokenizer)
        return prompt_view(prepared.folder, prepared.manifest, tokenizer, config.model, options, prepared.dataset)
    if OBJECTIVES[config.objective].pairs:
        from ftcli.data.preference_prepare import prepare_pairs

        prepared = prepare_pairs(config, tokenizer)
        return _pair_view(prepared.folder, prepared.manifest, tokenizer, config.model, options, prepared.dataset,
                          from_file=True)
    prepared = prepare_dataset(config, tokenizer)
    return _data_view(prepared.folder, prepared.manifest, tokenizer, config.model, options, dataset=prepared.dataset,
                      from_file=True)


def _example_index(manifest: dict[str, Any], asked: int, from_file: bool) -> tuple[int, dict[str, Any]]:
    """--example N as the index into the prepared (shuffled) rows, and the words saying which row that is: of a
    file, row N of the file (0 = the first) when that can be known, else the prepared data's N-th row, said so."""
    from ftcli.data.stats import prepared_position

    position = prepared_position(manifest, asked) if from_file else None
    if position is not None:
        return position, {"source_row": asked, "prepared_row": position, "where": f"row {asked} of the file"}
    seed = manifest.get("options", {}).get("seed")
    where = f"row {asked} of the prepared data, shuffled with seed {seed}"
    if from_file:
        where += " (rows were dropped, so which row of the file it is is not known)"
    return asked, {"source_row": None, "prepared_row": asked, "where": where}


def _data_view(folder: Path, manifest: dict[str, Any], tokenizer: Any, tokenizer_ref: str | None,
               options: InspectOptions, dataset: Any = None, from_file: bool = False) -> dict[str, Any]:
    from ftcli.data.pipeline import explain_example
    from ftcli.data.stats import rendering_note

    stats = manifest.get("stats", {})
    source = manifest.get("source", {})
    opts = manifest.get("options", {})
    view: dict[str, Any] = {
        "data": {
            "source": source.get("ref"), "source_kind": source.get("kind"), "prepared_folder": str(folder),
            "format": manifest.get("format"), "template": manifest.get("template"),
            "rendering": rendering_note(stats, manifest.get("format")),
            "tokenizer": tokenizer_ref, "seq_length": opts.get("seq_length"),
            "train_on_inputs": opts.get("train_on_inputs"),
            "rows_read": stats.get("rows_read"), "rows": stats.get("rows_kept"), "dropped": stats.get("dropped"),
            "tokens": stats.get("tokens"), "loss_tokens": stats.get("loss_tokens"),
            "loss_token_share": stats.get("loss_token_share"), "truncated": stats.get("truncated"),
            "truncated_share": stats.get("truncated_share"), "eos_trained_once": stats.get("eos_trained_once"),
            "length": stats.get("length"), "padding": stats.get("padding"),
            "sources": manifest.get("mixture", {}).get("sources"),  # a mixture's (ftcli.data.mixture), else None
        },
        "example": None,
    }
    if tokenizer is None:
        view["example_note"] = f"tokenizer {tokenizer_ref} is not available here: no example rendered"
        return view
    if dataset is None:
        from datasets import load_from_disk

        dataset = load_from_disk(str(folder))
    rows = len(dataset)
    if rows == 0 and options.example == 0:
        return view
    if options.example >= rows:
        raise ConfigError(f"--example {options.example} is beyond the {rows} examples of {folder}",
                          hint=f"pick an index in 0..{rows - 1}" if rows else "this dataset has no examples to show")
    index, where = _example_index(manifest, options.example, from_file)
    row = dataset[index]
    pieces = explain_example(row["input_ids"], row["labels"], tokenizer)
    view["example"] = {"index": options.example, **where, "tokens": len(pieces),
                       "loss_tokens": sum(1 for _, on in pieces if on),
                       "pieces": [{"text": text, "loss": on} for text, on in pieces]}
    return view


def _has_pair_columns(target: str, mapping: dict[str, str] | None = None) -> bool:
    """Whether a dataset file's rows have chosen and rejected columns (preference pairs), --columns applied."""
    from ftcli.data.sources import load_rows

    try:
        columns = load_rows(target).dataset.column_names
    except Exception:  # noqa: BLE001 - unreadable here: SFT's preparation says why, in its own words
        return False
    names = set(columns) | {field for field, column in (mapping or {}).items() if column.strip() in
                            {c.strip() for c in columns}}
    return "chosen" in names and "rejected" in names


def _pair_view(folder: Path, manifest: dict[str, Any], tokenizer: Any, tokenizer_ref: str | None,
               options: InspectOptions, dataset: Any = None, from_file: bool = False) -> dict[str, Any]:
    """Prepared preference pairs: their statistics and one pair, each answer's tokens with its mask."""
    from ftcli.data.preference import explain_pair

    stats, source, opts = manifest.get("stats", {}), manifest.get("source", {}), manifest.get("options", {})
    view: dict[str, Any] = {"pairs": {
        "source": source.get("ref"), "source_kind": source.get("kind"), "prepared_folder": str(folder),
        "format": manifest.get("format"), "template": manifest.get("template"), "tokenizer": tokenizer_ref,
        "seq_length": opts.get("seq_length"), "max_prompt_length": opts.get("max_prompt_length"),
        **{k: stats.get(k) for k in ("rows_read", "rows_kept", "dropped", "tokens", "loss_tokens", "truncated",
                                     "prompt_truncated", "chosen_truncated", "rejected_truncated",
                                     "cut_differently", "eos_trained_once", "length")}}, "example": None}
    if tokenizer is None:
        view["example_note"] = f"tokenizer {tokenizer_ref} is not available here: no pair rendered"
        return view
    if dataset is None:
        from datasets import load_from_disk

        dataset = load_from_disk(str(folder))
    if options.example >= len(dataset):
        raise ConfigError(f"--example {options.example} is beyond the {len(dataset)} pairs of {folder}",
                          hint=f"pick an index in 0..{len(dataset) - 1}")
    index, where = _example_index(manifest, options.example, from_file)
    row = dataset[index]
    sides = explain_pair(row, tokenizer)
    view["example"] = {"index": options.example, **where, "prompt_tokens": len(row["prompt_ids"]),
                       **{side: [{"text": t, "loss": on} for t, on in pieces] for side, pieces in sides.items()}}
    return view

