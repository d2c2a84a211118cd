"""`ftcli eval`: score a model, adapter, run or exported folder on held-out data, with train's loss definition.

    >>> from ftcli.evaluation.run import EvalOptions, run_eval
    >>> report = run_eval(EvalOptions(target="runs/lora-1"))              # the run's own eval set
    >>> report = run_eval(EvalOptions(target="builtin:tiny-llama", dataset="dev.jsonl", compare_base=False))
    >>> report["loss"], report["perplexity"], report["examples"], report["tokens"]

The data goes through the same preparation as `train` (format, template, loss mask, sequence
length, cache) and the loss through ftcli.evaluation.loss, the code the run's eval steps use, so
`ftcli eval RUN` repeats the run's final eval loss. Nothing is written but the data cache.
`ftcli eval RUN` alone refuses data that changed since the run (its recorded fingerprint differs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.console import console
from ftcli.errors import ConfigError
from ftcli.targets import RUN_ONLY_KEYS, TargetInfo, find_target, load_target_model


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


def eval_config(target: TargetInfo, opts: EvalOptions) -> Any:
    """The RunConfig the data is prepared with: the run's own (a run folder) under the flags given."""
    from ftcli.config import build_run_config

    flags = {k: getattr(opts, k) for k in ("dataset_split", "format", "template", "columns", "train_on_inputs",
                                           "seq_length", "dtype", "device")}
    if target.kind == "run":
        base = {k: v for k, v in target.run_config.items() if k not in RUN_ONLY_KEYS}
        from ftcli.chain import TEMPLATE_COPY

        kept = Path(target.ref).expanduser() / TEMPLATE_COPY
        if str(target.data.get("template", "")).startswith("file:") and kept.is_file():
            base["template"] = str(kept)  # the text the run rendered with, not the file as it is now
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
    if target.scores and target.kind != "run":
        # A reward model's export or adapter: its pairs are scored as the reward objective prepares them.
        base["objective"] = scoring_objective(target.head)
    if opts.dataset is not None and not scores_pairs(base.get("objective", "sft")) and is_preference_data(opts, base):
        # Pairs are scored as DPO scores them (ftcli.evaluation.pairs); what only training reads is left as DPO has it.
        base.update(objective=PAIRS_OBJECTIVE, train_on_inputs=False, format="auto", lora_dropout=0.0, packing=False,
                    padding_free=None, compile=False, lora_init="default")
    base.update({k: v for k, v in flags.items() if v is not None})
    return build_run_config(base)


PAIRS_OBJECTIVE = "dpo"  # how `ftcli eval` scores preference data given to a target trained otherwise


def scoring_objective(head: str) -> str:
    """The objective whose model has `head` (a score head: the reward objective), for a target without a run."""
    from ftcli.objectives import OBJECTIVES

    return next(o.name for o in OBJECTIVES.values() if o.head == head)


def scores_pairs(objective: str) -> bool:
    from ftcli.objectives import OBJECTIVES

    return OBJECTIVES[objective].data != "examples"  # pairs, labeled rows: the objective's trainer scores them


def is_preference_data(opts: EvalOptions, base: dict[str, Any]) -> bool:
    """Whether `--dataset` holds preference pairs (a 'chosen' and a 'rejected' column, after --columns)."""
    from ftcli.data import cache
    from ftcli.data.sources import load_rows
    from ftcli.errors import DataError

    source = str(opts.dataset)
    if cache.is_prepared_folder(source):
        return (cache.read_prepared_manifest(Path(source).expanduser()) or {}).get("kind") == "preference"
    try:
        names = set(load_rows(source, split=opts.dataset_split or base.get("dataset_split") or "train").dataset
                    .column_names)
    except DataError:  # preparing the data names the problem, with --dataset
        return False
    columns = opts.columns or base.get("columns") or {}
    return all(columns.get(field, field) in names for field in ("chosen", "rejected"))


def load_eval_set(config: Any, tokenizer: Any) -> Any:
    from ftcli.data import load_datasets
    from ftcli.data.split import prepare_eval_dataset

    if config.eval_dataset is not None:
        # The data to score is `--dataset` here, whatever the run called it.
        prepare = None
        if scores_pairs(config.objective):
            from ftcli.data.shapes import shape_module

            prepare = shape_module(config).prepare
        return prepare_eval_dataset(config, tokenizer, flag="--dataset", prepare=prepare)
    # A run's held-out split: its training data prepared again (a cache hit), the same rows held out.
    return load_datasets(config, tokenizer)[2]


def check_own_eval_set(target: TargetInfo, eval_set: Any) -> None:
    """`ftcli eval RUN` scores the run's own eval set, or nothing: data that changed since the run (its fingerprint
    differs from the one the run recorded) would be another eval set under the run's name."""
    from ftcli.errors import DataError

    recorded = target.eval_record.get("fingerprint")
    if recorded and recorded != eval_set.fingerprint:
        raise DataError(f"the eval set of the run in {target.ref} has changed since it trained: {eval_set.source} "
                        "no longer holds the data the run held out and scored (its fingerprint differs)",
                        hint="score the data as it is now with --dataset SOURCE, or put back the file the run "
                             "trained on")


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    from ftcli.evaluation.loss import evaluate_loss
    from ftcli.models import load_tokenizer, resolve_device
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eval_set = load_eval_set(config, tokenizer)
    if target.kind == "run" and opts.dataset is None:
        check_own_eval_set(target, eval_set)
    console.print(f"eval: {eval_set.examples:,} examples, {eval_set.loss_tokens:,} loss tokens ({eval_set.source})",
                  soft_wrap=True)
    batch_size = config.eval_batch_size or config.batch_size
    report: dict[str, Any] = {
        "target": target.ref, "kind": target.kind, "model": target.model,
        "adapter": str(target.adapter) if target.adapter else None, "base_4bit": target.loads_4bit,
        "data": eval_set.source, "seq_length": config.seq_length, "batch_size": batch_size, "device": device,
    }
    if target.scores:  # a reward model: pairwise accuracy and margin of its scores
        from ftcli.evaluation.reward_model import evaluate_reward_pairs

        if opts.compare_base:
            raise ConfigError("--compare-base: a reward model's base has no trained score head to compare with",
                              hint="drop --compare-base")
        return {**report, "scores": True, **evaluate_reward_pairs(target, config, eval_set, tokenizer, device)}
    if scores_pairs(config.objective):  # preference data: the objective's loss and rewards (ftcli.evaluation.pairs)
        from ftcli.evaluation.pairs import evaluate_pairs, reference_of
        from ftcli.objectives import OBJECTIVES

        if OBJECTIVES[config.objective].reference is not None:
            reference_of(target)  # refused before any weight loads
        if opts.compare_base:
            raise ConfigError("--compare-base: on preference pairs the base is the reference every reward is "
                              "measured against", hint="drop --compare-base")
        return {**report, "objective": config.objective, **evaluate_pairs(target, config, eval_set, tokenizer, device)}
    model = load_target_model(target, config, device)
    result = evaluate_loss(model, eval_set.dataset, batch_size, pad)
    report.update({**result.to_dict(), "base": None})
    if opts.compare_base:
        del model
        base = evaluate_loss(load_target_model(target, config, device, base_only=True), eval_set.dataset,
                             batch_size, pad)
        report["base"] = {"model": target.base, **base.to_dict()}
    return report


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    if report.get("scores"):
        return print_reward_report(report)
    if report.get("objective") is not None:
        return print_pair_report(report)
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


def print_pair_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="evaluation (preference pairs)", show_header=True)
    for column in ("model", "loss", "reward accuracy", "reward margin", "chosen reward", "rejected reward", "pairs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    fmt = (lambda v: "n/a" if v is None else f"{v:.4f}")  # noqa: E731
    table.add_row(report["target"], fmt(report["loss"]), fmt(report["rewards/accuracies"]),
                  fmt(report["rewards/margins"]), fmt(report["rewards/chosen"]), fmt(report["rewards/rejected"]),
                  f"{report['pairs']:,}")
    console.print(table)
    if report.get("kl") is not None:
        console.print(f"KL estimate (policy vs reference, mismatched completions): {report['kl']:.4f}")
    options = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in report["options"].items() if v is not None)
    console.print(f"data: {report['data']}; --objective {report['objective']} ({options}), reference "
                  f"{report['reference'] or 'none'}; seq length {report['seq_length']}, batch {report['batch_size']}",
                  soft_wrap=True)


def print_reward_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="evaluation (reward model on preference pairs)", show_header=True)
    for column in ("model", "accuracy", "mean margin", "loss", "chosen score", "rejected score", "pairs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(report["target"], f"{report['accuracy']:.4f}", f"{report['margin']:.4f}", f"{report['loss']:.4f}",
                  f"{report['chosen_score']:.4f}", f"{report['rejected_score']:.4f}", f"{report['pairs']:,}")
    console.print(table)
    console.print(f"pairwise accuracy {report['accuracy']:.2%} (share of pairs with score(chosen) > "
                  f"score(rejected)), mean margin {report['margin']:.4f}; data: {report['data']}; seq length "
                  f"{report['seq_length']}, batch {report['batch_size']}", soft_wrap=True)


def non_finite(report: dict[str, Any]) -> list[str]:
    """The report's numbers that are NaN or infinite (`base.loss` for the base's), e.g. a model with NaN weights."""
    import math

    found = [k for k, v in report.items() if isinstance(v, float) and not math.isfinite(v)]
    base = report.get("base") or {}
    return found + [f"base.{k}" for k, v in base.items() if isinstance(v, float) and not math.isfinite(v)]


def json_report(report: dict[str, Any]) -> str:
    """The report as strict JSON: a NaN or infinite number is null, and `non_finite` names them (json.dumps would
    write the bare words NaN and Infinity, which jq and JSON.parse refuse)."""
    import json
    import math

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return {k: clean(v) for k, v in value.items()} if isinstance(value, dict) else value

    return json.dumps({**clean(report), "non_finite": non_finite(report)}, allow_nan=False)
