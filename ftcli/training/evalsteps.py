"""Evaluation during training: when to evaluate, early stopping, and the best model (`--load-best`).

    >>> from ftcli.training.evalsteps import eval_callback
    >>> evaluator = eval_callback(config, eval_set, tokenizer, guard)   # a transformers TrainerCallback
    >>> trainer, display = build_trainer(..., guard, evaluator=evaluator)

- when: at step 0 (where the base model starts), every `--eval-steps` optimizer steps, or without
  it at the end of each epoch, and always at the end of the run; never twice at one step;
- what: ftcli.evaluation.loss (the token-weighted loss `ftcli eval` computes too), logged through
  the trainer (`metrics.jsonl`, TensorBoard, the live display) as `eval_loss`, `eval_perplexity`,
  `eval_tokens`, `eval_examples`;
- early stopping: an evaluation improves when its loss is below the best so far (step 0 included)
  by more than `--early-stopping-threshold`; after `--early-stopping-patience` evaluations without
  improvement the run stops at that step;
- `--load-best`: the best loss among the evaluations after training steps (step 0 is the untouched
  base) gets a checkpoint, kept from rotation, loaded back at the end of the run.

Nothing of this state is saved on its own: it is replayed from the eval records the checkpoint's
metrics hold, so a resumed run stops where the uninterrupted one stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftcli.training.checkpoints import PREFIX, unmark

EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_tokens", "eval_examples")


class EvalCallbacks:
    """Evaluates at the run's eval steps and keeps the early-stopping and best-model state."""

    def __init__(self, config: Any, eval_set: Any, pad_token_id: int | None, guard: Any = None,
                 objective_eval: Any = None):
        self.eval_set = eval_set
        # The objective's own held-out metrics (DPO: its loss and rewards, logged by the trainer), else the SFT loss.
        self.objective_eval = objective_eval
        self.every = config.eval_steps
        self.batch_size = config.eval_batch_size or config.batch_size
        self.patience = config.early_stopping_patience
        self.threshold = config.early_stopping_threshold
        self.load_best = config.load_best
        self.pad_token_id = pad_token_id
        self.guard = guard
        self.trainer: Any = None
        self.out: Path | None = Path(guard.out) if guard is not None else None
        self.records: list[dict[str, Any]] = []  # (step, eval_loss, ...) of every evaluation of the run
        self.last_step: int | None = None
        self.best_loss: float | None = None  # early stopping's reference (step 0 included)
        self.since_best = 0
        self.best_model: tuple[int, float] | None = None  # (step, loss) of the best trained model
        self.early_stopped: dict[str, Any] | None = None
        self.seconds = 0.0

    # ---- state, also replayed on resume ----

    def track(self, step: int, loss: float, control: Any = None) -> None:
        self.last_step = step
        if self.best_loss is None or loss < self.best_loss - self.threshold:
            self.best_loss, self.since_best = loss, 0
        else:
            self.since_best += 1
        if step > 0 and (self.best_model is None or loss < self.best_model[1]):
            self.best_model = (step, loss)
            if self.load_best and control is not None:
                # A checkpoint of this model, so that the end of the run can load it back.
                control.should_save = True
                if self.out is not None:
                    unmark(self.out / f"{PREFIX}{step}")
        if self.guard is not None and self.load_best and self.best_model is not None:
            self.guard.keep_checkpoint = self.best_model[0]
        if control is not None and self.patience and self.since_best >= self.patience:
            control.should_training_stop = True
            self.early_stopped = {
                "step": step, "patience": self.patience, "threshold": self.threshold,
                "best_step": self._best_reference_step(), "best_eval_loss": self.best_loss,
                "reason": f"the eval loss did not improve by more than {self.threshold:g} for {self.patience} "
                          f"evaluation{'s' if self.patience > 1 else ''}",
            }

    def _best_reference_step(self) -> int | None:
        for record in self.records:
            if record["eval_loss"] == self.best_loss:
                return record["step"]
        return None

    # ---- evaluating ----

    def evaluate(self, state: Any, control: Any, model: Any) -> None:
        import time

        from ftcli.evaluation.loss import evaluate_loss

        step = state.global_step
        if step == self.last_step:
            return
        started = time.perf_counter()
        if self.objective_eval is not None:
            should_log = control.should_log
            metrics = self.objective_eval(self.trainer)  # logged by the trainer itself, as eval_*
            control.should_log = should_log
            self.seconds += time.perf_counter() - started
            self.records.append({"step": step, **{k: v for k, v in metrics.items() if k.startswith("eval_")
                                                  and k not in ("eval_runtime", "eval_samples_per_second",
                                                                "eval_steps_per_second")}})
            self.track(step, float(metrics["eval_loss"]), control)
            return
        result = evaluate_loss(model, self.eval_set.dataset, self.batch_size, self.pad_token_id)
        self.seconds += time.perf_counter() - started
        logs = {"eval_loss": result.loss, "eval_perplexity": result.perplexity, "eval_tokens": result.tokens,
                "eval_examples": result.examples}
        self.records.append({"step": step, **logs})
        if self.trainer is not None:
            # metrics.jsonl, TensorBoard and the display, through their callbacks. Logging resets the step's
            # "log now" flag, which the training loss of this step still needs.
            should_log = control.should_log
            self.trainer.log(dict(logs))
            control.should_log = should_log
        self.track(step, result.loss, control)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        restored = self.guard.restored_metrics if self.guard is not None else []
        for record in restored:
            if "eval_loss" in record:
                self.records.append({"step": record["step"], **{k: record.get(k) for k in EVAL_KEYS}})
                self.track(int(record["step"]), float(record["eval_loss"]))
        if state.global_step == 0:
            self.evaluate(state, control, kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if last or (self.every and state.global_step % self.every == 0):
            self.evaluate(state, control, kwargs["model"])

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.every:
            self.evaluate(state, control, kwargs["model"])

    # ---- the end of the run ----

    def summary(self, loaded_best: bool) -> dict[str, Any]:
        """The manifest's `eval` section."""
        base = next((r for r in self.records if r["step"] == 0), None)
        final = self.records[-1] if self.records else None
        if loaded_best and self.best_model is not None:
            final = next(r for r in self.records if r["step"] == self.best_model[0])
        return {
            **self.eval_set.to_dict(),
            "batch_size": self.batch_size,
            "evaluations": len(self.records),
            "eval_steps": self.every or "epoch",
            "base_loss": base["eval_loss"] if base else None,
            "final_loss": final["eval_loss"] if final else None,
            "final_perplexity": final.get("eval_perplexity") if final else None,
            # The objective's other held-out metrics (DPO: eval_rewards/margins, eval_rewards/accuracies, ...).
            "final_metrics": {k: v for k, v in final.items() if k not in ("step", *EVAL_KEYS)} if final else {},
            "final_step": final["step"] if final else None,
            "best": {"step": self.best_model[0], "eval_loss": self.best_model[1],
                     "checkpoint": f"{PREFIX}{self.best_model[0]}" if self.load_best else None,
                     "loaded": loaded_best} if self.best_model else None,
            "early_stopped": self.early_stopped,
            "seconds": round(self.seconds, 3),
        }


def load_best_model(trainer: Any, evaluator: Any, out: Path) -> bool:
    """With --load-best: put the best evaluated weights back into the trainer's model (every rank). Returns
    whether the final model is a checkpoint's (False when the best is the last step's, already in memory)."""
    if evaluator is None or not evaluator.load_best or evaluator.best_model is None:
        return False
    step = evaluator.best_model[0]
    if step == trainer.state.global_step:
        return True
    # The guarded trainer's loader: peft adapters keep their training dtype, FSDP ranks keep their shards.
    trainer._load_from_checkpoint(str(out / f"{PREFIX}{step}"))
    return True


def eval_line(evaluation: dict[str, Any]) -> str:
    """`eval loss: base 2.9012 -> final 1.8731 (step 40, best; 120 examples, 3,456 tokens)` for the summary."""
    fmt = (lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-")
    best = evaluation.get("best") or {}
    which = ", the best (--load-best)" if best.get("loaded") else ""
    line = (f"eval loss: base {fmt(evaluation['base_loss'])} -> final {fmt(evaluation['final_loss'])} "
            f"(step {evaluation['final_step']}{which}; {evaluation['examples']:,} examples, "
            f"{evaluation['loss_tokens']:,} tokens)")
    final = evaluation.get("final_metrics") or {}
    if "eval_rewards/margins" in final:
        line += f"; reward margin {final['eval_rewards/margins']:.4f}, "
        # KTO's rows are not pairs: no accuracy, its KL estimate instead
        line += (f"accuracy {final['eval_rewards/accuracies']:.1%}" if "eval_rewards/accuracies" in final
                 else f"KL {final.get('eval_kl', float('nan')):.4f}")
    stopped = evaluation.get("early_stopped")
    if stopped:
        line += f"; stopped early at step {stopped['step']}: {stopped['reason']}"
    return line


def eval_callback(config: Any, eval_set: Any, tokenizer: Any, guard: Any = None) -> Any:
    """The run's evaluator as a transformers TrainerCallback (None without an eval set)."""
    if eval_set is None:
        return None
    from transformers import TrainerCallback

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from ftcli.objectives import OBJECTIVES

    cls = type("EvalCallback", (EvalCallbacks, TrainerCallback), {})
    return cls(config, eval_set, pad, guard, OBJECTIVES[config.objective].evaluate)
