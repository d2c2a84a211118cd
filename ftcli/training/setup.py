"""Everything a run needs before its trainer: tokenizer, data, model and the method's plan.

    >>> from ftcli.training.setup import set_up
    >>> ready = set_up(config, "train")     # prints the data and model lines as it goes
    >>> ready.plan.model, ready.dataset, ready.device

Shared by `train` and `warmup` (and every later command that loads a model for training; with
`--eval-split` both get the training part only), so
both load the same tokenizer, data and model in the same order, with the seed set before the
method builds anything random.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

from ftcli.chain import load_start_model, resolve_start
from ftcli.console import console
from ftcli.training.recipe import check_recipe


@dataclass
class RunSetup:
    device: str
    torch_dtype: Any
    tokenizer: Any
    pad_policy: str
    dataset: Any
    report: Any  # ftcli.data.DataReport
    method: Any  # ftcli.methods.Method
    plan: Any  # ftcli.methods.MethodPlan
    eval_set: Any = None  # ftcli.data.split.EvalSet, when the run evaluates
    objective: Any = None  # ftcli.objectives.Objective


def quiet_libraries() -> None:
    """Keep the terminal for ftcli's own display: library progress bars and advice go quiet."""
    # Set before the libraries are imported: bitsandbytes warns about optional CPU kernels at import time.
    for name in ("bitsandbytes", "kernels", "torch.distributed", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*use_cache=True.*")
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="trl")


def set_up(config: Any, command: str) -> RunSetup:
    """Load what `config` describes, printing one line for the data and one for the model."""
    from ftcli.models import resolve_device

    # Before anything can start CUDA (importing bitsandbytes does): a one-process run narrows the visible GPUs.
    device = resolve_device(config.device)
    quiet_libraries()  # next: importing transformers pulls in peft -> bitsandbytes, which warns on import
    check_recipe(config, device)  # an optimizer or tracker that cannot run here: one line, before anything loads
    from transformers import set_seed

    from ftcli.data import load_datasets
    from ftcli.methods import METHODS
    from ftcli.objectives import OBJECTIVES
    from ftcli.models import apply_pad_policy, load_model_config, load_tokenizer, resolve_dtype

    torch_dtype = resolve_dtype(config.dtype, device)
    console.print(f"[bold]ftcli {command}[/] method={config.method} objective={config.objective} model={config.model} "
                  f"dataset={config.dataset}", soft_wrap=True)
    start = resolve_start(config.model)
    if start.continues:
        console.print(f"start: {' -> '.join(chain_names(start))} (the new training continues from the last)",
                      soft_wrap=True)
        from ftcli.data.templates import inherited_for

        inherited = inherited_for(config)
        if inherited is not None:
            console.print(f"template: {inherited.description}, as {inherited.run} was trained (pass --template "
                          "to choose another)", soft_wrap=True)
    model_config = load_model_config(start.base, revision=config.revision, trust_remote_code=config.trust_remote_code)
    context = getattr(model_config, "max_position_embeddings", None)
    if isinstance(context, int) and config.seq_length > context:
        console.print(f"[yellow]note:[/] --seq-length {config.seq_length} is beyond the model's context length "
                      f"({context} positions, max_position_embeddings): examples longer than that will not train "
                      f"well; a --seq-length of at most {context} fits the model", soft_wrap=True)
    tokenizer = load_tokenizer(start.base, revision=config.revision, trust_remote_code=config.trust_remote_code)
    pad_policy = apply_pad_policy(tokenizer)
    dataset, report, eval_set = load_datasets(config, tokenizer)
    print_data_lines(report, config)
    for note in OBJECTIVES[config.objective].notes(config):
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if eval_set is not None:
        console.print(f"eval: {eval_set.examples:,} examples, {eval_set.loss_tokens:,} loss tokens "
                      f"({eval_set.source})", soft_wrap=True)
    # Seed before the method builds anything random (LoRA's A matrices): the trainer seeds only later,
    # and an unseeded torch generator would make every LoRA run start from different adapters.
    set_seed(config.seed)
    method = METHODS[config.method]
    # A finished run or adapter as --model: its base with the earlier adapters merged in (ftcli.chain).
    model = load_start_model(start, dtype=config.dtype, device=device, attn_implementation=config.attn_implementation,
                             revision=config.revision, trust_remote_code=config.trust_remote_code,
                             **head_options(OBJECTIVES[config.objective], tokenizer),
                             **method.load_options(config, device))
    _refuse_nonfinite_start(model, config.model)
    plan = method.plan(config, model)
    console.print(f"model: {plan.total_parameters:,} parameters, {plan.trainable_parameters:,} trainable "
                  f"({config.method}, {str(torch_dtype).removeprefix('torch.')}, {device})")
    return RunSetup(device, torch_dtype, tokenizer, pad_policy, dataset, report, method, plan, eval_set,
                    OBJECTIVES[config.objective])


def head_options(objective: Any, tokenizer: Any) -> dict[str, Any]:
    """What loading needs of the objective's head: a classifier (a reward model) gets one score and the pad id."""
    from ftcli.models import CAUSAL_HEAD, classifier_pad_token_id

    if objective.head == CAUSAL_HEAD:
        return {}
    return {"head": objective.head, "pad_token_id": classifier_pad_token_id(tokenizer)}


def _refuse_nonfinite_start(model: Any, ref: str) -> None:
    """A start model that already holds NaN or inf fails at step 1 whatever the learning rate: say so at load."""
    from ftcli.errors import ModelError
    from ftcli.inspection.weights import nonfinite_parameter

    bad = nonfinite_parameter(model)
    if bad:
        raise ModelError(f"the start model {ref} holds non-finite weights (NaN or inf, e.g. in {bad}), so training "
                         "from it cannot work", hint="start from an intact model (a run that diverged saves NaN "
                         "weights; train it again, or --resume it from an earlier checkpoint)")


def chain_names(start: Any) -> list[str]:
    """`builtin:tiny-llama -> runs/sft-1 (lora sft)` pieces for the start line, the manifest and the model card."""
    names = []
    for step in start.chain:
        if "model" in step:
            names.append(str(step["model"]))
        elif "run" in step:
            names.append(f"{step['run']} ({step.get('method')} {step.get('objective')})")
        else:
            names.append(f"{step['adapter']} (adapter)")
    return names


def print_data_lines(report: Any, config: Any) -> None:
    """How many rows were read and used, the tokens, the truncation, and where the data came from."""
    selected = "all of them" if report.rows_selected >= report.rows_read else f"the first {report.rows_selected:,}"
    console.print(f"data: {report.rows_read:,} rows read, {selected} selected, {report.rows_used:,} examples used; "
                  f"{report.tokens:,} tokens ({report.loss_tokens:,} in the loss), {report.truncated} truncated at "
                  f"{config.seq_length}", soft_wrap=True)
    for s in report.sources:  # a mixture (ftcli.data.mixture): one line per source
        console.print(f"data: {s['ref']}: weight {s['weight']:g} ({s['share']:.1%}), {s['format']}/{s['template']}, "
                      f"{s['rows_read']:,} rows read, {s['rows_used']:,} of {s['rows_available']:,} examples used, "
                      f"{s['tokens']:,} tokens", soft_wrap=True)
    from ftcli.data.stats import rendering_note

    if report.stats.get("per_turn"):
        console.print(f"data: {rendering_note(report.stats, report.format)}", soft_wrap=True)
    if report.prepared:
        console.print(f"data: {'reusing prepared data from' if report.reused else 'prepared and cached in'} "
                      f"{report.prepared}", soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
