"""What a command checks before anything heavy loads: a mistyped path, a missing data file, a hub default.

    >>> from ftcli.preflight import refuse_missing_path, check_run
    >>> refuse_missing_path("runs/chat-lora-typo", "TARGET")  # ConfigError: TARGET runs/chat-lora-typo does not exist
    >>> check_run(config, "train")  # notes the hub defaults it falls back to (size, gated); offline and not cached: refused

Nothing here imports torch, transformers or datasets: a typo costs a fraction of a second instead of
seconds of imports and a network error, and nothing downloads before the user has been told what.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from ftcli.builtin import BUILTIN_MODELS, builtin_name, is_builtin
from ftcli.errors import ConfigError, DataError, ModelError

# What the hub defaults cost, said before any of it downloads (sizes of the bfloat16 safetensors / the data files).
# A method's default model must be listed here (tests/test_newcomer.py checks it).
HUB_FACTS: dict[str, tuple[str, bool]] = {  # id -> (size, gated)
    "meta-llama/Llama-3.2-3B-Instruct": ("3.2B parameters, a ~6.4 GB download", True),
    "meta-llama/Llama-3.1-8B-Instruct": ("8.0B parameters, a ~16 GB download", True),
    "meta-llama/Llama-3.1-70B-Instruct": ("70.6B parameters, a ~141 GB download", True),
    "tatsu-lab/alpaca": ("52,002 rows, a ~24 MB download", False),
}
GATED = "gated: accept its licence on huggingface.co, then `hf auth login` or set HF_TOKEN"


def looks_like_path(ref: str) -> bool:
    """A reference meant as a local path rather than a hub id (`org/name`): it starts with `.`, `/` or `~`, has a
    backslash, a trailing slash or more than one `/`, or its first part is a folder or file here (`runs/typo`)."""
    if is_builtin(ref) or not ref:
        return False
    if ref.startswith((".", "/", "~")) or "\\" in ref or ref.endswith("/") or ref.count("/") > 1:
        return True
    return "/" in ref and Path(ref.split("/", 1)[0]).exists()


def refuse_missing_path(ref: str | None, what: str, always_path: bool = False) -> None:
    """A path-looking `ref` (see looks_like_path; any `ref` with `always_path`) that does not exist: one line,
    exit 2, before it is tried as a hub id (seconds of imports, then a network error)."""
    if ref is None or not (always_path or looks_like_path(ref)) or Path(ref).expanduser().exists():
        return
    raise ConfigError(f"{what} {ref} does not exist", hint=_nearby(ref))


def _nearby(ref: str, otherwise: str = "check the path") -> str:
    """`did you mean NAME?` for a close name beside the missing one, else what else to check."""
    path = Path(ref).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if parent == path.parent and parent.is_dir():
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
        if close:
            return f"did you mean {os.path.join(os.path.dirname(ref), close[0])}?"
    head = ref.split("/", 1)[0]
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and Path(head).exists():
        return f"{otherwise} ({head} exists here, so this is read as a path, not as the hub id org/name)"
    return otherwise


def check_run(config: Any, command: str) -> None:
    """Before `train`, `warmup` or `prepare` load anything: a mistyped --model path or a missing local data file is
    one line; a hub default the run falls back to (no --model, no --dataset) is named with its size and whether it
    is gated, and refused at once when offline and not in the local cache."""
    refuse_missing_path(config.model, "--model")
    if is_builtin(config.model) and builtin_name(config.model) not in BUILTIN_MODELS:
        from ftcli.models import resolve_model_source

        resolve_model_source(config.model)  # the one line naming the built-in models (nothing is built)
    check_local_data(config.dataset, "--dataset")
    if getattr(config, "eval_dataset", None):
        check_local_data(config.eval_dataset, "--eval-dataset")
    if os.environ.get("LOCAL_RANK") is not None:
        return  # a launched rank: its launcher has said it already
    if command == "train":
        from ftcli.objectives import OBJECTIVES

        OBJECTIVES[config.objective].preflight(config)  # e.g. GRPO's rewards, tried on the data's first rows
    if "model" not in config.model_fields_set and config.model in HUB_FACTS:
        _announce_model(config, command)
    if "dataset" not in config.model_fields_set and config.dataset in HUB_FACTS:
        _announce_dataset(config.dataset)


def check_local_data(dataset: str | list[str], flag: str) -> None:
    """Each local source of `dataset` (a file or folder; not a glob, built-in or hub id) exists: the same one line
    and exit code (3) as when the data is read, before seconds of imports."""
    from ftcli.data.sources import GLOB_CHARS, LOCAL_SUFFIXES
    from ftcli.data.specs import split_weight

    for spec in [dataset] if isinstance(dataset, str) else dataset:
        ref = split_weight(spec)[0] if not isinstance(dataset, str) else spec
        if is_builtin(ref) or any(c in ref for c in GLOB_CHARS) or Path(ref).expanduser().exists():
            continue
        head = ref.rpartition(":")[0]
        if head and Path(head).expanduser().exists():
            continue  # `a.jsonl:abc`: the mixture's reading says that `abc` is not a weight
        if looks_like_path(ref) or Path(ref).suffix.lower() in LOCAL_SUFFIXES:
            where = "folder" if ref.endswith("/") else "file"
            raise DataError(f"dataset {where} {ref} does not exist", hint=_nearby(ref, f"check the path given to {flag}"))


def _announce_model(config: Any, command: str) -> None:
    from ftcli.console import err_console

    size, gated = HUB_FACTS[config.model]
    if command == "prepare":
        size = "only its tokenizer downloads, a few MB"
    facts = f"{size}; {GATED}" if gated else f"{size}; not gated"
    err_console.print(f"[yellow]note:[/] no --model given: --method {config.method} uses its default, "
                      f"{config.model} ({facts}); pass --model to choose (builtin:tiny-llama tries ftcli offline)",
                      soft_wrap=True)
    if _offline() and not _model_cached(config.model):
        raise ModelError(f"no --model given, and --method {config.method}'s default {config.model} is not in the "
                         "local cache (HF_HUB_OFFLINE=1 forbids downloading it)",
                         hint="pass --model: builtin:tiny-llama, a local model folder or a cached hub id")


def _announce_dataset(dataset: str) -> None:
    from ftcli.console import err_console

    size, gated = HUB_FACTS[dataset]
    err_console.print(f"[yellow]note:[/] no --dataset given: using {dataset} from the hub ({size}; "
                      f"{'gated' if gated else 'not gated'}); pass --dataset FILE to train on your own data",
                      soft_wrap=True)
    if _offline() and not _dataset_cached(dataset):
        raise DataError(f"no --dataset given, and the default {dataset} is not in the local cache (HF_HUB_OFFLINE=1 "
                        "forbids downloading it)",
                        hint="pass --dataset: a .jsonl/.json/.csv/.parquet/.txt file, or builtin:alpaca-sample")


def _offline() -> bool:
    from ftcli.models import hub_offline

    return hub_offline()


def _model_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def _dataset_cached(repo: str) -> bool:
    """A trace of the dataset in the hub cache or in datasets' own cache (then loading it decides)."""
    from huggingface_hub import constants

    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    return (Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").is_dir() \
        or (Path(datasets_cache) / repo.replace("/", "___")).is_dir()
