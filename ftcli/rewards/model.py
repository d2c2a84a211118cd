"""A reward model trained by ftcli (`--objective reward`) as a GRPO reward: `--reward-model RUN` (`--reward model:RUN`).

    >>> from ftcli.rewards.model import load
    >>> name, reward = load("runs/rm-1")     # checked now (a reward model's run, adapter or export), loaded at first use
    >>> reward(prompts, completions, prompt_ids=..., completion_ids=...)   # one score per completion

During a run each completion is scored on its exact tokens, the prompt as the policy's template rendered it and
then the completion (closed by EOS as the reward model's answers were), so the reward model must share the policy's
tokenizer (train both from the same base or SFT run): the first call compares the prompt's text as each tokenizer
reads it and stops the run with one line when they differ. Without token ids (`ftcli eval --reward model:RUN`), the
prompt and completion texts are rendered as the reward model's training rendered its pairs. It is not called on
the probe before the run (it is ftcli's code, and loading it twice would cost a model's memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ftcli.errors import ConfigError

_LOADED: dict[str, Any] = {}  # ref -> RewardScorer: one copy per process however often it is named


class ModelReward:
    probed = False

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.__name__ = name_of(ref)
        self.checked = False

    def scorer(self) -> Any:
        if self.ref not in _LOADED:
            from ftcli.evaluation.reward_model import load_reward_scorer

            _LOADED[self.ref] = load_reward_scorer(self.ref)
        return _LOADED[self.ref]

    def __call__(self, prompts: list[Any], completions: list[Any], prompt_ids: list[Any] | None = None,
                 completion_ids: list[Any] | None = None, **_: Any) -> list[float]:
        scorer = self.scorer()
        if prompt_ids is None or completion_ids is None:
            return scorer(prompts, completions)
        if not self.checked:
            self.check_tokenizer(scorer, prompts[0], prompt_ids[0])
        return scorer.score_tokens(prompt_ids, completion_ids)

    def check_tokenizer(self, scorer: Any, prompt: str, ids: list[int]) -> None:
        read = scorer.tokenizer.decode(list(ids), skip_special_tokens=True)
        if read != prompt:
            raise ValueError(f"the reward model {self.ref} reads the policy's tokens as other text (another "
                             "tokenizer): train it from the same base model as the policy")
        self.checked = True


def name_of(ref: str) -> str:
    return f"model:{Path(ref).name or ref}"


def load(ref: str) -> tuple[str, Callable[..., list[float]]]:
    """(name, reward) of the reward model at `ref`; one ConfigError when it is missing or not a reward model."""
    from ftcli.targets import find_target

    if not ref.strip():
        raise ConfigError("--reward-model names no folder", hint="pass the run, adapter or export of an "
                          "`ftcli train --objective reward` run")
    if not find_target(ref).scores:
        raise ConfigError(f"--reward-model {ref} is not a reward model (it has a language-model head, not a score "
                          "head)", hint="train one with `ftcli train --objective reward` and pass its run or export")
    return name_of(ref), ModelReward(ref)
