"""TRL's RewardTrainer, fed the pairs ftcli tokenized (ftcli/data/preference.py).

    >>> from ftcli.objectives.reward_trainer import FtcliRewardTrainer, PairSequenceCollator
    >>> trainer = FtcliRewardTrainer(model=classifier, args=RewardConfig(...), train_dataset=pairs,
    ...                              processing_class=tok, data_collator=PairSequenceCollator(pad_token_id=0))

One change to TRL's behaviour: the dataset is used as prepared. ftcli's pairs hold the prompt and each answer
apart (`prompt_ids`, `chosen_ids`, `rejected_ids`), while TRL reads `chosen_ids`/`rejected_ids` as whole sequences:
the collator puts each answer after its prompt (`pair_sequences`), batch by batch, so nothing is re-rendered,
re-tokenized, given a second EOS or copied on disk. The scorer (ftcli.evaluation.reward_model) and `ftcli eval`
read the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def pair_sequences(row: dict[str, Any]) -> dict[str, list[int]]:
    """A prepared pair -> the whole sequences its scores are read on: the prompt, then each answer."""
    prompt = list(row.get("prompt_ids") or [])
    return {"chosen_ids": prompt + list(row["chosen_ids"]), "rejected_ids": prompt + list(row["rejected_ids"])}


@dataclass
class PairSequenceCollator(DataCollatorForPreference):  # type: ignore[misc]
    """TRL's preference collator (the chosen sequences, then the rejected, right-padded) over ftcli's pairs."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return super().torch_call([pair_sequences(e) for e in examples])


class FtcliRewardTrainer(RewardTrainer):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keep_score_head_in_compute_dtype(self.model)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(PAIR_COLUMNS)


def keep_score_head_in_compute_dtype(model: Any) -> int:
    """QLoRA: TRL casts every trainable weight of a 4-bit model to bfloat16 (the QLoRA paper's adapters), the new
    score head too, which then meets hidden states in the compute dtype (a dtype error on float32). The head goes back
    to the dtype of the model's embeddings; the LoRA weights stay in bfloat16. Returns how many weights moved."""
    embeddings = model.get_input_embeddings()
    dtype = embeddings.weight.dtype
    moved = 0
    for name, param in model.named_parameters():
        if param.requires_grad and "modules_to_save" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
            moved += 1
    return moved
