"""The run folder: what `ftcli train` leaves behind, and the rules for writing it.

    >>> from ftcli.training.runfolder import check_output_dir
    >>> out = check_output_dir("runs/lora-1", overwrite=False)   # refuses a non-empty folder
    >>> out = check_output_dir("runs/lora-1", overwrite=False, resume=True)   # accepts a run folder

Layout: the trained model or adapter and its tokenizer at the top (so `from_pretrained(folder)`
works), `ftcli_run.json` (the manifest: config, versions, data fingerprint, timings, metrics,
status), `ftcli_config.yaml` (the resolved config, reusable with `--config`), `metrics.jsonl`
(one line per logging step), `probe.safetensors` (logits of the final model on a fixed input),
`logs/` (TensorBoard events) unless `--log-dir` points elsewhere, and `checkpoint-N/` folders
(see ftcli.training.checkpoints) when checkpoints are saved.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ftcli.errors import OutputError
from ftcli.files import check_writable

MANIFEST = "ftcli_run.json"
CONFIG_COPY = "ftcli_config.yaml"
METRICS = "metrics.jsonl"
PROBE = "probe.safetensors"


def default_output_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(path: str | Path, overwrite: bool, resume: bool = False) -> Path:
    """Refuse a file, or a non-empty folder unless `overwrite` or `resume`; never create anything here.

    With `resume` a non-empty folder is accepted when it is an ftcli run folder (its manifest is there):
    whether its checkpoint fits this run is checked once the data is loaded (ftcli.training.checkpoints)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file", hint="pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if resume and (out / MANIFEST).is_file():
            pass
        elif resume:
            raise OutputError(f"--output-dir {out} is not empty and is not an ftcli run folder (no {MANIFEST})",
                              hint="resume into the run's own folder or an empty one, or pass --overwrite")
        else:
            raise OutputError(f"--output-dir {out} is not empty", hint=_non_empty_hint(out))
    check_writable(out, "--output-dir")
    return out


def _non_empty_hint(out: Path) -> str:
    from ftcli.training.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        return (f"it holds a run with a complete checkpoint ({checkpoint.name}): pass --resume to continue it, "
                "pick a new folder, or pass --overwrite to replace its contents")
    return "pick a new folder, or pass --overwrite to replace its contents"


def create_run_dir(out: Path, overwrite: bool) -> None:
    """Create the run folder; with `overwrite`, empty it first (only called once loading succeeded)."""
    if out.is_dir() and overwrite:
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
