"""`ftcli warmup`: compile ahead of the run, without touching the weights.

    >>> from ftcli.training.warmup import warm_compile_cache
    >>> warm_compile_cache(config, plan, tokenizer, dataset, "cpu")   # what `train --compile` calls

The model is compiled exactly as the trainer will compile it (the trainer's own
`accelerator.prepare_model`, i.e. `torch.compile(model, backend="inductor")`) and runs the
trainer's own `training_step` (forward + backward) on every batch shape one epoch produces.
There is no optimizer and no step: the gradients are dropped, the random number generators
restored, so the weights and the data order of the run that follows are exactly as without
a warmup.

The artefacts stay in `<ftcli home>/compile/<key>/`: `inductor/` (Inductor's cache folder,
used as TORCHINDUCTOR_CACHE_DIR: FX graph and AOTAutograd caches, compiled kernels),
`artifacts.bin` (PyTorch's portable "mega-cache", `torch.compiler.save_cache_artifacts()`)
and `warmup.json` (written last: the cache counts as warm only once it exists). The key
covers the model files, method, LoRA shape, batch size, sequence-length buckets, dtype,
device type and library versions, so a later `train --compile` with the same settings starts
from these artefacts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ftcli.console import console
from ftcli.files import write_atomic
from ftcli.paths import ftcli_home

MARKER = "warmup.json"
ARTIFACTS = "artifacts.bin"
INDUCTOR = "inductor"
# Distinct batch shapes warmed at most: with automatic dynamic shapes, dynamo compiles the first
# shape statically and one shape-generic graph at the second, so a few shapes cover the rest.
MAX_SHAPES = 8
STEADY_STEPS = 3
# Batches the warmup looks at to find the shapes of one epoch (collation only, no compute).
MAX_SCAN_BATCHES = 4096
_HASH_CHUNK = 1 << 20


def model_fingerprint(path: str | Path) -> str:
    """sha256 over a model folder's files: names, sizes, and the content (first and last MiB of big files).

    Weight files are large; their size and both ends change whenever the weights do, and reading
    gigabytes to name a cache would cost more than the compile it saves.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    if not folder.is_dir():  # a hub id not downloaded: the id itself is all there is
        digest.update(str(path).encode())
        return "sha256:" + digest.hexdigest()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder)}\0{size}\0".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(_HASH_CHUNK))
            if size > 2 * _HASH_CHUNK:
                fh.seek(size - _HASH_CHUNK)
                digest.update(fh.read(_HASH_CHUNK))
            elif size > _HASH_CHUNK:
                digest.update(fh.read())
    return "sha256:" + digest.hexdigest()


def cache_key_fields(config: Any, dataset: Any, device: str, torch_dtype: Any) -> dict[str, Any]:
    """What the compiled code depends on; two runs with equal fields share one cache folder."""
    from ftcli.training.batching import bucket_length, group_by_length
    from ftcli.models import resolve_attn_implementation, resolve_model_source
    from ftcli.system import library_versions
    from ftcli.training.precision import use_liger

    lengths = [len(ids) for ids in dataset["input_ids"]]
    versions = library_versions()
    fields: dict[str, Any] = {
        "model": model_fingerprint(resolve_model_source(config.model).path),
        "revision": config.revision,
        "method": config.method,
        "batch_size": config.batch_size,
        "seq_length": config.seq_length,
        "buckets": sorted({bucket_length(n, config.seq_length) for n in lengths}),
        "batching": {"group_by_length": group_by_length(config), "padding_free": config.padding_free,
                     "packing": config.packing},
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": device.split(":")[0],
        # Inductor tunes its kernels for the GPU model, and Liger replaces modules before compiling.
        "gpu": gpu_name(device),
        "liger": use_liger(config, device),
        "attn_implementation": resolve_attn_implementation(config.attn_implementation, device, torch_dtype),
        "versions": {k: versions[k] for k in ("python", "torch", "transformers", "trl", "peft", "ftcli")},
    }
    from ftcli.methods import METHODS

    if METHODS[config.method].uses_lora:
        fields["lora"] = {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                          "targets": sorted(config.lora_target_modules or [])}
        from ftcli.methods.variants import describe

        if describe(config):  # DoRA, rsLoRA, trained biases change the graph (plain LoRA keeps its key)
            fields["lora"]["variant"] = describe(config)
    return fields


def gpu_name(device: str) -> str | None:
    """The GPU model a CUDA device is (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(device)


def cache_folder(fields: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return ftcli_home() / "compile" / key


def is_warm(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / ARTIFACTS).is_file()


def use_cache_folder(folder: Path) -> None:
    """Point Inductor at the key's cache folder for the rest of this process (the compile happens later, in training).

    Tensor dimensions are also compiled as dynamic from the first call. By default dynamo compiles
    the first shape it sees statically and only the second one shape-generically, so which graphs
    exist would depend on the order of the batches, and the run's first batch (another shape than
    the warmup's first) would compile a graph of its own. Shape-generic from the start, the warmup
    and the run compile the same graphs whatever the order.
    """
    import torch

    inductor = folder / INDUCTOR
    inductor.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    torch._dynamo.config.assume_static_by_default = False


def load_artifacts(folder: Path) -> int:
    """Hot-load the portable artefacts into PyTorch's caches; returns how many entries were loaded."""
    import torch

    info = torch.compiler.load_cache_artifacts((folder / ARTIFACTS).read_bytes())
    return _count_artifacts(info)


def _count_artifacts(info: Any) -> int:
    if info is None:
        return 0
    artifacts = getattr(info, "artifacts", None)
    if isinstance(artifacts, dict):
        return sum(len(v) for v in artifacts.values())
    return 0


def save_artifacts(folder: Path, report: dict[str, Any]) -> None:
    """Write the portable artefacts, then the marker (last: a half-written cache never counts as warm)."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    data = saved[0] if saved is not None else b""
    report["artifacts"] = _count_artifacts(saved[1]) if saved is not None else 0
    write_atomic(folder / ARTIFACTS, data)
    write_atomic(folder / MARKER, json.dumps(report, indent=2, default=str) + "\n")


def warm_compile_cache(config: Any, plan: Any, tokenizer: Any, dataset: Any, device: str) -> dict[str, Any]:
    """Called by `train --compile` before the trainer is built: load the key's cache if it is warm,
    otherwise warm it up first (forward + backward on the run's shapes, no optimizer step)."""
    from ftcli.methods import METHODS

    if METHODS[config.method].shards:
        # The sharded model is compiled after `fully_shard`, inside the trainer; it compiles in the run.
        console.print(f"compile: {config.method} compiles during the run (no ahead-of-time warmup across processes)")
        return {"cache": "none"}
    fields = cache_key_fields(config, dataset, device, plan.model.dtype)
    folder = cache_folder(fields)
    use_cache_folder(folder)
    if is_warm(folder):
        loaded = load_artifacts(folder)
        console.print(f"compile cache: warm ({folder.name}, {loaded} artefacts loaded)")
        return {"cache": "warm", "folder": str(folder), "artifacts_loaded": loaded}
    console.print(f"compile cache: cold ({folder.name}); warming up first, without training")
    report = dry_run(config, plan, tokenizer, dataset, device)
    report.update(cache="cold", folder=str(folder), key=fields)
    save_artifacts(folder, report)
    console.print(f"compile: {report['compile_s']:.1f} s for {len(report['shapes'])} shape(s), cached in {folder}")
    return report


def run_warmup(config: Any) -> dict[str, Any]:
    """`ftcli warmup`: load like `train`, then compile and measure (dry run) with the key's cache."""
    from ftcli.errors import ConfigError
    from ftcli.methods import METHODS
    from ftcli.objectives import OBJECTIVES
    from ftcli.training.setup import set_up

    if not OBJECTIVES[config.objective].compiles:
        raise ConfigError(f"ftcli warmup compiles the model for --compile, which --objective {config.objective} does "
                          "not take", hint="train without --compile (and without warmup)")
    if METHODS[config.method].shards:
        raise ConfigError(f"ftcli warmup runs in one process, and --method {config.method} compiles after sharding, "
                          "in the run",
                          hint="warm up with --method lora (same model and shapes) or use train --compile directly")
    # Warmup compiles whether or not the options say --compile: the trainer is built as `train --compile` builds it.
    config = config.model_copy(update={"compile": True})
    ready = set_up(config, "warmup")
    plan, dataset, device = ready.plan, ready.dataset, ready.device
    fields = cache_key_fields(config, dataset, device, plan.model.dtype)
    folder = cache_folder(fields)
    use_cache_folder(folder)
    warm = is_warm(folder)
    loaded = load_artifacts(folder) if warm else 0
    report = dry_run(config, plan, ready.tokenizer, dataset, device)
    report.update(cache="warm" if warm else "cold", folder=str(folder), key=fields, artifacts_loaded=loaded,
                  rows=ready.report.rows_used, trainable_parameters=plan.trainable_parameters)
    if not warm:
        save_artifacts(folder, report)
    print_report(report)
    return report


def dry_run(config: Any, plan: Any, tokenizer: Any, dataset: Any, device: str) -> dict[str, Any]:
    """Compile and run forward + backward on each batch shape of one epoch, then time steady steps.

    The weights are never stepped; gradients are set to None and the RNG states restored after."""
    import torch

    from ftcli.errors import RunFailed
    from ftcli.system import peak_memory

    model = plan.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Building a trainer patches the model's forward (TRL's fused LM head); the real trainer patches it again.
    saved_forward = {m: m.__dict__.get("forward") for m in (model, base)}
    was_training = model.training
    rng = _rng_state(device)
    tmp = Path(tempfile.mkdtemp(prefix="ftcli-warmup-"))
    try:
        trainer = _warmup_trainer(config, plan, tokenizer, dataset, tmp, device)
        seen, batches = _epoch_shapes(trainer)
        _prepare_like_train(trainer)
        compiled = trainer.accelerator.prepare_model(trainer._wrap_model(trainer.model_wrapped))
        first_s: list[float] = []
        steady, tokens = [], 0
        try:
            for batch in batches:
                first_s.append(_step(trainer, compiled, batch, device)[0])
            for _ in range(STEADY_STEPS):
                seconds, real = _step(trainer, compiled, batches[-1], device)
                steady.append(seconds)
                tokens += real
        except (torch.OutOfMemoryError, MemoryError):
            shape = "x".join(map(str, batches[len(first_s)]["input_ids"].shape)) if len(first_s) < len(batches) \
                else "x".join(map(str, batches[-1]["input_ids"].shape))
            raise RunFailed(f"batch size {config.batch_size} does not fit on {device}: out of memory on a "
                            f"{shape} batch (forward + backward, before any optimizer state)",
                            hint="lower --batch-size or --seq-length, or add --gradient-checkpointing") from None
        step_s = sorted(steady)[len(steady) // 2]
        kind, peak = peak_memory(device)
        shapes = [list(b["input_ids"].shape) for b in batches]
    finally:
        model.zero_grad(set_to_none=True)
        for module, forward in saved_forward.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        model.train(was_training)
        _restore_rng(rng, device)
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
    return {
        "compile_s": round(max(sum(first_s) - step_s * len(first_s), 0.0), 3),
        "first_steps_s": [round(s, 3) for s in first_s],
        "step_s": round(step_s, 4),
        "real_tokens_per_second": round(tokens / max(sum(steady), 1e-9), 1),
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "shapes": shapes,
        "distinct_shapes_in_epoch": seen,
        "batch_size": config.batch_size,
        # Not allocated by the warmup (no optimizer): AdamW's two moments per trainable weight, at the first step.
        "optimizer_state_bytes": 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    }


def _warmup_trainer(config: Any, plan: Any, tokenizer: Any, dataset: Any, tmp: Path, device: str) -> Any:
    """The trainer `train` builds, with its arguments, collator and trainer class, writing only into `tmp`.

    Without the run's guard: it only acts in `trainer.train()`, which warmup never calls."""
    from ftcli.training.trainer import build_trainer

    trainer, _ = build_trainer(config, plan, tokenizer, dataset, tmp, tmp / "logs", device)
    return trainer


def _prepare_like_train(trainer: Any) -> None:
    """What `Trainer.train()` does to the model before compiling it: Liger kernels, activation checkpointing.

    Both change the graph torch.compile sees; the run repeats them on the same model (they are idempotent)."""
    args = trainer.args
    if args.use_liger_kernel:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(trainer.model, args.liger_kernel_config)
    if args.activation_checkpointing:
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        every_n_layers = kwargs.pop("every_n_layers", 1)
        offload = kwargs.pop("offload", False)
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                                      every_n_layers=every_n_layers, offload=offload)


def _epoch_shapes(trainer: Any) -> tuple[int, list[dict[str, Any]]]:
    """One batch per distinct shape the trainer's own dataloader yields over one epoch (collation only)."""
    by_shape: dict[tuple[int, ...], dict[str, Any]] = {}
    for i, batch in enumerate(trainer.get_train_dataloader()):
        by_shape.setdefault(tuple(batch["input_ids"].shape), batch)
        if i + 1 >= MAX_SCAN_BATCHES:
            break
    shapes = sorted(by_shape, key=lambda s: (s[-1], s))
    if len(shapes) > MAX_SHAPES:
        # Evenly spaced, always including the smallest and the largest (the memory peak).
        step = (len(shapes) - 1) / (MAX_SHAPES - 1)
        shapes = [shapes[round(i * step)] for i in range(MAX_SHAPES)]
    return len(by_shape), [by_shape[s] for s in shapes]


def _step(trainer: Any, model: Any, batch: dict[str, Any], device: str) -> tuple[float, int]:
    """The trainer's own forward + backward on one batch, gradients dropped: (seconds, real tokens)."""
    import torch

    inputs = dict(batch)
    start = time.perf_counter()
    trainer.current_gradient_accumulation_steps = 1
    num_items = trainer._get_num_items_in_batch([inputs], trainer.args.device)
    trainer.training_step(model, inputs, num_items)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    mask = batch.get("attention_mask")
    if "ftcli_real_tokens" in batch:  # padding-free rows: no mask, the collator counts the real tokens
        real = int(batch["ftcli_real_tokens"])
    else:
        real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return seconds, real


def _rng_state(device: str) -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], device: str) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    from ftcli.system import format_bytes

    table = Table(title="warmup (forward + backward, no optimizer step)", show_header=False)
    table.add_row("compile cache", f"{report['cache']}: {report['folder']}")
    table.add_row("batch shapes warmed", ", ".join("x".join(map(str, s)) for s in report["shapes"])
                  + f"  ({report['distinct_shapes_in_epoch']} distinct in one epoch)")
    table.add_row("compile time", f"{report['compile_s']:.2f} s")
    table.add_row("steady step time", f"{report['step_s'] * 1000:.1f} ms (batch {report['batch_size']})")
    table.add_row("real tokens/s (non-padding)", f"{report['real_tokens_per_second']:,.1f}")
    table.add_row(report["peak_memory_kind"], format_bytes(report["peak_memory_bytes"]))
    table.add_row("+ AdamW state (first optimizer step)", format_bytes(report["optimizer_state_bytes"]))
    console.print(table)
    console.print(f"batch size {report['batch_size']} fits for forward + backward; the weights were not changed")
