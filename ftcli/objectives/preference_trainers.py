"""TRL's ORPO, CPO (SimPO's loss) and KTO trainers, fed the rows ftcli tokenized and masked (ftcli/data/preference.py).

    >>> from ftcli.objectives.preference_trainers import FtcliORPOTrainer, pair_collator
    >>> trainer = FtcliORPOTrainer(model=peft_model, args=ORPOConfig(...), train_dataset=pairs, processing_class=tok,
    ...                            data_collator=pair_collator(tok.pad_token_id), ftcli_config=config)

What changes from TRL's behaviour, each small:
- ORPO and CPO (`--objective orpo`, `--objective simpo`) re-render and re-tokenize text rows in `__init__`
  (`tokenize_row`, after extracting prompts and applying the chat template). Here the rows are already ftcli's pairs
  (`prompt_ids`, `chosen_ids`, `rejected_ids`): `tokenize_row` keeps them, those passes find nothing to change, and
  they run with the datasets cache off so that nothing is written next to the prepared folder (the cache entry stays
  as it was built). `pair_collator` turns a batch of pairs into the tensors TRL's loss reads (`chosen_input_ids`,
  `chosen_attention_mask`, `chosen_labels` with the prompt masked, the same for `rejected`).
- KTO (`--objective kto`): the labeled rows (`prompt_ids`, `completion_ids`, `label`) are used as prepared; TRL's
  `_prepare_dataset` would re-tokenize them. What it adds besides is kept: each row's mismatched completion for
  the KL estimate (the batch's completions rotated by one, as TRL does), and a LoRA model's reference is the model
  with its adapter disabled, as for DPO (TRL would copy the zero-start adapter into a second "ref" adapter that
  `save_pretrained` would then write into the run folder too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import warnings

import torch
from trl import KTOTrainer

with warnings.catch_warnings():  # "trl.experimental may change": ftcli pins the TRL it is tested with
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

from ftcli.console import console
from ftcli.training.batching import REAL_TOKENS

IGNORE = -100


@contextlib.contextmanager
def datasets_cache_off() -> Iterator[None]:
    """TRL's passes over the (already tokenized) pairs write to a temporary folder, not beside the prepared data."""
    import datasets

    was = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was:
            datasets.enable_caching()


@dataclass
class PairCollator:
    """A batch of ftcli pairs as TRL's ORPO/CPO tensors: each answer after its prompt, right-padded, the prompt and
    the padding out of the labels."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            seqs = [list(r["prompt_ids"]) + list(r[f"{side}_ids"]) for r in rows]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for i, (row, seq) in enumerate(zip(rows, seqs)):
                ids[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
                start = len(row["prompt_ids"])
                labels[i, start:len(seq)] = ids[i, start:len(seq)]
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_labels"] = ids, mask, labels
        # The tokens read, padding excluded, for the run's tokens/s (ftcli's batching pops it before the model).
        out[REAL_TOKENS] = int(out["chosen_attention_mask"].sum() + out["rejected_attention_mask"].sum())
        return out


def pair_collator(pad_token_id: int) -> PairCollator:
    return PairCollator(pad_token_id)


class _PreparedPairs:
    """ORPO/CPO over ftcli's prepared pairs (see the module's docstring)."""

    def __init__(self, *args: Any, ftcli_config: Any = None, **kwargs: Any) -> None:
        self._ftcli_config = ftcli_config
        with datasets_cache_off():
            super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
        return feature


class FtcliORPOTrainer(_PreparedPairs, ORPOTrainer):  # type: ignore[misc]
    pass


class FtcliCPOTrainer(_PreparedPairs, CPOTrainer):  # type: ignore[misc]
    pass


def balanced_weights(desirable: int, undesirable: int, given_d: float | None,
                     given_u: float | None) -> tuple[float, float, str]:
    """(desirable weight, undesirable weight, how they were chosen): as given, or balanced so that weight x count is
    the same for both groups (the KTO paper's eq. 8 asks for a ratio in [1, 4/3]; 1 is its lower end): the larger
    group weighs 1 and the smaller one is weighted up; one weight given, the other balances it."""
    if given_d is not None and given_u is not None:
        return given_d, given_u, "as given"
    if given_d is None and given_u is None:
        if not (desirable and undesirable):
            return 1.0, 1.0, "one group only"
        return max(1.0, undesirable / desirable), max(1.0, desirable / undesirable), "balanced for the counts"
    if given_d is None:
        return (given_u * undesirable / desirable if desirable and undesirable else 1.0), given_u, \
            "desirable balanced for the counts"
    return given_d, (given_d * desirable / undesirable if desirable and undesirable else 1.0), \
        "undesirable balanced for the counts"


class FtcliKTOTrainer(KTOTrainer):  # type: ignore[misc]
    def __init__(self, *args: Any, ftcli_config: Any = None, **kwargs: Any) -> None:
        self._ftcli_config = ftcli_config
        args_ = kwargs.get("args")
        dataset = kwargs.get("train_dataset")
        if ftcli_config is not None and args_ is not None and dataset is not None:
            labels = dataset["label"]
            good = sum(1 for label in labels if label)
            d, u, how = balanced_weights(good, len(labels) - good, ftcli_config.kto_desirable_weight,
                                         ftcli_config.kto_undesirable_weight)
            args_.desirable_weight, args_.undesirable_weight = d, u
            console.print(f"KTO weights: desirable {d:.3g}, undesirable {u:.3g} ({how}: {good:,} desirable, "
                          f"{len(labels) - good:,} undesirable rows)", soft_wrap=True)
        super().__init__(*args, **kwargs)
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict) and "ref" in peft_config:
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        """The prepared rows, with the KL estimate's mismatched completions added as TRL adds them (within each
        batch of `per_device_train_batch_size` rows, every row gets the previous row's completion)."""
        if not self.calculate_KL or "KL_completion_ids" in dataset.column_names:
            return dataset
        size = args.per_device_train_batch_size
        completions = dataset["completion_ids"]
        rotated: list[list[int]] = []
        for start in range(0, len(completions), size):
            block = completions[start:start + size]
            rotated.extend([block[-1], *block[:-1]])
        return dataset.add_column("KL_completion_ids", rotated)
