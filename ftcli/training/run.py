"""One training run, top to bottom: config -> tokenizer -> data -> model -> method plan -> trainer -> run folder.

    >>> from ftcli.config import build_run_config
    >>> from ftcli.training.run import run_training
    >>> result = run_training(build_run_config({"method": "lora", "model": "builtin:tiny-llama",
    ...                                         "dataset": "builtin:alpaca-sample", "max_steps": 5}))

Everything that can fail because of the user's input (flags, data, model, output folder) fails
before the run folder is created, so a refused run leaves nothing behind.

Checkpoints (`--save-steps`), `--resume`, Ctrl-C / SIGTERM and the non-finite guard go through the
trainer's own checkpoint machinery, made safe by ftcli.training.checkpoints and
ftcli.training.guard: `_train` runs the trainer under that guard and records in the manifest how the run ended (finished, interrupted at step N, failed and why).

Under a launcher (torchrun, or `ftcli train --method fsdp` starting its own ranks) every rank runs
this same function; rank 0 alone prints, checks and writes the run folder, and every rank joins the
collective work (training, gathering the weights for saving, the probe forward pass).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli import __version__
from ftcli.config import RunConfig
from ftcli.console import console
from ftcli.data.specs import map_sources
from ftcli.errors import EXIT_INTERRUPTED, RunFailed
from ftcli.files import disk_full_note, followed, fsync_tree, write_atomic, write_json_atomic
from ftcli.system import utc_now
from ftcli.models import without_bitsandbytes
from ftcli.training.checkpoints import (
    check_compatible, complete_checkpoints, goal_reached, latest_checkpoint, local_path_or_id,
    prune_for_resume, read_marker, resolve_resume, restore_metrics, resume_command, resumed_config, run_identity,
    training_goal, verify_checkpoint,
)
from ftcli.training.distributed import is_main_rank, leave_process_group, sharded_fraction, world_size
from ftcli.training.evalsteps import eval_callback, eval_line, load_best_model
from ftcli.training.guard import FaultStop, NonFiniteError, RunInterrupted, StopRequest, run_guard_class
from ftcli.training.runfolder import (
    CONFIG_COPY, LOCK_HELD_ENV, MANIFEST, METRICS, PROBE, check_log_dir, claim_run_dir, create_run_dir, finished_run,
    join_run_lock, put_back, read_manifest, remove_replaced,
)
from ftcli.training import recipe
from ftcli.training.setup import set_up
from ftcli.training.precision import precision_record
from ftcli.training.trainer import build_trainer, compute_dtype, final_metrics, save_probe

PROBE_TOKENS = 16


@dataclass
class RunResult:
    output_dir: Path
    manifest: dict[str, Any]


class Manifest(dict):
    """The run's manifest, and what a resume needs to keep a finished record honest."""

    previous: bytes | None = None  # the record a resume replaces, put back when it fails before its first step
    trained: bool = False  # whether this process completed an optimizer step


def run_training(config: RunConfig, command: list[str] | None = None) -> RunResult:
    main = is_main_rank()
    # The other ranks run silently: one progress display and one summary per run.
    console.quiet = not main
    config = with_absolute_paths(config)
    if main:
        check_log_dir(config.log_dir)
    # Only rank 0 decides and locks: the others would see the folder rank 0 is filling and refuse it. Under
    # ftcli's own launcher the launcher holds the lock, shared, and every rank joins it for its life.
    held = os.environ.get(LOCK_HELD_ENV)
    joined = bool(held and config.output_dir and held == str(followed(Path(config.output_dir))))
    lock = main and not joined
    with claim_run_dir(config.output_dir, config.method, config.overwrite, bool(config.resume), lock=lock) as out, \
            (join_run_lock(out) if joined else nullcontext()), \
            without_bitsandbytes(not recipe.uses_bitsandbytes(config)):
        return _run(config, command, out, main, verify=lock)


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """Local paths made absolute, so that the manifest and the resume command work from any folder."""
    update = {key: local_path_or_id(getattr(config, key)) for key in ("model", "eval_dataset", "template")}
    update["dataset"] = map_sources(config.dataset, local_path_or_id)
    for key in ("output_dir", "log_dir"):
        value = getattr(config, key)
        if value and value.strip():
            update[key] = str(Path(value).expanduser().absolute())
    return config.model_copy(update=update)


def _run(config: RunConfig, command: list[str] | None, out: Path, main: bool, verify: bool) -> RunResult:
    started = time.time()
    # A checkpoint that does not exist, was never completed or is damaged is refused before anything loads
    # (its checksums read once: by rank 0, or by ftcli's launcher before it started the ranks).
    if config.resume:
        finished = _finished_here(config, out)
        if finished is not None:
            return finished
    checkpoint = resolve_resume(config.resume, out) if config.resume else None
    forced: list[str] = []
    if checkpoint is not None:
        if verify:
            verify_checkpoint(checkpoint)
        # A different run is refused before loading, as far as the flags tell; the data is compared once loaded.
        forced = check_compatible(checkpoint, run_identity(config, None, world_size()), config.force, True)
        config = resumed_config(config, checkpoint)
    ready = set_up(config, "train")
    loaded = time.time()

    eval_set = ready.eval_set
    identity = run_identity(config, ready.report.fingerprint, world_size(),
                            eval_fingerprint=eval_set.fingerprint if eval_set is not None else None)
    if checkpoint is not None:
        check_compatible(checkpoint, identity, config.force)  # a different run is refused, complete or not
        complete = _complete_run(config, checkpoint, out)
        if complete is not None:
            return complete
    resumed = _check_resume(config, checkpoint, identity, out, main, forced)
    log_dir = Path(config.log_dir) if config.log_dir else out / "logs"
    manifest = _start_manifest(config, command, out, log_dir, ready, main, resumed)
    try:
        return _run_started(config, command, out, log_dir, ready, manifest, checkpoint, identity,
                            (started, loaded), main)
    except BaseException as exc:
        if manifest is not None and manifest.get("status") == "running":
            # Whatever ended the run unrecorded (a full disk, a signal, a bug) leaves it recorded, not `running`.
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            _finish(manifest, out, "interrupted" if interrupted else "failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _run_started(config: RunConfig, command: list[str] | None, out: Path, log_dir: Path, ready: Any,
                 manifest: Manifest | None, checkpoint: Path | None, identity: dict[str, Any],
                 times: tuple[float, float], main: bool) -> RunResult:
    started, loaded = times
    plan, device, eval_set = ready.plan, ready.device, ready.eval_set
    if main:
        _write_config_copy(out / CONFIG_COPY, config)
        from ftcli.data.templates import keep_template

        keep_template(config, ready.report.template, out)
    if config.compile:
        _warm_compile_cache(config, ready, manifest, out)
    guard = run_guard_class()(out, identity, StopRequest(announce=console.print if main else None),
                              save_total_limit=config.save_total_limit, epoch_saves=bool(config.save_steps),
                              display=None, restored_metrics=restore_metrics(checkpoint) if checkpoint else None)
    if manifest is not None:
        guard.on_first_step = lambda: setattr(manifest, "trained", True)
    evaluator = eval_callback(config, eval_set, ready.tokenizer, guard)
    trainer, display, stats = _train(config, plan, ready.tokenizer, ready.dataset, out, log_dir, device, guard,
                                     checkpoint, manifest, command, evaluator)
    trained = time.time()
    sharded, loaded_best = _save_final(trainer, ready, out, guard, manifest, main, evaluator)
    saved = time.time()

    metrics = final_metrics(stats.metrics, trainer.state, device)
    metrics["sharded_parameter_fraction"] = sharded
    evaluation = evaluator.summary(loaded_best) if evaluator is not None else None
    if evaluation is not None:
        metrics.update(eval_loss=evaluation["final_loss"], eval_perplexity=evaluation["final_perplexity"],
                       base_eval_loss=evaluation["base_loss"])
    leave_process_group()
    if manifest is None:
        return RunResult(out, {"metrics": metrics})
    manifest["metrics"] = metrics
    manifest["log_history"] = display.history
    manifest["timings"] = {"load_s": round(loaded - started, 3), "train_s": round(trained - loaded, 3),
                           "save_s": round(saved - trained, 3), "total_s": round(saved - started, 3)}
    manifest["checkpoints"] = [p.name for _, p in complete_checkpoints(out)]
    if evaluation is not None:
        manifest["eval"] = evaluation
    # Weights, tokenizer, probe, metrics and logs on disk before the record says finished.
    fsync_tree(out)
    _finish(manifest, out, "finished")
    print_summary(metrics, out, plan.saves, evaluation)
    return RunResult(out, manifest)


def _finished_here(config: RunConfig, out: Path) -> RunResult | None:
    """`--resume` of a run folder that holds a finished run trained to the goal this command asks for: nothing to
    train, with or without checkpoints, and the folder is left as it is."""
    manifest = finished_run(config, out)
    if manifest is None:
        return None
    last = latest_checkpoint(out)
    if last is not None:  # another run asked for than the one finished here is refused, as for any resume
        check_compatible(last, run_identity(config, None, world_size()), config.force, True)
    steps = (manifest.get("metrics") or {}).get("steps")
    console.print(f"the run in {out} is complete: it trained {training_goal(config)}"
                  f"{f' ({steps} steps)' if steps else ''} and finished; nothing to train (to train further, resume "
                  "with a higher --num-epochs or --max-steps, or start a new run from it with --model "
                  f"{out})", soft_wrap=True)
    return RunResult(out, manifest)


def _complete_run(config: RunConfig, checkpoint: Path, out: Path) -> RunResult | None:
    """Resuming from a checkpoint that already reached the goal (--max-steps, or else --num-epochs): nothing to
    train, and nothing is written (a run that stopped before its final save is pointed at the checkpoint)."""
    marker = read_marker(checkpoint) or {}
    step, epoch = int(marker.get("step", 0)), float(marker.get("epoch", 0.0))
    if not goal_reached(config, step, epoch):
        return None
    goal = training_goal(config)
    if checkpoint.parent != out or not (out / MANIFEST).is_file():
        # Into another folder: the trainer would run one step past the goal; nothing is created there.
        console.print(f"{checkpoint} already reached {goal} (step {step}): nothing to train into {out}; to train "
                      f"further, pass a higher --num-epochs or --max-steps, or start a new run from the finished "
                      f"run with --model {checkpoint.parent}", soft_wrap=True)
        return RunResult(out, read_manifest(checkpoint.parent) if (checkpoint.parent / MANIFEST).is_file() else {})
    manifest = read_manifest(out)
    if manifest.get("status") != "finished":
        # Stopped after its last step (a signal during it, a failed final save): the trainer would run one step
        # more. The checkpoint holds the trained weights; nothing is trained or rewritten.
        console.print(f"the run in {out} reached {goal} at {checkpoint.name} but stopped before its final save "
                      f"({manifest.get('status')}): nothing to train; its trained weights are in {checkpoint}: "
                      f"export them with `ftcli export {checkpoint} --output DIR`", soft_wrap=True)
        return RunResult(out, manifest)
    console.print(f"the run in {out} is complete: {checkpoint.name} is at step {step} and {goal} is reached; "
                  "nothing to train (raise --max-steps or --num-epochs to train further)", soft_wrap=True)
    return RunResult(out, manifest)


def _warm_compile_cache(config: RunConfig, ready: Any, manifest: dict[str, Any] | None, out: Path) -> None:
    from ftcli.training.warmup import warm_compile_cache

    try:
        warm_compile_cache(config, ready.plan, ready.tokenizer, ready.dataset, ready.device)
    except BaseException as exc:
        # A failed or interrupted warmup must not leave the run recorded as running.
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _finish(manifest, out, status, error=f"compile warmup: {type(exc).__name__}: {exc}")
        raise


def _save_final(trainer: Any, ready: Any, out: Path, guard: Any, manifest: dict[str, Any] | None,
                main: bool, evaluator: Any = None) -> tuple[float, bool]:
    """Save the model or adapter (with --load-best: the best evaluated one), the tokenizer and the probe logits;
    returns the sharded share of parameters and whether the best checkpoint's weights were loaded back."""
    before = _top_files(out) if main else {}
    try:
        loaded_best = load_best_model(trainer, evaluator, out)
        # Measured now: the probe's forward below leaves FSDP's final-norm/lm_head unit gathered on purpose.
        sharded = sharded_fraction(trainer.model)
        # Every rank saves and probes: with FSDP both gather the sharded weights, which takes all ranks.
        trainer.save_model(str(out))
        if main:
            from ftcli.chain import TEMPLATE_COPY

            if (out / TEMPLATE_COPY).is_file():  # the Jinja file it trained with is the saved tokenizer's template
                ready.tokenizer.chat_template = (out / TEMPLATE_COPY).read_text(encoding="utf-8")
            ready.tokenizer.save_pretrained(str(out))
            # The trainer also pickles its arguments; the manifest already records them, and ftcli ships no pickles.
            (out / "training_args.bin").unlink(missing_ok=True)
        save_probe(trainer.model, ready.objective.probe_ids(ready.dataset[0])[:PROBE_TOKENS], out / PROBE,
                    write=main)
    except Exception as exc:
        if main:
            # Half-written weights are not left where export or from_pretrained would trust them (and a full
            # disk gets the room back to record the failure).
            for name, stamp in _top_files(out).items():
                if before.get(name) != stamp and name not in (MANIFEST, CONFIG_COPY, METRICS):
                    (out / name).unlink(missing_ok=True)
        reason = f"saving the final model failed: {type(exc).__name__}: {exc}{disk_full_note(out)}"
        _finish(manifest, out, "failed", error=reason)
        raise RunFailed(reason, hint=f"the run folder {out} records it; free disk space or pick another "
                        "--output-dir, and rerun with --debug for the traceback") from exc
    finally:
        # Until here a signal waits for the final save (the run is finishing anyway); then the defaults return.
        guard.stop.restore()
    return sharded, loaded_best


def _top_files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}


def _check_resume(config: RunConfig, checkpoint: Path | None, identity: dict[str, Any], out: Path,
                  main: bool, forced: list[str]) -> dict[str, Any] | None:
    """Refuse a checkpoint of a different run (unless --force); rank 0 clears what this run will rewrite."""
    if checkpoint is None:
        return None
    differences = [*forced, *(d for d in check_compatible(checkpoint, identity, config.force) if d not in forced)]
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
           command: list[str] | None, evaluator: Any = None) -> tuple[Any, Any, Any]:
    """Train under the guard: Ctrl-C / SIGTERM stop after a step with a checkpoint, a non-finite step fails."""
    guard.stop.install()
    trained = False
    try:
        trainer, display = build_trainer(config, plan, tokenizer, dataset, out, log_dir, device, guard, evaluator)
        if manifest is not None:  # what the run computes with, as the trainer holds it (recorded however it ends)
            manifest["precision"] = precision_record(trainer, compute_dtype(config, device))
        try:
            stats = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:  # stopped by an error: a checkpoint being marked in the background counts, or stays incomplete
            guard.finish_marking(quiet=True)
        trained = True
    except NonFiniteError as exc:
        last = latest_checkpoint(out)
        kept = f"the last good checkpoint {last} is untouched" if last else "no checkpoint had been saved"
        _finish(manifest, out, "failed", error=f"non-finite {exc.what} (NaN or inf) at step {exc.step}",
                failed_at_step=exc.step, last_checkpoint=str(last) if last else None,
                log_history=guard.display.history if guard.display else None)
        leave_process_group()
        raise RunFailed(f"training stopped at step {exc.step}: the {exc.what} is not finite (NaN or inf); {kept}",
                        hint="lower --learning-rate or check the data, then --resume from that checkpoint "
                             "or start again") from None
    except FaultStop as exc:
        kept = f"checkpoint saved to {exc.checkpoint}" if exc.checkpoint else "no step had finished, no checkpoint"
        _finish(manifest, out, "failed", error=exc.message, failed_at_step=exc.step,
                last_checkpoint=str(exc.checkpoint) if exc.checkpoint else None,
                log_history=guard.display.history if guard.display else None)
        leave_process_group()
        how = resume_command(command or ["ftcli", *sys.argv[1:]], out, config) if exc.checkpoint else "start again"
        raise RunFailed(f"training stopped: {exc.message}; {kept}", hint=f"fix it, then {how}") from None
    except KeyboardInterrupt:
        last = latest_checkpoint(out)
        _finish(manifest, out, "interrupted", error="stopped at once (a second Ctrl-C, or before training began); "
                f"newest complete checkpoint: {last.name if last else 'none'}",
                log_history=guard.display.history if guard.display else None)
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}{disk_full_note(out)}"
        _finish(manifest, out, "failed", error=reason)
        raise RunFailed(f"training failed: {reason}",
                        hint=f"the run folder {out} records it; rerun with --debug for the traceback") from exc
    finally:
        if not trained:  # on success the handlers stay until the final model is saved
            guard.stop.restore()
    if guard.stopping:
        guard.stop.restore()
        _stop_interrupted(guard, out, manifest, command, display, config)
    return trainer, display, stats


def _stop_interrupted(guard: Any, out: Path, manifest: dict[str, Any] | None, command: list[str] | None,
                      display: Any, config: RunConfig) -> None:
    """After a signal: the checkpoint of the last step is saved; record where, say how to resume, exit 130."""
    import signal

    how = resume_command(command or ["ftcli", *sys.argv[1:]], out, config)
    name = signal.Signals(guard.stop.signal).name if guard.stop.signal else "a signal"
    _finish(manifest, out, "interrupted", error=f"stopped by {name} after step {guard.stopped_at}",
            interrupted_at_step=guard.stopped_at, checkpoint=str(guard.last_saved), resume_command=how,
            log_history=display.history)
    leave_process_group()
    if not is_main_rank():
        raise SystemExit(EXIT_INTERRUPTED)  # rank 0 says it, once
    raise RunInterrupted(f"interrupted by {name}: stopped after step {guard.stopped_at}, checkpoint saved to "
                         f"{guard.last_saved}", hint=f"resume with: {how}")


def _start_manifest(config: RunConfig, command: list[str] | None, out: Path, log_dir: Path, ready: Any,
                    main: bool, resumed: dict[str, Any] | None) -> Manifest | None:
    """Create the run folder (an --overwrite sets the old run aside, removed once the new record is written) and
    write the manifest (status running, this host and process); rank 0 only."""
    from ftcli.chain import resolve_start
    from ftcli.models import physical_device, resolve_attn_implementation, resolve_model_source
    from ftcli.system import library_versions

    if not main:
        return None
    device, torch_dtype, plan = ready.device, ready.torch_dtype, ready.plan
    start = resolve_start(config.model)
    previous = (out / MANIFEST).read_bytes() if resumed and (out / MANIFEST).is_file() else None
    aside = create_run_dir(out, config.overwrite)
    manifest = Manifest({
        "ftcli_version": __version__,
        "status": "running",
        "command": command or sys.argv,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": utc_now(),
        "config": config.to_dict(),
        "resolved": {
            "output_dir": str(out), "log_dir": str(log_dir), "device": device,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "attn_implementation": resolve_attn_implementation(config.attn_implementation, device, torch_dtype),
            "model_path": resolve_model_source(start.base).path, "pad_policy": ready.pad_policy,
            # What the run starts from: the base and the earlier runs whose adapters were merged in (ftcli.chain).
            "start": start.to_dict(),
            "chain": [*start.chain, {"run": str(out), "method": config.method, "objective": config.objective,
                                     "saves": plan.saves}],
            **objective_record(config, ready),
            "saves": plan.saves, "trainable_parameters": plan.trainable_parameters,
            "total_parameters": plan.total_parameters,
            "processes": world_size(),
            **recipe.resolved(config, device, out, log_dir),
            **physical_device(device),
        },
        "versions": library_versions(),
        "data": ready.report.to_dict(),
    })
    if resumed:
        manifest["resumed_from"] = resumed
    if previous is not None and json.loads(previous).get("status") in ("finished", "interrupted"):
        manifest.previous = previous
    try:
        write_json_atomic(out / MANIFEST, manifest, durable=True)
    except BaseException:
        put_back(out, aside)  # no new record (a full disk, a signal): the replaced run stays the run here
        raise
    # The new record is in place: the replaced run goes now, before this one needs the disk space.
    remove_replaced(aside)
    return manifest


def objective_record(config: RunConfig, ready: Any) -> dict[str, Any]:
    """The manifest's note of the objective: how its reference model is held (DPO), if it has one."""
    objective = ready.objective
    if objective is None or objective.reference is None:
        return {}
    return {"reference": objective.reference(ready.method, config)}


def print_summary(metrics: dict[str, Any], out: Path, saves: str, evaluation: dict[str, Any] | None = None) -> None:
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
    if evaluation is not None:
        console.print(eval_line(evaluation), soft_wrap=True)
    console.print(f"saved {saves} to {out}")


def _write_config_copy(path: Path, config: RunConfig) -> None:
    import yaml

    data = config.to_dict()
    # Where and how this run was written or resumed is not part of what it computes.
    for key in ("output_dir", "overwrite", "resume", "force"):
        data.pop(key, None)
    if "master_port" not in config.model_fields_set:  # one machine then picks a free port; a copy must not pin one
        data.pop("master_port", None)
    write_atomic(path, "# resolved config of this run; reuse with: ftcli train --config " + path.name + "\n"
                 + yaml.safe_dump(data, sort_keys=False))


def _finish(manifest: Manifest | None, out: Path, status: str, error: str | None = None,
            **details: Any) -> None:
    """Record how the run ended: finished, interrupted (and where) or failed (and why). A resume that fails
    before its first step puts back the record it replaced (a finished run stays finished)."""
    if manifest is None:
        return
    manifest["status"] = status
    manifest["ended_at"] = utc_now()
    if error:
        manifest["error"] = error
    manifest.update({k: v for k, v in details.items() if v is not None})
    record = manifest.previous if status != "finished" and manifest.previous and not manifest.trained else None
    try:
        _write_record(out, manifest, record)
    except OSError:
        if status == "finished":
            raise
        # A full disk: drop what this run half-wrote (checkpoints never completed), then record the end.
        prune_for_resume(out, sys.maxsize)
        _write_record(out, manifest, record)


def _write_record(out: Path, manifest: Manifest, record: bytes | None) -> None:
    if record is not None:
        write_atomic(out / MANIFEST, record, durable=True)
    else:
        write_json_atomic(out / MANIFEST, manifest, durable=True)
