"""Reward models (`--objective reward`): scoring answers, `ftcli eval`'s pairwise accuracy, and a scorer for RL.

    >>> from ftcli.evaluation.reward_model import load_reward_scorer
    >>> score = load_reward_scorer("runs/reward-1")          # a run, its adapter, or its export; loaded once
    >>> score(["What is 2+2?\\n"], ["4"])                     # one float per (prompt, completion)
    [1.73...]

A completion is scored as the reward model was trained (ftcli/objectives/reward.py): the prompt and the completion
rendered by the run's own rules (ftcli/data/preference.py: its template, the tokenizer's special prefix, one EOS after
the answer, the prompt cut to --max-prompt-length and the whole to --seq-length), then one forward pass of the
classifier, whose score is read at the sequence's last non-pad token. `ftcli eval` on preference pairs reports the
share of pairs whose chosen answer scores above the rejected one (`accuracy`) and the mean of score(chosen) -
score(rejected) (`margin`), on the same sequences the trainer scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_BATCH = 8


def score_sequences(model: Any, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> list[float]:
    """One score per token sequence: right-padded batches through the classifier (float32 scores, in order)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, seq in enumerate(chunk):
                ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[i, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            scores.extend(float(v) for v in logits[:, 0].float().cpu())
    return scores


def evaluate_reward_pairs(target: Any, config: Any, eval_set: Any, tokenizer: Any, device: str) -> dict[str, Any]:
    """Pairwise accuracy, mean margin and the Bradley-Terry loss of the reward model `target` on prepared pairs."""
    import math

    from ftcli.models import classifier_pad_token_id
    from ftcli.objectives.reward_trainer import pair_sequences
    from ftcli.targets import load_target_model

    pad = classifier_pad_token_id(tokenizer)
    model = load_target_model(target, config, device, pad_token_id=pad)
    rows = [pair_sequences(row) for row in eval_set.dataset]
    batch = config.eval_batch_size or config.batch_size
    chosen = score_sequences(model, [r["chosen_ids"] for r in rows], pad, batch)
    rejected = score_sequences(model, [r["rejected_ids"] for r in rows], pad, batch)
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = max(len(margins), 1)
    # -log sigmoid(m), computed stably
    loss = sum(max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins) / n
    return {"accuracy": sum(1 for m in margins if m > 0) / n, "margin": sum(margins) / n, "loss": loss,
            "chosen_score": sum(chosen) / n, "rejected_score": sum(rejected) / n, "pairs": len(margins),
            "tokens": eval_set.loss_tokens}


@dataclass
class RewardScorer:
    """A loaded reward model: call it with prompts and completions for their scores (see the module's docstring)."""

    model: Any
    tokenizer: Any
    template: Any  # ftcli.data.templates.TemplateSpec
    max_prompt: int
    seq_length: int
    pad_token_id: int
    batch_size: int = DEFAULT_BATCH

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """The tokens the score of `completion` after `prompt` is read on, rendered as the run trained."""
        from ftcli.data.pipeline import special_prefix
        from ftcli.data.preference import Pair, encode_chat_pair, encode_text_pair, truncate

        if self.template.is_chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            answer = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            encoded = encode_chat_pair(Pair(True, messages, answer, answer), self.template, self.tokenizer)
        else:
            encoded = encode_text_pair(Pair(False, str(prompt), str(completion), str(completion)), self.template,
                                       self.tokenizer, special_prefix(self.tokenizer))
        encoded = truncate(encoded, self.max_prompt, self.seq_length)
        return list(encoded.prompt_ids) + list(encoded.chosen_ids)

    def score_tokens(self, prompt_ids: list[Any], completion_ids: list[Any]) -> list[float]:
        """Scores of token sequences already rendered (a GRPO run's prompts and sampled completions): each
        completion closed by EOS as the training's answers were, the prompt cut as the training cut it."""
        eos = self.tokenizer.eos_token_id
        sequences = []
        for prompt, completion in zip(prompt_ids, completion_ids):
            prompt, completion = list(prompt), list(completion)
            if eos is not None and (not completion or completion[-1] != eos):
                completion.append(eos)
            if len(prompt) + len(completion) > self.seq_length:
                prompt = prompt[:max(self.max_prompt, self.seq_length - len(completion))]
            sequences.append((prompt + completion)[:self.seq_length])
        return score_sequences(self.model, sequences, self.pad_token_id, self.batch_size)

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions: give one prompt per "
                             "completion")
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions)]
        return score_sequences(self.model, sequences, self.pad_token_id, self.batch_size)


def load_reward_scorer(ref: str, *, device: str = "auto", dtype: str = "auto",
                       batch_size: int = DEFAULT_BATCH) -> RewardScorer:
    """The reward model `ref` (a run, an adapter or an exported folder), loaded once, as a scorer."""
    from pathlib import Path
    from types import SimpleNamespace

    from ftcli.config import build_run_config
    from ftcli.errors import ConfigError
    from ftcli.inference.target import rendering
    from ftcli.models import classifier_pad_token_id, load_tokenizer, resolve_device
    from ftcli.objectives.dpo import max_prompt_length
    from ftcli.targets import EXPORT_RECORD, find_target, load_target_model

    info = find_target(ref)
    if not info.scores:
        raise ConfigError(f"{ref} is not a reward model (it has a language-model head, not a score head)",
                          hint="train one with `ftcli train --objective reward`, then pass its run or export")
    recorded = dict(info.run_config)
    if info.exported:
        from ftcli.files import read_json_object

        record = read_json_object(Path(ref).expanduser() / EXPORT_RECORD, hint="export the reward model again")
        recorded = dict((record.get("run") or {}).get("config") or {})
    dev = resolve_device(device)
    config = build_run_config({**{k: recorded[k] for k in ("method", "attn_implementation", "seq_length")
                                  if recorded.get(k) is not None},
                               "model": info.model, "device": dev,
                               "dtype": dtype if dtype != "auto" else (info.trained_dtype or "auto")})
    tokenizer = load_tokenizer(info.tokenizer or info.model, revision=info.revision_of(info.tokenizer or ""),
                               trust_remote_code=info.trust_remote_code)
    _, template = rendering(info.data.get("format"), info.data.get("template"), "auto", tokenizer, ref,
                            folder=Path(ref).expanduser())
    if template.is_chat and info.template_kwargs:
        template = template.with_kwargs(info.template_kwargs)
    pad = classifier_pad_token_id(tokenizer)
    model = load_target_model(info, config, dev, pad_token_id=pad)
    max_prompt = max_prompt_length(SimpleNamespace(max_prompt_length=recorded.get("max_prompt_length"),
                                                   seq_length=config.seq_length))
    return RewardScorer(model, tokenizer, template, max_prompt, config.seq_length, pad, batch_size)
