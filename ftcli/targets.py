"""What a TARGET of `eval`, `generate` and `chat` is: a model, an adapter, a run or an exported folder, its
base, and how it loads as it was trained.

    >>> from ftcli.targets import find_target, load_target_model
    >>> target = find_target("runs/lora-1")
    >>> target.kind, target.model, target.adapter, target.loads_4bit     # ('run', 'builtin:tiny-llama', ...)
    >>> model = load_target_model(target, config, "cpu")                # base (4-bit for QLoRA) + adapter

`find_target` reads small files only (manifests, configs), so a wrong target fails before any
weight loads. A run folder brings its own settings (method, base, template, format, columns, loss
mask, sequence length, eval set and batch size, from its manifest); an exported folder its run's
record. `load_target_model` loads it the way the run computed: a QLoRA run's base in 4-bit with the
non-quantised weights upcast as for k-bit training and the CPU kernel of training, and an adapter
in the dtype it was saved (trained) in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcli.errors import ModelError
from ftcli.files import read_json_object
from ftcli.training.runfolder import MANIFEST

# Settings of where and how a run was written, meaningless (or refused) when only reading it.
RUN_ONLY_KEYS = ("output_dir", "log_dir", "resume", "force", "overwrite")

ADAPTER_CONFIG = "adapter_config.json"
EXPORT_RECORD = "ftcli_export.json"
HINT = "pass a model (hub id, folder, builtin:tiny-llama), an adapter folder, a run folder or an exported folder"


@dataclass
class TargetInfo:
    ref: str  # as given
    kind: str  # "run" | "adapter" | "model" (an exported folder is a model, with `exported` set)
    model: str  # what loads as the model: the target itself, or the base an adapter goes on
    adapter: Path | None = None
    base: str | None = None  # the model before fine-tuning (--compare-base), when known
    loads_4bit: bool = False  # the base loads in 4-bit NF4 (a QLoRA run)
    run_config: dict[str, Any] = field(default_factory=dict)  # a run folder's resolved config
    tokenizer: str | None = None  # where the tokenizer loads from: the base model for runs and adapters
    revision: str | None = None  # of the hub model or base (a local folder loads without one)
    trust_remote_code: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # the run's data record (format, template, ...), if any
    trained_dtype: str | None = None  # the dtype the run computed in, when recorded
    exported: bool = False  # an `ftcli export` folder (its record names the base and the run's data)
    template_kwargs: dict[str, Any] | None = None  # the run's --template-kwargs, rendered with again
    eval_record: dict[str, Any] = field(default_factory=dict)  # a run's eval section (its eval set's fingerprint)
    head: str = "causal"  # "classification": a reward model (one score per sequence), ftcli.models' heads

    @property
    def scores(self) -> bool:
        """A reward model: it scores sequences and generates nothing."""
        from ftcli.models import CLASSIFICATION_HEAD

        return self.head == CLASSIFICATION_HEAD

    def revision_of(self, ref: str) -> str | None:
        return None if Path(ref).expanduser().is_dir() else self.revision


def _read(path: Path) -> dict[str, Any]:
    return read_json_object(path, hint="the folder looks damaged; " + HINT)


def find_target(ref: str, base: str | None = None) -> TargetInfo:
    """What `ref` is; `base` (a --base option) replaces the recorded base model."""
    target = _find(ref, base)
    if base:
        if target.adapter is not None:
            target.model = target.tokenizer = base
            target.revision = None
        target.base = base
    return target


def _find(ref: str, base_override: str | None) -> TargetInfo:
    from ftcli.models import resolve_model_source

    path = Path(ref).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return _run_target(ref, path)
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        config = _read(path / ADAPTER_CONFIG)
        base = base_override or config.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"the adapter in {path} does not record its base model (base_model_name_or_path)",
                             hint="pass the run folder it came from, an exported model, or --base")
        head = "classification" if config.get("task_type") == "SEQ_CLS" else "causal"
        return TargetInfo(ref, "adapter", str(base), adapter=path, base=str(base), tokenizer=str(base), head=head)
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"{ref} is not a model, adapter, run or exported folder (no config.json, "
                         f"{ADAPTER_CONFIG} or {MANIFEST} in it)", hint=HINT)
    src = resolve_model_source(ref)  # a builtin name, a model folder or a hub id; refuses what is none of them
    if src.kind == "local" and (path / EXPORT_RECORD).is_file():
        record = _read(path / EXPORT_RECORD)
        run = record.get("run") or {}
        return TargetInfo(ref, "model", ref, base=record.get("base_model"), tokenizer=ref, data=run.get("data") or {},
                          trained_dtype=record.get("dtype"), exported=True,
                          template_kwargs=(run.get("config") or {}).get("template_kwargs"), head=_folder_head(path))
    return TargetInfo(ref, "model", ref, tokenizer=ref, head=_folder_head(path))


def _folder_head(path: Path) -> str:
    """A local model folder's head, from its config.json (an exported reward model is a sequence classifier)."""
    from types import SimpleNamespace

    from ftcli.models import CAUSAL_HEAD, head_of_config

    if not (path / "config.json").is_file():
        return CAUSAL_HEAD
    try:
        return head_of_config(SimpleNamespace(**_read(path / "config.json")))
    except Exception:  # noqa: BLE001 - unreadable: loading says why
        return CAUSAL_HEAD


def _run_target(ref: str, path: Path) -> TargetInfo:
    from ftcli.chain import resolve_start
    from ftcli.methods import METHODS

    manifest = _read(path / MANIFEST)
    if manifest.get("status") != "finished":
        raise ModelError(f"the run in {path} did not finish (status: {manifest.get('status')})",
                         hint="use a finished run, or resume this one with `ftcli train --resume`")
    config = dict(manifest.get("config") or {})
    saves = (manifest.get("resolved") or {}).get("saves")
    method = METHODS.get(config.get("method", ""))
    if saves not in ("adapter", "model") or method is None or not config.get("model"):
        raise ModelError(f"the manifest in {path} does not say what the run trained and saved",
                         hint="pass a run folder written by `ftcli train`")
    # The tokenizer the run loaded (its data cache is keyed by it); load_tokenizer applies the same pad policy.
    # A run that continued an earlier one (ftcli.chain) loaded its start's base tokenizer.
    tokenizer = resolve_start(config["model"]).base
    common = dict(base=config["model"], run_config=config, tokenizer=tokenizer, revision=config.get("revision"),
                  trust_remote_code=bool(config.get("trust_remote_code")), data=manifest.get("data") or {},
                  trained_dtype=(manifest.get("resolved") or {}).get("dtype"),
                  template_kwargs=config.get("template_kwargs"), eval_record=manifest.get("eval") or {},
                  head=run_head(config))
    if saves == "adapter":
        return TargetInfo(ref, "run", config["model"], adapter=path, loads_4bit=method.loads_4bit, **common)
    return TargetInfo(ref, "run", str(path), **common)


def run_head(config: dict[str, Any]) -> str:
    """The head a run's objective trained (a recorded objective this version does not know: the LM head)."""
    from ftcli.objectives import OBJECTIVES

    objective = OBJECTIVES.get(str(config.get("objective", "sft")))
    return objective.head if objective is not None else "causal"


def load_target_model(target: TargetInfo, config: Any, device: str, base_only: bool = False,
                      pad_token_id: int | None = None) -> Any:
    """The model to score: the target (with its adapter), or with `base_only` the base before fine-tuning. A reward
    model loads as the classifier it is, given `pad_token_id` (ftcli.models.classifier_pad_token_id)."""
    from ftcli.chain import load_start_model, resolve_start
    from ftcli.methods import METHODS

    ref = (target.base or target.model) if base_only else target.model
    options = METHODS[config.method].load_options(config, device) if target.loads_4bit else {}
    if target.scores:
        options.update(head=target.head, pad_token_id=pad_token_id)
    # A run that continued an earlier fine-tune starts from it: the base with the earlier adapters merged in.
    model = load_start_model(resolve_start(ref), dtype=config.dtype, device=device,
                             attn_implementation=config.attn_implementation, revision=target.revision_of(ref),
                             trust_remote_code=target.trust_remote_code, **options)
    if target.loads_4bit:
        from peft import prepare_model_for_kbit_training

        from ftcli.methods.qlora import keep_cpu_inference_in_compute_dtype

        # As the run had it: non-quantised weights upcast as for k-bit training, the CPU kernel of training.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_cpu_inference_in_compute_dtype(model)
    if target.adapter is not None and not base_only:
        from ftcli.models import attach_adapter

        model = attach_adapter(model, target.adapter)
        _adapter_in_saved_dtype(model, target.adapter)
    return model


def _adapter_in_saved_dtype(model: Any, folder: Path) -> None:
    """The adapter computes in the dtype it was saved (and trained) in: peft loads a bfloat16 adapter (a 4-bit
    base's, trained so by TRL) into float32 weights, and the loss would then differ from the run's."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return
    with safe_open(str(path), framework="pt") as fh:
        keys = [k for k in fh.keys() if "lora_" in k]  # a reward model's score head is saved in its own dtype
        dtypes = {fh.get_slice(k).get_dtype() for k in keys}
    if len(dtypes) != 1:
        return
    import torch

    saved = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtypes.pop())
    for name, param in model.named_parameters():
        if saved is not None and "lora_" in name and param.dtype != saved:
            param.data = param.data.to(saved)


def target_uses_bitsandbytes(ref: str, base: str | None = None) -> bool:
    """Whether loading TARGET needs bitsandbytes: a QLoRA run, or a model saved 4-/8-bit quantized (a hub model
    not in the local cache counts as one: its config is not known here). Else it is kept out of the process."""
    from ftcli.errors import FtcliError

    try:
        target = find_target(ref, base)
    except FtcliError:
        return True  # loading it says what is wrong, in its own words
    return target.loads_4bit or any(_quantized(r) for r in {target.model, target.base} if r)


def _quantized(ref: str) -> bool:
    from ftcli.builtin import is_builtin
    from ftcli.models import hub_offline

    if is_builtin(ref):
        return False
    path = Path(ref).expanduser()
    if not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
        if not isinstance(cached, str):
            return not hub_offline()
        path = Path(cached).parent
    config = path / "config.json"
    if not config.is_file():
        return False  # a run or adapter folder: its method said (loads_4bit)
    try:
        return "quantization_config" in read_json_object(config)
    except Exception:  # noqa: BLE001 - unreadable: loading says why
        return False
