"""How examples become batches: length grouping, padding-free rows, packing (see README "Performance").

    >>> from ftcli.training import batching
    >>> batching.bucket_length(300, 2048)             # the padded length torch.compile sees
    384
    >>> batching.training_args(config, "cpu")         # SFTConfig arguments
    >>> batching.data_collator(config, tokenizer)      # None: the trainer's own collator
    >>> trainer_class = batching.trainer_class(SFTTrainer)

Length grouping (by default only where an adapter trains: `group_by_length`) orders each epoch so
that every optimizer step (per-device batch x gradient accumulation x processes) holds examples of
similar length: a run with batch 8 and a run with batch 2 x accumulation 4 see exactly the same
examples in each step. The order depends only on
the seed, the epoch and the lengths, so a resumed run replays it exactly.

Padding-free batches concatenate a batch into one row with `position_ids` restarting at every
example and no attention mask; the model then builds a block-diagonal causal mask (SDPA, eager)
or uses variable-length kernels (FlashAttention 2), so no example attends into another. Packing
fills rows of up to --seq-length tokens with whole examples (best fit decreasing) the same way.

Importing this module must not import torch (the CLI imports the config early).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

IGNORE = -100
MIN_BUCKET = 32
PAD_MULTIPLE = 8  # padded batches are this many tokens long, times n (not with --compile: buckets)
# Megabatches of up to this many optimizer steps are sorted by length (transformers sorts 50 batches):
# enough to find similar lengths, small enough that the data order stays random at epoch scale.
MEGABATCH_STEPS = 64
# ... and at least this many megabatches per epoch, so that small data sets still mix between epochs.
MIN_MEGABATCHES = 2
# Grouped steps divide their summed token loss by the epoch's mean loss tokens per step, not by their own count
# (see `loss_tokens_per_step`); False brings back the per-step mean (bench/grouping.py's "before").
TOKEN_WEIGHTED_GROUPING = True
# The epoch's longest step goes first, so that an out-of-memory shows at once (bench/grouping.py measures its cost).
LONGEST_FIRST = True
# Batch key the padding-free collator adds: the number of real tokens (the trainer removes it before the forward).
REAL_TOKENS = "ftcli_real_tokens"


# ---- shapes ---------------------------------------------------------------------------------------


def bucket_length(n: int, seq_length: int) -> int:
    """The padded length of a row of `n` tokens when compiling: the smallest bucket >= n, at most `seq_length`.

    Buckets are 32, 48, 64, 96, 128, 192, 256, ... (powers of two and 1.5x between), so torch.compile
    sees about two shapes per doubling of length and a row never carries more than a third of padding
    (beyond the 32-token floor). A row longer than `seq_length` keeps its own length.
    """
    if n < 1:
        raise ValueError(f"a row has at least one token, not {n}")
    bucket = MIN_BUCKET
    while bucket < n:
        # Power of two -> x1.5; the 1.5x step -> the next power of two.
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return max(n, min(bucket, seq_length))


def bucket_lengths(seq_length: int) -> list[int]:
    """Every length `bucket_length` can return for rows of up to `seq_length` tokens, shortest first."""
    out: list[int] = []
    n = 1
    while n <= seq_length:
        b = bucket_length(n, seq_length)
        if not out or b != out[-1]:
            out.append(b)
        n = b + 1
    return out


# ---- choices --------------------------------------------------------------------------------------


def use_padding_free(config: Any, attn_implementation: str | None = None) -> bool:
    """Padding-free rows: as asked, or (unset) only where the attention kernel is variable-length (FlashAttention 2).

    With SDPA or eager attention the result is just as correct (a block-diagonal mask), but the mask covers
    the whole concatenated row, so attention costs (sum of lengths)^2 instead of batch x longest^2: slower
    than length-grouped padded batches on CPU (see README "Performance").
    """
    if config.padding_free is not None:
        return bool(config.padding_free)
    return attn_implementation == "flash_attention_2"


def resolved_attn_implementation(config: Any) -> str:
    """The attention implementation the model will load with (as ftcli.models decides it)."""
    from ftcli.models import resolve_attn_implementation, resolve_device, resolve_dtype

    device = resolve_device(config.device)
    return resolve_attn_implementation(config.attn_implementation, device, resolve_dtype(config.dtype, device))


def group_by_length(config: Any) -> bool:
    """Length-grouped steps: as asked, or (unset) only for methods that train an adapter (lora, qlora, fsdp).

    A grouped step holds examples of one length, so the steps of long examples hold many times the mean
    tokens per step (up to 12x on long-tailed data) and those of short ones a small fraction. AdamW moves the
    weights by about the learning rate per step however many tokens the step holds, and gradient clipping
    caps the long steps too, so in grouped order the tokens of long examples train less than in random order.
    bench/grouping.py, 4 seeds (docs/performance.md): full fine-tuning ends clearly above random order (no
    variant of the grouping tried was within seed noise), LoRA within seed noise with half the padded tokens.
    """
    if config.group_by_length is not None:
        return bool(config.group_by_length)
    from ftcli.methods import METHODS

    return bool(METHODS[config.method].trains_adapter)


def training_args(config: Any, device: str) -> dict[str, Any]:
    """The SFTConfig arguments that decide throughput: batching (the optimizer kernel: ftcli.training.recipe; Liger: the
    trainer's).

    Packing and padding-free rows are built by ftcli's own collator (TRL's would re-check lengths and refuse
    a custom collator), so TRL's `packing` / `padding_free` stay off here.
    """
    args: dict[str, Any] = {
        "packing": False,
        "train_sampling_strategy": "group_by_length" if group_by_length(config) else "random",
        # Padded lengths in steps of 8: grouped batches would otherwise bring a new shape almost every step,
        # and each new shape costs kernel set-up and cached workspace (measured: +90-130 MiB peak on CPU).
        "pad_to_multiple_of": PAD_MULTIPLE,
    }
    return args


def data_collator(config: Any, tokenizer: Any) -> Any:
    """The collator for `config`, or None for the trainer's default (pad to the longest in the batch)."""
    packing = bool(config.packing)
    attn = resolved_attn_implementation(config) if (packing or config.padding_free is not False) else None
    padding_free = use_padding_free(config, attn)
    compile_ = bool(getattr(config, "compile", False))
    if not (packing or padding_free or compile_):
        return None
    return Collator(
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        seq_length=config.seq_length,
        padding_free=padding_free,
        packing=packing,
        # Variable-length kernels want one flat row; a dense mask wants one row per packed sequence.
        flat_packing=attn == "flash_attention_2",
        bucket=compile_,
        cu_seq_lens=attn == "flash_attention_2",
    )


# ---- collator -------------------------------------------------------------------------------------


@dataclass
class Collator:
    """Examples (input_ids, labels[, seq_lengths]) -> a batch of tensors.

    - padded (default): rows padded on the right to the longest (or its bucket), with an attention mask;
    - padding_free: the batch concatenated into one row, `position_ids` restarting per example;
    - packing: rows that already hold several examples (`seq_lengths`), one batch row each, or one flat
      row with `flat_packing`.
    Without an attention mask, the first label of every example is masked: it would otherwise be
    predicted from the previous example's last token.
    """

    pad_token_id: int
    seq_length: int
    padding_free: bool = False
    packing: bool = False
    flat_packing: bool = False
    bucket: bool = False  # pad lengths to bucket_length() (a bounded set of shapes for torch.compile)
    cu_seq_lens: bool = False  # add FlashAttention's varlen boundaries (saves a device sync per layer)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.packing:
            rows = [(list(e["input_ids"]), list(e["labels"]), list(e["seq_lengths"])) for e in examples]
            if self.flat_packing:
                return self._flat(rows)
            return self._rows(rows)
        rows = [(list(e["input_ids"]), list(e["labels"]), [len(e["input_ids"])]) for e in examples]
        if self.padding_free:
            return self._flat(rows)
        return self._padded(rows)

    def _length(self, n: int, cap: int) -> int:
        return bucket_length(n, cap) if self.bucket else n

    def _padded(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, Any]:
        import torch

        width = self._length(max(len(ids) for ids, _, _ in rows), self.seq_length)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab, _) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def _flat(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, Any]:
        """All examples of the batch in one row (padding-free; packed rows flattened too)."""
        ids = [t for r in rows for t in r[0]]
        labels = [t for r in rows for t in r[1]]
        lengths = [n for r in rows for n in r[2]]
        batch = self._row_tensors([(ids, labels, lengths)], self._length(len(ids), self.seq_length * len(rows)))
        if self.cu_seq_lens:
            import torch

            bounds = [0]
            for n in lengths:
                bounds.append(bounds[-1] + n)
            width = batch["input_ids"].shape[1]
            if bounds[-1] < width:  # the bucket padding forms one more sequence of its own
                bounds.append(width)
            cu = torch.tensor(bounds, dtype=torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = int(cu.diff().max())
        return batch

    def _rows(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict[str, Any]:
        """One batch row per packed row, padded to the longest (its bucket when compiling)."""
        width = self._length(max(len(r[0]) for r in rows), self.seq_length)
        return self._row_tensors(rows, width)

    def _row_tensors(self, rows: list[tuple[list[int], list[int], list[int]]], width: int) -> dict[str, Any]:
        import torch

        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        real = 0
        for i, (ids, lab, lengths) in enumerate(rows):
            n = len(ids)
            real += n
            input_ids[i, :n] = torch.tensor(ids)
            row_labels = torch.tensor(lab)
            positions = torch.cat([torch.arange(k) for k in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
            # An example's first label would be predicted from the previous example's last token.
            row_labels[positions == 0] = IGNORE
            labels[i, :n] = row_labels
            position_ids[i, :n] = positions
            if n < width:
                # The padding is a sequence of its own (positions 0, 1, ...): nothing real attends to it.
                position_ids[i, n:] = torch.arange(width - n)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                REAL_TOKENS: torch.tensor(real, dtype=torch.long)}


# ---- data order -----------------------------------------------------------------------------------


def example_lengths(dataset: Any) -> list[int]:
    """Token count of every row of a datasets.Dataset (read from input_ids, via Arrow when possible)."""
    try:
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_pylist()
    except Exception:  # noqa: BLE001 - any other dataset type: count in Python
        return [len(row["input_ids"]) for row in dataset]


def loss_tokens(dataset: Any) -> int:
    """Loss tokens of a datasets.Dataset as the trainer counts them (labels after the first that are not -100)."""
    try:
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[:]["labels"]
        scored = pc.sum(pc.not_equal(pc.list_flatten(column), IGNORE)).as_py() or 0
        first = pc.sum(pc.not_equal(pc.list_element(column, 0), IGNORE)).as_py() or 0
        return int(scored - first)
    except Exception:  # noqa: BLE001 - any other dataset type: count in Python
        return sum(sum(1 for t in row["labels"][1:] if t != IGNORE) for row in dataset)


def loss_tokens_per_step(dataset: Any, effective_batch: int) -> float:
    """The mean loss tokens of an optimizer step over the epoch: what a grouped step divides its summed loss by.

    A grouped step holds examples of one length, so dividing by its own token count (as a random-order step
    does) would give every token of a short-example step many times the weight of a token of a long-example
    step: the run would fit short examples at the expense of long ones and end with a worse token-weighted
    loss (bench/grouping.py). Divided by the epoch's mean instead, every token weighs the same in every step,
    as in expectation in random order; it depends only on the data and the effective batch, so accumulation
    (batch 8 = 2 x 4) and resume give the same steps."""
    steps = max(1, -(-len(dataset) // max(1, effective_batch)))
    return max(1.0, loss_tokens(dataset) / steps)


def grouped_order(lengths: list[int], effective_batch: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: each consecutive `effective_batch` slice is one optimizer step.

    A seeded permutation is cut into megabatches of MEGABATCH_STEPS steps, each sorted by length and cut
    into steps; the steps are then shuffled (the longest first, so an out-of-memory shows at once). The
    `len % effective_batch` leftover examples form the last, short step, so the step boundaries stay
    where the trainer puts them. Within a step, examples are sorted by length: its micro-batches (and
    processes) get similar lengths too.
    """
    import torch

    n = len(lengths)
    if n == 0:
        return []
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=generator).tolist()
    full = n - n % effective_batch
    body, leftover = perm[:full], perm[full:]
    steps_per_mega = max(1, min(MEGABATCH_STEPS, full // (effective_batch * MIN_MEGABATCHES)))
    mega = steps_per_mega * effective_batch
    steps: list[list[int]] = []
    for start in range(0, full, mega):
        chunk = sorted(body[start:start + mega], key=lambda i: (-lengths[i], i))
        steps.extend(chunk[k:k + effective_batch] for k in range(0, len(chunk), effective_batch))
    if steps:
        order = torch.randperm(len(steps), generator=generator).tolist()
        steps = [steps[i] for i in order]
        if LONGEST_FIRST:
            longest = max(range(len(steps)), key=lambda s: lengths[steps[s][0]])
            steps[0], steps[longest] = steps[longest], steps[0]
    if leftover:
        steps.append(sorted(leftover, key=lambda i: (-lengths[i], i)))
    return [i for step in steps for i in step]


class EffectiveBatchLengthSampler:
    """torch Sampler: `grouped_order` for the current epoch (the trainer calls `set_epoch`)."""

    def __init__(self, lengths: list[int], effective_batch: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.effective_batch = max(1, int(effective_batch))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(grouped_order(self.lengths, self.effective_batch, self.seed, self.epoch))


def effective_batch_size(args: Any) -> int:
    """Examples per optimizer step over all processes."""
    return int(args.train_batch_size) * int(args.gradient_accumulation_steps) * max(1, int(args.world_size))


# ---- packing --------------------------------------------------------------------------------------


def pack_examples(dataset: Any, seq_length: int) -> Any:
    """Whole examples packed into rows of at most `seq_length` tokens (best fit decreasing), with `seq_lengths`."""
    from trl import pack_dataset

    keep = [c for c in ("input_ids", "labels") if c in dataset.column_names]
    return pack_dataset(dataset.select_columns(keep), seq_length, strategy="bfd")


# ---- trainer --------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def trainer_class(base: type) -> type:
    """`base` (SFTTrainer or a method's subclass of it) with ftcli's batching: the length-grouped
    effective-batch sampler, packing of the training set, and real-token counting of padding-free rows."""

    class BatchingTrainer(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            collator = kwargs.get("data_collator")
            if isinstance(collator, Collator) and collator.packing and kwargs.get("train_dataset") is not None:
                kwargs["train_dataset"] = pack_examples(kwargs["train_dataset"], collator.seq_length)
            self._ftcli_real_tokens = None
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or dataset is None or not hasattr(
                    dataset, "__len__"):
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            if TOKEN_WEIGHTED_GROUPING:
                self._ftcli_step_tokens = loss_tokens_per_step(dataset, effective_batch_size(self.args))
            return EffectiveBatchLengthSampler(example_lengths(dataset), effective_batch_size(self.args), seed)

        def _get_num_items_in_batch(self, batch_samples: list, device: Any) -> Any:
            counted = super()._get_num_items_in_batch(batch_samples, device)
            expected = getattr(self, "_ftcli_step_tokens", None)
            self._ftcli_loss_scale = None
            if expected is None or counted is None:
                return counted
            import torch

            counted = torch.as_tensor(counted, device=device)
            # The same division by parallel sizes as the count (1 under DDP and FSDP).
            mean = counted.new_tensor(expected, dtype=torch.float32) / (
                self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
            # Reported (logged) losses stay this step's mean token loss: the loss trained is rescaled, not the record.
            self._ftcli_loss_scale = mean / counted.float().clamp(min=1)
            return mean

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            # The count rides in the batch from the collator; the model must not see it.
            # (An objective that generates its batch, GRPO, gets a list of rows here, never a count.)
            self._ftcli_real_tokens = inputs.pop(REAL_TOKENS, None) if isinstance(inputs, dict) else None
            loss = super().training_step(model, inputs, *args, **kwargs)
            scale = getattr(self, "_ftcli_loss_scale", None)
            return loss if scale is None else loss * scale.to(loss.device)

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            real = self._ftcli_real_tokens
            if real is None or self.args.include_num_input_tokens_seen != "non_padding":
                return super()._track_num_input_tokens(inputs)
            import torch

            count = torch.as_tensor(real, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()
            self._ftcli_real_tokens = None

    BatchingTrainer.__name__ = BatchingTrainer.__qualname__ = f"Batching{base.__name__}"
    return BatchingTrainer
