"""`ftcli eval TARGET --reward FN --dataset PROMPTS`: the mean reward of sampled completions on held-out prompts,
for the tuned model and its base, sampled the same way from the same seed.

    >>> from ftcli.evaluation.rewards import RewardEvalOptions, run_reward_eval
    >>> report = run_reward_eval(RewardEvalOptions(target="runs/grpo-1", dataset="held.jsonl",
    ...                                            rewards=["rewards.py:correct"]))
    >>> report["tuned"]["mean"], report["base"]["mean"]

The prompts are rendered as the target's training rendered them (ftcli.inference: `ftcli generate`'s renderer) and
completions are sampled with the run's --temperature and --max-completion-length unless given, `samples` per
prompt, each prompt's sampling seeded with `seed` + its index for both models. The rewards are loaded and probed on
the data's first rows before any model loads, as `train` does. The mean is over every completion of every prompt,
with --reward-weights applied (per-function means are reported too); a reward of None does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ftcli.console import console
from ftcli.errors import ConfigError

DEFAULT_SAMPLES = 4
DEFAULT_NEW_TOKENS = 256


@dataclass
class RewardEvalOptions:
    target: str
    dataset: str
    rewards: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    samples: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int = 0
    columns: dict[str, str] | None = None
    dataset_split: str | None = None
    dtype: str | None = None
    device: str | None = None


def run_reward_eval(opts: RewardEvalOptions) -> dict[str, Any]:
    from ftcli.data.prompt_rows import prompt_text, read_prompt_rows
    from ftcli.inference.target import TargetOptions, load_target
    from ftcli.rewards import load_rewards
    from ftcli.rewards.probe import PROBE_ROWS, probe
    from ftcli.targets import find_target
    from ftcli.training.setup import quiet_libraries

    rewards = load_rewards(opts.rewards, opts.weights)
    rows = read_prompt_rows(opts.dataset, opts.columns, opts.dataset_split or "train")
    if not rows:
        raise ConfigError(f"--dataset {opts.dataset} holds no prompts", hint="give prompts to sample from")
    probe(rewards, [{**r, "prompt": prompt_text(r["prompt"])} for r in rows[:PROBE_ROWS]])
    quiet_libraries()
    recorded = find_target(opts.target).run_config
    samples = opts.samples or DEFAULT_SAMPLES
    new_tokens = opts.max_new_tokens or recorded.get("max_completion_length") or DEFAULT_NEW_TOKENS
    temperature = opts.temperature or recorded.get("temperature") or 1.0
    target = load_target(opts.target, TargetOptions(dtype=opts.dtype or "auto", device=opts.device or "auto"))
    console.print(f"[bold]ftcli eval[/] {target.label}: {len(rows):,} prompts x {samples} samples, up to "
                  f"{new_tokens} new tokens at temperature {temperature:g}, seed {opts.seed}", soft_wrap=True)
    prompts = [encoded(target, row) for row in rows]
    settings = dict(samples=samples, new_tokens=new_tokens, temperature=temperature, seed=opts.seed)
    report: dict[str, Any] = {"target": target.ref, "data": opts.dataset, "prompts": len(rows),
                              "samples_per_prompt": samples, "max_new_tokens": new_tokens,
                              "temperature": temperature, "seed": opts.seed, "base": None,
                              "rewards": [{"name": r.name, "weight": r.weight} for r in rewards]}
    report["tuned"] = score(target, target.model, prompts, rows, rewards, settings)
    if target.base or target.adapter:
        with target.base_model() as base:
            report["base"] = {"model": target.base, **score(target, base, prompts, rows, rewards, settings)}
    return report


def encoded(target: Any, row: dict[str, Any]) -> list[int]:
    from ftcli.data.prompts import row_example
    from ftcli.inference.prompts import render

    return render(target, row_example(row["prompt"], {}, 0))


def sample(model: Any, target: Any, prompt_ids: list[int], settings: dict[str, Any], seed: int) -> list[str]:
    """`samples` completions of one prompt, seeded, decoded as the trainer decodes them (special tokens dropped)."""
    import torch

    from ftcli.inference.generate import stop_ids

    eos, turn_end = stop_ids(target)
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else eos
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=settings["temperature"], top_p=1.0, top_k=0,
                             max_new_tokens=settings["new_tokens"], num_return_sequences=settings["samples"],
                             eos_token_id=[eos, *turn_end], pad_token_id=pad)
    return target.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def score(target: Any, model: Any, prompts: list[list[int]], rows: list[dict[str, Any]], rewards: list[Any],
          settings: dict[str, Any]) -> dict[str, Any]:
    """Every prompt's samples scored by every reward: the weighted mean and each function's mean."""
    from ftcli.rewards.probe import problem

    n = settings["samples"]
    texts, completions, columns = [], [], {}
    for i, (ids, row) in enumerate(zip(prompts, rows)):
        got = sample(model, target, ids, settings, settings["seed"] + i)
        texts += [target.tokenizer.decode(ids, skip_special_tokens=True)] * n
        completions += got
        for key, value in row.items():
            if key != "prompt":
                columns.setdefault(key, []).extend([value] * n)
    per: dict[str, float | None] = {}
    total = [0.0] * len(completions)
    scored = [False] * len(completions)
    for reward in rewards:
        try:
            out = reward.fn(prompts=texts, completions=completions, **columns)
        except Exception as exc:  # noqa: BLE001 - the user's function: one line naming it
            raise ConfigError(f"--reward {reward.name} raised {type(exc).__name__}: {exc}",
                              hint="fix the function (docs/grpo.md)") from None
        fault = problem(out, len(completions))
        if fault:
            raise ConfigError(f"--reward {reward.name} {fault}", hint="fix the function (docs/grpo.md)")
        values = [float(v) for v in out if v is not None]
        per[reward.name] = sum(values) / len(values) if values else None
        for j, v in enumerate(out):
            if v is not None:
                total[j] += reward.weight * float(v)
                scored[j] = True
    kept = [t for t, s in zip(total, scored) if s]
    mean = sum(kept) / len(kept) if kept else math.nan
    return {"mean": mean, "per_function": per, "completions": len(completions),
            "example": {"prompt": texts[0], "completion": completions[0]} if completions else None}


def print_reward_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="evaluation (rewards of sampled completions)", show_header=True)
    names = [r["name"] for r in report["rewards"]]
    table.add_column("model")
    table.add_column("mean reward", justify="right")
    for name in names if len(names) > 1 else []:
        table.add_column(name, justify="right")
    table.add_column("completions", justify="right")
    fmt = (lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}")  # noqa: E731
    rows = [(report["target"], report["tuned"])]
    if report.get("base"):
        rows.insert(0, (f"base: {report['base']['model'] or 'adapter disabled'}", report["base"]))
    for label, r in rows:
        table.add_row(label, fmt(r["mean"]), *([fmt(r["per_function"][n]) for n in names] if len(names) > 1 else []),
                      f"{r['completions']:,}")
    console.print(table)
    if report.get("base"):
        delta = report["tuned"]["mean"] - report["base"]["mean"]
        console.print(f"mean reward: base {fmt(report['base']['mean'])} -> {fmt(report['tuned']['mean'])} "
                      f"({delta:+.4f})")
    console.print(f"data: {report['data']}; {report['prompts']:,} prompts x {report['samples_per_prompt']} samples, "
                  f"up to {report['max_new_tokens']} new tokens, temperature {report['temperature']:g}, seed "
                  f"{report['seed']}", soft_wrap=True)
