"""RunConfig: every choice of a training run in one validated object, saved in every run folder.

    >>> from ftcli.config import build_run_config
    >>> cfg = build_run_config({"method": "lora", "model": "builtin:tiny-llama"})
    >>> cfg.learning_rate, cfg.batch_size, cfg.lora_rank
    (0.0001, 4, 8)

Precedence, lowest first: the reference scripts' per-method defaults < the YAML file given with
`--config` < flags on the command line. Keys are the flag names in snake_case (`batch_size`);
kebab-case (`batch-size`) is accepted in YAML too, and values take the flags' forms as well
(`columns: instruction=question`, `lora_target_modules: q_proj,v_proj`). An unknown key is an
error that names the closest valid key; a key given twice (or in both spellings) is an error
naming both lines. Number options take finite numbers only (no `true`, `inf` or `nan`).
Importing this module must not import torch.
"""

from __future__ import annotations

import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from ftcli.data.specs import check_dataset, parse_columns, parse_template_kwargs, read_tools
from ftcli.errors import ConfigError
from ftcli.files import read_yaml_document
from ftcli.methods import METHODS
from ftcli.objectives import OBJECTIVE_OPTIONS, OBJECTIVES
from ftcli.objectives.options import ObjectiveOptions

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
# The options of the LoRA variants: each changes what the adapter computes (or where it starts).
LORA_VARIANT_FIELDS = ("use_dora", "use_rslora", "lora_init", "lora_bias")

# Each method's defaults of the options that depend on the method (the reference scripts'): declared
# by the method itself (ftcli/methods/), read here and nowhere else.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {name: dict(m.defaults) for name, m in METHODS.items()}
SEED_MAX = 2**32 - 1  # the one --seed range, 0..SEED_MAX (numpy's, seeded by set_seed): train, YAML, generate, chat


class RunConfig(ObjectiveOptions):
    """The resolved configuration of one `ftcli train` run (the objectives' own options: ObjectiveOptions)."""

    # allow_inf_nan=False: the backstop of `_strict_numbers` (inf and nan are never a valid setting).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    method: str = "full"  # a name in ftcli.methods.METHODS
    objective: str = "sft"  # a name in ftcli.objectives.OBJECTIVES
    model: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"

    # One source, or a mixture: several `SOURCE[:WEIGHT]` (see split_weight and ftcli.data.mixture).
    dataset: str | list[str] = "tatsu-lab/alpaca"
    dataset_split: str = "train"
    dataset_size: int | None = Field(default=None, ge=1)  # None (`all`): every row
    dataset_revision: str | None = None
    format: Literal["auto", "alpaca", "prompt-completion", "chat", "sharegpt", "text"] = "auto"
    columns: dict[str, str] | None = None  # the data's names for the format's fields, e.g. {"instruction": "question"}
    template: str = "auto"  # auto | alpaca | model (the tokenizer's chat template) | path to a Jinja file
    template_kwargs: dict[str, Any] | None = None  # handed to the chat template, e.g. {"enable_thinking": False}
    tools: str | None = None  # a JSON file of tool schemas for every conversation without its own (template_kwargs)
    train_on_inputs: bool = False
    train_reasoning: bool = True  # False: the text between <think> and </think> of assistant turns is masked

    batch_size: int | None = Field(default=None, ge=1)
    seq_length: int = Field(default=2048, ge=8)
    num_epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)  # None: train --num-epochs (never a number meaning "unset")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    gradient_checkpointing: bool | None = None
    seed: int = Field(default=42, ge=0, le=SEED_MAX)

    # Optimizer and schedule (see README "Optimizer and schedule"): handed to the trainer by ftcli/training/recipe.py.
    optim: str = "auto"  # a transformers OptimizerNames value; auto: adamw_torch_fused where it runs, else adamw_torch
    lr_scheduler: Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup",
                          "warmup_stable_decay"] = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)  # a fraction of the run's optimizer steps
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float | None = Field(default=None, ge=0, le=1)  # None: 0.1 cosine_with_min_lr, 0 warmup_stable_decay
    decay_ratio: float = Field(default=0.1, gt=0, le=1)  # warmup_stable_decay: the share of steps that decays
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)  # 0: no clipping
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    neftune_noise_alpha: float | None = Field(default=None, gt=0)

    # Batching (see README "Performance").
    group_by_length: bool | None = None  # None: on for adapters, off for full (batching.group_by_length)
    padding_free: bool | None = None  # None: on where attention is variable-length (FlashAttention 2)
    packing: bool = False

    # Held-out evaluation (see README "Evaluation"): a separate eval set or rows held out of --dataset.
    eval_dataset: str | None = None
    eval_split: int | float | None = None  # a fraction (0 < F < 1) or a number of rows (N >= 1)
    eval_steps: int | None = Field(default=None, ge=1)  # None: at the end of each epoch (and of the run)
    eval_batch_size: int | None = Field(default=None, ge=1)  # None: --batch-size
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_threshold: float = Field(default=0.0, ge=0)
    load_best: bool = False

    # Checkpoints and resuming.
    save_steps: int | None = Field(default=None, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    resume: str | None = None  # "latest" (the newest complete checkpoint in --output-dir) or a checkpoint path
    force: bool = False  # resume even though the config differs from the checkpoint's

    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: list[str] | None = None
    # LoRA variants (peft; see README "LoRA variants"): DoRA's magnitude vectors, rank-stabilised scaling
    # (alpha / sqrt(r)), how the adapters start, and which biases train with them.
    use_dora: bool = False
    use_rslora: bool = False
    lora_init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    full_parameters: bool = False  # fsdp only: train every weight instead of LoRA adapters

    # Processes and machines (fsdp): handed to torch.distributed.run, the engine behind torchrun.
    nproc_per_node: int = Field(default=1, ge=1)
    nnodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(default=29500, ge=1, le=65535)
    rdzv_endpoint: str | None = None

    logging_steps: int = Field(default=1, ge=1)
    # Experiment trackers, through transformers' integrations (see README "Experiment trackers").
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = ["tensorboard"]  # []: none
    run_name: str | None = None  # None: the run folder's name
    log_dir: str | None = None
    output_dir: str | None = None
    overwrite: bool = False
    compile: bool = False
    liger: bool | None = None  # None: on for CUDA without --compile where liger-kernel is installed; never on CPU

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A number option takes a finite number: YAML's `true` is not 1, and `inf` / `nan` are no setting."""
        if info.field_name not in NUMBER_FIELDS:
            return value
        if isinstance(value, bool):
            raise ValueError("true/false is not a number")
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return value  # not a number at all: the field's own validation says so
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError("must be a finite number")
        return value

    @field_validator("columns", mode="before")
    @classmethod
    def _columns_text(cls, value: Any) -> Any:
        return parse_columns(value) if isinstance(value, str) else value

    @field_validator("template_kwargs", mode="before")
    @classmethod
    def _template_kwargs_text(cls, value: Any) -> Any:
        return parse_template_kwargs(value) if isinstance(value, str) else value or None

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_sources(cls, value: Any) -> Any:
        return check_dataset(value)

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            value = [m.strip() if isinstance(m, str) else m for m in value]
            value = [m for m in value if m != ""]
            if not value:
                raise ValueError("must not be empty: name the modules to adapt (e.g. q_proj,v_proj) or all-linear")
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            names = [repr(m) for m in METHODS]
            raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]}")
        return value

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in OBJECTIVES:
            names = [repr(o) for o in OBJECTIVES]
            raise ValueError(f"Input should be {', '.join(names[:-1])} or {names[-1]}")
        return value

    @field_validator("dataset_size", mode="before")
    @classmethod
    def _rows_or_all(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "all":
                return None
            if not text.isdigit():
                raise ValueError("must be a number of rows or 'all'")
            return int(text)
        return value

    @field_validator("max_steps", mode="before")
    @classmethod
    def _steps_or_epochs(cls, value: Any) -> Any:
        """-1 is how the trainer (and ftcli before 0.x) wrote "no step limit": read back as None, so that no code
        can mistake it for a goal of -1 steps. `none` says the same in YAML."""
        if value == -1 and not isinstance(value, bool):
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "-1"):
            return None
        return value

    @field_validator("eval_split", mode="before")
    @classmethod
    def _fraction_or_rows(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text) if text.isdigit() else float(text)
            except ValueError:
                raise ValueError("must be a fraction (0.1) or a number of rows (50)") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) and value is not None:
            raise ValueError("must be a fraction (0.1) or a number of rows (50)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number: a fraction (0.1) or a number of rows (50)")
        if isinstance(value, float) and value.is_integer() and value >= 1:
            value = int(value)
        if value is not None and (value <= 0 or (isinstance(value, float) and value >= 1)):
            raise ValueError("must be a fraction between 0 and 1 (0.1) or a number of rows >= 1 (50)")
        return value

    @field_validator("optim", mode="before")
    @classmethod
    def _optimizer_name(cls, value: Any) -> Any:
        """Spelled as transformers spells it (lower case); the installed transformers' list is checked before the run
        loads anything (ftcli.training.recipe.check_recipe), as this module must not import torch."""
        if isinstance(value, str):
            value = value.strip().lower().replace("-", "_")
            if not value:
                raise ValueError("must name an optimizer (auto, adamw_torch, adamw_8bit, adafactor, sgd, ...)")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        """`mlflow,wandb` or a list of names (a flag given several times); `none` alone: no tracker."""
        names = value.split(",") if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)):
            return value
        names = [n.strip().lower() if isinstance(n, str) else n for n in names]
        names = list(dict.fromkeys(n for n in names if n != ""))
        if "none" in names:
            if len(names) > 1:
                raise ValueError("'none' turns every tracker off: pass it alone, or name the trackers")
            return []
        return names

    @model_validator(mode="after")
    def _check_schedule(self) -> RunConfig:
        # Set to other than its default (the copied ftcli_config.yaml gives every key, at its default too).
        given = {n for n in self.model_fields_set if getattr(self, n) != type(self).model_fields[n].default}
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("--warmup-ratio and --warmup-steps both set the warmup: pass one")
        if self.lr_scheduler == "constant" and (self.warmup_ratio or self.warmup_steps):
            raise ValueError("--lr-scheduler constant has no warmup: use constant_with_warmup")
        if self.min_lr_ratio is not None and self.lr_scheduler not in ("cosine_with_min_lr", "warmup_stable_decay"):
            raise ValueError("--min-lr-ratio applies to --lr-scheduler cosine_with_min_lr and warmup_stable_decay")
        if "decay_ratio" in given and self.lr_scheduler != "warmup_stable_decay":
            raise ValueError("--decay-ratio applies to --lr-scheduler warmup_stable_decay only")
        adam = [f"--{n.replace('_', '-')}" for n in ("adam_beta1", "adam_beta2", "adam_epsilon") if n in given]
        if adam and self.optim in ("sgd", "adafactor", "adagrad", "rmsprop"):
            raise ValueError(f"{', '.join(adam)} have no effect with --optim {self.optim}: drop them, or pick an "
                             "Adam-type optimizer")
        return self

    @model_validator(mode="after")
    def _check_batching(self) -> RunConfig:
        if self.packing and self.padding_free:
            raise ValueError("--packing and --padding-free are two ways of dropping the padding: pass one "
                             "(--packing fills each row with several examples, and with flash_attention_2 "
                             "already builds the one flat row --padding-free would)")
        return self

    @model_validator(mode="after")
    def _check_eval_options(self) -> RunConfig:
        if self.eval_dataset is not None and self.eval_split is not None:
            raise ValueError("--eval-dataset and --eval-split both name the eval set: pass one")
        if self.eval_dataset is None and self.eval_split is None:
            given = [f"--{name.replace('_', '-')}" for name in ("eval_steps", "eval_batch_size",
                                                                "early_stopping_patience", "early_stopping_threshold",
                                                                "load_best")
                     if name in self.model_fields_set and getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} an eval set: add "
                                 "--eval-dataset SOURCE or --eval-split F|N")
        return self

    @model_validator(mode="after")
    def _fill_method_defaults(self) -> RunConfig:
        method = METHODS[self.method]
        for key, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, key) is None:
                # object.__setattr__ skips re-validation (validate_assignment would recurse here).
                object.__setattr__(self, key, value)
        sharded = [m for m, facts in METHODS.items() if facts.shards]
        if self.full_parameters and not method.shards:
            raise ValueError(f"full_parameters applies to --method {'/'.join(sharded)} only "
                             "(use --method full on one process)")
        if self.nproc_per_node * self.nnodes > 1 and ":" in self.device:
            raise ValueError(f"--device {self.device} picks the one GPU of a one-process run; with several "
                             "processes each uses its own (its local rank's): pass --device cuda or auto, and "
                             "choose the GPUs with CUDA_VISIBLE_DEVICES")
        if (self.nproc_per_node > 1 or self.nnodes > 1) and not method.multi_process:
            several = "/".join(m for m, facts in METHODS.items() if facts.multi_process)
            raise ValueError(f"--method {self.method} runs in one process; use --method {several} for "
                             "--nproc-per-node / --nnodes > 1")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        return self

    @model_validator(mode="after")
    def _check_lora_variants(self) -> RunConfig:
        """The LoRA variants apply where LoRA adapters train, and each initialisation where peft's fits the base."""
        method = METHODS[self.method]
        given = [f"--{name.replace('_', '-')}" for name in LORA_VARIANT_FIELDS
                 if getattr(self, name) != RunConfig.model_fields[name].default]
        if given and (not method.uses_lora or self.full_parameters):
            trains = "--full-parameters trains" if self.full_parameters else f"--method {self.method} trains"
            lora = "/".join(m for m, facts in METHODS.items() if facts.uses_lora)
            raise ValueError(f"{', '.join(given)} shape LoRA adapters, and {trains} every weight instead: "
                             f"drop them, or use --method {lora}")
        quantized = "/".join(m for m, facts in METHODS.items() if facts.loads_4bit)
        if self.lora_init in ("pissa", "olora") and method.loads_4bit:
            raise ValueError(f"--lora-init {self.lora_init} moves part of each base weight into the adapter, and on "
                             f"--method {self.method}'s 4-bit base that remainder would be quantised again, so base + "
                             "adapter would no longer be the trained model: use --method lora, or --lora-init loftq "
                             "(made for a 4-bit base)")
        if self.lora_init == "loftq" and not method.loads_4bit:
            raise ValueError(f"--lora-init loftq starts the adapter to make up for a 4-bit base's quantisation error, "
                             f"and --method {self.method} does not quantise its base: use --method {quantized}, or "
                             "--lora-init pissa/olora")
        if self.lora_init == "loftq" and self.use_dora:
            raise ValueError("--lora-init loftq sets the adapter after DoRA has sized its magnitude vectors to the "
                             "weights without it: pass one of --use-dora and --lora-init loftq")
        if self.lora_init == "loftq" and self.device.startswith("cpu"):
            raise ValueError(f"--lora-init loftq needs CUDA (peft computes its 4-bit round trips on the GPU), and "
                             f"--device is {self.device}: run on a CUDA GPU, or use --lora-init default")
        return self

    @model_validator(mode="after")
    def _read_tools(self) -> RunConfig:
        """`--tools FILE.json`: its schemas go into the template's switches, so the record holds them (a run repeats
        and later commands render as training did, whatever becomes of the file)."""
        if self.tools and "tools" not in (self.template_kwargs or {}):
            try:
                kwargs = {**(self.template_kwargs or {}), "tools": read_tools(self.tools)}
            except ValueError as exc:
                raise ValueError(f"--tools: {exc}") from None
            object.__setattr__(self, "template_kwargs", kwargs)
        return self

    @model_validator(mode="after")
    def _check_objective(self) -> RunConfig:
        """An objective's own options only with that objective; then the objective's own checks."""
        objective = OBJECTIVES[self.objective]
        foreign = [name for name in dict.fromkeys(OBJECTIVE_OPTIONS) if name not in objective.options
                   and getattr(self, name) != type(self).model_fields[name].default]
        if foreign:
            owners = "/".join(o.name for o in OBJECTIVES.values() if set(foreign) & set(o.options))
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
            verb = "applies" if len(foreign) == 1 else "apply"
            raise ValueError(f"{flags} {verb} to --objective {owners}, and this run's objective is "
                             f"{self.objective}: drop them, or pass --objective {owners.split('/')[0]}")
        for key, value in objective.defaults(self).items():
            if key not in self.model_fields_set:
                object.__setattr__(self, key, value)  # as the method defaults are filled: no re-validation
        objective.check(self)
        return self

    @model_validator(mode="after")
    def _check_resume_options(self) -> RunConfig:
        if self.resume is not None and not self.resume.strip():
            raise ValueError("resume must be 'latest' (a bare --resume) or a checkpoint path")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it: pass one")
        if self.force and not self.resume:
            raise ValueError("--force only applies with --resume (resume although the config differs)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


FIELDS = tuple(RunConfig.model_fields)


def _types_in(annotation: Any) -> set[Any]:
    args = typing.get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_types_in(a) for a in args))


# The options that take a number (int and/or float, never bool): checked by RunConfig._strict_numbers.
NUMBER_FIELDS = frozenset(name for name, f in RunConfig.model_fields.items()
                          if _types_in(f.annotation) & {int, float} and bool not in _types_in(f.annotation))


def normalize_key(key: str) -> str:
    return key.strip().replace("-", "_")


def closest_key(key: str) -> str | None:
    matches = difflib.get_close_matches(normalize_key(key), FIELDS, n=1, cutoff=0.5)
    return matches[0] if matches else None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML run file into a dict of config keys (validated later, with the flags)."""
    path = Path(path)
    data = read_yaml_document(path, normalize_key)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, not {type(data).__name__}",
                          hint="write one `key: value` per line, e.g. `learning_rate: 1e-4`")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = normalize_key(str(key))
        if name not in FIELDS:
            guess = closest_key(str(key))
            hint = f"did you mean '{guess}'?" if guess else f"valid keys: {', '.join(FIELDS)}"
            raise ConfigError(f"unknown key '{key}' in config file {path}", hint=hint)
        out[name] = value
    return out


def build_run_config(flags: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """Merge the YAML file (if any) under the flags given on the command line, then validate."""
    merged: dict[str, Any] = load_config_file(config_file) if config_file else {}
    merged.update({normalize_key(k): v for k, v in flags.items() if v is not None})
    unknown = [k for k in merged if k not in FIELDS]
    if unknown:
        guess = closest_key(unknown[0])
        raise ConfigError(f"unknown option '{unknown[0]}'", hint=f"did you mean '{guess}'?" if guess else None)
    try:
        return RunConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, config_file)) from None


def _describe_validation_error(exc: ValidationError, config_file: str | Path | None) -> str:
    """All problems in one line, each naming the option as the user would type it."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if not str(p).isdigit()]
        name = loc[0] if loc else ""
        flag = f"--{name.replace('_', '-')}" if name else "config"
        value = err.get("input")
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if name:  # a value of the wrong shape too (`optim: {name: adamw}` in YAML): name its key
            problems.append(f"{flag}: {msg} (got {repr(value)[:80]})")
        else:
            problems.append(msg)
    where = f" (flags and {config_file})" if config_file else ""
    return "invalid run configuration" + where + ": " + "; ".join(problems)
