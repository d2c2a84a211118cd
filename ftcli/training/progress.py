"""The live training display: a progress bar on a terminal, plain lines elsewhere.

    >>> from ftcli.training.progress import TrainingDisplay
    >>> trainer.add_callback(TrainingDisplay(device="cpu", metrics_path=run_dir / "metrics.jsonl"))

It shows step/total, loss, learning rate, real (non-padding) tokens/s, ETA and peak memory (and the
last eval loss when the run evaluates; with a preference objective the reward margin, accuracy and the
chosen/rejected rewards too), and writes one JSON line per logging step and per evaluation
to `metrics.jsonl`. Only rank 0 draws and writes. On a terminal the line fits its width: the fields
are dropped by rank (LINE_FIELDS) as it narrows, step N/M and ETA always stay; piped, each logging
step is one plain line with every field.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from transformers import TrainerCallback

from ftcli.console import console


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# The live line's fields, in the order drawn, each with its rank: when the terminal is too narrow for all
# of them, the highest ranks go first. The step counter and the ETA are always drawn (rank 0), then the
# bar takes what is left (at least BAR_MIN columns, at most BAR_MAX).
LINE_FIELDS = [("label", 9), ("steps", 0), ("loss", 1), ("eval", 5), ("margin", 6), ("acc", 7), ("rewards", 8),
               ("reward", 5), ("flat", 6), ("kl", 7), ("len", 8), ("lr", 2), ("tps", 3), ("mem", 4), ("eta", 0)]
BAR_MIN, BAR_MAX = 12, 40


def line_texts(completed: int, total: int, fields: dict[str, str], evaluates: bool) -> dict[str, Text]:
    """Each field of the live line as styled text ("" values are not drawn)."""
    steps = f"{completed:>{len(str(total))}}/{total}"
    texts = {"label": Text("train", style="bold"), "steps": Text(steps),
             "loss": Text.assemble("loss ", (fields.get("loss", "-"), "cyan")),
             "lr": Text(f"lr {fields.get('lr', '-')}"),
             "tps": Text(f"{fields.get('tps', '-')} tok/s", style="green"),
             "mem": Text(f"mem {fields.get('mem', '-')}"),
             "eta": Text(f"eta {fields.get('eta', '--:--')}")}
    if evaluates:
        texts["eval"] = Text.assemble("eval ", (fields.get("eval", "-"), "magenta"))
    for key in ("margin", "acc", "rewards", "reward", "flat", "kl", "len"):
        if fields.get(key):
            texts[key] = Text(fields[key])
    return texts


def fit_line(completed: int, total: int, fields: dict[str, str], width: int, evaluates: bool = False) -> Table:
    """The live line at `width` columns: the fields by rank, then the bar in what is left; never wider."""
    texts = line_texts(completed, total, fields, evaluates)
    kept: set[str] = set()
    used = -1  # n fields take their widths plus n - 1 separating spaces
    for key, _ in sorted((f for f in LINE_FIELDS if f[0] in texts), key=lambda f: f[1]):
        need = texts[key].cell_len + 1
        if key not in ("steps", "eta") and used + need + 1 + BAR_MIN > width:
            break  # this field and every lower-ranked one stay off the line
        kept.add(key)
        used += need
    bar = max(0, min(BAR_MAX, width - used - 1))
    line = Table.grid(padding=(0, 1, 0, 0))
    cells: list[Any] = []
    for key, _ in LINE_FIELDS:
        if key == "steps" and bar:
            line.add_column(width=bar, no_wrap=True)
            cells.append(ProgressBar(total=max(total, 1), completed=completed, width=bar))
        if key in kept:
            line.add_column(no_wrap=True, overflow="crop")
            cells.append(texts[key])
    line.add_row(*cells)
    return line


class _Line:
    """One task's live line, fitted to the width it is drawn at (the terminal's, at every refresh)."""

    def __init__(self, task: Any, evaluates: bool):
        self.task, self.evaluates = task, evaluates

    def __rich_console__(self, console: Console, options: Any) -> Any:
        task = self.task
        yield fit_line(int(task.completed), int(task.total or 0), task.fields, options.max_width, self.evaluates)


def preference_fields(logs: dict[str, float]) -> dict[str, str]:
    """The live line's pieces of a preference objective's rewards (none without them)."""
    if "rewards/margins" not in logs:
        if not reward_model_text(logs):
            return {}
        return {"margin": f"margin {logs['margin']:.3f}", "acc": f"acc {logs['accuracy']:.0%}"}
    # KTO reports no accuracy (its rows are not pairs): its KL estimate takes the place.
    acc = (f"acc {logs['rewards/accuracies']:.0%}" if "rewards/accuracies" in logs
           else f"kl {logs.get('kl', float('nan')):.3f}")
    return {"margin": f"margin {logs['rewards/margins']:.3f}",
            "acc": acc,
            "rewards": f"chosen {logs.get('rewards/chosen', float('nan')):.3f} "
                       f"rejected {logs.get('rewards/rejected', float('nan')):.3f}"}


def preference_text(logs: dict[str, float]) -> str:
    """`margin 0.031 acc 75% (chosen 0.012 rejected -0.019)` from a preference objective's rewards, else ""."""
    if "rewards/margins" not in logs:
        return reward_model_text(logs)
    fields = preference_fields(logs)
    return (f"margin {logs['rewards/margins']:.3f} {fields['acc']} "
            f"(chosen {logs.get('rewards/chosen', float('nan')):.3f} rejected "
            f"{logs.get('rewards/rejected', float('nan')):.3f})")


def reward_model_text(logs: dict[str, float]) -> str:
    """`margin 1.250 acc 75%` from a reward model's scores (TRL's RewardTrainer logs `margin` and `accuracy`)."""
    if "margin" not in logs or "accuracy" not in logs:
        return ""
    return f"margin {logs['margin']:.3f} acc {logs['accuracy']:.0%}"


REWARD = "reward"  # GRPO's logged mean reward (TRL's key)


def reward_fields(logs: dict[str, float]) -> dict[str, str]:
    """The live line's pieces of an objective that samples and scores completions (GRPO), none without them:
    the mean reward and its spread, the share of groups whose rewards were all equal, KL, completion length."""
    if REWARD not in logs:
        return {}
    fields = {"reward": f"reward {logs['reward']:.3f}±{logs.get('reward_std', float('nan')):.2f}",
              "flat": f"flat {logs.get('frac_reward_zero_std', float('nan')):.0%}",
              "len": f"len {logs.get('completions/mean_length', float('nan')):.0f} "
                     f"(clip {logs.get('completions/clipped_ratio', float('nan')):.0%})"}
    if "kl" in logs:
        fields["kl"] = f"kl {logs['kl']:.3f}"
    return fields


def reward_text(logs: dict[str, float]) -> str:
    """`reward 0.281±0.05 flat 12% len 31 (clip 90%) [fn.py:score 0.281]` from GRPO's logs, else ""."""
    fields = reward_fields(logs)
    if not fields:
        return ""
    each = [f"{k.removeprefix('rewards/').removesuffix('/mean')} {v:.3f}" for k, v in logs.items()
            if k.startswith("rewards/") and k.endswith("/mean")]
    return " ".join(fields[k] for k in ("reward", "flat", "kl", "len") if k in fields) + (
        f" [{', '.join(each)}]" if len(each) > 1 else "")


class LineProgress(Progress):
    """A Rich Progress drawing each task as one line fitted to the terminal (`fit_line`)."""

    def __init__(self, *, evaluates: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.evaluates = evaluates

    def get_renderables(self) -> Any:
        for task in self.tasks:
            yield _Line(task, self.evaluates)


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
            "pref": preference_text(self.last) or reward_text(self.last),
            **preference_fields(self.last),
            **reward_fields(self.last),
        }

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()
        if self.metrics_path is not None and state.is_world_process_zero:
            self.metrics_path.write_text("")
        if not state.is_world_process_zero or not self.out.is_terminal:
            return
        self.progress = LineProgress(evaluates=self.evaluates, console=self.out, refresh_per_second=4)
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
