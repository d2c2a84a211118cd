"""A checkpoint's checksums computed while it is written, and its optimizer state written while training goes on.

    >>> checksums = Checksums()
    >>> checksums.land([folder / "adapter_model.safetensors"])        # fsync + sha256 on background threads
    >>> checksums.write_later(folder / "optimizer.pt", write)         # write(path), then fsync + sha256 there
    >>> sizes, sums = checksums.settle(folder)                        # every file of the folder, on disk

`ChecksumsAsFilesLand` is the trainer mixin that feeds it during a checkpoint save (one process): each part
the trainer writes (weights or adapter, optimizer and scheduler, random states) lands as soon as that part
returns, and an optimizer state of at most `BACKGROUND_OPTIMIZER_BYTES` (a LoRA's) is copied in memory at
the save and written by a background thread, so the training loop waits for a copy instead of a pickle and a
write. A checkpoint still counts only from its marker, written by `mark_complete` after `settle`, which waits
for that write: a write that fails fails the mark, and the checkpoint stays incomplete.
"""

from __future__ import annotations

import copy
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcli.files import StatKey, file_mode, fsync_dir, stat_key

OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # the trainer's names (transformers.trainer)
# An optimizer state up to this size is copied at the save and written in the background (the copy is extra
# host memory until it is written); a larger one (a full fine-tune's) is written by the trainer as before.
BACKGROUND_OPTIMIZER_BYTES = 1 << 30


def fsync_file(path: Path) -> None:
    """fsync one file; a file a library wrote private (0600) gets the mode the umask gives (see fsync_tree)."""
    with open(path, "rb") as fh:
        if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) == 0o600 != file_mode():
            os.fchmod(fh.fileno(), file_mode())
        os.fsync(fh.fileno())


def keyed_sha256(path: Path) -> tuple[StatKey, str | None]:
    """The file's stat_key and sha256; the sha256 is None when the file changed while it was read."""
    import hashlib

    with open(path, "rb") as fh:
        before = stat_key(os.fstat(fh.fileno()))
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        after = stat_key(os.fstat(fh.fileno()))
    return before, digest if before == after else None


class Checksums:
    """The sha256 of each file of a folder being written, and its fsync, done on two background threads as soon
    as the file is complete (`land`) while the writer goes on with the next one: the file is read back from
    the page cache it was just written to, its fsync (the disk) and its hashing (a CPU) side by side.

    `settle(folder)` gives every file under the folder with its size and sha256, each fsynced, and fsyncs the
    folders: a landed result is used when the file is unchanged since it was hashed (same inode, size and
    modification time), anything else is computed then. An fsync that failed in the background fails
    `settle` (an fsync error is reported once: it is never retried into a silent success)."""

    def __init__(self) -> None:
        self._executor: Any = None
        self._landed: dict[Path, tuple[Any, Any]] = {}
        self._writes: dict[Path, Any] = {}  # files being written by write_later
        self._lock = threading.Lock()  # files of the next checkpoint land while this one settles

    def land(self, paths: list[Path]) -> None:
        with self._lock:
            for path in map(Path, paths):
                if path not in self._writes:  # a file being written in the background lands when written
                    self._landed[path] = self._submit(path)

    def write_later(self, path: Path, write: Callable[[Path], None]) -> None:
        """Run `write(path)` on a background thread, then fsync and hash the file there; `settle` waits for it
        and raises what it raised."""
        def written() -> tuple[StatKey, str | None]:
            try:
                write(path)
            except OSError as exc:  # named: the trainer's own saves fail in the loop, where it is known
                raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
            fsync_file(path)
            return keyed_sha256(path)

        path = Path(path)
        with self._lock:
            future = self._pool().submit(written)
            self._writes[path] = future
            self._landed[path] = (future, future)

    def _pool(self) -> Any:
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(2, thread_name_prefix="ftcli-checksums")
        return self._executor

    def _submit(self, path: Path) -> tuple[Any, Any]:
        return self._pool().submit(fsync_file, path), self._pool().submit(keyed_sha256, path)

    def settle(self, folder: Path) -> tuple[dict[str, int], dict[str, str]]:
        """({relative name: size}, {relative name: sha256}) of every file under `folder`, on disk."""
        folder = Path(folder)
        with self._lock:
            writes = {path: job for path, job in self._writes.items() if folder in path.parents}
        for path, job in writes.items():  # written (or its error raised) before the folder is listed
            job.result()
            with self._lock:
                del self._writes[path]
        paths = [Path(root) / name for root, _dirs, names in os.walk(folder) for name in names]
        with self._lock:
            jobs = {path: self._landed.pop(path, None) or self._submit(path) for path in paths}
            for path in [p for p in self._landed if folder in p.parents]:  # landed, then removed
                del self._landed[path]
        sizes, sums = {}, {}
        try:
            for path, (synced, hashed) in jobs.items():
                synced.result()
                key, digest = hashed.result()
                if digest is None or key != stat_key(path.stat()):  # changed since it landed: again, now
                    fsync_file(path)
                    key, digest = keyed_sha256(path)
                name = str(path.relative_to(folder))
                sizes[name], sums[name] = key[1], digest
        finally:
            with self._lock:
                if not self._landed and not self._writes and self._executor is not None:
                    self._executor.shutdown(wait=False)
                    self._executor = None
        for root, _dirs, _names in os.walk(folder):
            fsync_dir(Path(root))
        return sizes, sums


class ChecksumsAsFilesLand:
    """A trainer mixin: in a one-process run, the files each part of a checkpoint save writes (the weights or
    adapter, then the optimizer and scheduler, then the random states) are handed to `ftcli_checksums` as soon
    as that part returns, so they are hashed and flushed on background threads while the trainer writes the
    next part, and mark_complete waits only for the last ones. (With several processes another rank may still
    be writing into the folder: everything is then hashed at the mark, after the ranks' barrier.)"""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self.__dict__["_ftcli_saving"] = True
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self.__dict__["_ftcli_saving"] = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with self._ftcli_landing(output_dir):
            super().save_model(output_dir, _internal_call=_internal_call)  # type: ignore[misc]

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        snapshot = self._ftcli_optimizer_snapshot(output_dir)
        if snapshot is None:
            with self._ftcli_landing(output_dir):
                super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
            return
        import warnings

        import torch
        from transformers.trainer_pt_utils import reissue_pt_warnings

        self.ftcli_checksums.write_later(Path(output_dir) / OPTIMIZER_NAME, lambda path: torch.save(snapshot, path))
        with self._ftcli_landing(output_dir), warnings.catch_warnings(record=True) as caught:  # as the trainer does
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)  # type: ignore[attr-defined]
        reissue_pt_warnings(caught)

    def _ftcli_optimizer_snapshot(self, output_dir: str) -> dict[str, Any] | None:
        """A copy of the optimizer's state (on the CPU), to be written while training goes on: only in a
        checkpoint save of one plain process (no FSDP, DeepSpeed or XLA) and up to BACKGROUND_OPTIMIZER_BYTES."""
        trainer: Any = self
        if not self.__dict__.get("_ftcli_saving") or trainer.args.world_size > 1 or not trainer.args.should_save \
                or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or trainer.optimizer is None:
            return None
        import torch
        from transformers.utils import is_torch_xla_available

        if is_torch_xla_available():
            return None
        state = trainer.optimizer.state_dict()
        tensors = [v for entry in state["state"].values() for v in entry.values() if torch.is_tensor(v)]
        if sum(t.numel() * t.element_size() for t in tensors) > BACKGROUND_OPTIMIZER_BYTES:
            return None
        # The live tensors change at the next step: the copy is what this step's checkpoint holds.
        own = (lambda v: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v))
        return {**{k: copy.deepcopy(v) for k, v in state.items() if k != "state"},
                "state": {key: {name: own(v) for name, v in entry.items()} for key, entry in state["state"].items()}}

    def _save_rng_state(self, output_dir: str) -> None:
        with self._ftcli_landing(output_dir):
            super()._save_rng_state(output_dir)  # type: ignore[misc]

    @property
    def ftcli_checksums(self) -> Checksums:
        return self.__dict__.setdefault("_ftcli_checksums", Checksums())

    @contextmanager
    def _ftcli_landing(self, output_dir: str | None) -> Iterator[None]:
        """Around a part of a checkpoint save: the files it wrote (new, or changed since before it) land."""
        if not self.__dict__.get("_ftcli_saving") or output_dir is None or self.args.world_size > 1:  # type: ignore
            yield
            return
        before = stat_keys(Path(output_dir))
        yield
        self.ftcli_checksums.land([p for p, key in stat_keys(Path(output_dir)).items() if before.get(p) != key])


def stat_keys(folder: Path) -> dict[Path, tuple[int, int, int]]:
    """{path: files.stat_key} of every file under `folder` (none when it does not exist)."""
    found = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            try:
                found[path] = stat_key(path.stat())
            except FileNotFoundError:
                continue
    return found


