"""Where a model starts: a model (builtin, folder, hub id), or a finished fine-tune to continue from.

    >>> from ftcli.chain import resolve_start, load_start_model
    >>> start = resolve_start("runs/sft-1")      # a LoRA SFT run of builtin:tiny-llama
    >>> start.base, start.adapters               # ('builtin:tiny-llama', ('/abs/runs/sft-1',))
    >>> [step.get("run") or step.get("model") for step in start.chain]
    ['builtin:tiny-llama', '/abs/runs/sft-1']
    >>> model = load_start_model(start, dtype="float32", device="cpu")   # the base, the SFT adapter merged in

`--model` may name a finished run folder or an adapter folder (what `ftcli train` wrote, or a peft
adapter). A run that saved a whole model (full, fsdp --full-parameters) is itself the start; a run or
folder that saved an adapter starts from its base (itself resolved the same way, so chains of runs
work) with the adapter merged into it in memory: a new adapter then trains on that merged model, so for
DPO the reference (the adapter disabled) IS the fine-tuned start, and the trained adapter belongs to
base + the earlier adapters, which `export` merges in the same order. On a 4-bit base (qlora) the earlier
adapter is merged into the quantised weights (peft re-quantises them: rounding, which the new adapter
was trained on, and which export reproduces).

A continued run also renders its data as the run it continues did (`inherited_template`), unless
`--template` says otherwise; a run trained with a Jinja file keeps its text as `TEMPLATE_COPY`.

Only small files are read here (manifests, adapter configs); nothing imports torch until a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.errors import ModelError
from ftcli.training.runfolder import MANIFEST as RUN_MANIFEST

ADAPTER_CONFIG = "adapter_config.json"
# A run trained with `--template FILE.jinja` keeps the text it rendered with here (what later commands read).
TEMPLATE_COPY = "ftcli_template.jinja"
MAX_DEPTH = 16


@dataclass(frozen=True)
class Start:
    ref: str | None  # as given to --model
    base: str | None  # the model that loads from disk or the hub
    adapters: tuple[str, ...] = ()  # adapter folders merged into it, oldest first
    chain: tuple[dict[str, Any], ...] = ()  # base -> earlier runs, each {"model": ...} or {"run": ..., ...}

    @property
    def continues(self) -> bool:
        """Whether --model names an earlier fine-tune rather than a model."""
        return len(self.chain) > 1

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "adapters": list(self.adapters), "chain": list(self.chain)}


def resolve_start(ref: str | None, depth: int = 0) -> Start:
    """What `ref` starts from (see the module doc); a ModelError for an unfinished or unreadable run."""
    import json

    path = Path(ref).expanduser() if isinstance(ref, str) and ref and not ref.startswith("builtin:") else None
    if path is None or not path.is_dir() or depth > MAX_DEPTH:
        return Start(ref, ref, (), ({"model": ref},))
    where = str(path.absolute())
    if (path / RUN_MANIFEST).is_file():
        try:
            manifest = json.loads((path / RUN_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"--model {path}: its {RUN_MANIFEST} cannot be read ({exc})",
                             hint="pass a finished run folder written by `ftcli train`") from None
        if manifest.get("status") != "finished":
            raise ModelError(f"--model {path}: the run did not finish (status: {manifest.get('status')})",
                             hint="continue from a finished run (resume it first with `ftcli train --resume`)")
        config = manifest.get("config", {})
        saves = manifest.get("resolved", {}).get("saves")
        parent = resolve_start(config.get("model"), depth + 1)
        step = {"run": where, "method": config.get("method"), "objective": config.get("objective", "sft"),
                "saves": saves}
        if saves == "adapter":
            return Start(ref, parent.base, (*parent.adapters, where), (*parent.chain, step))
        return Start(ref, where, (), (*parent.chain, step))
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError) as exc:
            raise ModelError(f"--model {path}: its {ADAPTER_CONFIG} cannot be read ({exc})",
                             hint="pass an adapter folder saved by peft or ftcli") from None
        if not base:
            raise ModelError(f"--model {path}: the adapter does not record its base model",
                             hint="set base_model_name_or_path in its adapter_config.json")
        parent = resolve_start(base, depth + 1)
        return Start(ref, parent.base, (*parent.adapters, where), (*parent.chain, {"adapter": where}))
    return Start(ref, ref, (), ({"model": ref},))


def load_start_model(start: Start, **load: Any) -> Any:
    """The start's model: its base loaded with `load` (ftcli.models.load_model's options), each adapter merged in."""
    from ftcli.models import attach_adapter, load_model

    model = load_model(start.base, **load)
    for adapter in start.adapters:
        model = attach_adapter(model, Path(adapter)).merge_and_unload()
    return model


@dataclass(frozen=True)
class InheritedTemplate:
    """How the run that `--model` continues rendered its examples, for a new run left at `--template auto`."""

    run: str  # the run folder
    name: str  # its recorded template: alpaca | plain | model | file:<hash>
    text: str | None = None  # a Jinja file's text (name file:...)

    @property
    def is_chat(self) -> bool:
        return self.name == "model" or self.text is not None

    @property
    def description(self) -> str:
        return {"model": "the model's chat template", "alpaca": "the Alpaca template",
                "plain": "the prompt and completion as they are"}.get(self.name, "the chat template file it kept")

    @property
    def key(self) -> str:
        """What the prepared-data cache key records of it (the text by content)."""
        import hashlib

        return self.name if self.text is None else "file-sha256:" + hashlib.sha256(self.text.encode()).hexdigest()


def inherited_template(ref: str | None) -> InheritedTemplate | None:
    """The template of the newest run in `ref`'s chain (None: `ref` is a model, or that run's rendering cannot be
    carried: raw text, a mixture of renderings). A run trained with a Jinja file that is gone or was edited since
    is a ConfigError naming `--template`."""
    import hashlib
    import json

    start = resolve_start(ref)
    runs = [step["run"] for step in start.chain if "run" in step]
    if not start.continues or not runs:
        return None
    run = Path(runs[-1])
    try:
        manifest = json.loads((run / RUN_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = str((manifest.get("data") or {}).get("template") or "")
    if name in ("alpaca", "plain", "model"):
        return InheritedTemplate(str(run), name)
    if not name.startswith("file:") or "+" in name:
        return None  # raw text ("none"), or a mixture whose sources were rendered differently
    digest = name.removeprefix("file:")
    kept = run / TEMPLATE_COPY
    recorded = (manifest.get("config") or {}).get("template")
    for candidate in (kept, Path(recorded) if isinstance(recorded, str) else None):
        if candidate is not None and candidate.is_file():
            text = candidate.read_bytes().decode("utf-8-sig", errors="replace")
            if hashlib.sha256(text.encode("utf-8")).hexdigest().startswith(digest):
                return InheritedTemplate(str(run), name, text)
    from ftcli.errors import ConfigError

    raise ConfigError(f"--model {run} was trained with the chat template {recorded}, which is gone or has changed "
                      "since", hint="pass the template it was trained with as --template FILE.jinja (or --template "
                      "model / alpaca to train this run with another one)")
