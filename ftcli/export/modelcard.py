"""The record of an export (`ftcli_export.json`) and its model card (`README.md`), from the run manifest.

    >>> record = export_record(src, opts, "dequantized", "bfloat16", comparison, effect, files)
    >>> write_model_card(out / "README.md", src, record, title="my-model")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftcli import __version__
from ftcli.errors import ModelError
from ftcli.models import CAUSAL_HEAD

if TYPE_CHECKING:
    from ftcli.export.source import ExportOptions, ExportSource


def export_record(src: ExportSource, opts: ExportOptions, merge_into: str, dtype_name: str, comparison: Any,
                  effect: float | None, files: list[str]) -> dict[str, Any]:
    from ftcli.system import library_versions, utc_now

    manifest = src.manifest or {}
    return {
        "ftcli_version": __version__,
        "exported_at": utc_now(),
        "source": str(src.path.absolute()),
        "source_kind": "run" if src.manifest else "adapter",
        "method": src.method,
        "base_model": src.base if src.kind == "adapter" else (manifest.get("config", {}).get("model")),
        "merge_into": merge_into,
        "format": opts.format,
        "dtype": dtype_name,
        "max_shard_size": opts.max_shard_size,
        "verification": None if comparison is None else {
            "max_logit_difference": comparison.max_difference, "tolerance": comparison.tolerance,
            "tolerance_of": comparison.precision, "adapter_effect": effect, "passed": comparison.ok},
        "lora": _lora_shape(src),
        "run": {k: manifest.get(k) for k in ("config", "resolved", "data", "metrics", "versions", "command")}
        if manifest else None,
        "versions": library_versions(),
        "files": files,
    }


def _lora_shape(src: ExportSource) -> dict[str, Any] | None:
    ac = src.adapter_config
    if not ac:
        return None
    targets = ac.get("target_modules")
    # peft records every targeted module by its full path; the card names the layer kinds.
    targets = sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) else targets
    from ftcli.methods.variants import adapter_variant

    trained_init = ((src.manifest or {}).get("config") or {}).get("lora_init")
    return {"r": ac.get("r"), "alpha": ac.get("lora_alpha"), "dropout": ac.get("lora_dropout"),
            "target_modules": targets, "use_dora": bool(ac.get("use_dora")), "use_rslora": bool(ac.get("use_rslora")),
            "bias": ac.get("bias", "none"), "variant": adapter_variant(ac, trained_init) or "plain LoRA"}


def write_model_card(path: Path, src: ExportSource, record: dict[str, Any], title: str) -> None:
    """README.md: how the model was trained (from the run manifest) and how it was exported."""
    from ftcli.models import resolve_model_source

    base = record["base_model"] or ""
    try:
        hub_base = base and resolve_model_source(base).kind == "hub"
    except ModelError:
        hub_base = False
    tags = ["ftcli", src.method if src.method != "adapter" else "lora"] + (["merged"] if src.kind == "adapter" else [])
    scores = src.head != CAUSAL_HEAD  # a reward model: one score per sequence
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {'text-classification' if scores else 'text-generation'}"]
    if hub_base:
        front += [f"base_model: {base}", "base_model_relation: finetune"]
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    lines = [*front, f"# {title}", ""]
    lines += [f"Fine-tuned from `{base}` and exported as a standalone model with ftcli {__version__} "
              "(`ftcli export`). It loads with plain transformers; peft is not needed.", ""]
    lines += ["## Training", "", "| | |", "|---|---|", *_training_rows(src, record), ""]
    verification = record["verification"]
    if verification:
        vs = "base + adapter" if src.kind == "adapter" else "the run's probe logits"
        check = (f"largest logit difference vs {vs}: {verification['max_logit_difference']:.3g} "
                 f"(tolerance {verification['tolerance']:.3g})")
    else:
        check = "not run (--no-verify, or no probe to compare with)"
    merged = {"dequantized": "the dequantised 4-bit NF4 base weights the adapter was trained against",
              "original": "the base model's original weights", "none": "nothing to merge (full fine-tune, re-saved)"}
    lines += ["## Export", "", "| | |", "|---|---|",
              f"| adapter merged into | {merged[record['merge_into']]} |",
              f"| dtype | {record['dtype']} |",
              f"| max shard size | {record['max_shard_size']} |",
              f"| verification | {check} |",
              f"| exported | {record['exported_at']} with ftcli {__version__}, transformers "
              f"{record['versions'].get('transformers')}, peft {record['versions'].get('peft')} |", ""]
    if record.get("gguf"):
        lines += _gguf_lines(record["gguf"])
        path.write_text("\n".join(lines), encoding="utf-8")
        return
    auto = "AutoModelForSequenceClassification" if scores else "AutoModelForCausalLM"
    lines += ["## Use", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
              f"model = {auto}.from_pretrained(\"path/to/this/folder\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")", "```", ""]
    if scores:
        lines += ["A reward model: `model(input_ids).logits[:, 0]` is the score of each sequence (the prompt and an "
                  "answer, rendered as in training, ending with the EOS token), read at its last non-pad token.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _gguf_lines(gguf: dict[str, Any]) -> list[str]:
    """The card's GGUF section: the file, its checks with their figures, and how to run it."""
    read = gguf["reader_check"]
    errors = ", ".join(f"{k} {v:.2g}" for k, v in sorted(read["max_relative_value_error"].items()))
    llama = gguf["llama_cpp_check"]
    if isinstance(llama, dict):
        checked = (f"ids identical: {llama['ids_identical']}, largest relative logit difference "
                   f"{llama['max_relative_logit_difference']:.3g}, top-1 agreement {llama['min_top1_agreement']:.1%}, "
                   f"greedy continuation identical: {llama['greedy_identical']} ({llama['prompts']} prompts)")
    else:
        checked = f"llama.cpp was not run ({llama.removeprefix('not run: ')})"
    prompt = gguf["prompt"]
    pre = gguf.get("pre_tokenizer") or {}
    name = gguf["file"]
    return ["## GGUF", "", "| | |", "|---|---|", f"| file | `{name}` ({gguf['type']}) |",
            f"| converted by | {gguf['converter']} |",
            f"| pre-tokenizer | {pre.get('name')} (from {pre.get('from')}) |",
            f"| prompt format | {prompt['format']} data, template {prompt['template']}; EOS id {prompt['eos_id']}, "
            f"end-of-turn id {prompt['eot_id']}, BOS added: {prompt['add_bos']} |",
            f"| gguf reader check | {read['matched']} of {read['tensors']} tensors match the merged weights "
            f"(largest relative value error {errors}) |",
            f"| llama.cpp check | {checked} |", "",
            "## Use", "", "```sh", f"llama-cli -m {name} --jinja -cnv", f"llama-server -m {name} --jinja",
            "ollama create my-model -f Modelfile && ollama run my-model", "```", ""]


def _training_rows(src: ExportSource, record: dict[str, Any]) -> list[str]:
    run = record["run"]
    rows = []
    if run:
        config, metrics, data = run.get("config") or {}, run.get("metrics") or {}, run.get("data") or {}
        versions, resolved = run.get("versions") or {}, run.get("resolved") or {}
        rows += [f"| method | {config.get('method')} |", f"| base model | `{config.get('model')}` |",
                 f"| dataset | `{config.get('dataset')}` ({data.get('rows_used', '?')} examples, "
                 f"{data.get('tokens', '?')} tokens, {data.get('fingerprint', 'no fingerprint')}) |",
                 f"| steps | {metrics.get('steps')} (batch size {config.get('batch_size')}, gradient accumulation "
                 f"{config.get('gradient_accumulation_steps')}, sequence length {config.get('seq_length')}) |",
                 f"| learning rate | {config.get('learning_rate')} |",
                 f"| final train loss | {_fmt(metrics.get('train_loss'))} |",
                 f"| training precision | {resolved.get('dtype', config.get('dtype'))} on "
                 f"{resolved.get('device', '?')} ({resolved.get('processes', 1)} process(es)) |"]
        if len(resolved.get("chain") or []) > 2:  # base -> earlier runs -> this run (ftcli.chain)
            rows.append(f"| training chain | {' -> '.join(_chain_step(step) for step in resolved['chain'])} |")
        row = _objective_row(config, resolved)
        if row:
            rows.append(row)
        if run.get("command"):
            rows.append(f"| command | `{' '.join(map(str, run['command']))}` |")
        rows.append(f"| trained with | ftcli {versions.get('ftcli')}, transformers {versions.get('transformers')}, "
                    f"trl {versions.get('trl')}, peft {versions.get('peft')}, torch {versions.get('torch')} |")
    else:
        rows.append(f"| training record | none: `{src.path}` is an adapter folder without an ftcli run manifest |")
    lora = record["lora"]
    if lora:
        targets = lora["target_modules"]
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        rows.append(f"| LoRA | r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, targets: {targets} |")
        if lora.get("variant", "plain LoRA") != "plain LoRA":
            rows.append(f"| LoRA variant | {lora['variant']} |")
    return rows


def _objective_row(config: dict[str, Any], resolved: dict[str, Any]) -> str:
    """`| objective | dpo (dpo_beta 0.1, dpo_loss sigmoid; reference: adapter disabled) |` for an objective with
    options of its own (the preference objectives), else ""."""
    from ftcli.objectives import OBJECTIVES

    objective = OBJECTIVES.get(str(config.get("objective")))
    if objective is None or not objective.options:
        return ""
    options = ", ".join(f"{name} {config.get(name)}" for name in objective.options if config.get(name) is not None)
    reference = resolved.get("reference") or "none"
    return f"| objective | {objective.name} ({options}; reference: {reference}) |"


def _chain_step(step: dict[str, Any]) -> str:
    if "model" in step:
        return f"`{step['model']}`"
    if "run" in step:
        return f"`{step['run']}` ({step.get('method')} {step.get('objective')})"
    return f"`{step.get('adapter')}` (adapter)"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
