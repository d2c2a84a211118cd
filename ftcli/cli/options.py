"""`train`'s option set (shared by train, prepare and warmup) and the defaults shown in every help text.

    >>> from ftcli.cli.options import with_train_options, run_config_from_flags
    >>> command = with_train_options(warmup)   # a Typer command with exactly `train`'s flags

Command modules reach these through ftcli.cli.common, which re-exports them. Help texts show each
option's default, generated from the config and the methods' declared defaults; a `[default: ...]`
note is escaped, or Rich would read it as markup and drop it.
"""

import copy
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.markup import escape

from ftcli.config import METHOD_DEFAULTS, RunConfig
from ftcli.methods import METHODS
from ftcli.methods.base import LLAMA_PROJECTIONS, PER_METHOD_OPTIONS
from ftcli.objectives import OBJECTIVES
from ftcli.objectives.dpo import DPO_LOSSES
from ftcli.objectives.grpo import ADAPTER_LEARNING_RATE, FULL_LEARNING_RATE, GRPO_LOSSES, VLLM_MODES

DATA = "Data"
MODEL = "Model"
TRAIN = "Training"
LORA = "LoRA"
OUTPUT = "Output"
DIST = "Processes and machines"
EVAL = "Evaluation"
RECIPE = "Optimizer and schedule"
PREFERENCE = "Preference tuning (--objective dpo, kto, orpo, simpo)"
RL = "Online RL (--objective grpo)"


# ---- defaults in help texts -------------------------------------------------------------------------


def format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        if tuple(value) == LLAMA_PROJECTIONS:
            return "the seven Llama projections"
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def default_text(key: str) -> str:
    """`8 full/qlora, 4 lora/fsdp` for a per-method option, else RunConfig's own default."""
    if key in PER_METHOD_OPTIONS:
        groups: dict[str, list[str]] = {}
        for method, defaults in METHOD_DEFAULTS.items():
            groups.setdefault(format_default(defaults[key]), []).append(method)
        if len(groups) == 1:
            return next(iter(groups))
        return ", ".join(f"{value} {'/'.join(methods)}" for value, methods in groups.items())
    return format_default(RunConfig.model_fields[key].default)


def with_default(text: str, key: str | None = None, default: str | None = None) -> str:
    """`text [default: ...]`, the note escaped so that Rich prints it instead of reading it as markup."""
    note = default if default is not None else default_text(key or "")
    return f"{text} {escape(f'[default: {note}]')}"


def rate(value: float) -> str:
    """1e-06 -> `1e-6`."""
    return f"{value:.0e}".replace("e-0", "e-")


def method_help() -> str:
    listing = "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
    return with_default(f"{' | '.join(METHODS)}. {listing}.", "method")


def objective_help() -> str:
    listing = "; ".join(f"{name}: {o.summary}" for name, o in OBJECTIVES.items())
    return with_default(f"{' | '.join(OBJECTIVES)}. {listing}.", "objective")


# ---- train's options (shared by train, prepare, warmup) ---------------------------------------------


def train_options(
    method: Annotated[Optional[str], typer.Option(help=method_help(), rich_help_panel=TRAIN)] = None,
    # Eager: read before --help, which then describes that objective's own options (ftcli/cli/helpformat.py).
    objective: Annotated[Optional[str], typer.Option(help=objective_help(), rich_help_panel=TRAIN,
                                                     is_eager=True)] = None,
    model: Annotated[Optional[str], typer.Option(
        help=with_default("Hub id, local folder, builtin:tiny-llama, or a finished run folder / adapter folder to "
                          "continue from (e.g. an SFT run for DPO).", "model"), rich_help_panel=MODEL)] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of the model.",
                                                    rich_help_panel=MODEL)] = None,
    trust_remote_code: Annotated[Optional[bool], typer.Option(
        "--trust-remote-code", help=with_default("Run code shipped with the model.", "trust_remote_code"),
        rich_help_panel=MODEL)] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help=with_default("auto | float32 | float16 | bfloat16. auto: bfloat16 on CUDA, float32 on CPU.", "dtype"),
        rich_help_panel=MODEL)] = None,
    device: Annotated[Optional[str], typer.Option(help=with_default("auto | cpu | cuda | cuda:N.", "device"),
                                                  rich_help_panel=MODEL)] = None,
    attn_implementation: Annotated[Optional[str], typer.Option(
        help=with_default("auto | sdpa | eager | flash_attention_2. auto: FlashAttention 2 when installed on CUDA, "
                          "else SDPA.", "attn_implementation"), rich_help_panel=MODEL)] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(
        metavar="SOURCE[:WEIGHT]",
        help=with_default("Hub id, local .jsonl/.json/.csv/.parquet/.txt file, folder, glob, builtin:alpaca-sample "
                          "or a prepared folder. Repeat it for a mixture, each source with an optional weight "
                          "after its last colon (a.jsonl --dataset b.jsonl:0.25): the mixture's proportions.",
                          "dataset"), rich_help_panel=DATA)] = None,
    dataset_split: Annotated[Optional[str], typer.Option(help=with_default("Split of a hub dataset.", "dataset_split"),
                                                         rich_help_panel=DATA)] = None,
    dataset_size: Annotated[Optional[str], typer.Option(
        metavar="N|all", help=with_default("Use the first N rows (or all), then shuffle with --seed. Of a mixture: its "
                                           "number of examples (all: the most that repeat no source).",
                                           default="all"), rich_help_panel=DATA)] = None,
    dataset_revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of the dataset.",
                                                            rich_help_panel=DATA)] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help=with_default("auto | alpaca | prompt-completion | chat | sharegpt | text. auto: detected "
                                      "from the columns.", "format"), rich_help_panel=DATA)] = None,
    columns: Annotated[Optional[str], typer.Option(
        help="Map the format's fields to your column names, e.g. instruction=question,output=answer.",
        rich_help_panel=DATA)] = None,
    template: Annotated[Optional[str], typer.Option(
        help=with_default("auto | alpaca | model (the model's chat template) | path to a Jinja file. auto: Alpaca "
                          "template for Alpaca data, the model's chat template for chat data.", "template"),
        rich_help_panel=DATA)] = None,
    tools: Annotated[Optional[str], typer.Option(
        metavar="FILE.json", help="Tool schemas (a JSON list) for every conversation without a tools column of its own; "
        "recorded in the run and rendered by generate and chat too.", rich_help_panel=DATA)] = None,
    template_kwargs: Annotated[Optional[str], typer.Option(
        metavar="KEY=VALUE,...", help="Switches handed to the chat template on every rendering, in training and "
        "later in generate, chat, eval and export, e.g. enable_thinking=false.", rich_help_panel=DATA)] = None,
    train_reasoning: Annotated[Optional[bool], typer.Option(
        "--train-reasoning/--no-train-reasoning", help=with_default(
            "Train the reasoning inside <think>...</think> of assistant turns (off: masked, the answer after it "
            "and the tags still trained).", default="on"), rich_help_panel=DATA)] = None,
    train_on_inputs: Annotated[Optional[bool], typer.Option(
        "--train-on-inputs", help=with_default("Put the prompt in the loss too (the reference scripts' behaviour).",
                                               default="off: only the response and its EOS"),
        rich_help_panel=DATA)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=with_default("Per-device batch size.", "batch_size"),
                                                      rich_help_panel=TRAIN)] = None,
    seq_length: Annotated[Optional[int], typer.Option(help=with_default("Maximum tokens per example.", "seq_length"),
                                                      rich_help_panel=TRAIN)] = None,
    num_epochs: Annotated[Optional[float], typer.Option(help=with_default("Epochs.", "num_epochs"),
                                                        rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help=with_default("Stop after N optimizer steps (overrides epochs).", default="none: --num-epochs"),
        rich_help_panel=TRAIN)] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option(
        help=with_default("Micro-batches per optimizer step.", "gradient_accumulation_steps"),
        rich_help_panel=TRAIN)] = None,
    learning_rate: Annotated[Optional[float], typer.Option(
        "--learning-rate", "--lr", help=with_default("Peak learning rate.", "learning_rate"),
        rich_help_panel=TRAIN)] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help=with_default("Recompute activations to save memory.", "gradient_checkpointing"),
        rich_help_panel=TRAIN)] = None,
    seed: Annotated[Optional[int], typer.Option(help=with_default("Seed for shuffling and training.", "seed"),
                                                rich_help_panel=TRAIN)] = None,
    optim: Annotated[Optional[str], typer.Option(
        help=with_default("Any optimizer of the installed transformers: adamw_torch, adamw_torch_fused, adamw_8bit, "
                          "paged_adamw_8bit (CUDA), adafactor, sgd, ... auto: adamw_torch_fused (CPU and CUDA; "
                          "adamw_torch with fsdp or --compile).", "optim"), rich_help_panel=RECIPE)] = None,
    lr_scheduler: Annotated[Optional[str], typer.Option(
        help=with_default("linear | cosine | cosine_with_min_lr | constant | constant_with_warmup | "
                          "warmup_stable_decay.", "lr_scheduler"), rich_help_panel=RECIPE)] = None,
    warmup_ratio: Annotated[Optional[float], typer.Option(
        help=with_default("Linear warmup over this fraction of the optimizer steps (rounded up).", "warmup_ratio"),
        rich_help_panel=RECIPE)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(
        help=with_default("Linear warmup over N optimizer steps (instead of --warmup-ratio).", "warmup_steps"),
        rich_help_panel=RECIPE)] = None,
    min_lr_ratio: Annotated[Optional[float], typer.Option(
        help=with_default("The learning rate the decay ends at, as a fraction of the peak (cosine_with_min_lr, "
                          "warmup_stable_decay).", default="0.1 cosine_with_min_lr, 0 warmup_stable_decay"),
        rich_help_panel=RECIPE)] = None,
    decay_ratio: Annotated[Optional[float], typer.Option(
        help=with_default("warmup_stable_decay: the fraction of the optimizer steps that decays (cosine), after "
                          "the warmup and the stable phase.", "decay_ratio"), rich_help_panel=RECIPE)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(
        help=with_default("Decoupled weight decay (not on biases and norms).", "weight_decay"),
        rich_help_panel=RECIPE)] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(
        help=with_default("Clip the gradients to this norm (0: no clipping).", "max_grad_norm"),
        rich_help_panel=RECIPE)] = None,
    adam_beta1: Annotated[Optional[float], typer.Option(help=with_default("Adam's beta1.", "adam_beta1"),
                                                        rich_help_panel=RECIPE)] = None,
    adam_beta2: Annotated[Optional[float], typer.Option(help=with_default("Adam's beta2.", "adam_beta2"),
                                                        rich_help_panel=RECIPE)] = None,
    adam_epsilon: Annotated[Optional[float], typer.Option(help=with_default("Adam's epsilon.", "adam_epsilon"),
                                                          rich_help_panel=RECIPE)] = None,
    neftune_noise_alpha: Annotated[Optional[float], typer.Option(
        help=with_default("NEFTune: noise of this scale on the input embeddings while training.", default="off"),
        rich_help_panel=RECIPE)] = None,
    group_by_length: Annotated[Optional[bool], typer.Option(
        "--group-by-length/--no-group-by-length",
        help=with_default("Batch examples of similar length together (less padding; --objective dpo batches its "
                          "pairs in random order; full fine-tuning ends with a higher loss grouped).",
                          default="on for lora/qlora/fsdp, off for full"),
        rich_help_panel=TRAIN)] = None,
    padding_free: Annotated[Optional[bool], typer.Option(
        "--padding-free/--no-padding-free", help=with_default(
            "Concatenate each batch into one padding-free row.", default="on with flash_attention_2, else off"),
        rich_help_panel=TRAIN)] = None,
    packing: Annotated[Optional[bool], typer.Option(
        "--packing/--no-packing",
        help=with_default("Pack several examples into each --seq-length row (no cross-attention).", "packing"),
        rich_help_panel=TRAIN)] = None,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile", help=with_default("torch.compile the model (compiles during the first steps; no throw-away "
                                       "training).", "compile"), rich_help_panel=TRAIN)] = None,
    liger: Annotated[Optional[bool], typer.Option("--liger/--no-liger", help=with_default(
        "Liger's fused kernels (CUDA; never on CPU).", default="on for CUDA without --compile, when installed"),
        rich_help_panel=TRAIN)] = None,
    eval_dataset: Annotated[Optional[str], typer.Option(
        help="Held-out eval set: anything --dataset accepts, rendered with the same format, template and loss mask.",
        rich_help_panel=EVAL)] = None,
    eval_split: Annotated[Optional[str], typer.Option(
        metavar="F|N", help="Hold out a fraction F (0.1) or N rows (50) of --dataset as the eval set, chosen with "
        "--seed and never trained on.", rich_help_panel=EVAL)] = None,
    eval_steps: Annotated[Optional[int], typer.Option(
        help=with_default("Evaluate every N optimizer steps (and at step 0 and the end of the run).",
                          default="the end of each epoch"), rich_help_panel=EVAL)] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option(
        help=with_default("Examples per eval forward pass (the loss does not depend on it).", default="--batch-size"),
        rich_help_panel=EVAL)] = None,
    early_stopping_patience: Annotated[Optional[int], typer.Option(
        help=with_default("Stop when the eval loss has not improved for N evaluations.", default="off"),
        rich_help_panel=EVAL)] = None,
    early_stopping_threshold: Annotated[Optional[float], typer.Option(
        help=with_default("The least fall of the eval loss that counts as an improvement.",
                          "early_stopping_threshold"), rich_help_panel=EVAL)] = None,
    load_best: Annotated[Optional[bool], typer.Option(
        "--load-best", help=with_default("The run folder's final model is the one with the best eval loss "
                                         "(a checkpoint is saved at each new best).", "load_best"),
        rich_help_panel=EVAL)] = None,
    dpo_beta: Annotated[Optional[float], typer.Option(
        help=with_default("DPO's beta: how far the policy may move from the reference.", "dpo_beta"),
        rich_help_panel=PREFERENCE)] = None,
    dpo_loss: Annotated[Optional[str], typer.Option(
        help=with_default(f"{' | '.join(DPO_LOSSES)} (TRL's DPO losses).", "dpo_loss"),
        rich_help_panel=PREFERENCE)] = None,
    max_prompt_length: Annotated[Optional[int], typer.Option(
        help=with_default("Cut longer prompts to N tokens (keeping their start); the answers get the rest of "
                          "--seq-length.", default="half of --seq-length"), rich_help_panel=PREFERENCE)] = None,
    precompute_ref: Annotated[Optional[bool], typer.Option(
        "--precompute-ref", help=with_default("full: compute the reference log-probs once before training (cached "
                                              "with the data) instead of keeping a frozen copy of the model.",
                                              "precompute_ref"), rich_help_panel=PREFERENCE)] = None,
    kto_beta: Annotated[Optional[float], typer.Option(
        help=with_default("KTO's beta: how far the policy may move from the reference.", "kto_beta"),
        rich_help_panel=PREFERENCE)] = None,
    kto_desirable_weight: Annotated[Optional[float], typer.Option(
        help=with_default("KTO: the weight of the desirable rows' loss.", default="balanced for the counts"),
        rich_help_panel=PREFERENCE)] = None,
    kto_undesirable_weight: Annotated[Optional[float], typer.Option(
        help=with_default("KTO: the weight of the undesirable rows' loss.", default="balanced for the counts"),
        rich_help_panel=PREFERENCE)] = None,
    orpo_beta: Annotated[Optional[float], typer.Option(
        help=with_default("ORPO's lambda: the weight of the odds-ratio term next to the SFT loss.", "orpo_beta"),
        rich_help_panel=PREFERENCE)] = None,
    simpo_beta: Annotated[Optional[float], typer.Option(
        help=with_default("SimPO's beta: the scale of the length-normalised reward.", "simpo_beta"),
        rich_help_panel=PREFERENCE)] = None,
    simpo_gamma: Annotated[Optional[float], typer.Option(
        help=with_default("SimPO's gamma: the reward margin the chosen answer must win by.", "simpo_gamma"),
        rich_help_panel=PREFERENCE)] = None,
    cpo_alpha: Annotated[Optional[float], typer.Option(
        help=with_default("SimPO: the weight of an SFT loss on the chosen answer (CPO-SimPO; 0: pure SimPO).",
                          "cpo_alpha"), rich_help_panel=PREFERENCE)] = None,
    reward: Annotated[Optional[list[str]], typer.Option(
        "--reward", metavar="FILE.py:FN|builtin:NAME",
        help="A reward function (repeatable): FILE.py:function, or builtin:exact-match, normalized-match, "
             "math-match, format=REGEX, length-penalty=N (docs/grpo.md).", rich_help_panel=RL)] = None,
    reward_model: Annotated[Optional[list[str]], typer.Option(
        "--reward-model", metavar="RUN",
        help="A reward model as a reward (repeatable): the run, adapter or export of an `--objective reward` "
             "run, scoring each completion after its prompt.", rich_help_panel=RL)] = None,
    reward_weights: Annotated[Optional[str], typer.Option(
        metavar="W[,W]", help=with_default("One weight per --reward, then per --reward-model, in their order.",
                                           default="1 each"),
        rich_help_panel=RL)] = None,
    num_generations: Annotated[Optional[int], typer.Option(
        help=with_default("Completions sampled per prompt (one group). GRPO's own defaults: --batch-size this, "
                          f"--learning-rate {rate(FULL_LEARNING_RATE)} full, {rate(ADAPTER_LEARNING_RATE)} lora/qlora.",
                          "num_generations"),
        rich_help_panel=RL)] = None,
    max_completion_length: Annotated[Optional[int], typer.Option(
        help=with_default("Most new tokens per completion.", "max_completion_length"), rich_help_panel=RL)] = None,
    temperature: Annotated[Optional[float], typer.Option(
        help=with_default("Sampling temperature of the completions.", "temperature"), rich_help_panel=RL)] = None,
    grpo_beta: Annotated[Optional[float], typer.Option(
        help=with_default("KL coefficient (0: no reference model).", "grpo_beta"), rich_help_panel=RL)] = None,
    grpo_loss: Annotated[Optional[str], typer.Option(
        help=with_default(f"{' | '.join(GRPO_LOSSES)} (TRL's GRPO losses).", "grpo_loss"), rich_help_panel=RL)] = None,
    vllm: Annotated[Optional[str], typer.Option(
        help=with_default(f"Generate with vLLM: {' | '.join(VLLM_MODES)} (CUDA, vllm installed).",
                          default="transformers"), rich_help_panel=RL)] = None,
    completions_every: Annotated[Optional[int], typer.Option(
        help=with_default("Append a sample of completions to completions.jsonl every N steps.", "completions_every"),
        rich_help_panel=RL)] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help=with_default("LoRA rank r.", "lora_rank"),
                                                     rich_help_panel=LORA)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help=with_default("LoRA alpha.", "lora_alpha"),
                                                        rich_help_panel=LORA)] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help=with_default("LoRA dropout.", "lora_dropout"),
                                                          rich_help_panel=LORA)] = None,
    lora_target_modules: Annotated[Optional[str], typer.Option(
        help=with_default("Comma-separated module names, or all-linear.", "lora_target_modules"),
        rich_help_panel=LORA)] = None,
    use_dora: Annotated[Optional[bool], typer.Option(
        "--use-dora/--no-use-dora", help=with_default("DoRA: a trained magnitude per output row on top of the LoRA "
                                                      "direction update (export merges it).", "use_dora"),
        rich_help_panel=LORA)] = None,
    use_rslora: Annotated[Optional[bool], typer.Option(
        "--use-rslora/--no-use-rslora", help=with_default("rsLoRA: scale the adapter by alpha/sqrt(r) instead of "
                                                          "alpha/r.", "use_rslora"), rich_help_panel=LORA)] = None,
    lora_init: Annotated[Optional[str], typer.Option(
        help=with_default("default (peft's: Kaiming-uniform A, zero B) | gaussian (A ~ N(0, 1/r), zero B) | pissa | "
                          "olora (lora/fsdp: start from the base's SVD / QR; saved as plain LoRA of rank 2r) | "
                          "loftq (qlora on CUDA: make up for the 4-bit rounding).", "lora_init"),
        rich_help_panel=LORA)] = None,
    lora_bias: Annotated[Optional[str], typer.Option(
        help=with_default("none | all (every bias of the model trains) | lora_only (the biases of the adapted "
                          "layers); export merges them.", "lora_bias"), rich_help_panel=LORA)] = None,
    full_parameters: Annotated[Optional[bool], typer.Option(
        "--full-parameters", help=with_default("fsdp: train every weight instead of LoRA adapters.",
                                               "full_parameters"), rich_help_panel=DIST)] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        help=with_default("Processes on this machine (one per GPU): data parallel for full/lora/qlora, "
                          "sharded for fsdp.", "nproc_per_node"),
        rich_help_panel=DIST)] = None,
    nnodes: Annotated[Optional[int], typer.Option(help=with_default("Number of machines.", "nnodes"),
                                                  rich_help_panel=DIST)] = None,
    node_rank: Annotated[Optional[int], typer.Option(
        help=with_default("Rank of this machine, 0..nnodes-1.", "node_rank"), rich_help_panel=DIST)] = None,
    master_addr: Annotated[Optional[str], typer.Option(help=with_default("Address of machine 0.", "master_addr"),
                                                       rich_help_panel=DIST)] = None,
    master_port: Annotated[Optional[int], typer.Option(help=with_default("Port on machine 0.", "master_port"),
                                                       rich_help_panel=DIST)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        help="host:port of a c10d rendezvous (instead of --master-addr/--master-port).",
        rich_help_panel=DIST)] = None,
    save_steps: Annotated[Optional[int], typer.Option(
        help=with_default("Save a checkpoint every N optimizer steps and at the end of each epoch.",
                          default="none; Ctrl-C / SIGTERM always save one"), rich_help_panel=OUTPUT)] = None,
    save_total_limit: Annotated[Optional[int], typer.Option(
        help=with_default("Keep at most N checkpoints (the newest complete one is never deleted).",
                          default="keep all"), rich_help_panel=OUTPUT)] = None,
    resume: Annotated[Optional[str], typer.Option(
        metavar="[PATH]",
        help="Resume from the latest complete checkpoint in --output-dir (bare `--resume`) or from PATH "
        "(a checkpoint-N folder or a run folder). Refused when the method, model, data, batch size, "
        "accumulation, seed, optimizer or schedule differ, unless --force.", rich_help_panel=OUTPUT)] = None,
    force: Annotated[Optional[bool], typer.Option(
        "--force", help="Resume even though the config differs from the checkpoint's.", rich_help_panel=OUTPUT)] = None,
    # str, not Path: Typer turns "" into Path(".") and the emptiness could no longer be refused.
    output_dir: Annotated[Optional[str], typer.Option(
        metavar="<path>",
        help=with_default("Run folder: model/adapter, tokenizer, manifest, logs.", default="runs/<method>-<time>"),
        rich_help_panel=OUTPUT)] = None,
    overwrite: Annotated[Optional[bool], typer.Option(
        "--overwrite", help="Replace a non-empty --output-dir that ftcli wrote.", rich_help_panel=OUTPUT)] = None,
    log_dir: Annotated[Optional[str], typer.Option(metavar="<path>",
                                                   help=with_default("TensorBoard folder.", default="<output-dir>/logs"),
                                                   rich_help_panel=OUTPUT)] = None,
    logging_steps: Annotated[Optional[int], typer.Option(help=with_default("Log every N steps.", "logging_steps"),
                                                         rich_help_panel=OUTPUT)] = None,
    report_to: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME[,NAME]", help=with_default("Experiment trackers: tensorboard, wandb, mlflow, trackio or none; "
                                                 "comma-separated or repeated. Their files go in the run folder.",
                                                 "report_to"), rich_help_panel=OUTPUT)] = None,
    run_name: Annotated[Optional[str], typer.Option(
        help=with_default("The run's name in the trackers.", default="the run folder's name"),
        rich_help_panel=OUTPUT)] = None,
    config: Annotated[Optional[str], typer.Option(
        "--config", metavar="<path>", help="YAML file with the same keys as these flags (snake_case); flags override it.",
        rich_help_panel=OUTPUT)] = None,
) -> None:
    """The option set of `train` (and of every command that takes train's options); never run itself."""


TRAIN_SIGNATURE = inspect.signature(train_options)


def with_train_options(body: Callable[[dict], Any], *extra: inspect.Parameter,
                       shown: frozenset[str] | None = None) -> Callable[..., Any]:
    """A command function with exactly `train`'s options (plus `extra`), calling `body(values)` with them.

    `values` maps each option name to what was given (None when not given); turn it into a
    RunConfig with `run_config_from_flags(values)`. The command's help is `body`'s docstring.
    With `shown`, the help lists only those of train's options: the others are still accepted (a
    whole `train` command line works) but do not crowd the help of a command that does not read them."""
    parameters = [p if shown is None or p.name in shown else hidden(p) for p in TRAIN_SIGNATURE.parameters.values()]
    return with_options(body, [*parameters, *extra])


def hidden(param: inspect.Parameter) -> inspect.Parameter:
    """`param` accepted as before, left out of the help."""
    return restyled(param, hidden=True)


def restyled(param: inspect.Parameter, **changes: Any) -> inspect.Parameter:
    """`param` with its typer.Option's `changes` (help, rich_help_panel, hidden, ...); train's own stays as it is."""
    info = copy.copy(param.annotation.__metadata__[0])
    for name, value in changes.items():
        setattr(info, name, value)
    return param.replace(annotation=Annotated[param.annotation.__origin__, info])


def with_options(body: Callable[[dict], Any], parameters: list[inspect.Parameter]) -> Callable[..., Any]:
    """A Typer command function taking `parameters` (arguments first), calling `body(values)` with them."""
    def command(**values: Any) -> Any:
        return body(values)

    signature = inspect.Signature(parameters)
    command.__signature__ = signature  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    command.__doc__ = body.__doc__
    command.__name__ = body.__name__
    return command


def run_config_from_flags(values: dict) -> RunConfig:
    """The `train` options as given (None = not given) + `--config` file -> a validated RunConfig."""
    from ftcli.config import build_run_config

    flags = {k: v for k, v in values.items() if k != "config" and v is not None}
    if not flags.get("dataset", True):
        del flags["dataset"]  # a repeatable option not given
    if "columns" in flags:
        flags["columns"] = parse_columns(flags["columns"])
    if "report_to" in flags:
        flags["report_to"] = ",".join(flags["report_to"])
        if not flags["report_to"]:
            del flags["report_to"]
    for name in ("reward", "reward_model"):
        if not flags.get(name, True):
            del flags[name]  # a repeatable option not given
    if "lora_target_modules" in flags:
        flags["lora_target_modules"] = [m.strip() for m in flags["lora_target_modules"].split(",") if m.strip()]
    config_file = values.get("config")
    if config_file is not None and not config_file.strip():
        from ftcli.errors import ConfigError

        raise ConfigError("--config is empty", hint="pass the path of a YAML run file (an unset shell variable gives \"\")")
    return build_run_config(flags, config_file=Path(config_file) if config_file else None)


def parse_columns(text: str) -> dict[str, str]:
    """`instruction=question,output=answer` -> {"instruction": "question", "output": "answer"} (the config's parser,
    so the flag and the YAML key read the same)."""
    from ftcli import config
    from ftcli.errors import ConfigError

    try:
        return config.parse_columns(text)
    except ValueError as exc:
        raise ConfigError(f"--columns: {exc}") from None
