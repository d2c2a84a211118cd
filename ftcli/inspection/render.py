"""Drawing an `inspect` report (the plain dict of ftcli/inspection/views.py) with Rich.

    >>> from ftcli.inspection.detect import inspect_target
    >>> from ftcli.inspection.render import render
    >>> render(inspect_target("builtin:tiny-llama"))
"""

from __future__ import annotations

from typing import Any


def render(report: dict[str, Any]) -> None:
    """Draw a report with Rich on the ftcli console."""
    from ftcli.console import console

    kind = report["kind"]
    console.print(f"[bold]{report['target']}[/]: {kind}")
    {"model": _render_model, "adapter": _render_adapter, "run": _render_run, "prepared": _render_data,
     "dataset": _render_data, "compile_cache": _render_compile_cache}[kind](report)


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Any:
    from rich.table import Table

    # A long value (a path, a hub id) folds onto the next line instead of being cut with an ellipsis.
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, "-" if value is None else number_text(key, value) if isinstance(value, float) else str(value))
    return table


def number_text(key: str, value: Any) -> str:
    """A value as people read it: losses to 4 decimals, counts with thousands separators, seconds and
    rates rounded; anything else as it is. Tables apply it to floats; counts are passed in by name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if "loss" in key:
        return f"{value:.4f}"
    if key.endswith(("runtime", "_s", "seconds")):
        return f"{value:,.1f} s"
    if key.endswith("per_second"):
        return f"{value:,.0f}"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"


def _render_model(report: dict[str, Any]) -> None:
    from ftcli.console import console

    m = report["model"]
    console.print(_kv_table("model (from its config; no weights loaded)", [
        ("architecture", f"{m['architecture']} ({m['model_type']})"),
        ("parameters", f"{m['parameters']:,}"),
        ("layers", m["layers"]), ("hidden size", m["hidden_size"]),
        ("intermediate size", m["intermediate_size"]),
        ("attention heads / kv heads", f"{m['heads']} / {m['kv_heads']} (head dim {m['head_dim']})"),
        ("vocabulary", f"{m['vocab_size']:,}"), ("context length", m["context_length"]),
        ("dtype (config)", m["dtype"]), ("tied embeddings", m["tied_embeddings"]),
        ("chat template", "yes" if m["chat_template"] else "no"),
        *([("head", "a score head: a reward model (one score per sequence; `ftcli eval` with preference pairs, "
                    "not generate/chat)")] if m.get("reward_model") else []),
    ]))
    console.print(_memory_table(report["memory"]))
    sampling = [n for n in (report["memory"]["methods"] or [{}])[0].get("notes", []) if "completions per step" in n]
    for note in sampling:  # what the sampling objective's rows and cache are (the same for every method)
        console.print(note)
    console.print(memory_caption(report["memory"]))


def memory_caption(mem: dict[str, Any]) -> str:
    """What the estimate is for and what its total counts, in a few sentences that wrap at any width."""
    dtype = f"{mem['dtype']} ({mem.get('dtype_reason') or 'given'})"
    if mem.get("device") == "cpu":
        return (f"For this CPU, in {dtype}. total: the process's peak RSS (weights, gradients, AdamW state, "
                "activations, and the CPU process: libraries and trainer, the plain loss's whole logits, the freed "
                "temporaries glibc's allocator keeps). qlora: NF4 base. `ftcli warmup` measures the real peak.")
    asked = " (--gpu-memory)" if mem.get("gpu_memory_bytes") else ""
    return (f"For a GPU{asked}, in {dtype}. total: the tensors (weights, gradients, AdamW state, activations); qlora: "
            "NF4 base. The verdict keeps 10% + 1 GiB for the CUDA context and allocator slack. `ftcli warmup` "
            "measures the real peak.")


def _memory_table(mem: dict[str, Any]) -> Any:
    """The estimate with one column per method and one row per part (a handful of columns: it fits 80)."""
    from rich.table import Table

    from ftcli.system import format_bytes

    gpu = mem["gpu_memory_bytes"]
    methods = mem["methods"]
    title = (f"memory per process (estimate): {mem.get('objective', 'sft')}, {mem['dtype']}, seq "
             f"{mem['seq_length']}, {mem['nproc']} process{'es' if mem['nproc'] > 1 else ''}")
    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)  # the labels are short: the method columns wrap instead
    for est in methods:
        table.add_column(est["method"], justify="right", overflow="fold")

    def row(label: str, values: list[str]) -> None:
        table.add_row(label, *values)

    row("batch size", [str(e["batch_size"]) for e in methods])
    row("grad checkpointing", ["on" if e["gradient_checkpointing"] else "off" for e in methods])
    row("trainable params", [count_text(e["trainable_parameters"]) for e in methods])
    for label, key in (("weights", "weights_bytes"), ("gradients", "gradients_bytes"),
                       ("optimizer (AdamW)", "optimizer_bytes"), ("activations", "activations_bytes")):
        row(label, [format_bytes(e[key]) for e in methods])
    if any(e.get("generation_bytes") for e in methods):  # GRPO: the sampled completions' KV cache
        row("generation KV cache", [format_bytes(e["generation_bytes"]) for e in methods])
    if any(e.get("reference") for e in methods):
        row("reference model", [format_bytes(e["reference_bytes"]) for e in methods])
        row("  (kept as)", [str(e.get("reference") or "-") for e in methods])
    if any(e.get("process_bytes") for e in methods):  # a CPU estimate: the process's own memory
        row("CPU process", [format_bytes(e["process_bytes"]) for e in methods])
    row("[bold]total", [f"[bold]{format_bytes(e['total_bytes'])}" for e in methods])
    if gpu:
        row(f"fits {format_bytes(gpu)}", ["[green]yes" if e["fits"] else "[red]no" for e in methods])
    return table


def count_text(n: int) -> str:
    """A count with thousands separators, in millions past 11 characters (8,030.3 M): a method column stays narrow."""
    text = f"{n:,}"
    return text if len(text) <= 11 else f"{n / 1e6:,.1f} M"


def _render_compile_cache(report: dict[str, Any]) -> None:
    from ftcli.console import console
    from ftcli.system import format_bytes

    c = report["compile_cache"]
    key = c.get("key") or {}
    console.print(_kv_table("compile cache (ftcli warmup)", [
        ("method, batch size, seq length", f"{key.get('method')}, {key.get('batch_size')}, {key.get('seq_length')}"),
        ("dtype, device", f"{key.get('dtype')}, {key.get('device')}"),
        ("model fingerprint", key.get("model")),
        ("torch", (key.get("versions") or {}).get("torch")),
        ("shapes warmed", ", ".join("x".join(map(str, s)) for s in c.get("shapes") or [])),
        ("cold compile time", f"{c['compile_s']:.2f} s" if c.get("compile_s") is not None else None),
        ("steady step time", f"{c['step_s'] * 1000:.1f} ms" if c.get("step_s") is not None else None),
        ("portable artefacts", format_bytes(c["artifacts_bytes"]) if c.get("artifacts_bytes") is not None else None),
        ("Inductor cache", format_bytes(c["inductor_bytes"])),
    ]))


def _render_adapter(report: dict[str, Any]) -> None:
    from ftcli.console import console

    console.print(_adapter_table(report["adapter"]))


def _adapter_table(a: dict[str, Any]) -> Any:
    from ftcli.system import format_bytes

    trainable = a["trainable_parameters"]
    return _kv_table("adapter", [
        ("base model", a["base_model"]), ("type", a["peft_type"]), ("rank", a["rank"]), ("alpha", a["alpha"]),
        ("dropout", a["dropout"]), ("target modules", ", ".join(a["target_modules"] or [])),
        ("trainable parameters", f"{trainable:,} in {a['tensors']} tensors" if trainable is not None else None),
        ("size on disk", format_bytes(a["size_bytes"])),
    ])


def objective_text(name: str | None) -> str:
    """`reward (a reward model: a score head, one score per sequence)`, or the objective's name."""
    from ftcli.models import CAUSAL_HEAD
    from ftcli.objectives import OBJECTIVES

    objective = OBJECTIVES.get(name or "sft")
    if objective is None or objective.head == CAUSAL_HEAD:
        return name or "sft"
    return f"{objective.name} (a reward model: a score head, one score per sequence)"


def _render_run(report: dict[str, Any]) -> None:
    from ftcli.console import console
    from ftcli.system import format_bytes

    run = report["run"]
    colour = {"finished": "green", "interrupted": "yellow", "failed": "red", "stopped": "red"}.get(run["status"], "cyan")
    if run["status"] == "stopped":  # "stopped (process N is gone)"
        status = f"[{colour}]{run['error']}[/]"
    else:
        status = f"[{colour}]{run['status']}[/]" + (f": {run['error']}" if run.get("error") else "")
    rows: list[tuple[str, Any]] = [("status", status)]
    cfg = report.get("config") or {}
    rows += [("method", cfg.get("method")), ("objective", objective_text(cfg.get("objective"))),
             ("model", cfg.get("model")), ("dataset", cfg.get("dataset")),
             ("started / ended", f"{run['started_at']} / {run['ended_at'] or '-'}"),
             ("device, dtype", f"{run['device']}, {run['dtype']}"),
             ("parameters", f"{run['trainable_parameters']:,} trainable of {run['total_parameters']:,}"
              if run.get("total_parameters") else None),
             ("data", f"{number_text('rows', run['data'].get('rows_used'))} examples, "
                      f"{number_text('tokens', run['data'].get('tokens'))} tokens, "
                      f"{number_text('truncated', run['data'].get('truncated'))} truncated")]
    metrics = run.get("metrics") or {}
    for key in ("steps", "train_loss", "train_runtime", "real_tokens_per_second"):
        if metrics.get(key) is not None:
            rows.append((key, number_text(key, metrics[key])))
    if metrics.get("peak_memory_bytes"):
        rows.append((metrics.get("peak_memory_kind", "peak memory"), format_bytes(metrics["peak_memory_bytes"])))
    checkpoints = report["checkpoints"]
    rows.append(("checkpoints", ", ".join(c["name"] + ("" if c["complete"] else " (incomplete)")
                                          for c in checkpoints) or "none"))
    console.print(_kv_table("run", rows))
    console.print(_kv_table("resolved config", [(k, v) for k, v in cfg.items() if v is not None]))
    if "adapter" in report:
        console.print(_adapter_table(report["adapter"]))
    curve = report["loss_curve"]
    if curve["loss"]:
        console.print(f"[bold]training loss[/] ({curve['source']}, {len(curve['loss'])} points)")
        console.print(loss_chart(curve["steps"], curve["loss"]))
    else:
        console.print("training loss: no TensorBoard events or metrics.jsonl in this run")
    _render_eval(report, console)
    rewards = report.get("reward_curve") or {}
    if rewards.get("reward"):  # GRPO's progress: its loss stays near 0 and says little
        console.print(f"[bold]mean reward[/] (metrics.jsonl, {len(rewards['reward'])} points)")
        console.print(loss_chart(rewards["steps"], rewards["reward"]))
    from ftcli.inspection.prompts import render_completions

    render_completions(report.get("completions") or [])


def _render_eval(report: dict[str, Any], console: Any) -> None:
    """The eval curve beside the training curve, and how the evaluation ended (base -> final, best, stop)."""
    curve = report.get("eval_curve") or {}
    evaluation = report.get("eval") or {}
    if not curve.get("loss"):
        return
    console.print(f"[bold]eval loss[/] ({curve['source']}, {len(curve['loss'])} evaluations, "
                  f"steps {', '.join(map(str, curve['steps']))})")
    console.print(loss_chart(curve["steps"], curve["loss"]))
    if evaluation:
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-")
        line = f"eval loss: base {fmt(evaluation.get('base_loss'))} -> final {fmt(evaluation.get('final_loss'))}"
        best = evaluation.get("best") or {}
        if best:
            line += f"; best {fmt(best.get('eval_loss'))} at step {best.get('step')}"
            line += " (loaded: --load-best)" if best.get("loaded") else ""
        stopped = evaluation.get("early_stopped")
        if stopped:
            line += f"; stopped early at step {stopped['step']}"
        console.print(line + f" ({evaluation.get('source')})", soft_wrap=True)


def loss_chart(steps: list[int], values: list[float], width: int = 60, height: int = 10) -> str:
    """A block chart of the loss: one column per group of steps (its mean), `height` rows of eighths."""
    levels = " ▁▂▃▄▅▆▇█"
    width = max(1, min(width, len(values)))
    columns = []
    for c in range(width):
        chunk = values[c * len(values) // width:(c + 1) * len(values) // width] or [values[-1]]
        columns.append(sum(chunk) / len(chunk))
    low, high = min(columns), max(columns)
    span = (high - low) or 1.0
    filled = [round((v - low) / span * (height * 8 - 1)) + 1 for v in columns]
    lines = []
    for row in range(height - 1, -1, -1):
        label = f"{high:8.3f} ┤" if row == height - 1 else f"{low:8.3f} ┤" if row == 0 else " " * 9 + "│"
        cells = "".join(levels[max(0, min(8, f - row * 8))] for f in filled)
        lines.append(label + cells)
    lines.append(" " * 9 + "└" + "─" * width)
    lines.append(" " * 10 + f"step {steps[0]}".ljust(max(width - 10, 1)) + f"step {steps[-1]}")
    return "\n".join(lines)


def _render_data(report: dict[str, Any]) -> None:
    from rich.text import Text

    from ftcli.console import console

    if "pairs" in report:
        _render_pairs(report)
        return
    if "prompts" in report:
        from ftcli.inspection.prompts import render_prompts

        render_prompts(report, _kv_table)
        return
    d = report["data"]
    length = d.get("length") or {}
    dropped = d.get("dropped") or {}
    padding = d.get("padding") or {}
    share = (lambda x: f"{x:.1%}" if isinstance(x, (int, float)) else "-")
    console.print(_kv_table("dataset" if report["kind"] == "dataset" else "prepared dataset", [
        ("source", f"{' + '.join(d['source']) if isinstance(d['source'], list) else d['source']} "
                   f"({d['source_kind']})"), ("format / template", f"{d['format']} / {d['template']}"),
        *([("conversations", d["rendering"])] if d.get("rendering") else []),
        ("tokenizer", d["tokenizer"]), ("rows", f"{d['rows']} kept of {d['rows_read']} read"
                                        + (f" (dropped: {dropped})" if any(dropped.values()) else "")),
        ("tokens", f"{d['tokens']:,} ({d['loss_tokens']:,} in the loss, {share(d['loss_token_share'])})"
         if d.get("tokens") is not None else None),
        ("length p50 / p90 / p95 / p99 / max", " / ".join(str(length.get(k, "-")) for k in
                                                        ("p50", "p90", "p95", "p99", "max"))),
        ("truncated at seq length", f"{d['truncated']} ({share(d['truncated_share'])}) at {d['seq_length']}"),
        ("EOS trained once", d.get("eos_trained_once")),
        ("padding (in order / length-grouped)",
         f"{share(padding.get('in_order'))} / {share(padding.get('length_grouped'))}" if padding else None),
        ("prepared folder", d["prepared_folder"]),
        *_mixture_rows(d.get("sources")),
    ]))
    example = report.get("example")
    if example is None:
        if report.get("example_note"):
            console.print(report["example_note"])
        return
    console.print(f"[bold]example {example['index']}[/] ({example.get('where', '')}): {example['tokens']} tokens, "
                  f"{example['loss_tokens']} in the "
                  "loss ([bold green]green[/] = in the loss, [dim]dim[/] = masked)")
    text = Text()
    for piece in example["pieces"]:
        text.append(piece["text"], style="bold green" if piece["loss"] else "dim")
    console.print(text)


def _render_pairs(report: dict[str, Any]) -> None:
    """Preference pairs: statistics, then one pair: the prompt (masked) and each answer (in the loss)."""
    from rich.text import Text

    from ftcli.console import console

    d = report["pairs"]
    console.print(_kv_table("preference pairs", [
        ("source", f"{d['source']} ({d['source_kind']})"), ("format / template", f"{d['format']} / {d['template']}"),
        ("tokenizer", d["tokenizer"]), ("pairs", f"{d['rows_kept']} kept of {d['rows_read']} read"
                                        + (f" (dropped: {d['dropped']})" if any((d["dropped"] or {}).values()) else "")),
        ("tokens", f"{d['tokens']:,} ({d['loss_tokens']:,} answer tokens in the loss)"),
        ("truncated", f"{d['prompt_truncated']} prompts at --max-prompt-length {d['max_prompt_length']}; "
                      f"{d['chosen_truncated']} chosen, {d['rejected_truncated']} rejected at --seq-length "
                      f"{d['seq_length']}; {d['cut_differently']} pairs cut differently"),
        ("EOS trained once (both answers)", d["eos_trained_once"]), ("prepared folder", d["prepared_folder"]),
    ]))
    example = report.get("example")
    if example is None:
        if report.get("example_note"):
            console.print(report["example_note"])
        return
    for side in ("chosen", "rejected"):
        pieces = example[side]
        console.print(f"[bold]pair {example['index']}, {side}[/] ({example.get('where', '')}): {len(pieces)} tokens, "
                      f"{sum(1 for p in pieces if p['loss'])} in the loss ([bold green]green[/] = in the loss, "
                      "[dim]dim[/] = masked prompt)")
        text = Text()
        for piece in pieces:
            text.append(piece["text"], style="bold green" if piece["loss"] else "dim")
        console.print(text)


def _mixture_rows(sources: list[dict[str, Any]] | None) -> list[tuple[str, Any]]:
    """One row per source of a mixture: weight (share), format / template, examples used of those prepared."""
    return [(f"mixture: {s['ref']}", f"weight {s['weight']:g} ({s['share']:.1%}), {s['format']} / {s['template']}, "
                                     f"{s['rows_used']:,} of {s['rows_available']:,} examples, {s['tokens']:,} tokens")
            for s in sources or []]
