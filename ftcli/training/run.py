"""One training run, top to bottom: config -> tokenizer -> data -> model -> method plan -> trainer -> run folder.

    >>> from ftcli.config import build_run_config
    >>> from ftcli.training.run import run_training
    >>> result = run_training(build_run_config({"method": "lora", "model": "builtin:tiny-llama",
    ...                                         "dataset": "builtin:alpaca-sample", "max_steps": 5}))

Everything that can fail because of the user's input (flags, data, model, output folder) fails
before the run folder is created, so a refused run leaves nothing behind.

Checkpoints (`--save-steps`), `--resume`, Ctrl-C / SIGTERM and the non-finite guard go through the
trainer's own checkpoint machinery, made safe by ftcli.training.checkpoints: `_train` runs the trainer under that
guard and records in the manifest how the run ended (finished, interrupted at step N, failed and why).

Under a launcher (torchrun, or `ftcli train --method fsdp` starting its own ranks) every rank runs
this same function; rank 0 alone prints, checks and writes the run folder, and every rank joins the
collective work (training, gathering the weights for saving, the probe forward pass).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.training.checkpoints import (
    NonFiniteError, RunInterrupted, StopRequest, check_compatible, complete_checkpoints, guarded_trainer_class,
    latest_checkpoint, prune_for_resume, read_marker, restore_metrics, resolve_resume, resume_command, run_guard_class,
    run_identity,
)
from ftcli.config import RunConfig
from ftcli.console import console
from ftcli.errors import EXIT_INTERRUPTED, ConfigError, RunFailed
from ftcli.training.runfolder import (
    CONFIG_COPY, MANIFEST, METRICS, PROBE, check_output_dir, create_run_dir, default_output_dir, write_json_atomic,
)

PROBE_TOKENS = 16


@dataclass
class RunResult:
    output_dir: Path
    manifest: dict[str, Any]


def quiet_libraries() -> None:
    """Keep the terminal for ftcli's own display: library progress bars and advice go quiet."""
    # Set before the libraries are imported: bitsandbytes warns about optional CPU kernels at import time.
    for name in ("bitsandbytes", "torch.distributed", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*use_cache=True.*")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")


def run_training(config: RunConfig, command: list[str] | None = None) -> RunResult:
    quiet_libraries()  # first: importing transformers pulls in peft -> bitsandbytes, which warns on import
    from transformers import set_seed

    from ftcli.data import load_training_dataset
    from ftcli.methods import METHODS
    from ftcli.models import (
        apply_pad_policy, load_model, load_model_config, load_tokenizer, resolve_device, resolve_dtype,
    )

    started = time.time()
    main = is_main_rank()
    # The other ranks run silently: one progress display and one summary per run.
    console.quiet = not main
    if config.method not in METHODS:
        raise ConfigError(f"--method {config.method} is not available in ftcli {__version__}",
                          hint=f"use one of: {', '.join(METHODS)}")
    out = Path(config.output_dir or default_output_dir(config.method)).expanduser()
    if main:
        # Only rank 0 decides: the others would see the folder rank 0 is filling and refuse it.
        out = check_output_dir(out, config.overwrite, resume=bool(config.resume))
    # A checkpoint that does not exist or was never completed is refused before anything loads.
    checkpoint = resolve_resume(config.resume, out) if config.resume else None
    device = resolve_device(config.device)
    torch_dtype = resolve_dtype(config.dtype, device)

    console.print(f"[bold]ftcli train[/] method={config.method} model={config.model} dataset={config.dataset}")
    load_model_config(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)
    pad_policy = apply_pad_policy(tokenizer)
    dataset, report = load_training_dataset(config, tokenizer)
    console.print(f"data: {report.rows_used} examples, {report.tokens:,} tokens ({report.loss_tokens:,} in the loss), "
                  f"{report.truncated} truncated at {config.seq_length}")
    if report.prepared:
        console.print(f"data: {'reusing prepared data from' if report.reused else 'prepared and cached in'} "
                      f"{report.prepared}", soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    # Seed before the method builds anything random (LoRA's A matrices): the trainer seeds only later,
    # and an unseeded torch generator would make every LoRA run start from different adapters.
    set_seed(config.seed)
    method = METHODS[config.method]
    model = load_model(config.model, dtype=config.dtype, device=device, attn_implementation=config.attn_implementation,
                       revision=config.revision, trust_remote_code=config.trust_remote_code,
                       **method.load_options(config, device))
    plan = method.plan(config, model)
    console.print(f"model: {plan.total_parameters:,} parameters, {plan.trainable_parameters:,} trainable "
                  f"({config.method}, {str(torch_dtype).removeprefix('torch.')}, {device})")
    loaded = time.time()

    identity = run_identity(config, report.fingerprint, int(os.environ.get("WORLD_SIZE", "1")))
    resumed = _check_resume(config, checkpoint, identity, out, main)
    log_dir = Path(config.log_dir).expanduser() if config.log_dir else out / "logs"
    manifest = _start_manifest(config, command, out, log_dir, device, torch_dtype, pad_policy, plan, report, main)
    if manifest is not None and resumed:
        manifest["resumed_from"] = resumed
        write_json_atomic(out / MANIFEST, manifest)
    if config.compile:
        from ftcli.training.warmup import warm_compile_cache

        try:
            warm_compile_cache(config, plan, tokenizer, dataset, device)
        except BaseException as exc:
            # A failed or interrupted warmup must not leave the run recorded as running.
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            _finish(manifest, out, status, error=f"compile warmup: {type(exc).__name__}: {exc}")
            raise
    guard = run_guard_class()(out, identity, StopRequest(announce=console.print if main else None),
                              save_total_limit=config.save_total_limit, epoch_saves=bool(config.save_steps),
                              display=None, restored_metrics=restore_metrics(checkpoint) if checkpoint else None)
    trainer, display, stats = _train(config, plan, tokenizer, dataset, out, log_dir, device, guard, checkpoint,
                                     manifest, command)
    trained = time.time()
    try:
        # Measured now: the probe's forward below leaves FSDP's final-norm/lm_head unit gathered on purpose.
        sharded = _sharded_fraction(trainer.model)

        # Every rank saves and probes: with FSDP both gather the sharded weights, which takes all ranks.
        trainer.save_model(str(out))
        if main:
            tokenizer.save_pretrained(str(out))
            # The trainer also pickles its arguments; the manifest already records them, and ftcli ships no pickles.
            (out / "training_args.bin").unlink(missing_ok=True)
        _save_probe(trainer.model, dataset[0]["input_ids"][:PROBE_TOKENS], out / PROBE, write=main)
    except Exception as exc:
        _finish(manifest, out, "failed", error=f"saving the final model failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        # Until here a signal waits for the final save (the run is finishing anyway); then the defaults return.
        guard.stop.restore()
    saved = time.time()

    metrics = _final_metrics(stats.metrics, trainer.state, device)
    metrics["sharded_parameter_fraction"] = sharded
    _leave_process_group()
    if manifest is None:
        return RunResult(out, {"metrics": metrics})
    manifest["metrics"] = metrics
    manifest["log_history"] = display.history
    manifest["timings"] = {"load_s": round(loaded - started, 3), "train_s": round(trained - loaded, 3),
                           "save_s": round(saved - trained, 3), "total_s": round(saved - started, 3)}
    manifest["checkpoints"] = [p.name for _, p in complete_checkpoints(out)]
    _finish(manifest, out, "finished")
    print_summary(metrics, out, plan.saves)
    return RunResult(out, manifest)


def _check_resume(config: RunConfig, checkpoint: Path | None, identity: dict[str, Any], out: Path,
                  main: bool) -> dict[str, Any] | None:
    """Refuse a checkpoint of a different run (unless --force); rank 0 clears what this run will rewrite."""
    if checkpoint is None:
        return None
    differences = check_compatible(checkpoint, identity, config.force)
    step = int(read_marker(checkpoint)["step"])
    console.print(f"resuming from {checkpoint} (step {step})", soft_wrap=True)
    for diff in differences:
        console.print(f"[yellow]note:[/] --force: resuming although {diff}")
    if main and checkpoint.parent.resolve() == out.resolve():
        for name in prune_for_resume(out, step):
            console.print(f"[yellow]note:[/] removed {name} (incomplete, or after the checkpoint resumed from)")
    return {"checkpoint": str(checkpoint), "step": step, "forced_differences": differences}


def _train(config: RunConfig, plan: Any, tokenizer: Any, dataset: Any, out: Path, log_dir: Path, device: str,
           guard: Any, checkpoint: Path | None, manifest: dict[str, Any] | None,
           command: list[str] | None) -> tuple[Any, Any, Any]:
    """Train under the guard: Ctrl-C / SIGTERM stop after a step with a checkpoint, a non-finite step fails."""
    guard.stop.install()
    trained = False
    try:
        trainer, display = _build_trainer(config, plan, tokenizer, dataset, out, log_dir, device, guard)
        stats = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        trained = True
    except NonFiniteError as exc:
        last = latest_checkpoint(out)
        kept = f"the last good checkpoint {last} is untouched" if last else "no checkpoint had been saved"
        _finish(manifest, out, "failed", error=f"non-finite {exc.what} (NaN or inf) at step {exc.step}",
                failed_at_step=exc.step, last_checkpoint=str(last) if last else None,
                log_history=guard.display.history if guard.display else None)
        _leave_process_group()
        raise RunFailed(f"training stopped at step {exc.step}: the {exc.what} is not finite (NaN or inf); {kept}",
                        hint="lower --learning-rate or check the data, then --resume from that checkpoint "
                             "or start again") from None
    except KeyboardInterrupt:
        last = latest_checkpoint(out)
        _finish(manifest, out, "interrupted", error="stopped at once (a second Ctrl-C, or before training began); "
                f"newest complete checkpoint: {last.name if last else 'none'}",
                log_history=guard.display.history if guard.display else None)
        raise
    except Exception as exc:
        _finish(manifest, out, "failed", error=f"{type(exc).__name__}: {exc}")
        raise RunFailed(f"training failed: {type(exc).__name__}: {exc}",
                        hint=f"the run folder {out} records it; rerun with --debug for the traceback") from exc
    finally:
        if not trained:  # on success the handlers stay until the final model is saved
            guard.stop.restore()
    if guard.stopping:
        guard.stop.restore()
        _stop_interrupted(guard, out, manifest, command, display)
    return trainer, display, stats


def _stop_interrupted(guard: Any, out: Path, manifest: dict[str, Any] | None, command: list[str] | None,
                      display: Any) -> None:
    """After a signal: the checkpoint of the last step is saved; record where, say how to resume, exit 130."""
    import signal

    how = resume_command(command or ["ftcli", *sys.argv[1:]], out)
    name = signal.Signals(guard.stop.signal).name if guard.stop.signal else "a signal"
    _finish(manifest, out, "interrupted", error=f"stopped by {name} after step {guard.stopped_at}",
            interrupted_at_step=guard.stopped_at, checkpoint=str(guard.last_saved), resume_command=how,
            log_history=display.history)
    _leave_process_group()
    if not is_main_rank():
        raise SystemExit(EXIT_INTERRUPTED)  # rank 0 says it, once
    raise RunInterrupted(f"interrupted by {name}: stopped after step {guard.stopped_at}, checkpoint saved to "
                         f"{guard.last_saved}", hint=f"resume with: {how}")


def _leave_process_group() -> None:
    """Meet the other ranks once more, then close the process group.

    Without this, a rank that exits while gloo still holds connections to the others can abort at
    interpreter shutdown; on several machines the launcher then waits for a peer that is gone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _sharded_fraction(model: Any) -> float:
    """Share of parameters held as FSDP2 shards (DTensor): 0.0 on one process, about 1.0 when FSDP sharded."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    total = sum(p.numel() for p in params) or 1
    return round(sum(p.numel() for p in params if isinstance(p, DTensor)) / total, 4)


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _start_manifest(config: RunConfig, command: list[str] | None, out: Path, log_dir: Path, device: str,
                    torch_dtype: Any, pad_policy: str, plan: Any, report: Any, main: bool) -> dict[str, Any] | None:
    """Create the run folder and write the manifest (status running) and config copy; rank 0 only."""
    from ftcli.models import resolve_attn_implementation, resolve_model_source
    from ftcli.system import library_versions

    if not main:
        return None
    create_run_dir(out, config.overwrite)
    manifest: dict[str, Any] = {
        "ftcli_version": __version__,
        "status": "running",
        "command": command or sys.argv,
        "started_at": _now(),
        "config": config.to_dict(),
        "resolved": {
            "output_dir": str(out), "log_dir": str(log_dir), "device": device,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "attn_implementation": resolve_attn_implementation(config.attn_implementation, device, torch_dtype),
            "model_path": resolve_model_source(config.model).path, "pad_policy": pad_policy,
            "saves": plan.saves, "trainable_parameters": plan.trainable_parameters,
            "total_parameters": plan.total_parameters,
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
        },
        "versions": library_versions(),
        "data": report.to_dict(),
    }
    write_json_atomic(out / MANIFEST, manifest)
    _write_config_copy(out / CONFIG_COPY, config)
    return manifest


def _build_trainer(config: RunConfig, plan: Any, tokenizer: Any, dataset: Any, out: Path, log_dir: Path,
                   device: str, guard: Any) -> tuple[Any, Any]:
    from transformers import PrinterCallback
    from transformers.integrations import TensorBoardCallback
    from trl import SFTConfig, SFTTrainer

    from ftcli.training import batching
    from ftcli.training.progress import TrainingDisplay

    model = plan.model
    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        optim="adamw_torch",
        # The trainer writes checkpoint folders; the guard marks them complete and rotates them (the trainer's
        # own rotation would count a half-written folder as the newest one).
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=None,
        seed=config.seed,
        max_length=config.seq_length,
        logging_steps=config.logging_steps,
        activation_checkpointing=bool(config.gradient_checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        torch_compile=config.compile,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        # ftcli has already tokenized and masked the data; TRL must not re-tokenize or re-append EOS.
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=device == "cpu",
        # Weights train in --dtype. Autocast only where it is a no-op for the weights (bfloat16); TRL's own
        # default (bf16 autocast always) would silently train float32 weights with bfloat16 matmuls.
        bf16=str(model.dtype) == "torch.bfloat16",
        fp16=False,
        dataloader_pin_memory=device.startswith("cuda"),
    )
    kwargs.update(batching.training_args(config, device))
    # The method's own arguments (e.g. FSDP's) win over ftcli's defaults.
    args = SFTConfig(**{**kwargs, **plan.training_args})
    display = TrainingDisplay(device=device, metrics_path=out / METRICS)
    tensorboard = TensorBoardCallback()
    # transformers 5 dropped `logging_dir`; the callback reads its folder from this attribute.
    tensorboard.logging_dir = str(log_dir)
    trainer_class = guarded_trainer_class(batching.trainer_class(plan.trainer_class or SFTTrainer))
    guard.display = display
    # The guard comes after the display: on resume it puts back the metrics the display has just reset.
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            data_collator=batching.data_collator(config, tokenizer),
                            callbacks=[display, tensorboard, guard])
    guard.trainer = trainer
    # The display replaces the trainer's own printing of raw log dicts.
    trainer.remove_callback(PrinterCallback)
    return trainer, display


def _final_metrics(raw: dict[str, Any], state: Any, device: str) -> dict[str, Any]:
    from ftcli.system import peak_memory

    runtime = float(raw.get("train_runtime", 0.0)) or 1e-9
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    kind, peak = peak_memory(device)
    kind, peak = _max_over_ranks(kind, peak)
    return {
        "train_runtime": round(runtime, 3),
        "train_samples_per_second": raw.get("train_samples_per_second"),
        "train_steps_per_second": raw.get("train_steps_per_second"),
        "train_loss": raw.get("train_loss"),
        "steps": state.global_step,
        "real_tokens": tokens,
        "real_tokens_per_second": round(tokens / runtime, 2),
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
    }


def _max_over_ranks(kind: str, peak: int) -> tuple[str, int]:
    """With several processes, the largest peak of any rank (every rank must call this)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return kind, peak
    backend = dist.get_backend()
    value = torch.tensor([peak], dtype=torch.int64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return f"{kind} (max of {dist.get_world_size()} ranks)", int(value.item())


def print_summary(metrics: dict[str, Any], out: Path, saves: str) -> None:
    from rich.table import Table

    from ftcli.system import format_bytes

    table = Table(title="training summary", show_header=False)
    table.add_row("train_runtime", f"{metrics['train_runtime']:.2f} s")
    table.add_row("train_samples_per_second", f"{metrics['train_samples_per_second']:.3f}")
    table.add_row("train_steps_per_second", f"{metrics['train_steps_per_second']:.3f}")
    table.add_row("train_loss", f"{metrics['train_loss']:.4f}")
    table.add_row("real tokens/s (non-padding)", f"{metrics['real_tokens_per_second']:,.1f}")
    table.add_row(metrics["peak_memory_kind"], format_bytes(metrics["peak_memory_bytes"]))
    console.print(table)
    console.print(f"saved {saves} to {out}")


def _save_probe(model: Any, input_ids: list[int], path: Path, write: bool = True) -> None:
    """Logits of the final in-memory model on a fixed input, so a reload can be checked against them.

    Every rank runs the forward pass (a sharded model needs all of them); only a `write` rank saves."""
    import torch
    from safetensors.torch import save_file

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().cpu()
    if write:
        save_file({"input_ids": ids[0].cpu(), "logits": logits.contiguous()}, str(path))
    model.train(was_training)


def _write_config_copy(path: Path, config: RunConfig) -> None:
    import yaml

    data = config.to_dict()
    # Where and how this run was written or resumed is not part of what it computes.
    for key in ("output_dir", "overwrite", "resume", "force"):
        data.pop(key, None)
    path.write_text("# resolved config of this run; reuse with: ftcli train --config " + path.name + "\n"
                    + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _finish(manifest: dict[str, Any] | None, out: Path, status: str, error: str | None = None,
            **details: Any) -> None:
    """Record how the run ended: finished, interrupted (and where) or failed (and why)."""
    if manifest is None:
        return
    manifest["status"] = status
    manifest["ended_at"] = _now()
    if error:
        manifest["error"] = error
    manifest.update({k: v for k, v in details.items() if v is not None})
    write_json_atomic(out / MANIFEST, manifest)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
