"""`ftcli inspect` for GRPO's data and runs: prepared prompts (statistics and one rendered prompt) and the latest
completions a run sampled (its `completions.jsonl`).

    >>> from ftcli.inspection.prompts import latest_completions
    >>> latest_completions(Path("runs/grpo-1"))[-1]["rewards"]
    {'rewards.py:correct': 1.0}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftcli.errors import ConfigError

LATEST = 4  # completions `inspect RUN` shows


def latest_completions(folder: Path, count: int = LATEST) -> list[dict[str, Any]]:
    """The last `count` completions a run wrote to completions.jsonl (none: an empty list); a damaged line is
    skipped (a run killed mid-write leaves one)."""
    from ftcli.rewards import COMPLETIONS

    path = folder / COMPLETIONS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[-count * 4:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records[-count:]


def prompt_view(folder: Path, manifest: dict[str, Any], tokenizer: Any, tokenizer_ref: str | None, options: Any,
                dataset: Any = None) -> dict[str, Any]:
    """Prepared prompts: their statistics and one prompt as the model sees it, with the columns the rewards get."""
    stats, source, opts = manifest.get("stats", {}), manifest.get("source", {}), manifest.get("options", {})
    view: dict[str, Any] = {"prompts": {
        "source": source.get("ref"), "source_kind": source.get("kind"), "prepared_folder": str(folder),
        "format": manifest.get("format"), "template": manifest.get("template"), "tokenizer": tokenizer_ref,
        "seq_length": opts.get("seq_length"), "prompt_room": opts.get("prompt_room"),
        **{k: stats.get(k) for k in ("rows_read", "rows_kept", "dropped", "tokens", "columns", "length")}},
        "example": None}
    if dataset is None:
        from datasets import load_from_disk

        dataset = load_from_disk(str(folder))
    if options.example >= len(dataset):
        raise ConfigError(f"--example {options.example} is beyond the {len(dataset)} prompts of {folder}",
                          hint=f"pick an index in 0..{len(dataset) - 1}")
    row = dataset[options.example]
    view["example"] = {
        "index": options.example, "where": f"row {options.example} of the prepared prompts, shuffled with seed "
                                           f"{opts.get('seed')}",
        "prompt_tokens": len(row["prompt_ids"]),
        "rendered": tokenizer.decode(row["prompt_ids"], skip_special_tokens=False) if tokenizer else row["prompt"],
        "columns": {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids")}}
    return view


def render_prompts(report: dict[str, Any], table: Any) -> None:
    """Draw `prompt_view`'s report (`table` makes the key-value tables of ftcli/inspection/render.py)."""
    from rich.markup import escape

    from ftcli.console import console

    d = report["prompts"]
    length = d.get("length") or {}
    console.print(table("prompts (--objective grpo)", [
        ("source", f"{d['source']} ({d['source_kind']})"), ("format / template", f"{d['format']} / {d['template']}"),
        ("tokenizer", d["tokenizer"]),
        ("prompts", f"{d['rows_kept']} kept of {d['rows_read']} read"
                    + (f" (dropped: {d['dropped']})" if any((d["dropped"] or {}).values()) else "")),
        ("prompt tokens", f"{d['tokens']:,}; min {length.get('min')} / p50 {length.get('p50')} / max "
                          f"{length.get('max')} (at most {d['prompt_room']}: --seq-length minus "
                          "--max-completion-length)"),
        ("reward columns", ", ".join(d["columns"] or []) or "none"), ("prepared folder", d["prepared_folder"])]))
    example = report.get("example")
    if example is not None:
        console.print(f"[bold]prompt {example['index']}[/] ({example['where']}): {example['prompt_tokens']} tokens, "
                      "as the model sees it before its completion:")
        console.print(escape(example["rendered"]), style="dim")
        if example["columns"]:
            console.print("columns the rewards get: " + escape(json.dumps(example["columns"], ensure_ascii=False)))


def reward_curve(folder: Path) -> dict[str, Any]:
    """The mean reward at each logged step (metrics.jsonl), empty for a run that scored no completions."""
    from ftcli.training.runfolder import METRICS

    steps, values = [], []
    path = folder / METRICS
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("reward"), (int, float)):
            steps.append(record.get("step") if isinstance(record.get("step"), int) else len(steps) + 1)
            values.append(float(record["reward"]))
    return {"steps": steps, "reward": values}


def render_completions(records: list[dict[str, Any]]) -> None:
    """The latest sampled completions of a run, each with its rewards and advantage."""
    from rich.markup import escape

    from ftcli.console import console

    if not records:
        return
    console.print(f"[bold]latest completions[/] (completions.jsonl, the last {len(records)}):")
    for r in records:
        rewards = ", ".join(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} none"
                            for k, v in (r.get("rewards") or {}).items())
        advantage = r.get("advantage")
        console.print(f"step {r.get('step')}: {rewards}" + (f"; advantage {advantage:+.3f}"
                                                           if isinstance(advantage, (int, float)) else ""))
        console.print(f"  prompt: {escape(str(r.get('prompt', '')))}", style="dim", soft_wrap=True)
        console.print(f"  completion: {escape(str(r.get('completion', '')))}", soft_wrap=True)
