"""Start the ranks of a distributed run through torch.distributed.run, the engine behind torchrun.

    $ ftcli train --method fsdp --model builtin:tiny-llama --nproc-per-node 2
    # runs: torchrun --nnodes 1 --nproc-per-node 2 --node-rank 0 --master-addr 127.0.0.1 --master-port 29500
    #       --max-restarts 0 -m ftcli train --method fsdp ... --output-dir runs/fsdp-<time>

Each rank runs the same `ftcli train` command line; seeing WORLD_SIZE and LOCAL_RANK (set by torchrun,
accelerate launch or this launcher) it trains as one rank instead of launching again. A rank that fails
stops the others and the launch exits non-zero with that rank's error in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ftcli.errors import RunFailed


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def needs_launch(config: Any) -> bool:
    return config.method == "fsdp" and not under_launcher()


def launcher_args(config: Any) -> list[str]:
    """torchrun's flags for this machine: static rendezvous at master-addr:port, or a c10d endpoint."""
    args = ["--nnodes", str(config.nnodes), "--nproc-per-node", str(config.nproc_per_node)]
    if config.rdzv_endpoint:
        # c10d assigns node ranks itself; the id only has to be the same on every machine.
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", config.rdzv_endpoint, "--rdzv-id", "ftcli"]
    else:
        args += ["--node-rank", str(config.node_rank), "--master-addr", config.master_addr,
                 "--master-port", str(config.master_port)]
    # A failed rank fails the run: restarting from scratch would silently redo the training.
    return [*args, "--max-restarts", "0"]


def rank_command(argv: list[str], output_dir: Path) -> list[str]:
    """The ranks' command line: the user's own arguments with the output folder fixed, so every rank
    (and every machine) agrees on it instead of each picking its own timestamped default."""
    return ["-m", "ftcli", *argv, "--output-dir", str(output_dir)]


def preflight(config: Any) -> Path:
    """What must not race between ranks, done once here: the output-folder check, building a builtin model."""
    from ftcli.models import resolve_model_source
    from ftcli.runfolder import check_output_dir, default_output_dir

    out = Path(config.output_dir or default_output_dir(config.method)).expanduser()
    if config.node_rank == 0 and not config.rdzv_endpoint:
        out = check_output_dir(out, config.overwrite)
    resolve_model_source(config.model)
    return out.resolve()


def launch(config: Any, argv: list[str]) -> None:
    """Run this machine's ranks to the end; raise RunFailed naming the first rank that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    from ftcli.console import console

    out = preflight(config)
    # torchrun would otherwise warn and pick 1 thread; share this machine's cores between its ranks.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc_per_node)))
    args = launcher_args(config) + rank_command(argv, out)
    console.print(f"[bold]ftcli launch[/] torchrun {' '.join(args)}")
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise RunFailed(f"rank {rank} failed (exit code {failure.exitcode}): {_failure_message(failure)}",
                        hint="its own output above has the details; rerun with --debug for tracebacks") from None
    except RendezvousError as exc:
        raise RunFailed(f"the ranks could not meet: {type(exc).__name__}: {exc}",
                        hint="check --nnodes, --master-addr/--master-port or --rdzv-endpoint on every machine") from None


def _failure_message(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = " ".join(str(message).split())
    # torchrun's stand-in when a rank left no error file (a crash, not an ftcli error): its output has it.
    if not message or message.startswith("To enable traceback"):
        return "no error message from that rank; see its output above"
    return message


def record_rank_error(message: str) -> None:
    """Hand a rank's one-line error to the launcher (torchrun's per-rank error file), if there is one."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        raise RunFailed(message)
    except RunFailed as exc:
        ErrorHandler().record_exception(exc)
