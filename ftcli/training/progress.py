"""The live training display: a progress bar on a terminal, plain lines elsewhere.

    >>> from ftcli.training.progress import TrainingDisplay
    >>> trainer.add_callback(TrainingDisplay(device="cpu", metrics_path=run_dir / "metrics.jsonl"))

It shows step/total, loss, learning rate, real (non-padding) tokens/s, ETA and peak memory (and the
last eval loss when the run evaluates; with a preference objective the reward margin, accuracy and the
chosen/rejected rewards too), and writes one JSON line per logging step and per evaluation
to `metrics.jsonl`. Only rank 0 draws and writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers import TrainerCallback

from ftcli.console import console


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def preference_text(logs: dict[str, float]) -> str:
    """`margin 0.031 acc 75% (chosen 0.012 rejected -0.019)` from a preference objective's rewards, else ""."""
    if "rewards/margins" not in logs:
        return ""
    return (f"margin {logs['rewards/margins']:.3f} acc {logs.get('rewards/accuracies', float('nan')):.0%} "
            f"(chosen {logs.get('rewards/chosen', float('nan')):.3f} rejected "
            f"{logs.get('rewards/rejected', float('nan')):.3f})")


class TrainingDisplay(TrainerCallback):  # type: ignore[misc,valid-type]
    """Live progress and the per-step metrics file (`metrics.jsonl`), drawn by rank 0 only."""

    def __init__(self, device: str, metrics_path: Path | None = None, out: Console | None = None,
                 evaluates: bool = False):
        self.device = device
        self.evaluates = evaluates
        self.last_eval: float | None = None
        self.metrics_path = metrics_path
        self.out = out or console
        self.progress: Any = None
        self.task: Any = None
        self.start = 0.0
        self.last: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def _fields(self, state: Any) -> dict[str, str]:
        from ftcli.system import format_bytes, peak_memory

        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        done = max(state.global_step, 0)
        eta = (elapsed / done) * (state.max_steps - done) if done else float("inf")
        loss = self.last.get("loss")
        lr = self.last.get("learning_rate")
        return {
            "loss": f"{loss:.4f}" if loss is not None else "-",
            "lr": f"{lr:.2e}" if lr is not None else "-",
            "tps": f"{tokens / elapsed:,.0f}",
            "eta": _fmt_eta(eta),
            "mem": format_bytes(peak_memory(self.device)[1]),
            "eval": f"{self.last_eval:.4f}" if self.last_eval is not None else "-",
            "pref": preference_text(self.last),
        }

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()
        if self.metrics_path is not None and state.is_world_process_zero:
            self.metrics_path.write_text("")
        if not state.is_world_process_zero or not self.out.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("[green]{task.fields[tps]} tok/s"), TextColumn("eta {task.fields[eta]}"),
            TextColumn("mem {task.fields[mem]}"), TextColumn("{task.fields[pref]}"),
            *([TextColumn("eval [magenta]{task.fields[eval]}")] if self.evaluates else []),
            console=self.out, refresh_per_second=4,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, **self._fields(state))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, **self._fields(state))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs and "eval_loss" in logs:
            self._log_eval(state, logs)
            return
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.last = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "elapsed_s": round(time.perf_counter() - self.start, 3),
                  "tokens_seen": getattr(state, "num_input_tokens_seen", 0), **self.last}
        self.history.append(record)
        if self.metrics_path is not None:
            with self.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress.update(self.task, **self._fields(state))
        else:
            f = self._fields(state)
            self.out.print(f"step {state.global_step}/{state.max_steps}  loss {f['loss']}  lr {f['lr']}  "
                           f"{f['tps']} tok/s  eta {f['eta']}  mem {f['mem']}" + (f"  {f['pref']}" if f["pref"] else ""))

    def _log_eval(self, state: Any, logs: dict) -> None:
        values = {k: float(v) for k, v in logs.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        for key in ("eval_tokens", "eval_examples"):
            if key in values:
                values[key] = int(values[key])
        self.last_eval = values["eval_loss"]
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "elapsed_s": round(time.perf_counter() - self.start, 3),
                  "tokens_seen": getattr(state, "num_input_tokens_seen", 0), **values}
        self.history.append(record)
        if self.metrics_path is not None:
            with self.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        pref = preference_text({k.removeprefix("eval_"): v for k, v in values.items()})
        text = f"eval step {state.global_step}: loss {values['eval_loss']:.4f}  " + (
            pref if pref else f"perplexity {values.get('eval_perplexity', float('nan')):.2f}  "
                              f"{values.get('eval_tokens', 0):,} tokens")
        if self.progress is not None:
            self.progress.update(self.task, **self._fields(state))
            self.progress.console.print(text)
        else:
            self.out.print(text)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
