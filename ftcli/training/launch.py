"""Start the ranks of a distributed run through torch.distributed.run, the engine behind torchrun.

    $ ftcli train --method fsdp --model builtin:tiny-llama --nproc-per-node 2
    $ ftcli train --method lora --model builtin:tiny-llama --nproc-per-node 2   # data parallel (DDP)
    # runs: torchrun --nnodes 1 --nproc-per-node 2 --standalone --max-restarts 0
    #       -m ftcli train --method fsdp ... --output-dir runs/fsdp-<time>
    # (one machine without --master-port: a free port; else --node-rank/--master-addr/--master-port as given)

Each rank runs the same `ftcli train` command line; seeing WORLD_SIZE and LOCAL_RANK (set by torchrun,
accelerate launch or this launcher) it trains as one rank instead of launching again. A rank that fails
stops the others and the launch exits non-zero with that rank's error in one line, and the run
manifest says failed (a crashed rank 0 could not say it itself).

Lifetime: each rank dies with this launcher, however it dies (ftcli/__main__.py arms PR_SET_PDEATHSIG first
thing), and the run folder's lock, held shared by the launcher and joined by every rank, stays held while any of
them lives: a killed launcher never leaves ranks training in a folder another command could take.

Signals: Ctrl-C or SIGTERM to the launcher is forwarded once to every rank (torchrun's own
shutdown), which finish the current step together, save a checkpoint and exit; the launcher waits
for them up to `SHUTDOWN_TIMEOUT_S` and then exits 130 like a one-process run. A second Ctrl-C
stops the ranks at once.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import EXIT_INTERRUPTED, ConfigError, RunFailed

# How long the launcher lets the ranks finish their step and save a checkpoint after a signal,
# before torchrun kills them (its default, 30 s, is too short to save a large model).
SHUTDOWN_TIMEOUT_S = 600


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def needs_launch(config: Any) -> bool:
    """Whether this process starts the ranks: not already under a launcher, and a sharded method (launched even
    on one process: FSDP needs its process group) or a data-parallel one on more than one process."""
    from ftcli.methods import METHODS

    method = METHODS[config.method]
    several = config.nproc_per_node * config.nnodes > 1
    return method.multi_process and (method.shards or several) and not under_launcher()


def picks_own_port(config: Any) -> bool:
    """One machine, no --master-port and no --rdzv-endpoint: the ranks meet on a free port torchrun picks (its
    `--standalone`), so two runs on one machine never collide on the default port."""
    return config.nnodes == 1 and not config.rdzv_endpoint and "master_port" not in config.model_fields_set


def launcher_args(config: Any) -> list[str]:
    """torchrun's flags for this machine: a free port (one machine), static rendezvous at master-addr:port, or a
    c10d endpoint."""
    args = ["--nnodes", str(config.nnodes), "--nproc-per-node", str(config.nproc_per_node)]
    if picks_own_port(config):
        args += ["--standalone"]
    elif config.rdzv_endpoint:
        # c10d assigns node ranks itself; the id only has to be the same on every machine.
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", config.rdzv_endpoint, "--rdzv-id", "ftcli"]
    else:
        args += ["--node-rank", str(config.node_rank), "--master-addr", config.master_addr,
                 "--master-port", str(config.master_port)]
    # A failed rank fails the run: restarting from scratch would silently redo the training.
    return [*args, "--max-restarts", "0", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]


def rank_command(argv: list[str], output_dir: Path) -> list[str]:
    """The ranks' command line: the user's own arguments with the output folder fixed, so every rank
    (and every machine) agrees on it instead of each picking its own timestamped default."""
    return ["-m", "ftcli", *argv, "--output-dir", str(output_dir)]


@contextmanager
def preflight(config: Any) -> Iterator[Path]:
    """What must not race between ranks, done once here: the output-folder check (under the folder's lock,
    held for the whole launch on machine 0 of a static rendezvous), building a builtin model."""
    from ftcli.chain import resolve_start
    from ftcli.models import resolve_model_source
    from ftcli.training.runfolder import LOCK_HELD_ENV, claim_run_dir

    decides = config.node_rank == 0 and not config.rdzv_endpoint
    with claim_run_dir(config.output_dir, config.method, config.overwrite, bool(config.resume),
                       lock=decides, shared=decides) as out:
        if decides and config.resume:
            from ftcli.training.checkpoints import resolve_verified
            from ftcli.training.runfolder import finished_run

            if finished_run(config, out) is None:  # else each rank finds the run complete and says so (rank 0)
                from ftcli.training.checkpoints import check_compatible, run_identity

                # A different run (as far as the flags tell) is refused before any rank starts.
                check_compatible(resolve_verified(config.resume, out),
                                 run_identity(config, None, config.nproc_per_node * config.nnodes), config.force, True)
        resolve_model_source(resolve_start(config.model).base)  # builds a builtin base once, before the ranks
        if decides:
            # Each rank (a child of this process) joins the lock, now shared, instead of taking it: the folder
            # stays locked while any rank lives, even if this launcher is killed.
            os.environ[LOCK_HELD_ENV] = str(out)
        try:
            yield out
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)


def launch(config: Any, argv: list[str]) -> None:
    """Run this machine's ranks to the end; raise RunFailed naming the first rank that failed."""
    check_processes(config)
    check_master_port(config)
    with preflight(config) as out:
        _launch(config, argv, out)


def check_processes(config: Any) -> None:
    """More ranks than this machine has GPUs (or, on CPU, cores) is refused before anything starts: they would
    share devices, or crowd the cores and memory (each rank holds its own copy of the model)."""
    import torch

    if config.device != "cpu" and torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        what = "CPU cores this process may use"
    if config.nproc_per_node > have:
        raise ConfigError(f"--nproc-per-node {config.nproc_per_node} is more than the {have} {what} on this machine",
                          hint=f"pass --nproc-per-node {have} or fewer (one rank per device)")


def check_master_port(config: Any) -> None:
    """A --master-port already in use on machine 0 is one line naming it, before the ranks start."""
    import socket

    if picks_own_port(config) or config.rdzv_endpoint or config.node_rank != 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds it
        try:
            probe.bind(("", config.master_port))
        except OSError as exc:
            raise ConfigError(_port_busy(config, exc.strerror or str(exc)),
                              hint=PORT_HINT) from None


PORT_HINT = ("pass a free --master-port, or leave --master-port out on one machine and ftcli picks a free port "
             "itself")


def _port_busy(config: Any, why: str) -> str:
    return f"--master-port {config.master_port} cannot be used on this machine ({why})"


def _launch(config: Any, argv: list[str], out: Path) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed import DistNetworkError
    from torch.distributed.run import get_args_parser, run

    from ftcli.console import console
    from ftcli.system import LAUNCHER_PID_ENV

    narrow_for_ranks(config, os.environ)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # each rank dies with this process (ftcli/__main__.py)
    _quiet_torchrun()
    # torchrun would otherwise warn and pick 1 thread; share this machine's cores between its ranks.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.nproc_per_node)))
    args = launcher_args(config) + rank_command(argv, out)
    console.print(f"[bold]ftcli launch[/] torchrun {' '.join(args)}")
    try:
        run(get_args_parser().parse_args(args))
    except SignalException as exc:
        # torchrun has forwarded the signal to the ranks and waited for them: they saved and recorded it.
        raise _interrupted(out, exc.sigval.name) from None
    except ChildFailedError as exc:
        if all(f.exitcode == EXIT_INTERRUPTED for f in exc.failures.values()):
            # Each rank got the signal itself (not through this launcher) and stopped cleanly.
            raise _interrupted(out, "a signal to the ranks") from None
        rank, failure = _first_cause(exc.failures)
        message = f"rank {rank} {_failure_message(failure)}"
        # A rank killed by a signal is the cause; the others then fail on its lost connection and may have
        # recorded that instead.
        mark_failed(out, message, replace=failure.exitcode < 0)
        raise RunFailed(message,
                        hint="its own output above has the details; rerun with --debug for tracebacks") from None
    except DistNetworkError as exc:
        if picks_own_port(config) or "EADDRINUSE" not in str(exc) and "in use" not in str(exc):
            raise RunFailed(f"the ranks could not meet: {' '.join(str(exc).split())[:300]}",
                            hint="check --master-addr/--master-port") from None
        raise ConfigError(_port_busy(config, "address already in use"), hint=PORT_HINT) from None
    except RendezvousError as exc:
        raise RunFailed(f"the ranks could not meet: {type(exc).__name__}: {exc}",
                        hint="check --nnodes, --master-addr/--master-port or --rdzv-endpoint on every machine") from None
    finally:
        os.environ.pop(LAUNCHER_PID_ENV, None)


def _quiet_torchrun() -> None:
    """torch-elastic's own W.../E... log lines stay off stderr: the launcher says what failed, in one line."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _first_cause(failures: dict[int, Any]) -> tuple[int, Any]:
    """The rank whose failure caused the others': one killed by a signal (it left no error of its own, so its
    failure is seen last) other than SIGTERM (what torchrun stops the survivors with), else the first to fail."""
    import signal

    killed = {rank: f for rank, f in failures.items() if f.exitcode < 0 and -f.exitcode != signal.SIGTERM}
    own = {rank: f for rank, f in failures.items() if f.exitcode > 0}
    pool = killed or own or failures
    rank = min(pool, key=lambda r: (pool[r].timestamp, r))
    return rank, pool[rank]


def narrow_for_ranks(config: Any, env: Any) -> None:
    """`--device cuda:N` on a launched run (one process: the config refuses it for several) makes GPU N the only one
    its rank sees; a rank otherwise takes its local rank's GPU."""
    from ftcli.models import VISIBLE, cuda_choice

    if ":" in config.device and config.device.startswith("cuda"):
        narrow = cuda_choice(config.device, {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "LOCAL_RANK")})[1]
        if narrow is not None:
            env[VISIBLE] = narrow


def _interrupted(out: Path, cause: str) -> Exception:
    from ftcli.training.guard import RunInterrupted
    from ftcli.training.runfolder import MANIFEST, read_manifest

    manifest = read_manifest(out) if (out / MANIFEST).is_file() else {}
    if manifest.get("status") == "interrupted":
        how = manifest.get("resume_command")
        return RunInterrupted(f"interrupted: {manifest.get('error', cause)}, checkpoint saved to "
                              f"{manifest.get('checkpoint')}",
                              hint=f"resume with: {how}")
    mark_failed(out, f"stopped by {cause} before the ranks could save a checkpoint")
    return RunInterrupted(f"interrupted by {cause} before the ranks saved a checkpoint",
                          hint="resume from the newest complete checkpoint with --resume, if there is one")


def mark_failed(out: Path, reason: str, replace: bool = False) -> None:
    """Rank 0 could not finish the manifest (a rank crashed, or it was killed): say failed, and why. With
    `replace`, a failure rank 0 recorded (the lost connection to a killed rank) gives way to `reason`, and is
    kept as `error_on_other_ranks`."""
    from ftcli.files import write_json_atomic
    from ftcli.system import utc_now
    from ftcli.training.runfolder import MANIFEST, read_manifest

    if not (out / MANIFEST).is_file():
        return
    manifest = read_manifest(out)
    if manifest.get("status") == "failed" and replace and manifest.get("error") != reason:
        manifest["error_on_other_ranks"] = manifest.get("error")
    elif manifest.get("status") != "running":
        return
    manifest.update(status="failed", error=reason, ended_at=manifest.get("ended_at") or utc_now())
    write_json_atomic(out / MANIFEST, manifest)


def _failure_message(failure: Any) -> str:
    """`killed by SIGKILL (exit code -9)`, or `failed (exit code N): its message`."""
    import signal

    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return f"killed by {name} (exit code {failure.exitcode})"
    return f"failed (exit code {failure.exitcode}): {_rank_message(failure)}"


def _rank_message(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = " ".join(str(message).split())
    # torchrun's stand-in when a rank left no error file (a crash, not an ftcli error): its output has it.
    if not message or message.startswith("To enable traceback"):
        return "no error message from that rank; see its output above"
    return message


def record_rank_error(message: str) -> None:
    """Hand a rank's one-line error to the launcher (torchrun's per-rank error file), if there is one.

    Written as torch's ErrorHandler writes it, but atomically: its own open("w") leaves an empty file for a
    moment, and the agent reading it then (a peer killed at that instant) dies on the JSON instead."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time

    from ftcli.files import write_json_atomic

    data = {"message": {"message": f"RunFailed: {message}",
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    write_json_atomic(Path(path), data)