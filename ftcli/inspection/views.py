"""`ftcli inspect TARGET`: tell what TARGET is and show it, before trusting it with hours of GPU time.

    >>> from ftcli.inspection.views import InspectOptions, inspect_target
    >>> report = inspect_target("builtin:tiny-llama", InspectOptions(batch_size=4, seq_length=512))
    >>> report["kind"], report["model"]["parameters"]
    ('model', 301120)

TARGET is, in this order: a run folder (`ftcli_run.json`), a LoRA adapter folder
(`adapter_config.json`), a prepared dataset folder (its manifest), a model folder
(`config.json`), a dataset file (.json / .jsonl / .csv / .parquet), a `builtin:` name, or a
hub model id (read from the local cache when offline). Every view is a plain dict (what
`--json` prints); `render` draws it with Rich. Nothing here loads model weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import ConfigError, DataError, ModelError
from ftcli.training.runfolder import MANIFEST, METRICS, read_json_object

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class InspectOptions:
    """The memory-estimate settings (models) and what rows to show (datasets)."""

    batch_size: int | None = None  # None: each method's reference default
    seq_length: int = 2048
    gradient_checkpointing: bool | None = None  # None: each method's default (on for fsdp)
    nproc: int = 1
    gpu_memory: str | None = None
    dtype: str = "bfloat16"
    lora_rank: int = 8
    example: int = 0
    # Raw dataset files: the tokenizer and the options `train` would use.
    model: str = "builtin:tiny-llama"
    format: str | None = None
    template: str | None = None
    train_on_inputs: bool | None = None


def detect(target: str) -> str:
    """model | adapter | run | prepared | dataset | compile_cache (a one-line error for anything else)."""
    from ftcli.builtin import BUILTIN_DATASETS, builtin_name, is_builtin

    if is_builtin(target):
        return "dataset" if builtin_name(target) in BUILTIN_DATASETS else "model"
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "run"
        if (path / "adapter_config.json").is_file():
            return "adapter"
        if _prepared_manifest(path) is not None:
            return "prepared"
        if (path / "warmup.json").is_file():
            return "compile_cache"
        if (path / "config.json").is_file():
            return "model"
        raise ConfigError(f"cannot tell what {target} is: no ftcli_run.json, adapter_config.json, prepared-data "
                          "manifest or config.json in it",
                          hint="pass a run folder, an adapter or model folder, a prepared dataset or a data file")
    if path.is_file():
        if path.suffix.lower() in DATA_SUFFIXES:
            return "dataset"
        raise ConfigError(f"cannot tell what {target} is (a {path.suffix or 'suffix-less'} file)",
                          hint=f"data files end in {', '.join(DATA_SUFFIXES)}; models and runs are folders")
    if target.startswith((".", "/", "~")) or target.count("/") > 1 or Path(target).suffix.lower() in DATA_SUFFIXES:
        raise ConfigError(f"{target} does not exist", hint="check the path")
    return "model"  # a hub id: the model view says whether it can be read


def inspect_target(target: str, options: InspectOptions | None = None) -> dict[str, Any]:
    options = options or InspectOptions()
    kind = detect(target)
    view = {"model": inspect_model, "adapter": inspect_adapter, "run": inspect_run,
            "prepared": inspect_prepared, "dataset": inspect_dataset, "compile_cache": inspect_compile_cache}[kind]
    return {"kind": kind, "target": target, **view(target, options)}


# ---- models ---------------------------------------------------------------------------------------


def inspect_model(target: str, options: InspectOptions) -> dict[str, Any]:
    from ftcli.config import METHOD_DEFAULTS, METHODS
    from ftcli.inspection.estimate import describe_model, estimate_memory, fits, parse_size

    info = describe_model(target)
    gpu = parse_size(options.gpu_memory) if options.gpu_memory else None
    estimates = []
    for method in METHODS:
        defaults = METHOD_DEFAULTS[method]
        checkpointing = (options.gradient_checkpointing if options.gradient_checkpointing is not None
                         else bool(defaults["gradient_checkpointing"]))
        batch = options.batch_size or int(defaults["batch_size"])
        est = estimate_memory(info, method, batch_size=batch, seq_length=options.seq_length,
                              gradient_checkpointing=checkpointing, nproc=options.nproc, dtype=options.dtype,
                              lora_rank=options.lora_rank, lora_targets=list(defaults["lora_target_modules"]))
        if gpu is not None:
            est.fits = fits(est.total_bytes, gpu)
        estimates.append({**est.to_dict(), "batch_size": batch, "gradient_checkpointing": checkpointing})
    model = info.to_dict()
    model.pop("linear_layers")
    return {
        "model": model,
        "memory": {"seq_length": options.seq_length, "dtype": options.dtype, "nproc": options.nproc,
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
    manifest = read_json_object(folder / MANIFEST, hint="the run folder is damaged or was not written by ftcli")
    resolved = manifest.get("resolved", {})
    log_dir = Path(resolved.get("log_dir") or folder / "logs")
    if not log_dir.is_dir():  # recorded relative to where the run started, or the run folder was moved
        log_dir = folder / "logs"
    view: dict[str, Any] = {
        "run": {
            "status": manifest.get("status"),
            "error": manifest.get("error"),
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
    }
    if (folder / "adapter_config.json").is_file():
        view["adapter"] = adapter_summary(folder)
    return view


def run_checkpoints(folder: Path) -> list[dict[str, Any]]:
    """`checkpoint-N` folders, oldest first; complete only once their marker file exists."""
    from ftcli.training.checkpoints import MARKER, PREFIX

    found = []
    for path in folder.glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found.append({"name": path.name, "step": int(suffix), "complete": (path / MARKER).is_file()})
    return sorted(found, key=lambda c: c["step"])


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
            if "loss" in record:
                steps.append(int(record.get("step", len(steps) + 1)))
                values.append(float(record["loss"]))
        if steps:
            return {"source": METRICS, "steps": steps, "loss": values}
    return {"source": None, "steps": [], "loss": []}


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


def _prepared_manifest(folder: Path) -> dict[str, Any] | None:
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
    return _data_view(folder, manifest, tokenizer, tokenizer_ref, options)


def inspect_dataset(target: str, options: InspectOptions) -> dict[str, Any]:
    """A raw dataset file (or built-in sample): prepared as `train` would (into the same cache), then shown."""
    from ftcli.config import build_run_config
    from ftcli.data.prepare import prepare_dataset
    from ftcli.models import load_tokenizer

    flags: dict[str, Any] = {"dataset": target, "model": options.model, "seq_length": options.seq_length,
                             "dataset_size": None, "format": options.format, "template": options.template,
                             "train_on_inputs": options.train_on_inputs}
    config = build_run_config({k: v for k, v in flags.items() if v is not None or k == "dataset_size"})
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_dataset(config, tokenizer)
    return _data_view(prepared.folder, prepared.manifest, tokenizer, config.model, options, dataset=prepared.dataset)


def _data_view(folder: Path, manifest: dict[str, Any], tokenizer: Any, tokenizer_ref: str | None,
               options: InspectOptions, dataset: Any = None) -> dict[str, Any]:
    from ftcli.data.pipeline import explain_example

    stats = manifest.get("stats", {})
    source = manifest.get("source", {})
    opts = manifest.get("options", {})
    view: dict[str, Any] = {
        "data": {
            "source": source.get("ref"), "source_kind": source.get("kind"), "prepared_folder": str(folder),
            "format": manifest.get("format"), "template": manifest.get("template"),
            "tokenizer": tokenizer_ref, "seq_length": opts.get("seq_length"),
            "train_on_inputs": opts.get("train_on_inputs"),
            "rows_read": stats.get("rows_read"), "rows": stats.get("rows_kept"), "dropped": stats.get("dropped"),
            "tokens": stats.get("tokens"), "loss_tokens": stats.get("loss_tokens"),
            "loss_token_share": stats.get("loss_token_share"), "truncated": stats.get("truncated"),
            "truncated_share": stats.get("truncated_share"), "eos_trained_once": stats.get("eos_trained_once"),
            "length": stats.get("length"), "padding": stats.get("padding"),
        },
        "example": None,
    }
    if tokenizer is None:
        view["example_note"] = f"tokenizer {tokenizer_ref} is not available here: no example rendered"
        return view
    if dataset is None:
        from datasets import load_from_disk

        dataset = load_from_disk(str(folder))
    if len(dataset) == 0:
        return view
    index = min(options.example, len(dataset) - 1)
    row = dataset[index]
    pieces = explain_example(row["input_ids"], row["labels"], tokenizer)
    view["example"] = {"index": index, "tokens": len(pieces), "loss_tokens": sum(1 for _, on in pieces if on),
                       "pieces": [{"text": text, "loss": on} for text, on in pieces]}
    return view


# ---- rendering ------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> None:
    """Draw a report with Rich on the ftcli console."""
    from ftcli.console import console

    kind = report["kind"]
    console.print(f"[bold]{report['target']}[/]: {kind}")
    {"model": _render_model, "adapter": _render_adapter, "run": _render_run, "prepared": _render_data,
     "dataset": _render_data, "compile_cache": _render_compile_cache}[kind](report)


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    return table


def _render_model(report: dict[str, Any]) -> None:
    from rich.table import Table

    from ftcli.console import console
    from ftcli.system import format_bytes

    m = report["model"]
    console.print(_kv_table("model (from its config; no weights loaded)", [
        ("architecture", f"{m['architecture']} ({m['model_type']})"),
        ("parameters", f"{m['parameters']:,}"),
        ("layers", m["layers"]), ("hidden size", m["hidden_size"]),
        ("intermediate size", m["intermediate_size"]),
        ("attention heads / kv heads", f"{m['heads']} / {m['kv_heads']} (head dim {m['head_dim']})"),
        ("vocabulary", f"{m['vocab_size']:,}"), ("context length", m["context_length"]),
        ("dtype (config)", m["dtype"]), ("tied embeddings", m["tied_embeddings"]),
        ("chat template", "yes" if m["chat_template"] else "no"),
    ]))
    mem = report["memory"]
    gpu = mem["gpu_memory_bytes"]
    title = (f"training memory per process, estimated: seq length {mem['seq_length']}, {mem['dtype']}, "
             f"{mem['nproc']} process(es)" + (f", GPU {format_bytes(gpu)}" if gpu else ""))
    table = Table(title=title, title_justify="left")
    for column in ("method", "batch", "grad ckpt", "trainable", "weights", "gradients", "optimizer",
                   "activations", "total"):
        table.add_column(column, justify="left" if column == "method" else "right")
    if gpu:
        table.add_column("fits")
    for est in mem["methods"]:
        row = [est["method"], str(est["batch_size"]), "on" if est["gradient_checkpointing"] else "off",
               f"{est['trainable_parameters']:,}", format_bytes(est["weights_bytes"]),
               format_bytes(est["gradients_bytes"]), format_bytes(est["optimizer_bytes"]),
               format_bytes(est["activations_bytes"]), f"[bold]{format_bytes(est['total_bytes'])}"]
        if gpu:
            row.append("[green]yes" if est["fits"] else "[red]no")
        table.add_row(*row)
    console.print(table)
    console.print("AdamW, weights in the given dtype; qlora: NF4 base. The verdict keeps 10% + 1 GiB for the CUDA "
                  "context and allocator slack. `ftcli warmup` measures the real peak.")


def _render_compile_cache(report: dict[str, Any]) -> None:
    from ftcli.console import console
    from ftcli.system import format_bytes

    c = report["compile_cache"]
    key = c.get("key") or {}
    console.print(_kv_table("compile cache (ftcli warmup)", [
        ("method, batch size, seq length", f"{key.get('method')}, {key.get('batch_size')}, {key.get('seq_length')}"),
        ("dtype, device", f"{key.get('dtype')}, {key.get('device')}"),
        ("model fingerprint", key.get("model")),
        ("torch", (key.get("versions") or {}).get("torch")),
        ("shapes warmed", ", ".join("x".join(map(str, s)) for s in c.get("shapes") or [])),
        ("cold compile time", f"{c['compile_s']:.2f} s" if c.get("compile_s") is not None else None),
        ("steady step time", f"{c['step_s'] * 1000:.1f} ms" if c.get("step_s") is not None else None),
        ("portable artefacts", format_bytes(c["artifacts_bytes"]) if c.get("artifacts_bytes") is not None else None),
        ("Inductor cache", format_bytes(c["inductor_bytes"])),
    ]))


def _render_adapter(report: dict[str, Any]) -> None:
    from ftcli.console import console

    console.print(_adapter_table(report["adapter"]))


def _adapter_table(a: dict[str, Any]) -> Any:
    from ftcli.system import format_bytes

    trainable = a["trainable_parameters"]
    return _kv_table("adapter", [
        ("base model", a["base_model"]), ("type", a["peft_type"]), ("rank", a["rank"]), ("alpha", a["alpha"]),
        ("dropout", a["dropout"]), ("target modules", ", ".join(a["target_modules"] or [])),
        ("trainable parameters", f"{trainable:,} in {a['tensors']} tensors" if trainable is not None else None),
        ("size on disk", format_bytes(a["size_bytes"])),
    ])


def _render_run(report: dict[str, Any]) -> None:
    from ftcli.console import console
    from ftcli.system import format_bytes

    run = report["run"]
    colour = {"finished": "green", "interrupted": "yellow", "failed": "red"}.get(run["status"], "cyan")
    rows: list[tuple[str, Any]] = [("status", f"[{colour}]{run['status']}[/]"
                                    + (f": {run['error']}" if run.get("error") else ""))]
    cfg = report.get("config") or {}
    rows += [("method", cfg.get("method")), ("model", cfg.get("model")), ("dataset", cfg.get("dataset")),
             ("started / ended", f"{run['started_at']} / {run['ended_at'] or '-'}"),
             ("device, dtype", f"{run['device']}, {run['dtype']}"),
             ("parameters", f"{run['trainable_parameters']:,} trainable of {run['total_parameters']:,}"
              if run.get("total_parameters") else None),
             ("data", f"{run['data'].get('rows_used')} examples, {run['data'].get('tokens')} tokens, "
                      f"{run['data'].get('truncated')} truncated")]
    metrics = run.get("metrics") or {}
    for key in ("steps", "train_loss", "train_runtime", "real_tokens_per_second"):
        if metrics.get(key) is not None:
            rows.append((key, metrics[key]))
    if metrics.get("peak_memory_bytes"):
        rows.append((metrics.get("peak_memory_kind", "peak memory"), format_bytes(metrics["peak_memory_bytes"])))
    checkpoints = report["checkpoints"]
    rows.append(("checkpoints", ", ".join(c["name"] + ("" if c["complete"] else " (incomplete)")
                                          for c in checkpoints) or "none"))
    console.print(_kv_table("run", rows))
    console.print(_kv_table("resolved config", [(k, v) for k, v in cfg.items() if v is not None]))
    if "adapter" in report:
        console.print(_adapter_table(report["adapter"]))
    curve = report["loss_curve"]
    if curve["loss"]:
        console.print(f"[bold]training loss[/] ({curve['source']}, {len(curve['loss'])} points)")
        console.print(loss_chart(curve["steps"], curve["loss"]))
    else:
        console.print("training loss: no TensorBoard events or metrics.jsonl in this run")


def loss_chart(steps: list[int], values: list[float], width: int = 60, height: int = 10) -> str:
    """A block chart of the loss: one column per group of steps (its mean), `height` rows of eighths."""
    levels = " ▁▂▃▄▅▆▇█"
    width = max(1, min(width, len(values)))
    columns = []
    for c in range(width):
        chunk = values[c * len(values) // width:(c + 1) * len(values) // width] or [values[-1]]
        columns.append(sum(chunk) / len(chunk))
    low, high = min(columns), max(columns)
    span = (high - low) or 1.0
    filled = [round((v - low) / span * (height * 8 - 1)) + 1 for v in columns]
    lines = []
    for row in range(height - 1, -1, -1):
        label = f"{high:8.3f} ┤" if row == height - 1 else f"{low:8.3f} ┤" if row == 0 else " " * 9 + "│"
        cells = "".join(levels[max(0, min(8, f - row * 8))] for f in filled)
        lines.append(label + cells)
    lines.append(" " * 9 + "└" + "─" * width)
    lines.append(" " * 10 + f"step {steps[0]}".ljust(max(width - 10, 1)) + f"step {steps[-1]}")
    return "\n".join(lines)


def _render_data(report: dict[str, Any]) -> None:
    from rich.text import Text

    from ftcli.console import console

    d = report["data"]
    length = d.get("length") or {}
    dropped = d.get("dropped") or {}
    padding = d.get("padding") or {}
    share = (lambda x: f"{x:.1%}" if isinstance(x, (int, float)) else "-")
    console.print(_kv_table("dataset" if report["kind"] == "dataset" else "prepared dataset", [
        ("source", f"{d['source']} ({d['source_kind']})"), ("format / template", f"{d['format']} / {d['template']}"),
        ("tokenizer", d["tokenizer"]), ("rows", f"{d['rows']} kept of {d['rows_read']} read"
                                        + (f" (dropped: {dropped})" if any(dropped.values()) else "")),
        ("tokens", f"{d['tokens']:,} ({d['loss_tokens']:,} in the loss, {share(d['loss_token_share'])})"
         if d.get("tokens") is not None else None),
        ("length p50 / p90 / p95 / p99 / max", " / ".join(str(length.get(k, "-")) for k in
                                                        ("p50", "p90", "p95", "p99", "max"))),
        ("truncated at seq length", f"{d['truncated']} ({share(d['truncated_share'])}) at {d['seq_length']}"),
        ("EOS trained once", d.get("eos_trained_once")),
        ("padding (in order / length-grouped)",
         f"{share(padding.get('in_order'))} / {share(padding.get('length_grouped'))}" if padding else None),
        ("prepared folder", d["prepared_folder"]),
    ]))
    example = report.get("example")
    if example is None:
        if report.get("example_note"):
            console.print(report["example_note"])
        return
    console.print(f"[bold]example {example['index']}[/]: {example['tokens']} tokens, {example['loss_tokens']} in the "
                  "loss ([bold green]green[/] = in the loss, [dim]dim[/] = masked)")
    text = Text()
    for piece in example["pieces"]:
        text.append(piece["text"], style="bold green" if piece["loss"] else "dim")
    console.print(text)
