"""TRL's GRPOTrainer, generating from the prompt tokens ftcli rendered (ftcli/data/prompts.py).

    >>> from ftcli.objectives.grpo_trainer import FtcliGRPOTrainer
    >>> trainer = FtcliGRPOTrainer(model=model, args=GRPOConfig(...), train_dataset=prompts, processing_class=tok,
    ...                            ftcli_config=config, ftcli_rewards=rewards, ftcli_failures=RewardFailures())

What changes from TRL's behaviour, each small:
- the prompts are generated from as prepared (`prompt_ids`: `ftcli generate`'s rendering), not re-rendered by TRL;
- the reward functions are watched (ftcli.rewards.probe.watched): a fault is recorded and the guard stops the
  run at the step's end with a checkpoint (ftcli/training/guard.py), never a hang of the other processes;
- the reference model, with a KL term and no adapter, is a frozen copy of the starting weights (TRL would load
  the model again from its hub id);
- the tokens seen are the prompts' and completions' real tokens (TRL's count; the trainer's own would look for
  input ids in the rows);
- every `--completions-every` steps a sample of the step's completions with their rewards and advantages is
  appended to `completions.jsonl` in the run folder, and a warning is printed when most groups' rewards have been
  all equal for several logging steps (no advantage: nothing is learned from them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import GRPOTrainer

from ftcli.console import console
from ftcli.rewards import COMPLETIONS

SAMPLE = 8  # completions written per sample (one group at the default --num-generations)
FLAT_WINDOW = 5  # logging steps looked at for the all-equal-rewards warning
FLAT_SHARE = 0.75  # a step counts as flat when at least this share of its groups had all-equal rewards
FLAT_ADVICE = ("most groups' rewards have been all equal for {n} logging steps (frac_reward_zero_std {share:.0%}): "
               "equal rewards give no advantage, so nothing is learned from them. Try prompts nearer the model's "
               "level (harder if it always succeeds, easier if it never does), more --num-generations, a higher "
               "--temperature, or a graded reward (partial credit) instead of pass/fail")


class FtcliGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
    def __init__(self, *args: Any, ftcli_config: Any = None, ftcli_rewards: Any = None, ftcli_failures: Any = None,
                 ftcli_reference: Any = None, **kwargs: Any) -> None:
        from ftcli.rewards.probe import watched

        self._ftcli_config = ftcli_config
        self.ftcli_failures = ftcli_failures
        self._ftcli_prompt_ids: list[list[int]] | None = None
        kwargs.pop("data_collator", None)  # GRPO batches the rows it generates from itself (TRL takes no collator)
        rewards = list(ftcli_rewards or [])
        kwargs["reward_funcs"] = [watched(r, ftcli_failures, lambda: self.state.global_step) for r in rewards]
        import trl.trainer.grpo_trainer as trl_grpo

        # With a KL term on a model without an adapter, TRL loads the reference again from the model's hub id;
        # ftcli's start model may be a built-in, a run chain or a local folder: hand TRL the frozen copy instead.
        original = trl_grpo.create_model_from_path
        if ftcli_reference is not None:
            trl_grpo.create_model_from_path = lambda *a, **k: ftcli_reference
        try:
            super().__init__(*args, **kwargs)
        finally:
            trl_grpo.create_model_from_path = original
        out = Path(self.args.output_dir)
        every = getattr(ftcli_config, "completions_every", 10)
        self.add_callback(GroupWatch(self, out / COMPLETIONS, every, [r.name for r in rewards]))

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._ftcli_prompt_ids = [list(x["prompt_ids"]) for x in inputs]
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._ftcli_prompt_ids = None
        return output

    def _tokenize_prompts(self, prompts: list[Any]) -> Any:
        if self._ftcli_prompt_ids is None:  # not from a batch of ftcli's prompts
            return super()._tokenize_prompts(prompts)
        return self._ftcli_prompt_ids, None, {}

    def _track_num_input_tokens(self, inputs: Any) -> None:
        return None  # TRL counts the prompts' and completions' real tokens as it generates them


class GroupWatch(TrainerCallback):  # type: ignore[misc]
    """The completions sample and the all-equal-rewards warning (rank 0), and the reward faults (every rank)."""

    def __init__(self, trainer: Any, path: Path, every: int, names: list[str]):
        self.trainer, self.path, self.every, self.names = trainer, path, every, names
        self.flat: list[float] = []
        self.warned = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and (state.global_step % self.every == 0 or state.global_step == 1):
            self.write_sample(state.global_step)

    def write_sample(self, step: int) -> None:
        logs = self.trainer._logs
        prompts, completions = list(logs["prompt"]), list(logs["completion"])
        if not completions:
            return
        rewards = {name: list(logs["rewards"].get(name, [])) for name in self.trainer.reward_func_names}
        advantages = list(logs["advantages"])
        with self.path.open("a", encoding="utf-8") as fh:
            for i in range(min(SAMPLE, len(completions))):
                record = {"step": step, "prompt": prompts[i], "completion": completions[i],
                          "rewards": {n: _number(v[i]) for n, v in rewards.items() if i < len(v)},
                          "advantage": _number(advantages[i]) if i < len(advantages) else None}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        share = (logs or {}).get("frac_reward_zero_std")
        if not state.is_world_process_zero or share is None:
            return
        self.flat = (self.flat + [float(share)])[-FLAT_WINDOW:]
        if not self.warned and len(self.flat) == FLAT_WINDOW and min(self.flat) >= FLAT_SHARE:
            self.warned = True
            advice = FLAT_ADVICE.format(n=FLAT_WINDOW, share=sum(self.flat) / FLAT_WINDOW)
            console.print(f"[yellow]warning:[/] {advice}", soft_wrap=True)


def _number(value: Any) -> float | None:
    import math

    value = float(value)
    return value if math.isfinite(value) else None
