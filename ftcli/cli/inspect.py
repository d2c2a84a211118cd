"""`ftcli inspect TARGET`: what a model, adapter, dataset or run is, before trusting it.

    $ ftcli inspect meta-llama/Llama-3.1-8B-Instruct --seq-length 4096 --gpu-memory 80GB
    $ ftcli inspect runs/lora-20250101-120000 --json

Registered in ftcli/cli/__init__.py; heavy imports stay in the body.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ftcli.cli.common import default_text, parse_columns, run_guarded, with_default

ESTIMATE = "Memory estimate (models)"
DATA = "Datasets (files, built-in samples, prepared folders)"


def inspect(
    target: Annotated[str, typer.Argument(
        help="A model (hub id, folder, builtin:tiny-llama), a LoRA adapter folder, a run folder, a prepared "
             "dataset folder or a dataset file (.json/.jsonl/.csv/.parquet/.txt).", show_default=False)],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(
        help=with_default("Per-device batch size.", default=default_text("batch_size")), rich_help_panel=ESTIMATE, min=1)] = None,
    seq_length: Annotated[int, typer.Option(help="Tokens per example.", rich_help_panel=ESTIMATE, min=1)] = 2048,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help=with_default("Recompute activations.", default=default_text("gradient_checkpointing")), rich_help_panel=ESTIMATE)] = None,
    nproc: Annotated[int, typer.Option(help="Processes (fsdp shards weights, gradients and optimizer state "
                                            "over them).", rich_help_panel=ESTIMATE, min=1)] = 1,
    gpu_memory: Annotated[Optional[str], typer.Option(
        help="GPU memory per process, e.g. 80GB: adds a fits / does not fit verdict.",
        rich_help_panel=ESTIMATE)] = None,
    dtype: Annotated[str, typer.Option(
        help="auto | float32 | float16 | bfloat16: the training dtype. auto: what train's --dtype auto picks on "
             "this machine (float32 on a CPU), or on a GPU with --gpu-memory (bfloat16).",
        rich_help_panel=ESTIMATE)] = "auto",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r for the adapter methods.", rich_help_panel=ESTIMATE,
                                           min=1)] = 8,
    objective: Annotated[Optional[str], typer.Option(
        help=with_default("sft | dpo | kto | orpo | simpo | reward | grpo. Models: the estimate counts the "
                          "objective's reference model (dpo, kto; grpo with --grpo-beta > 0), its sequences per "
                          "example, grpo's sampled completions; dataset files: read as pairs, labeled rows or "
                          "prompts.",
                          default="sft; a dataset file with chosen/rejected columns is read as pairs"),
        is_eager=True)] = None,  # read before --help, which then describes that objective's options
    precompute_ref: Annotated[bool, typer.Option(
        "--precompute-ref", help=with_default("dpo estimate: the full method's reference log-probs precomputed "
                                              "(no frozen copy).", default="off"), rich_help_panel=ESTIMATE)] = False,
    num_generations: Annotated[int, typer.Option(
        help="grpo estimate: completions per prompt (the default batch).", rich_help_panel=ESTIMATE, min=2)] = 8,
    grpo_beta: Annotated[float, typer.Option(
        help="grpo estimate: the KL coefficient (above 0: a reference model is held).", rich_help_panel=ESTIMATE,
        min=0)] = 0.0,
    example: Annotated[int, typer.Option(help="Which example to render (0 = the first).", min=0,
                                         rich_help_panel=DATA)] = 0,
    model: Annotated[str, typer.Option(help="Dataset files: the model whose tokenizer (and chat template) counts "
                                            "the tokens.", rich_help_panel=DATA)] = "builtin:tiny-llama",
    format: Annotated[Optional[str], typer.Option(
        "--format", help=with_default("Dataset files: auto | alpaca | prompt-completion | chat | sharegpt | text.", "format"),
        rich_help_panel=DATA)] = None,
    columns: Annotated[Optional[str], typer.Option(
        help="Dataset files: map the format's fields to your column names, e.g. instruction=question,output=answer.",
        rich_help_panel=DATA)] = None,
    template: Annotated[Optional[str], typer.Option(
        help=with_default("Dataset files: auto | alpaca | model | path to a Jinja file.", "template"),
        rich_help_panel=DATA)] = None,
    train_on_inputs: Annotated[Optional[bool], typer.Option(
        "--train-on-inputs", help="Dataset files: put the prompt in the loss too.", rich_help_panel=DATA)] = None,
) -> None:
    """Show what TARGET is: a model's shape and training-memory estimate, an adapter, a dataset or a run."""

    def go() -> None:
        import json
        import sys

        from ftcli.inspection.detect import InspectOptions, inspect_target
        from ftcli.inspection.render import render

        options = InspectOptions(batch_size=batch_size, seq_length=seq_length,
                                 gradient_checkpointing=gradient_checkpointing, nproc=nproc, gpu_memory=gpu_memory,
                                 dtype=dtype, lora_rank=lora_rank, example=example, model=model, format=format,
                                 columns=parse_columns(columns) if columns else None, template=template, train_on_inputs=train_on_inputs, objective=objective,
                                 precompute_ref=precompute_ref, num_generations=num_generations, grpo_beta=grpo_beta)
        if not json_output:
            render(inspect_target(target, options))
            return
        from ftcli.console import console

        # With --json, stdout carries the JSON object alone: progress lines (preparing data) stay silent.
        console.quiet = True
        try:
            report = inspect_target(target, options)
        finally:
            console.quiet = False
        sys.stdout.write(json.dumps(report, default=str) + "\n")

    run_guarded(go)


command = inspect
