"""The trainer of a run: the objective's TRL trainer (SFTTrainer, DPO's) with ftcli's arguments, batching, guard and
display.

    >>> from ftcli.training.trainer import build_trainer
    >>> trainer, display = build_trainer(config, plan, tokenizer, dataset, out, out / "logs", "cpu", guard)
    >>> stats = trainer.train()

Importing this module stays light (transformers and TRL load inside `build_trainer`, after the
libraries have been quieted). Shared by `train` (ftcli/training/run.py) and `warmup` (which compiles this same trainer's model
and runs its own `training_step`, so the warm cache is the one the run uses).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from ftcli.training import batching, precision, recipe
from ftcli.training.distributed import max_over_ranks, world_size
from ftcli.training.guard import guarded_trainer_class
from ftcli.training.runfolder import METRICS


def build_trainer(config: Any, plan: Any, tokenizer: Any, dataset: Any, out: Path, log_dir: Path,
                  device: str, guard: Any = None, evaluator: Any = None) -> tuple[Any, Any]:
    """The run's trainer and its progress display. `guard` (ftcli.training.guard's RunGuard) watches the steps
    of a real run; warmup, which never calls `train()`, builds the same trainer without one. `evaluator`
    (ftcli.training.evalsteps) evaluates at the run's eval steps."""
    from transformers import PrinterCallback

    from ftcli.objectives import OBJECTIVES
    from ftcli.training.progress import TrainingDisplay  # a transformers callback: imported with the trainer

    objective = OBJECTIVES[config.objective]
    model = plan.model
    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,  # the trainer's "train by epochs"
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
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
        use_cpu=device == "cpu",
        # Autocast follows the compute dtype (ftcli.training.precision); TRL's own default (bf16 autocast
        # always) would silently train float32 weights with bfloat16 matmuls.
        **precision.autocast_args(compute_dtype(config, device), device),
        dataloader_pin_memory=device.startswith("cuda"),
    )
    kwargs.update(batching.training_args(config, device))
    kwargs.update(recipe.training_args(config, device, out))
    kwargs.update(liger_args(config, device))
    kwargs.update(data_parallel_args(config))
    kwargs.update(objective.training_args(config, device))
    # The method's own arguments (e.g. FSDP's) win over ftcli's defaults; the objective's arguments class takes its own.
    args = objective_args(objective.config_class(), {**kwargs, **plan.training_args})
    display = TrainingDisplay(device=device, metrics_path=out / METRICS, evaluates=evaluator is not None)
    inner = objective.trainer_class()
    trainer_class = guarded_trainer_class(recipe.trainer_class(batching.trainer_class(
        lean_loss_class(plan.trainer_class(inner) if plan.trainer_class else inner))))
    callbacks = [display, *recipe.tracker_callbacks(config, out, log_dir)]
    if evaluator is not None:
        # Before the guard: a checkpoint the evaluator asks for at a step is unmarked by the guard like its own.
        callbacks.append(evaluator)
    if guard is not None:
        guard.display = display
        # The guard comes after the display: on resume it puts back the metrics the display has just reset.
        callbacks.append(guard)
    collator = (batching.data_collator(config, tokenizer) if objective.data == "examples"
                else objective.data_collator(config, tokenizer))
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            data_collator=collator, callbacks=callbacks,
                            **objective.trainer_kwargs(config, plan, evaluator))
    if args.fp16:
        precision.keep_master_weights(trainer.model)
    if guard is not None:
        guard.trainer = trainer
    if evaluator is not None:
        evaluator.trainer = trainer
    # The display replaces the trainer's own printing of raw log dicts.
    trainer.remove_callback(PrinterCallback)
    return trainer, display


# Devices where TRL's fused LM head runs its Triton kernel: only the loss positions are projected and the
# (batch, length, vocabulary) logits never exist. Elsewhere it falls back to torch tiles over every position,
# with the projection computed again in the backward pass.
FUSED_HEAD_DEVICES = ("cuda", "xpu")


@lru_cache(maxsize=None)
def lean_loss_class(base: type) -> type:
    """`base` (the objective's trainer, or a method's subclass of it) whose SFT training loss is the plain
    `transformers.Trainer` one (the model's own logits and cross-entropy, as a peer's trainer computes it) where
    TRL's fused LM head has no kernel to run on (CPU, MPS).

    There TRL's head costs a second projection over the whole vocabulary for every position in the backward
    pass, plus the entropy and top-1 accuracy of every position (its `entropy` and `mean_token_accuracy`
    metrics, each read back with a device sync per micro-batch): measured by bench/steps.py, most of what made
    a training step cost more than the plain Trainer's. The loss is the same sum of token losses over
    `num_items_in_batch`; TRL's `num_tokens` count is kept. Anything else TRL's loss handles itself (another
    loss type, DPO's among them; label smoothing, MoE auxiliary loss, a custom loss function, evaluation) goes
    to TRL."""

    class LeanLoss(base):  # type: ignore[misc,valid-type]
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if return_outputs or not self.model.training or not self._ftcli_plain_loss():
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            from transformers import Trainer

            inputs["use_cache"] = False
            loss = Trainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
            if "attention_mask" in inputs:  # TRL's running count of the tokens trained (padding excluded)
                local = inputs["attention_mask"].sum()
            else:
                local = torch_tensor(inputs["position_ids"].size(1), inputs["position_ids"].device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def _ftcli_plain_loss(self) -> bool:
            if "_ftcli_plain" not in self.__dict__:
                device = getattr(self.args, "device", None)
                self._ftcli_plain = (getattr(device, "type", "cpu") not in FUSED_HEAD_DEVICES
                                     and getattr(self.args, "loss_type", None) == "nll"
                                     and self.compute_loss_func is None and self.label_smoother is None
                                     and not getattr(self, "aux_loss_enabled", False))
            return self._ftcli_plain

    LeanLoss.__name__ = LeanLoss.__qualname__ = f"Lean{base.__name__}"
    return LeanLoss


def torch_tensor(value: int, device: Any) -> Any:
    import torch

    return torch.tensor(value, device=device)

def objective_args(config_class: type, kwargs: dict[str, Any]) -> Any:
    """The arguments object of the objective's trainer from the settings its class has (SFT's packing switch, say,
    is no DPOConfig field: the objective refuses what would need it)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in kwargs.items() if k in known})


def compute_dtype(config: Any, device: str) -> Any:
    """The dtype the run computes in: --dtype resolved (QLoRA's 4-bit layers compute in it too)."""
    from ftcli.models import resolve_dtype

    return resolve_dtype(config.dtype, device)


def liger_args(config: Any, device: str) -> dict[str, Any]:
    """Liger's fused RMSNorm / SwiGLU / RoPE kernels where `precision.use_liger` says (TRL keeps its own fused LM
    head and loss)."""
    import warnings

    if not precision.use_liger(config, device):
        return {}
    warnings.filterwarnings("ignore", message=".*use_liger_kernel=True.*deprecated.*", category=FutureWarning)
    return {"use_liger_kernel": True}


def data_parallel_args(config: Any) -> dict[str, Any]:
    """The trainer's DDP settings when a method that does not shard runs on several processes.

    Accelerate wraps the model in DistributedDataParallel (gloo on CPU, NCCL on CUDA). Every trainable weight
    takes part in every forward pass (LoRA's frozen base is not tracked by DDP at all), so DDP need not search
    for unused parameters (a full graph walk per step, and refused with checkpointing); collectives that wait
    longer than the methods' timeout are a stuck rank."""
    from ftcli.methods import METHODS
    from ftcli.methods.fsdp import COLLECTIVE_TIMEOUT_S

    if METHODS[config.method].shards or world_size() == 1:
        return {}
    return {"ddp_find_unused_parameters": False, "ddp_timeout": COLLECTIVE_TIMEOUT_S}


def final_metrics(raw: dict[str, Any], state: Any, device: str) -> dict[str, Any]:
    from ftcli.system import peak_memory

    runtime = float(raw.get("train_runtime", 0.0)) or 1e-9
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    kind, peak = peak_memory(device)
    kind, peak = max_over_ranks(kind, peak)
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


def save_probe(model: Any, input_ids: list[int], path: Path, write: bool = True) -> None:
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
