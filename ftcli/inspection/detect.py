"""`ftcli inspect TARGET`: tell what TARGET is, and hand it to its view.

    >>> from ftcli.inspection.detect import InspectOptions, inspect_target
    >>> report = inspect_target("builtin:tiny-llama", InspectOptions(batch_size=4, seq_length=512))
    >>> report["kind"], report["model"]["parameters"]
    ('model', 301120)

TARGET is, in this order: a run folder (`ftcli_run.json`), a LoRA adapter folder
(`adapter_config.json`), a prepared dataset folder (its manifest), a compile cache (`warmup.json`),
a model folder (`config.json`), a dataset file (every suffix `train` reads: .json / .jsonl / .csv
/ .parquet / .txt), a `builtin:` name, or a hub model id (read from the local cache when
offline). Every view (ftcli/inspection/views.py) is a plain dict (what `--json` prints);
ftcli/inspection/render.py draws it with Rich. Nothing here loads model weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftcli.data.sources import LOCAL_SUFFIXES
from ftcli.errors import ConfigError
from ftcli.inspection import views
from ftcli.inspection.views import InspectOptions
from ftcli.preflight import refuse_missing_path
from ftcli.training.runfolder import MANIFEST

# The data files `inspect` reads are exactly those `train --dataset` reads.
DATA_SUFFIXES = LOCAL_SUFFIXES

__all__ = ["DATA_SUFFIXES", "InspectOptions", "detect", "inspect_target"]


def detect(target: str) -> str:
    """model | adapter | run | prepared | dataset | compile_cache (a one-line error for anything else)."""
    from ftcli.builtin import BUILTIN_DATASETS, builtin_name, is_builtin

    if is_builtin(target):
        return "dataset" if builtin_name(target) in BUILTIN_DATASETS else "model"
    path = Path(target).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "run"
        if (path / "adapter_config.json").is_file():
            return "adapter"
        if views.prepared_manifest(path) is not None:
            return "prepared"
        if (path / "warmup.json").is_file():
            return "compile_cache"
        if (path / "config.json").is_file():
            return "model"
        raise ConfigError(f"cannot tell what {target} is: no ftcli_run.json, adapter_config.json, prepared-data "
                          "manifest or config.json in it",
                          hint="pass a run folder, an adapter or model folder, a prepared dataset or a data file")
    if path.is_file():
        if path.suffix.lower() in DATA_SUFFIXES:
            return "dataset"
        raise ConfigError(f"cannot tell what {target} is (a {path.suffix or 'suffix-less'} file)",
                          hint=f"data files end in {', '.join(DATA_SUFFIXES)}; models and runs are folders")
    # runs/typo, ./x, a/b/c, data.jsonl: a path, not a hub id
    refuse_missing_path(target, "TARGET", always_path=Path(target).suffix.lower() in DATA_SUFFIXES)
    return "model"  # a hub id: the model view says whether it can be read


def inspect_target(target: str, options: InspectOptions | None = None) -> dict[str, Any]:
    options = options or InspectOptions()
    kind = detect(target)
    view = {"model": views.inspect_model, "adapter": views.inspect_adapter, "run": views.inspect_run,
            "prepared": views.inspect_prepared, "dataset": views.inspect_dataset,
            "compile_cache": views.inspect_compile_cache}[kind]
    return {"kind": kind, "target": target, **view(target, options)}
