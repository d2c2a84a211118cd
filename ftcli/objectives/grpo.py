"""Online RL from rewards (GRPO and its variants): sample a group of completions per prompt, score them with the
reward functions, and move the policy towards the completions that scored above their group's mean.

    >>> from ftcli.objectives import OBJECTIVES
    >>> grpo = OBJECTIVES["grpo"]
    >>> grpo.data, grpo.trainer_class().__name__     # ftcli's prompts, TRL's GRPOTrainer
    ('prompts', 'FtcliGRPOTrainer')

The prompts are rendered by ftcli (ftcli/data/prompts.py: the renderer `ftcli generate` uses); the rewards are
loaded and probed before the model loads (ftcli/rewards/); the trainer (ftcli/objectives/grpo_trainer.py) is TRL's
GRPOTrainer generating from ftcli's prompt tokens, writing samples of completions to `completions.jsonl` and
warning when most groups' rewards are all equal (nothing to learn from).

Defaults (docs/grpo.md says why): 8 completions per prompt of at most 256 tokens at temperature 1, TRL's `dapo`
loss (token-level normalisation, DAPO) and no KL term (`--grpo-beta 0`: DAPO and Dr. GRPO drop it, and no reference
model is held); a micro-batch of `--num-generations` completions (one prompt's group) unless --batch-size is
given; a learning rate of 1e-6 training every weight and 1e-5 for adapters (TRL's and DeepSeekMath's 1e-6; LoRA
needs about ten times more).

The reference model, when `--grpo-beta` > 0:

| method | reference |
|---|---|
| lora, qlora | the same model with the adapter disabled (TRL's) |
| full | a frozen copy of the starting weights |
"""

from __future__ import annotations

from typing import Any

from ftcli.objectives.base import FROZEN_COPY, Objective

# TRL 1.16's GRPOConfig.loss_type choices (trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss).
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
VLLM_MODES = ("colocate", "server")
FULL_LEARNING_RATE = 1e-6
ADAPTER_LEARNING_RATE = 1e-5

NO_REFERENCE = "none (--grpo-beta 0)"
ADAPTER_DISABLED = "adapter disabled"

FSDP_REFUSAL = ("--method {method} is not supported with --objective grpo: every step generates from the model, "
                "token by token, and a sharded model gathers every layer's weights for each token (TRL's FSDP "
                "generation), which ftcli has not made work on CPU processes; use --method lora or full with "
                "--nproc-per-node N (data-parallel: each process holds the whole model and generates its share)")


def trainer_class() -> type:
    from ftcli.objectives.grpo_trainer import FtcliGRPOTrainer

    return FtcliGRPOTrainer


def config_class() -> type:
    from trl import GRPOConfig

    return GRPOConfig


def reference(method: Any, config: Any) -> str:
    if not getattr(config, "grpo_beta", 0.0):
        return NO_REFERENCE
    return ADAPTER_DISABLED if method.trains_adapter else FROZEN_COPY


def defaults(config: Any) -> dict[str, Any]:
    """GRPO's own defaults of shared options (applied where not given): one group per micro-batch, RL's rates."""
    from ftcli.methods import METHODS

    adapter = METHODS[config.method].trains_adapter and not getattr(config, "full_parameters", False)
    return {"batch_size": config.num_generations,
            "learning_rate": ADAPTER_LEARNING_RATE if adapter else FULL_LEARNING_RATE}


def training_args(config: Any, device: str) -> dict[str, Any]:
    return {
        "num_generations": config.num_generations,
        "max_completion_length": config.max_completion_length,
        "temperature": config.temperature,
        "beta": config.grpo_beta,
        "loss_type": config.grpo_loss,
        # LUSPO is a sequence-level loss (TRL refuses it at the token level).
        "importance_sampling_level": "sequence" if config.grpo_loss == "luspo" else "token",
        "reward_weights": config.reward_weights,
        "use_vllm": config.vllm is not None,
        "vllm_mode": config.vllm or "colocate",
        # The rewards read the rows' other columns: the trainer must hand them over.
        "remove_unused_columns": False,
        "log_completions": False,  # ftcli writes its own sample (completions.jsonl) instead of printing tables
        "disable_dropout": True,
        # Each prompt's group is sampled together (TRL's sampler): ftcli's length grouping sorts single examples.
        "train_sampling_strategy": "random",
    }


def trainer_kwargs(config: Any, plan: Any, evaluator: Any) -> dict[str, Any]:
    """The reward functions (watched: a fault stops the run at the step's end), and a frozen copy of the starting
    model as the reference where there is a KL term and no adapter to disable."""
    import copy

    from ftcli.methods import METHODS
    from ftcli.rewards import load_rewards
    from ftcli.rewards.probe import RewardFailures

    kwargs: dict[str, Any] = {"ftcli_config": config, "ftcli_rewards": load_rewards(reward_specs(config),
                                                                                    config.reward_weights),
                              "ftcli_failures": RewardFailures()}
    if reference(METHODS[config.method], config) == FROZEN_COPY:
        ref = copy.deepcopy(plan.model)
        ref.requires_grad_(False)
        ref.eval()
        kwargs["ftcli_reference"] = ref
    return kwargs


def reward_specs(config: Any) -> list[str]:
    """Every reward of the run, in --reward-weights' order: the --reward functions, then the --reward-model runs."""
    from ftcli.rewards import MODEL_KIND

    return [*config.reward, *(f"{MODEL_KIND}:{ref}" for ref in config.reward_model)]


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def world(config: Any) -> int:
    return int(config.nproc_per_node) * int(config.nnodes)


def check(config: Any) -> None:
    """What makes no sense with GRPO: one ValueError naming the option and the fix."""
    from ftcli.methods import METHODS

    method = METHODS[config.method]
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_specs(config)):
        raise ValueError(f"--reward-weights has {len(config.reward_weights)} values for {len(reward_specs(config))} "
                         "rewards: give one weight per --reward, then per --reward-model, in their order (e.g. 1,0.5)")
    if method.shards:
        raise ValueError(FSDP_REFUSAL.format(method=config.method))
    if not isinstance(config.dataset, str):
        raise ValueError("--objective grpo trains on one prompts dataset, not a mixture: pass one --dataset")
    for name, why in (("train_on_inputs", "GRPO trains on sampled completions, never on the prompt"),
                      ("packing", "GRPO batches the completions it samples"),
                      ("padding_free", "GRPO batches the completions it samples"),
                      ("compile", "ftcli's compile warmup does not cover generation")):
        if getattr(config, name):
            raise ValueError(f"{flag(name)} does not apply to --objective grpo ({why}): drop {flag(name)}")
    if config.format != "auto":
        raise ValueError(f"--format {config.format} names an SFT data format; prompts are read from their prompt "
                         "column (map another name with --columns prompt=YOURS): drop --format")
    if config.eval_dataset is not None or config.eval_split is not None:
        which = "--eval-dataset" if config.eval_dataset is not None else "--eval-split"
        raise ValueError(f"{which}: a GRPO run is measured by its reward on held-out prompts, not an eval loss: drop "
                         "it, and after training run `ftcli eval RUN --reward ... --dataset PROMPTS`")
    check_vllm(config)
    generation = config.batch_size * world(config) * config.gradient_accumulation_steps
    if generation % config.num_generations:
        raise ValueError(f"--batch-size {config.batch_size} x {world(config)} process(es) x "
                         f"--gradient-accumulation-steps {config.gradient_accumulation_steps} = {generation} "
                         f"completions per step, not a whole number of groups of --num-generations "
                         f"{config.num_generations}: make --batch-size a multiple of {config.num_generations} (or "
                         f"leave it out: it then defaults to --num-generations)")
    if config.max_completion_length >= config.seq_length:
        raise ValueError(f"--max-completion-length {config.max_completion_length} leaves no room for the prompt "
                         f"within --seq-length {config.seq_length}: pass a larger --seq-length")


def check_vllm(config: Any) -> None:
    if config.vllm is None:
        return
    import importlib.util

    if config.device.startswith("cpu") or config.device == "mps":
        raise ValueError(f"--vllm {config.vllm} generates on CUDA GPUs, and --device is {config.device}: drop --vllm "
                         "(generation then uses transformers)")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"--vllm {config.vllm} needs vLLM, which is not installed here: pip install vllm (on a CUDA "
                         "machine), or drop --vllm (generation then uses transformers)")


def preflight(config: Any) -> None:
    """Before anything loads: every --reward imported and called on a few real rows of the data."""
    from ftcli.errors import ConfigError
    from ftcli.rewards import load_rewards
    from ftcli.rewards.probe import probe

    if not reward_specs(config):
        raise ConfigError("--objective grpo needs at least one --reward",
                          hint="pass --reward FILE.py:function, --reward builtin:NAME or --reward-model RUN (see "
                               "docs/grpo.md)")
    rewards = load_rewards(reward_specs(config), config.reward_weights)
    probe(rewards, probe_rows(config))


def probe_rows(config: Any) -> list[dict[str, Any]]:
    """The data's first rows, `--columns` applied, prompts as text (a message list: its last message's content)."""
    from ftcli.data.prompt_rows import prompt_text, read_prompt_rows
    from ftcli.rewards.probe import PROBE_ROWS

    if not isinstance(config.dataset, str):
        return []
    rows = read_prompt_rows(config.dataset, config.columns, config.dataset_split, config.dataset_revision)
    return [{**row, "prompt": prompt_text(row["prompt"])} for row in rows[:PROBE_ROWS]]


def notes(config: Any) -> list[str]:
    if "group_by_length" in config.model_fields_set and config.group_by_length:
        return ["--group-by-length sorts examples; --objective grpo batches each prompt's group of completions"]
    return []


def probe_ids(row: dict[str, Any]) -> list[int]:
    return list(row["prompt_ids"])


def generation_rows(config: Any) -> int:
    """Sequences one step's micro-batch puts through the model: its completions, each after its prompt."""
    return int(config.batch_size)


OBJECTIVE = Objective(
    name="grpo",
    summary="online RL from reward functions",
    data="prompts",
    options=("reward", "reward_model", "reward_weights", "num_generations", "max_completion_length", "temperature", "grpo_beta",
             "grpo_loss", "vllm", "completions_every"),
    trainer_class=trainer_class,
    config_class=config_class,
    training_args=training_args,
    trainer_kwargs=trainer_kwargs,
    check=check,
    reference=reference,
    probe_ids=probe_ids,
    compiles=False,
    shards=False,
    notes=notes,
    defaults=defaults,
    preflight=preflight,
    samples=True,
)
