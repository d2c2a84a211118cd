"""TRL's DPOTrainer, fed the pairs ftcli tokenized and masked (ftcli/data/preference.py).

    >>> from ftcli.objectives.dpo_trainer import FtcliDPOTrainer
    >>> trainer = FtcliDPOTrainer(model=peft_model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok,
    ...                           ftcli_config=config)

Three changes to TRL's behaviour, each small:
- the dataset is used as prepared (`prompt_ids`, `chosen_ids`, `rejected_ids`): TRL's `_prepare_dataset`
  would re-render and re-tokenize the text and append its own EOS;
- a LoRA model's reference is the model with its adapter disabled: TRL copies a PeftModel's adapter into a
  second "ref" adapter, which for a zero-start adapter (the only kind ftcli trains with DPO) is the same
  model at extra memory, and which `save_pretrained` would then write into the run folder too;
- `--precompute-ref`: the reference log-probabilities are cached under `<ftcli_home>/datasets/reference/`,
  keyed by the reference weights, the data and the settings that change the numbers, so a second run or a
  resume reads them back instead of computing them again. Each entry carries the checksum of its tensors and is
  flushed to disk before its rename; a damaged entry (truncated, edited, unreadable) is computed again, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from trl import DPOTrainer

from ftcli.console import console

REFERENCE_FOLDER = "reference"


class FtcliDPOTrainer(DPOTrainer):  # type: ignore[misc]
    def __init__(self, *args: Any, ftcli_config: Any = None, **kwargs: Any) -> None:
        self._ftcli_config = ftcli_config
        super().__init__(*args, **kwargs)
        peft_config = getattr(self.model, "peft_config", None)
        if isinstance(peft_config, dict) and "ref" in peft_config:
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        path = reference_cache_path(self._precompute_model_hash, dataset._fingerprint, self._ftcli_settings())
        saved, problem = load_reference(path, len(dataset))
        if saved is not None:
            console.print(f"reference log-probs ({name}, {len(dataset):,} pairs): reused from {path}", soft_wrap=True)
        else:
            if problem:
                console.print(f"[yellow]note:[/] the cached reference log-probs {path} are damaged ({problem}): "
                              "computing them again", soft_wrap=True)
            saved = self._compute_reference(dataset, batch_size)
            save_reference(path, saved)
            console.print(f"reference log-probs ({name}, {len(dataset):,} pairs): computed once and cached in "
                          f"{path}", soft_wrap=True)
        return dataset.add_column("ref_chosen_logps", saved["chosen"].tolist()) \
            .add_column("ref_rejected_logps", saved["rejected"].tolist())

    def _ftcli_settings(self) -> dict[str, Any]:
        """What changes the reference numbers besides the weights and the data."""
        model = self.ref_model or self.model
        return {"dtype": str(next(model.parameters()).dtype), "bf16": bool(self.args.bf16),
                "fp16": bool(self.args.fp16), "device": self.accelerator.device.type,
                "ld_alpha": self.args.ld_alpha, "max_length": self.args.max_length}

    def _compute_reference(self, dataset: Any, batch_size: int) -> dict[str, Any]:
        from torch.utils.data import DataLoader

        columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
        loader = DataLoader(dataset.select_columns(columns), batch_size=batch_size, collate_fn=self.data_collator,
                            shuffle=False)
        model = self.ref_model or self.model
        chosen, rejected = [], []
        stop = self._ftcli_stop_request()
        for batch in loader:
            if stop is not None and stop.requested:  # Ctrl-C / SIGTERM: honoured between batches, not after the pass
                raise KeyboardInterrupt
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            c, r = self.compute_ref_log_probs(model, batch)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


    def _ftcli_stop_request(self) -> Any:
        """The run guard's stop request (ftcli.training.guard.StopRequest), when a guard watches this trainer."""
        handler = getattr(self, "callback_handler", None)
        for callback in getattr(handler, "callbacks", []):
            stop = getattr(callback, "stop", None)
            if stop is not None and hasattr(stop, "requested"):
                return stop
        return None


def reference_cache_path(model_hash: str, data_fingerprint: str, settings: dict[str, Any]) -> Path:
    from ftcli.data.cache import cache_root

    key = hashlib.sha256(json.dumps({"model": model_hash, "data": data_fingerprint, "settings": settings},
                                    sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / REFERENCE_FOLDER / f"{key}.safetensors"


CHECKSUM = "ftcli_sha256"  # the safetensors metadata entry: sha256 of the tensors' names, shapes and bytes


def tensors_digest(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].contiguous().cpu()
        h.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def load_reference(path: Path, pairs: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the cached log-probabilities, None), or (None, why they cannot be trusted) — (None, None) when there are
    none. An entry is used only when it parses, holds both columns for `pairs` pairs, and its tensors match the
    checksum written with them (a truncated file, a same-size edit and a file of another version are all rebuilt)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as fh:
            checksum = (fh.metadata() or {}).get(CHECKSUM)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        return None, f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if checksum is None:
        return None, "no checksum"
    if set(tensors) != {"chosen", "rejected"} or any(t.shape != (pairs,) for t in tensors.values()):
        return None, "not the log-probabilities of these pairs"
    if tensors_digest(tensors) != checksum:
        return None, "checksum mismatch"
    return tensors, None


def save_reference(path: Path, tensors: dict[str, Any]) -> None:
    """The log-probabilities and their checksum written through a temporary sibling, flushed to disk, and one rename
    (never half a file, even after a power cut), readable as the umask says (safetensors writes 0600)."""
    from safetensors.torch import save_file

    from ftcli.files import file_mode, fsync_dir

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={CHECKSUM: tensors_digest(tensors)})
        os.chmod(tmp, file_mode())
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
