"""A run's optimizer, learning-rate schedule and experiment trackers: the trainer's arguments and their checks.

    $ ftcli train --method lora --model builtin:tiny-llama --optim adamw_8bit --lr-scheduler cosine \\
          --warmup-ratio 0.05 --weight-decay 0.01 --report-to tensorboard,mlflow

    >>> from ftcli.training import recipe
    >>> recipe.check_recipe(config, "cpu")          # one clear line for what cannot run here, before anything loads
    >>> recipe.training_args(config, "cpu", out)    # SFTConfig arguments: optimizer, schedule, clipping, NEFTune
    >>> recipe.tracker_callbacks(config, out, log_dir)   # transformers' integration callbacks, files in the run folder

Everything here is transformers' own machinery (OptimizerNames, get_scheduler, the integration callbacks of
transformers.integrations); ftcli adds the defaults, the checks and where the trackers write. Each tracker
callback reports from rank 0 only (transformers' callbacks check `state.is_world_process_zero`).
Importing this module must not import torch.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from ftcli.errors import ConfigError

AUTO = "auto"
# The floor of --lr-scheduler cosine_with_min_lr when --min-lr-ratio is not given (transformers has no default);
# warmup_stable_decay decays to 0 unless told (transformers' own default).
COSINE_MIN_LR_RATIO = 0.1
# warmup_stable_decay's --decay-ratio rides in the scheduler arguments until the run's length is known (`trainer_class`).
DECAY_RATIO_KEY = "ftcli_decay_ratio"
# --report-to NAME -> (the module it needs, what installs it: an ftcli extra; TensorBoard is a dependency of ftcli).
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install 'ftcli[wandb]'"),
            "mlflow": ("mlflow", "pip install 'ftcli[mlflow]'"), "trackio": ("trackio", "pip install 'ftcli[trackio]'")}
# Optimizers (by name prefix) that need a library ftcli does not install: the module and its pip package.
OPTIMIZER_LIBRARIES = {"adamw_torch_4bit": ("torchao", "torchao"), "adamw_torch_8bit": ("torchao", "torchao"),
                       "schedule_free": ("schedulefree", "schedulefree"), "grokadamw": ("grokadamw", "grokadamw"),
                       "stable_adamw": ("optimi", "torch-optimi"), "adamw_anyprecision": ("torchdistx", "torchdistx"),
                       "adamw_torch_xla": ("torch_xla", "torch-xla"), "adamw_torch_npu": ("torch_npu", "torch-npu")}
# Optimizers that need what ftcli does not pass: per-module targets (GaLore, APOLLO) or their own training loop (LOMO).
UNSUPPORTED_OPTIMIZERS = ("galore_", "apollo_", "lomo", "adalomo")


# ---- optimizer ------------------------------------------------------------------------------------


def use_fused_adamw(config: Any, device: str) -> bool:
    """Fused AdamW on CPU and CUDA; FSDP keeps the per-tensor kernel (its sharded parameters are DTensors),
    and so does --compile (with the fused kernel, Inductor's cache stays empty and `ftcli warmup` cannot help)."""
    from ftcli.methods import METHODS

    return device.split(":")[0] in ("cpu", "cuda") and not METHODS[config.method].shards and not config.compile


def resolved_optim(config: Any, device: str) -> str:
    """--optim as the trainer gets it: `auto` is the same AdamW, as one fused kernel where `use_fused_adamw` says
    (torch's default on CPU is a per-tensor Python loop, which in bfloat16 costs more than the forward and backward
    of a small model: see README "Performance"), else the per-tensor one."""
    if config.optim != AUTO:
        return config.optim
    return "adamw_torch_fused" if use_fused_adamw(config, device) else "adamw_torch"


# Optimizers that bitsandbytes implements (transformers' own list, by name prefix): a run with one of them imports it
# even when its method loads no 4-bit weights.
BITSANDBYTES_OPTIMIZERS = ("adamw_bnb", "adamw_8bit", "paged_", "ademamix", "lion", "rmsprop_bnb")


def needs_bitsandbytes(config: Any) -> bool:
    """Whether the run's --optim is a bitsandbytes optimizer (`auto` never is)."""
    return config.optim != AUTO and config.optim.startswith(BITSANDBYTES_OPTIMIZERS)


def uses_bitsandbytes(config: Any) -> bool:
    """Whether the run imports bitsandbytes at all: a 4-bit method or a bitsandbytes optimizer (else it stays
    out of the process: seconds of import, and notices about kernels the run never uses)."""
    from ftcli.methods import METHODS

    return METHODS[config.method].loads_4bit or needs_bitsandbytes(config)


def optimizer_names() -> list[str]:
    """Every --optim the installed transformers knows."""
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def check_recipe(config: Any, device: str) -> None:
    """Refuse, in one line each and before anything loads, an optimizer the installed transformers does not know,
    one that cannot run on `device` or needs a missing library, and a tracker whose library is not installed."""
    optim = resolved_optim(config, device)
    known = optimizer_names()
    if optim not in known:
        guess = difflib.get_close_matches(optim, known, n=1, cutoff=0.6)
        raise ConfigError(f"--optim {optim} is not an optimizer of the installed transformers",
                          hint=f"did you mean {guess[0]}?" if guess else "use auto, adamw_torch, adamw_torch_fused, "
                          "adamw_8bit, paged_adamw_8bit, adafactor, sgd, ...")
    if optim.startswith(UNSUPPORTED_OPTIMIZERS):
        raise ConfigError(f"--optim {optim} is not supported by ftcli (it needs per-module targets or its own "
                          "training loop)", hint="use adamw_torch, adamw_8bit, adafactor or sgd")
    for prefix, (module, package) in OPTIMIZER_LIBRARIES.items():
        if optim.startswith(prefix) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--optim {optim} needs the {package} library, which is not installed",
                              hint=f"pip install {package}, or pick another --optim")
    if optim.startswith("paged_") and not device.startswith("cuda"):
        # bitsandbytes would run it unpaged on CPU (measured: it warns and falls back), so the flag would lie.
        unpaged = optim.removeprefix("paged_").replace("adamw_32bit", "adamw_torch")
        raise ConfigError(f"--optim {optim} pages the optimizer state between GPU and CPU memory, which needs CUDA "
                          f"(this run is on {device})", hint=f"use --optim {unpaged}: the same optimizer, unpaged")
    for name in config.report_to:
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {name}: the {module} library is not installed",
                              hint=f"{install}, or drop {name} from --report-to")
    check_tracker_access(config)


TRACKER_TIMEOUT = 5.0  # seconds to reach a tracking server before the run is refused


def check_tracker_access(config: Any) -> None:
    """What would fail a tracker only after loading, refused first: an MLflow server that cannot be reached (mlflow
    retries for minutes), W&B online with no API key. (A user's `file:` MLflow store is accepted: see
    _mlflow_callback.)"""
    import socket
    from urllib.parse import urlparse

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parsed = urlparse(uri)
    if "mlflow" in config.report_to and parsed.scheme in ("http", "https") and parsed.hostname:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=TRACKER_TIMEOUT).close()
        except OSError as exc:
            raise ConfigError(f"--report-to mlflow: the tracking server MLFLOW_TRACKING_URI={uri} cannot be reached "
                              f"({exc.strerror or type(exc).__name__})", hint="start the server or fix the URI, or "
                              "unset MLFLOW_TRACKING_URI to log into the run folder") from None
    mode = os.environ.get("WANDB_MODE", "").lower()
    if "wandb" in config.report_to and mode not in ("offline", "disabled", "dryrun") \
            and not os.environ.get("WANDB_API_KEY") and not _netrc_login(os.environ.get("WANDB_BASE_URL")
                                                                         or "https://api.wandb.ai"):
        raise ConfigError("--report-to wandb: no W&B API key (WANDB_API_KEY, or a `wandb login` in ~/.netrc)",
                          hint="run `wandb login` or set WANDB_API_KEY, or set WANDB_MODE=offline to log into the run "
                               "folder")


def _netrc_login(url: str) -> bool:
    """Whether the netrc file (`wandb login` writes it) holds a login for `url`'s host."""
    import netrc
    from urllib.parse import urlparse

    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(urlparse(url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ---- schedule -------------------------------------------------------------------------------------


def scheduler_kwargs(config: Any) -> dict[str, Any]:
    """The scheduler-specific arguments (`lr_scheduler_kwargs`) of --lr-scheduler."""
    if config.lr_scheduler == "cosine_with_min_lr":
        return {"min_lr_rate": COSINE_MIN_LR_RATIO if config.min_lr_ratio is None else config.min_lr_ratio}
    if config.lr_scheduler == "warmup_stable_decay":
        # num_decay_steps is only known with the run's length: set by `trainer_class` when the scheduler is made.
        return {"min_lr_ratio": 0.0 if config.min_lr_ratio is None else config.min_lr_ratio,
                DECAY_RATIO_KEY: config.decay_ratio}
    return {}


def decay_steps(decay_ratio: float, training_steps: int) -> int:
    """warmup_stable_decay's decay phase: --decay-ratio of the run's optimizer steps, rounded up (at least one)."""
    return max(1, math.ceil(decay_ratio * training_steps))


def training_args(config: Any, device: str, out: Path | None = None) -> dict[str, Any]:
    """The SFTConfig arguments of the optimizer, the schedule, clipping, NEFTune and the trackers' run name."""
    return {
        "optim": resolved_optim(config, device),
        "lr_scheduler_type": config.lr_scheduler,
        "lr_scheduler_kwargs": scheduler_kwargs(config),
        # transformers reads a value below 1 as a fraction of the run's steps (rounded up).
        "warmup_steps": config.warmup_steps or config.warmup_ratio,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "adam_beta1": config.adam_beta1,
        "adam_beta2": config.adam_beta2,
        "adam_epsilon": config.adam_epsilon,
        "neftune_noise_alpha": config.neftune_noise_alpha,
        "run_name": run_name(config, out),
    }


@lru_cache(maxsize=None)
def trainer_class(base: type) -> type:
    """`base` with warmup_stable_decay's decay phase sized from the run's length (--decay-ratio of its steps)."""

    class RecipeTrainer(base):  # type: ignore[misc,valid-type]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            warmup = self.args.get_warmup_steps(num_training_steps)
            if warmup >= num_training_steps and self.lr_scheduler is None:
                from ftcli.console import console

                console.print(f"[yellow]note:[/] the warmup ({warmup:,} steps) is as long as the run "
                              f"({num_training_steps:,} optimizer steps) or longer: the learning rate never reaches "
                              f"--learning-rate; use a shorter --warmup-steps (or --warmup-ratio)", soft_wrap=True)
            kwargs = self.args.lr_scheduler_kwargs
            if isinstance(kwargs, dict) and DECAY_RATIO_KEY in kwargs:
                kwargs = dict(kwargs)
                kwargs["num_decay_steps"] = decay_steps(kwargs.pop(DECAY_RATIO_KEY), num_training_steps)
                self.args.lr_scheduler_kwargs = kwargs
            return super().create_scheduler(num_training_steps, optimizer)

    RecipeTrainer.__name__ = RecipeTrainer.__qualname__ = f"Recipe{base.__name__}"
    return RecipeTrainer


# ---- trackers -------------------------------------------------------------------------------------


def run_name(config: Any, out: Path | None) -> str | None:
    """--run-name, or the run folder's name."""
    if config.run_name:
        return config.run_name
    return Path(out).name if out is not None else None


def tracker_dirs(config: Any, out: Path, log_dir: Path) -> dict[str, str]:
    """Where each tracker of --report-to writes: inside the run folder unless its own variable says otherwise."""
    where = {"tensorboard": str(log_dir),
             "mlflow": os.environ.get("MLFLOW_TRACKING_URI") or f"file:{Path(out).absolute() / 'mlruns'}",
             "wandb": os.environ.get("WANDB_DIR") or str(out),
             "trackio": os.environ.get("TRACKIO_DIR") or str(Path(out) / "trackio")}
    return {name: where[name] for name in config.report_to}


def resolved(config: Any, device: str, out: Path, log_dir: Path) -> dict[str, Any]:
    """What the manifest records of the recipe, resolved: the optimizer, the run name and the trackers' places."""
    return {"optim": resolved_optim(config, device), "run_name": run_name(config, out),
            "trackers": tracker_dirs(config, out, log_dir)}


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block, the previous values put back after it."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tracker_callbacks(config: Any, out: Path, log_dir: Path) -> list[Any]:
    """transformers' own integration callback of each --report-to tracker, writing where `tracker_dirs` says."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    dirs = tracker_dirs(config, out, log_dir)
    callbacks = []
    for name in config.report_to:
        if name == "tensorboard":
            callback = INTEGRATION_TO_CALLBACK["tensorboard"]()
            # transformers 5 dropped `logging_dir`; the callback reads its folder from this attribute.
            callback.logging_dir = dirs["tensorboard"]
        elif name == "mlflow":
            callback = _mlflow_callback(dirs["mlflow"])
        elif name == "wandb":
            callback = _setup_in_env(INTEGRATION_TO_CALLBACK["wandb"], {"WANDB_DIR": dirs["wandb"]})()
        else:
            # trackio reads TRACKIO_DIR when it is first imported, which its callback does.
            Path(dirs["trackio"]).mkdir(parents=True, exist_ok=True)
            with _environ({"TRACKIO_DIR": dirs["trackio"]}):
                callback = INTEGRATION_TO_CALLBACK["trackio"]()
        callbacks.append(callback)
    return callbacks


def _setup_in_env(base: type, values: dict[str, str]) -> type:
    """A callback class whose `setup` (where the tracker starts its run) sees `values` in the environment."""

    class InEnvironment(base):  # type: ignore[misc,valid-type]
        def setup(self, *args: Any, **kwargs: Any) -> Any:
            with _environ(values):
                return super().setup(*args, **kwargs)

    InEnvironment.__name__ = InEnvironment.__qualname__ = base.__name__
    return InEnvironment


def _mlflow_callback(uri: str) -> Any:
    """MLflow's callback logging to `uri`: the user's MLFLOW_TRACKING_URI, else a file store in the run folder (which
    the lighter mlflow-skinny can write; MLflow asks for MLFLOW_ALLOW_FILE_STORE to accept a file store, the user's
    `file:` URI too)."""
    from transformers.integrations import MLflowCallback

    values = {"MLFLOW_TRACKING_URI": uri}
    if uri.startswith("file:") or "://" not in uri:  # a file store, ftcli's or one the user named: MLflow asks for this
        values["MLFLOW_ALLOW_FILE_STORE"] = "true"

    class RunFolderMLflowCallback(_setup_in_env(MLflowCallback, values)):  # type: ignore[misc]
        def setup(self, args: Any, state: Any, model: Any) -> None:
            # Set explicitly for each run: a URI set earlier in this process would otherwise be kept.
            if state.is_world_process_zero:
                self._ml_flow.set_tracking_uri(uri)
            super().setup(args, state, model)

    return RunFolderMLflowCallback()
