"""`ftcli eval`: score a model, adapter, run or exported folder on held-out data, with train's loss definition.

    >>> from ftcli.evaluation.run import EvalOptions, run_eval
    >>> report = run_eval(EvalOptions(target="runs/lora-1"))              # the run's own eval set
    >>> report = run_eval(EvalOptions(target="builtin:tiny-llama", dataset="dev.jsonl", compare_base=False))
    >>> report["loss"], report["perplexity"], report["examples"], report["tokens"]

The data goes through the same preparation as `train` (format, template, loss mask, sequence
length, cache) and the loss through ftcli.evaluation.loss, the code the run's eval steps use, so
`ftcli eval RUN` repeats the run's final eval loss. Nothing is written but the data cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.console import console
from ftcli.errors import ConfigError
from ftcli.evaluation.target import EvalTarget, find_target

# Settings of where and how a run was written, meaningless (or refused) when only reading it.
RUN_ONLY_KEYS = ("output_dir", "log_dir", "resume", "force", "overwrite")


@dataclass
class EvalOptions:
    target: str
    dataset: str | None = None
    dataset_split: str | None = None
    format: str | None = None
    template: str | None = None
    columns: dict[str, str] | None = None
    train_on_inputs: bool | None = None
    seq_length: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str | None = None
    compare_base: bool = False


def eval_config(target: EvalTarget, opts: EvalOptions) -> Any:
    """The RunConfig the data is prepared with: the run's own (a run folder) under the flags given."""
    from ftcli.config import build_run_config

    flags = {k: getattr(opts, k) for k in ("dataset_split", "format", "template", "columns", "train_on_inputs",
                                           "seq_length", "dtype", "device")}
    if target.kind == "run":
        base = {k: v for k, v in target.run_config.items() if k not in RUN_ONLY_KEYS}
        if opts.dataset is not None:
            base.update(eval_dataset=opts.dataset, eval_split=None)
        elif base.get("eval_dataset") is None and base.get("eval_split") is None:
            raise ConfigError(f"--dataset: the run in {target.ref} has no eval set of its own",
                              hint="pass the data to score with --dataset SOURCE")
    else:
        if opts.dataset is None:
            raise ConfigError(f"--dataset: {target.ref} is not a run folder, so there is no eval set to default to",
                              hint="pass the data to score with --dataset SOURCE")
        base = {"model": target.base or target.model, "eval_dataset": opts.dataset}
    if opts.batch_size is not None:
        base["eval_batch_size"] = opts.batch_size
    base.update({k: v for k, v in flags.items() if v is not None})
    return build_run_config(base)


def load_eval_set(config: Any, tokenizer: Any) -> Any:
    from ftcli.data import load_datasets
    from ftcli.data.split import prepare_eval_dataset

    if config.eval_dataset is not None:
        # The data to score is `--dataset` here, whatever the run called it.
        return prepare_eval_dataset(config, tokenizer, flag="--dataset")
    # A run's held-out split: its training data prepared again (a cache hit), the same rows held out.
    return load_datasets(config, tokenizer)[2]


def load_scored_model(target: EvalTarget, config: Any, device: str, base_only: bool = False) -> Any:
    """The model to score: the target (with its adapter), or with `base_only` the base before fine-tuning."""
    from ftcli.methods import METHODS
    from ftcli.models import load_model

    ref = (target.base or target.model) if base_only else target.model
    options = METHODS[config.method].load_options(config, device) if target.loads_4bit else {}
    model = load_model(ref, dtype=config.dtype, device=device, attn_implementation=config.attn_implementation,
                       revision=target.revision_of(ref), trust_remote_code=target.trust_remote_code, **options)
    if target.loads_4bit:
        from peft import prepare_model_for_kbit_training

        from ftcli.methods.qlora import keep_cpu_inference_in_compute_dtype

        # As the run had it: non-quantised weights upcast as for k-bit training, the CPU kernel of training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_cpu_inference_in_compute_dtype(model)
    if target.adapter is not None and not base_only:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.adapter))
        _adapter_in_saved_dtype(model, target.adapter)
    return model


def _adapter_in_saved_dtype(model: Any, folder: Path) -> None:
    """The adapter computes in the dtype it was saved (and trained) in: peft loads a bfloat16 adapter (a 4-bit
    base's, trained so by TRL) into float32 weights, and the loss would then differ from the run's."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        dtypes = {fh.get_slice(k).get_dtype() for k in keys}
    if len(dtypes) != 1:
        return
    import torch

    saved = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtypes.pop())
    for name, param in model.named_parameters():
        if saved is not None and "lora_" in name and param.dtype != saved:
            param.data = param.data.to(saved)


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    from ftcli.evaluation.loss import evaluate_loss
    from ftcli.models import apply_pad_policy, load_tokenizer, resolve_device
    from ftcli.training.setup import quiet_libraries

    quiet_libraries()
    target = find_target(opts.target)
    if opts.compare_base and not target.base:
        raise ConfigError(f"--compare-base: {target.ref} records no base model to compare with",
                          hint="evaluate the base model separately, or drop --compare-base")
    config = eval_config(target, opts)
    device = resolve_device(config.device)
    console.print(f"[bold]ftcli eval[/] {target.ref} ({target.kind}{', 4-bit base' if target.loads_4bit else ''})",
                  soft_wrap=True)
    tokenizer = load_tokenizer(target.tokenizer or target.model, revision=target.revision_of(target.tokenizer or ""),
                               trust_remote_code=target.trust_remote_code)
    apply_pad_policy(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eval_set = load_eval_set(config, tokenizer)
    console.print(f"eval: {eval_set.examples:,} examples, {eval_set.loss_tokens:,} loss tokens ({eval_set.source})",
                  soft_wrap=True)
    batch_size = config.eval_batch_size or config.batch_size
    model = load_scored_model(target, config, device)
    result = evaluate_loss(model, eval_set.dataset, batch_size, pad)
    report: dict[str, Any] = {
        "target": target.ref, "kind": target.kind, "model": target.model,
        "adapter": str(target.adapter) if target.adapter else None, "base_4bit": target.loads_4bit,
        "data": eval_set.source, "seq_length": config.seq_length, "batch_size": batch_size, "device": device,
        **result.to_dict(), "base": None,
    }
    if opts.compare_base:
        del model
        base = evaluate_loss(load_scored_model(target, config, device, base_only=True), eval_set.dataset,
                             batch_size, pad)
        report["base"] = {"model": target.base, **base.to_dict()}
    return report


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="evaluation", show_header=True)
    for column in ("model", "loss", "perplexity", "examples", "tokens"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [(report["target"], report)]
    if report.get("base"):
        rows.insert(0, (f"base: {report['base']['model']}", report["base"]))
    for name, r in rows:
        table.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['examples']:,}", f"{r['tokens']:,}")
    console.print(table)
    if report.get("base"):
        delta = report["loss"] - report["base"]["loss"]
        console.print(f"eval loss: base {report['base']['loss']:.4f} -> {report['loss']:.4f} ({delta:+.4f})")
    where = f"; adapter {Path(report['adapter'])}" if report.get("adapter") else ""
    console.print(f"data: {report['data']}; seq length {report['seq_length']}, batch {report['batch_size']}"
                  f"{where}{'; 4-bit base' if report['base_4bit'] else ''}", soft_wrap=True)
