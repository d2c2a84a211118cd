"""What `ftcli eval TARGET` scores: a model, an adapter, a run folder or an exported folder, and its base.

    >>> from ftcli.evaluation.target import find_target
    >>> target = find_target("runs/lora-1")
    >>> target.kind, target.model, target.adapter, target.loads_4bit     # ('run', 'builtin:tiny-llama', ...)

Only small files are read here (manifests, configs), so a wrong target fails before any weight loads.
A run folder brings its own settings (method, base, template, format, columns, loss mask, sequence
length, eval set and batch size, from its manifest); a QLoRA run is scored on the 4-bit base it
was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcli.errors import ModelError
from ftcli.files import read_json_object
from ftcli.training.runfolder import MANIFEST

ADAPTER_CONFIG = "adapter_config.json"
EXPORT_RECORD = "ftcli_export.json"
HINT = "pass a model (hub id, folder, builtin:tiny-llama), an adapter folder, a run folder or an exported folder"


@dataclass
class EvalTarget:
    ref: str  # as given
    kind: str  # "run" | "adapter" | "model"
    model: str  # what loads as the model: the target itself, or the base an adapter goes on
    adapter: Path | None = None
    base: str | None = None  # the model before fine-tuning (--compare-base), when known
    loads_4bit: bool = False  # the base loads in 4-bit NF4 (a QLoRA run)
    run_config: dict[str, Any] = field(default_factory=dict)  # a run folder's resolved config
    tokenizer: str | None = None  # where the tokenizer loads from: the base model for runs and adapters
    revision: str | None = None  # of the hub model or base (a local folder loads without one)
    trust_remote_code: bool = False

    def revision_of(self, ref: str) -> str | None:
        return None if Path(ref).expanduser().is_dir() else self.revision


def _read(path: Path) -> dict[str, Any]:
    return read_json_object(path, hint="the folder looks damaged; " + HINT)


def find_target(ref: str) -> EvalTarget:
    from ftcli.models import resolve_model_source

    path = Path(ref).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return _run_target(ref, path)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        config = _read(path / ADAPTER_CONFIG)
        base = config.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"the adapter in {path} does not record its base model (base_model_name_or_path)",
                             hint="evaluate the run folder it came from, or an exported model")
        return EvalTarget(ref, "adapter", str(base), adapter=path, base=str(base), tokenizer=str(base))
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"eval target {ref} is not a model, adapter, run or exported folder (no config.json, "
                         f"{ADAPTER_CONFIG} or {MANIFEST} in it)", hint=HINT)
    src = resolve_model_source(ref)  # a builtin name, a model folder or a hub id; refuses what is none of them
    base = None
    if src.kind == "local" and (path / EXPORT_RECORD).is_file():
        base = _read(path / EXPORT_RECORD).get("base_model")
    return EvalTarget(ref, "model", ref, base=base, tokenizer=ref)


def _run_target(ref: str, path: Path) -> EvalTarget:
    from ftcli.methods import METHODS

    manifest = _read(path / MANIFEST)
    if manifest.get("status") != "finished":
        raise ModelError(f"the run in {path} did not finish (status: {manifest.get('status')})",
                         hint="evaluate a finished run, or resume this one with `ftcli train --resume`")
    config = dict(manifest.get("config") or {})
    saves = (manifest.get("resolved") or {}).get("saves")
    method = METHODS.get(config.get("method", ""))
    if saves not in ("adapter", "model") or method is None or not config.get("model"):
        raise ModelError(f"the manifest in {path} does not say what the run trained and saved",
                         hint="evaluate a run folder written by `ftcli train`")
    # The tokenizer the run loaded (its data cache is keyed by it), with the same pad policy applied again.
    common = dict(base=config["model"], run_config=config, tokenizer=config["model"], revision=config.get("revision"),
                  trust_remote_code=bool(config.get("trust_remote_code")))
    if saves == "adapter":
        return EvalTarget(ref, "run", config["model"], adapter=path, loads_4bit=method.loads_4bit, **common)
    return EvalTarget(ref, "run", str(path), **common)
