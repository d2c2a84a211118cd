"""The eval loss: the mean cross-entropy over every loss token of the eval set (token-weighted).

    >>> from ftcli.evaluation.loss import evaluate_loss
    >>> result = evaluate_loss(model, dataset, batch_size=8)   # dataset: input_ids, labels (-100: not scored)
    >>> result.loss, result.perplexity, result.tokens, result.examples

Every example contributes each of its loss tokens once, whatever the batch it lands in: the loss is
summed (in float64) over all tokens of all batches of all processes and divided by their number.
So it does not depend on the eval batch size, on the run's length grouping, padding-free rows or
packing (evaluation always scores whole examples, one per row, padded on the right behind an
attention mask) or on the number of processes. (transformers' own eval loss is the mean of per-batch
means, which changes with all of these.) A token's loss is computed in float32 from the logits.

With several processes (FSDP), the examples are dealt out in turn and every process runs the same
number of forward passes (a sharded model needs all of them for each): a process with fewer batches
scores a batch with zero weight. Used by `train` at its eval steps and by `ftcli eval`, so both give
the same number for the same model and data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int  # loss tokens scored
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "examples": self.examples}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def rank_batches(lengths: list[int], batch_size: int, rank: int, world: int) -> tuple[list[list[int]], int]:
    """(this process's batches of example indices, the number of forward passes every process runs).

    Longest first, so that similar lengths share a batch (little padding) and a batch too large for
    memory shows at once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    mine = order[rank::world]
    batches = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    per_rank = -(-len(order) // world)
    return batches, -(-per_rank // batch_size)


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids.to(device), labels.to(device), mask.to(device)


def batch_loss_sum(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int, device: Any) -> tuple[Any, int]:
    """(sum of the token losses as a float64 tensor, number of loss tokens) of one batch of whole examples."""
    import torch
    import torch.nn.functional as F

    input_ids, labels, mask = _padded(rows, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    count = 0
    for i, (ids, _) in enumerate(rows):
        n = len(ids)
        # Row by row: a float32 copy of one example's logits, not of the whole batch's.
        target = labels[i, 1:n]
        scored = target != IGNORE
        if not bool(scored.any()):
            continue
        row = logits[i, :n - 1][scored].float()
        total += F.cross_entropy(row, target[scored], reduction="sum").double()
        count += int(scored.sum())
    return total, count


def evaluate_loss(model: Any, dataset: Any, batch_size: int, pad_token_id: int | None = None) -> EvalResult:
    """The token-weighted eval loss of `model` on `dataset` (every process must call this together)."""
    import torch
    import torch.distributed as dist

    from ftcli.training.distributed import rank_and_world

    rank, world = rank_and_world()
    all_ids, all_labels = list(dataset["input_ids"]), list(dataset["labels"])
    lengths = [len(x) for x in all_ids]
    batches, passes = rank_batches(lengths, max(1, int(batch_size)), rank, world)
    device = next(model.parameters()).device
    pad_id = 0 if pad_token_id is None else int(pad_token_id)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = examples = 0
    try:
        with torch.no_grad():
            for k in range(passes):
                idx = batches[k] if k < len(batches) else [0]  # a forward with zero weight keeps the ranks together
                rows = [(list(all_ids[i]), list(all_labels[i])) for i in idx]
                loss_sum, n = batch_loss_sum(model, rows, pad_id, device)
                if k < len(batches):
                    total += loss_sum.to(device)
                    count += n
                    examples += len(idx)
    finally:
        model.train(was_training)
    summed = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device),
                          torch.tensor(float(examples), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    tokens = int(summed[1].item())
    loss = float(summed[0].item() / tokens) if tokens else float("nan")
    return EvalResult(loss=loss, perplexity=perplexity(loss), tokens=tokens, examples=int(summed[2].item()))
