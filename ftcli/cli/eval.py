"""`ftcli eval TARGET`: the eval loss and perplexity of a model, adapter, run or exported folder.

    $ ftcli eval runs/lora-1                                   # the run's own eval set, as the run scored it
    $ ftcli eval runs/lora-1 --dataset dev.jsonl --compare-base
    $ ftcli eval builtin:tiny-llama --dataset builtin:alpaca-sample --json
    $ ftcli eval runs/grpo-1 --reward rewards.py:correct --dataset held.jsonl   # mean reward, tuned vs base

Registered in ftcli/cli/__init__.py; the work happens in ftcli/evaluation/run.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ftcli.cli.common import DATA, MODEL, parse_columns, run_guarded, with_default

SCORING = "Scoring"
REWARDS = "Rewards (prompts data: sampled completions scored)"


def evaluate(
    target: Annotated[str, typer.Argument(
        help="A model (hub id, folder, builtin:tiny-llama), a LoRA adapter folder, a run folder (its base, method, "
             "template and loss mask come from its manifest) or an exported folder.", show_default=False)],
    dataset: Annotated[Optional[list[str]], typer.Option(
        help=with_default("The data to score: anything `train --dataset` accepts (once); preference pairs "
                          "(chosen/rejected) are scored with DPO's loss and rewards.",
                          default="a run folder's own eval set"), rich_help_panel=DATA)] = None,
    dataset_split: Annotated[Optional[str], typer.Option(
        help=with_default("Split of a hub dataset.", default="the run's, else train"), rich_help_panel=DATA)] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help=with_default("auto | alpaca | prompt-completion | chat | sharegpt | text.",
                                      default="the run's, else auto"), rich_help_panel=DATA)] = None,
    template: Annotated[Optional[str], typer.Option(
        help=with_default("auto | alpaca | model | path to a Jinja file.", default="the run's, else auto"),
        rich_help_panel=DATA)] = None,
    columns: Annotated[Optional[str], typer.Option(
        help="Map the format's fields to your column names, e.g. instruction=question,output=answer.",
        rich_help_panel=DATA)] = None,
    train_on_inputs: Annotated[Optional[bool], typer.Option(
        "--train-on-inputs/--no-train-on-inputs",
        help=with_default("Score the prompt tokens too.", default="the run's, else off"), rich_help_panel=DATA)] = None,
    seq_length: Annotated[Optional[int], typer.Option(
        help=with_default("Tokens per example (longer ones are truncated).", default="the run's, else 2048"),
        rich_help_panel=DATA, min=8)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help=with_default("Examples per forward pass (the loss does not depend on it).",
                          default="the run's eval batch size, else 8"), rich_help_panel=SCORING, min=1)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help=with_default("auto | float32 | float16 | bfloat16.", default="the run's, else auto"),
        rich_help_panel=MODEL)] = None,
    device: Annotated[Optional[str], typer.Option(
        help=with_default("auto | cpu | cuda | cuda:N.", default="the run's, else auto"), rich_help_panel=MODEL)] = None,
    compare_base: Annotated[bool, typer.Option(
        "--compare-base", help="Also score the base model (before fine-tuning) on the same data.",
        rich_help_panel=SCORING)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.",
                                              rich_help_panel=SCORING)] = False,
    reward: Annotated[Optional[list[str]], typer.Option(
        "--reward", metavar="FILE.py:FN|builtin:NAME",
        help="Score sampled completions of --dataset's prompts with this reward (repeatable; as train's, or "
             "model:RUN for a reward model), for TARGET and its base.", rich_help_panel=REWARDS)] = None,
    reward_weights: Annotated[Optional[str], typer.Option(
        metavar="W[,W]", help=with_default("One weight per --reward.", default="1 each"),
        rich_help_panel=REWARDS)] = None,
    samples: Annotated[Optional[int], typer.Option(
        help=with_default("Completions sampled per prompt.", default="4"), rich_help_panel=REWARDS, min=1)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help=with_default("Most new tokens per completion.", default="the run's --max-completion-length, else 256"),
        rich_help_panel=REWARDS, min=1)] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=with_default("Sampling temperature.", default="the run's, else 1"), rich_help_panel=REWARDS)] = None,
    seed: Annotated[int, typer.Option(help=with_default("Sampling seed (the same for TARGET and its base).",
                                                        default="0"), rich_help_panel=REWARDS)] = 0,
) -> None:
    """Score TARGET on held-out data: loss (token-weighted, as `train` computes it), perplexity, examples and
    tokens scored; --compare-base shows the base model beside it."""

    def go() -> None:
        import sys

        from ftcli.preflight import check_local_data, refuse_missing_path

        refuse_missing_path(target, "TARGET")  # before the imports, and before a hub lookup
        for source in dataset or []:
            check_local_data(source, "--dataset")
        from ftcli.console import console
        from ftcli.errors import ConfigError, RunFailed
        from ftcli.evaluation.run import EvalOptions, json_report, non_finite, print_report

        if dataset and len(dataset) > 1:
            raise ConfigError(f"--dataset given {len(dataset)} times ({', '.join(dataset)}); eval scores one dataset",
                              hint="pass --dataset once (merge the files into one, or a folder of them), or run eval "
                                   "once per dataset")
        if reward:
            return score_rewards(target, dataset, dict(reward=reward, reward_weights=reward_weights, samples=samples,
                                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                                       seed=seed, columns=columns, dataset_split=dataset_split,
                                                       dtype=dtype, device=device, json_output=json_output))
        options = EvalOptions(target=target, dataset=dataset[0] if dataset else None, dataset_split=dataset_split,
                              format=format,
                              template=template, columns=parse_columns(columns) if columns else None,
                              train_on_inputs=train_on_inputs, seq_length=seq_length, batch_size=batch_size,
                              dtype=dtype, device=device, compare_base=compare_base)
        if not json_output:
            report = run(options)
            print_report(report)
        else:
            # With --json, stdout carries the JSON object alone.
            console.quiet = True
            try:
                report = run(options)
            finally:
                console.quiet = False
            sys.stdout.write(json_report(report) + "\n")
        bad = non_finite(report)
        if any(name.endswith("loss") for name in bad):  # a score that is no score: never exit 0 with it
            raise RunFailed(f"the eval loss of {target} is not finite ({', '.join(bad)}: NaN or infinity)",
                            hint="the model's weights or outputs hold NaN or infinity (check the model, e.g. with "
                                 "--dtype float32); the JSON report has null for them")

    def run(options: Any) -> dict:
        from ftcli.evaluation.run import run_eval
        from ftcli.models import without_bitsandbytes
        from ftcli.targets import target_uses_bitsandbytes

        with without_bitsandbytes(not target_uses_bitsandbytes(target)):
            return run_eval(options)

    from ftcli.system import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM / SIGHUP end it like Ctrl-C: one line, exit 130, what was done kept
        run_guarded(go)


def score_rewards(target: str, data: list[str] | None, v: dict[str, Any]) -> None:
    """`--reward`: sampled completions of the prompts scored, TARGET beside its base (ftcli/evaluation/rewards.py)."""
    import sys

    from ftcli.console import console
    from ftcli.errors import ConfigError
    from ftcli.evaluation.rewards import RewardEvalOptions, print_reward_report, run_reward_eval

    if not data or len(data) > 1:
        raise ConfigError("--reward scores completions sampled from --dataset's prompts: pass --dataset once",
                          hint="e.g. --dataset held-out-prompts.jsonl")
    temperature = v["temperature"]
    if temperature is not None and temperature <= 0:
        raise ConfigError(f"--temperature {temperature:g}: sampling needs a temperature above 0",
                          hint="e.g. --temperature 1")
    from ftcli.objectives.options import parse_weights

    try:
        weights = parse_weights(v["reward_weights"]) if v["reward_weights"] else None
    except ValueError as exc:
        raise ConfigError(str(exc), hint="one number per --reward, in their order") from None
    options = RewardEvalOptions(target=target, dataset=data[0], rewards=list(v["reward"]), weights=weights,
                                samples=v["samples"], max_new_tokens=v["max_new_tokens"], temperature=v["temperature"],
                                seed=v["seed"], columns=parse_columns(v["columns"]) if v["columns"] else None,
                                dataset_split=v["dataset_split"], dtype=v["dtype"], device=v["device"])
    console.quiet = v["json_output"]
    try:
        report = run_reward_eval(options)
    finally:
        console.quiet = False
    if v["json_output"]:
        from ftcli.evaluation.run import json_report

        sys.stdout.write(json_report(report) + "\n")
    else:
        print_reward_report(report)


command = evaluate
