"""The run's guard: Ctrl-C / SIGTERM, the non-finite check, and loading a checkpoint back on every rank.

    >>> from ftcli.training.guard import StopRequest, run_guard_class
    >>> guard = run_guard_class()(out, identity, StopRequest(), save_total_limit=3, epoch_saves=True, display=None)

- the first SIGINT/SIGTERM stops after the current optimizer step with a checkpoint, all ranks at
  the same step; a second one stops at once;
- a non-finite loss or gradient stops the run before the optimizer applies it, so nothing after
  the last good checkpoint is ever saved;
- with FSDP, every rank reads the checkpoint's gathered weights and optimizer state and keeps its
  shards (accelerate's own loader deadlocks there), and each epoch's sampler is set explicitly, as a
  mid-epoch resume across processes would otherwise replay the first epoch's order.

Two debug environment variables, read here only, let tests hit exact moments: `FTCLI_DEBUG_NAN_AT_STEP=K`
turns the loss of optimizer step K into NaN; `FTCLI_DEBUG_STEP_DELAY=S` sleeps S seconds as each
optimizer step begins (before its stop check), so a test can signal or kill a run between two given steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from ftcli.errors import EXIT_INTERRUPTED, FtcliError
from ftcli.training.checkpoints import PREFIX, mark_complete, rotate, unmark
from ftcli.training.checksums import ChecksumsAsFilesLand
from ftcli.training.distributed import agree, barrier

NAN_ENV = "FTCLI_DEBUG_NAN_AT_STEP"
DELAY_ENV = "FTCLI_DEBUG_STEP_DELAY"


class RunInterrupted(FtcliError):
    """The run stopped on a signal, after saving a checkpoint it can resume from."""

    exit_code = EXIT_INTERRUPTED


class NonFiniteError(Exception):
    """Raised inside the training loop when a step's loss or gradient is not finite."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step = step
        self.what = what


class FaultStop(Exception):
    """Raised inside the training loop when a step's inputs are unusable (a reward function failed): the step is
    not applied, and the state before it is saved as a checkpoint (`checkpoint`, None when no step had finished)."""

    def __init__(self, step: int, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.message = message
        self.checkpoint = checkpoint


# ---- signals ----


class StopRequest:
    """First SIGINT/SIGTERM: ask the run to stop after the current step. Second: stop at once."""

    def __init__(self, announce: Any = None):
        self.signal: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; an embedding caller keeps its own handling
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            if self.announce:
                self.announce(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                              "(press Ctrl-C again to stop at once)", soft_wrap=True)
            return
        self.restore()
        raise KeyboardInterrupt


# ---- the trainer side: stop flags, non-finite guard, markers ----

def debug_nan_step() -> int | None:
    value = os.environ.get(NAN_ENV, "").strip()
    return int(value) if value.isdigit() else None


def debug_step_delay() -> float:
    try:
        return max(0.0, float(os.environ.get(DELAY_ENV, "0") or 0))
    except ValueError:
        return 0.0


def guarded_trainer_class(base: type) -> type:
    """`base` (an SFTTrainer) that records each micro-batch loss for `RunGuard`, and injects the debug NaN."""
    nan_step = debug_nan_step()

    class Guarded(ChecksumsAsFilesLand, base):  # type: ignore[misc,valid-type]
        ftcli_losses: list[Any]

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if nan_step is not None and self.state.global_step + 1 == nan_step:
                if isinstance(result, tuple):
                    return (result[0] * float("nan"), *result[1:])
                return result * float("nan")
            return result

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if checkpoint is None or not getattr(self, "is_fsdp_enabled", False):
                super()._load_optimizer_and_scheduler(checkpoint)
                return
            _load_fsdp_optimizer(self, Path(checkpoint))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            if getattr(self, "is_fsdp_enabled", False):
                _load_fsdp_weights(model if model is not None else self.model, Path(resume_from_checkpoint))
                return
            # peft loads an adapter back in float32 whatever it was saved in; a run whose adapters train in
            # bfloat16 (4-bit bases) would then continue differently from the uninterrupted run.
            target = model if model is not None else self.model
            dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in target.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            self.__dict__.setdefault("ftcli_losses", []).append(loss.detach())
            return loss

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _load_fsdp_weights(model: Any, checkpoint: Path) -> None:
    """Every rank reads the checkpoint's gathered weights and keeps its own shards.

    (accelerate's loader has rank 0 broadcast them, and the other ranks, holding an empty state dict,
    never join that broadcast: the run deadlocks.)"""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").is_file() else "model.safetensors"
    saved = load_file(str(checkpoint / name))
    wanted = {}
    for key in model.state_dict():
        # peft saves adapter weights without the adapter's name (".default").
        plain = re.sub(r"\.default(?=\.)", "", key)
        for candidate in (key, plain, plain.removeprefix("base_model.model.")):
            if candidate in saved:
                wanted[key] = saved[candidate]
                break
    set_model_state_dict(model, wanted, options=StateDictOptions(full_state_dict=True, strict=False))


def _load_fsdp_optimizer(trainer: Any, checkpoint: Path) -> None:
    """Every rank reads the full optimizer state (rank 0 wrote it) and keeps its shards; then the scheduler."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(trainer.model, trainer.optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
    trainer.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))


def _local_grads_finite(model: Any) -> Any:
    """Whether every local gradient is finite, in one fused pass: the largest |g| of each tensor is
    NaN or inf exactly when the tensor holds one (no sum of squares that could overflow)."""
    import torch

    grads = []
    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        if local.numel():
            grads.append(local)
    if not grads:
        return torch.tensor(True)
    largest = torch._foreach_norm(grads, ord=float("inf"))
    return torch.stack([x.float() for x in largest]).isfinite().all()


def _rng_states() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class RunGuardCallbacks:
    """Once per optimizer step, before the optimizer applies it: are the loss and gradients finite, and
    has any rank been asked to stop? One all-reduce makes every rank take the same decision."""

    def __init__(self, out: Path, identity: dict[str, Any], stop: StopRequest, *, save_total_limit: int | None,
                 epoch_saves: bool, display: Any, restored_metrics: list[dict[str, Any]] | None = None):
        self.out = out
        self.identity = identity
        self.stop = stop
        self.save_total_limit = save_total_limit
        self.epoch_saves = epoch_saves
        self.display = display
        self.restored_metrics = restored_metrics or []
        self.trainer: Any = None
        self.stopping = False
        self.stopped_at: int | None = None
        self.last_saved: Path | None = None
        self.last_saved_step: int | None = None
        self.removed: list[str] = []
        self.marking: Any = None  # the newest checkpoint's marking (a Future), done in the background
        self._marker: Any = None
        self.keep_checkpoint: int | None = None  # a step whose checkpoint rotation keeps (--load-best's best)
        self.on_first_step: Any = None  # called once, after this process's first optimizer step
        self.delay = debug_step_delay()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Registered after the display, which has just started metrics.jsonl afresh: put back the steps
        # the resumed checkpoint had already logged, so the file (and the manifest) covers the whole run.
        if self.restored_metrics and state.is_world_process_zero:
            path = self.display.metrics_path
            if path is not None:
                with open(path, "w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in self.restored_metrics)
            self.display.history = list(self.restored_metrics)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # On a mid-epoch resume the trainer wraps the loader to skip the batches already seen, and with
        # several processes its set_epoch no longer reaches the sampler under accelerate's batch-sampler
        # shard: the epoch would replay epoch 0's order. Set it on every sampler in the chain here.
        epoch = int(state.epoch or 0)
        pending, seen = [kwargs.get("train_dataloader")], set()
        while pending:
            obj = pending.pop()
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if hasattr(obj, "set_epoch") and not hasattr(obj, "dataset"):
                obj.set_epoch(epoch)
            pending += [getattr(obj, name, None) for name in ("batch_sampler", "sampler", "base_dataloader")]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        losses = getattr(self.trainer, "ftcli_losses", None) or []
        self.trainer.ftcli_losses = []
        loss_ok = torch.stack([torch.isfinite(x).all() for x in losses]).all() if losses else torch.tensor(True)
        grads_ok = _local_grads_finite(kwargs["model"])
        failures = getattr(self.trainer, "ftcli_failures", None)  # GRPO's reward faults (ftcli.rewards.probe)
        fault = failures.message if failures is not None else None
        bad_loss, bad_grad, stop, faulty = agree([float(not bool(loss_ok)), float(not bool(grads_ok)),
                                                  float(self.stop.requested), float(fault is not None)])
        step = state.global_step + 1
        if faulty:
            raise FaultStop(step, fault or "a reward function failed in another process (its log says which)",
                            self._save_before_fault(args, state, control))
        if bad_loss:
            raise NonFiniteError(step, "loss")
        if bad_grad:
            raise NonFiniteError(step, "gradient")
        if stop and not self.stopping:
            self.stopping = True
            self.stopped_at = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.delay:  # before the step's stop check: a signal sent after the last save lands in this step
            time.sleep(self.delay)
        if getattr(self.trainer, "ftcli_failures", None) is not None:  # a step that may be undone (see below)
            self.step_rng = _rng_states()

    def _save_before_fault(self, args: Any, state: Any, control: Any) -> Path | None:
        """The state before the faulty step (weights and optimizer untouched by it) as a complete checkpoint,
        with the random state the step began with: a resume then samples that step as the run would have."""
        if state.global_step == 0:
            return None
        folder = self.out / f"{PREFIX}{state.global_step}"
        if self.last_saved_step != state.global_step:
            if state.is_world_process_zero:
                unmark(folder)
            if getattr(self, "step_rng", None) is not None:
                _set_rng_states(self.step_rng)
            self.trainer._save_checkpoint(self.trainer.model, trial=None)
            self.on_save(args, state, control)
        self.finish_marking()
        return folder

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.marking is not None and self.marking.done():  # a failed marking fails the run here
            self.finish_marking()
        if self.on_first_step is not None:
            self.on_first_step()
            self.on_first_step = None
        if self.stopping:
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and state.is_world_process_zero:
            unmark(self.out / f"{PREFIX}{state.global_step}")

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.epoch_saves and self.last_saved_step != state.global_step and state.global_step > 0:
            control.should_save = True
            if state.is_world_process_zero:
                unmark(self.out / f"{PREFIX}{state.global_step}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = self.out / f"{PREFIX}{state.global_step}"
        barrier()  # every rank's files (RNG states, shards) are written before rank 0 marks the folder
        if state.is_world_process_zero:
            self.finish_marking()  # markers and rotations in step order
            self._mark_in_background(folder, state.global_step, state.epoch or 0.0)
        self.last_saved, self.last_saved_step = folder, state.global_step

    def _mark_in_background(self, folder: Path, step: int, epoch: float) -> None:
        """Mark the checkpoint complete (its last files flushed and hashed, then the marker) and rotate, on a
        thread of its own while training goes on: the checkpoint counts from its marker, as always, and the
        training loop waits only for the trainer's own writing. `finish_marking` waits for it."""
        from concurrent.futures import ThreadPoolExecutor

        history, keep = list(self.display.history), self.keep_checkpoint
        checksums = getattr(self.trainer, "ftcli_checksums", None)

        def mark() -> list[str]:
            mark_complete(folder, step, epoch, self.identity, history, checksums=checksums)
            return rotate(self.out, self.save_total_limit, keep_step=keep)

        if self._marker is None:
            self._marker = ThreadPoolExecutor(1, thread_name_prefix="ftcli-marker")
        self.marking = self._marker.submit(mark)

    def finish_marking(self, quiet: bool = False) -> None:
        """Wait until the newest checkpoint is marked complete (or its marking failed: raised, unless `quiet`, as
        on the way out of a run that already failed, where the checkpoint then simply stays incomplete)."""
        pending, self.marking = self.marking, None
        if pending is None:
            return
        try:
            self.removed += pending.result()
        except Exception:
            if not quiet:
                raise

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.finish_marking()
        if self._marker is not None:
            self._marker.shutdown(wait=False)
            self._marker = None


@lru_cache(maxsize=1)
def run_guard_class() -> type:
    """The `RunGuard` trainer callback: `RunGuardCallbacks` on transformers' `TrainerCallback` (built on first
    use, so importing this module stays light)."""
    from transformers import TrainerCallback

    return type("RunGuard", (RunGuardCallbacks, TrainerCallback), {})
