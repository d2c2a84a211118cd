"""What a run needs to know and do across processes (torch.distributed, as set up by the launcher).

    >>> from ftcli.training.distributed import is_main_rank, world_size
    >>> is_main_rank(), world_size()     # (True, 1) in a single process

Every function here also works without a process group (one process): it then does nothing, or
returns the single process's own answer.
"""

from __future__ import annotations

import os
from typing import Any


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """The number of processes of this run, as the launcher set it (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world() -> tuple[bool, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_world_size()
    return False, 1


def agree(flags: list[float]) -> list[float]:
    """Element-wise max of `flags` over all ranks (every rank must call this at the same point)."""
    import torch
    import torch.distributed as dist

    on, size = _world()
    if not on or size == 1:
        return flags
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def barrier() -> None:
    import torch.distributed as dist

    on, size = _world()
    if on and size > 1:
        dist.barrier()


def max_over_ranks(kind: str, peak: int) -> tuple[str, int]:
    """With several processes, the largest peak of any rank (every rank must call this)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return kind, peak
    backend = dist.get_backend()
    value = torch.tensor([peak], dtype=torch.int64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return f"{kind} (max of {dist.get_world_size()} ranks)", int(value.item())


def leave_process_group() -> None:
    """Meet the other ranks once more, then close the process group.

    Without this, a rank that exits while gloo still holds connections to the others can abort at
    interpreter shutdown; on several machines the launcher then waits for a peer that is gone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sharded_fraction(model: Any) -> float:
    """Share of parameters held as FSDP2 shards (DTensor): 0.0 on one process, about 1.0 when FSDP sharded."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    total = sum(p.numel() for p in params) or 1
    return round(sum(p.numel() for p in params if isinstance(p, DTensor)) / total, 4)
