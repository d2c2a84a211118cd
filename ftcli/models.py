"""The model-loading core: every ftcli command loads models and tokenizers through here.

    >>> from ftcli.models import load_tokenizer, load_model
    >>> tok = load_tokenizer("builtin:tiny-llama")
    >>> model = load_model("builtin:tiny-llama", dtype="float32", device="cpu")

One place decides where a model comes from (a `builtin:` name, a local folder, a hub id), its
dtype, device, attention implementation, the remote-code rule (off unless asked) and the pad
token policy; errors come back as one line that says what to do, offline included.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcli.builtin import is_builtin, resolve_builtin_model
from ftcli.errors import ConfigError, ModelError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: what to hand to `from_pretrained`, and what kind it is."""

    ref: str
    path: str
    kind: str  # "builtin" | "local" | "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_source(ref: str) -> ModelSource:
    if is_builtin(ref):
        try:
            return ModelSource(ref, str(resolve_builtin_model(ref)), "builtin")
        except ValueError as exc:
            raise ModelError(str(exc), hint="use builtin:tiny-llama, a local folder or a hub id") from None
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"{ref} is not a model folder (no config.json in it)",
                             hint="pass the folder that holds config.json and the weights")
        return ModelSource(ref, str(path), "local")
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1
    if looks_local or not _REPO_ID.match(ref):
        raise ModelError(f"model folder {ref} does not exist", hint="check the path, or pass a hub id like org/name")
    return ModelSource(ref, ref, "hub")


def _hub_error(ref: str, exc: Exception) -> ModelError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ModelError(f"model {ref} is gated on the hub and this machine is not authorised",
                          hint="accept its licence on the hub and run `hf auth login`, or pass a local folder")
    if isinstance(exc, RepositoryNotFoundError):
        return ModelError(f"model {ref} does not exist on the hub", hint="check the id, or pass a local folder")
    if hub_offline():
        return ModelError(f"model {ref} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it",
                          hint="pass a local folder, download it first (`hf download " + ref + "`), "
                               "or unset HF_HUB_OFFLINE")
    return ModelError(f"model {ref} is not in the local cache and the hub is unreachable",
                      hint="pass a local folder, or download it on a connected machine and set HF_HUB_OFFLINE=1")


_warned_unpinned: set[str] = set()


def warn_unpinned_remote_code(src: ModelSource, revision: str | None, trust_remote_code: bool) -> bool:
    """Remote code from a hub model without --revision runs whatever the repository holds today: say so (once)."""
    if not trust_remote_code or revision or src.kind != "hub" or src.ref in _warned_unpinned:
        return False
    from ftcli.console import console

    _warned_unpinned.add(src.ref)
    console.print(f"[yellow]warning:[/] --trust-remote-code runs the code in {src.ref}'s repository as it is "
                  "now, and it can change; pin it with --revision COMMIT", soft_wrap=True)
    return True


def load_model_config(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config (no weights): the cheap first check that a model exists and is a causal LM."""
    src = resolve_model_source(ref)
    warn_unpinned_remote_code(src, revision, trust_remote_code)
    check_hub_reachable(src, revision)  # before importing transformers (and torch): an unreachable hub fails fast
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src.path, revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"model {ref} needs code from its repository to load",
                             hint="review that code, then pass --trust-remote-code (and pin --revision)") from None
        raise ModelError(f"model {ref} has a config transformers cannot read: {exc}") from None
    except OSError as exc:
        if src.kind == "hub":
            raise _hub_error(ref, exc) from None
        raise ModelError(f"cannot read the model config in {src.path}: {exc}") from None
    check_causal_lm(ref, config, trust_remote_code)
    return config


def check_causal_lm(ref: str, config: Any, trust_remote_code: bool = False) -> None:
    """Refuse a model that is not a decoder-only causal LM (BERT, T5, ...): every command trains or reads it as one.

    transformers maps some encoders (BERT, RoBERTa) to a causal class too, which without `is_decoder` attends
    both ways; so the architectures the config names must be causal ones as well."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    causal_classes = {name for value in CAUSAL.values() for name in ([value] if isinstance(value, str) else value)}
    causal = model_type in CAUSAL and not getattr(config, "is_encoder_decoder", False)
    if causal and architectures:
        # A decoder with a score head (a reward model, `--objective reward`) is still a causal LM underneath.
        causal = any(a in causal_classes or a.endswith(("ForCausalLM", "LMHeadModel", CLASSIFIER_SUFFIX))
                     for a in architectures)
    if not causal:
        what = ", ".join(architectures) or f"model type {model_type}"
        raise ModelError(f"{ref} is not a causal language model ({what}), so ftcli cannot train it",
                         hint="pass a decoder-only causal LM (e.g. a Llama, Mistral or Qwen model)")


_hub_checked: set[tuple[str, str | None]] = set()

# The heads a model loads with (Objective.head): the language-model head, or one score per sequence.
CAUSAL_HEAD = "causal"
CLASSIFICATION_HEAD = "classification"
CLASSIFIER_SUFFIX = "ForSequenceClassification"


def head_of_config(config: Any) -> str:
    """The head a saved model folder's config says it has (an exported reward model: a sequence classifier)."""
    architectures = list(getattr(config, "architectures", None) or [])
    return CLASSIFICATION_HEAD if any(a.endswith(CLASSIFIER_SUFFIX) for a in architectures) else CAUSAL_HEAD


def classifier_pad_token_id(tokenizer: Any) -> int:
    """A sequence classifier's `pad_token_id` (saved in its config): the tokenizer's, after the pad policy. The score
    is read at each sequence's last token that is not this id; with pad = EOS, at the token before the closing EOS."""
    apply_pad_policy(tokenizer)
    return int(tokenizer.pad_token_id)


def check_hub_reachable(src: ModelSource, revision: str | None) -> None:
    """One request, without retries, before transformers' own: on a dead network huggingface_hub retries the
    metadata request of an uncached file five times with back-off (about 25 s of warnings) before failing.

    Skipped offline, for a model whose config is already cached (huggingface_hub then falls back to the cache
    at once), and after the first success in this process."""
    if src.kind != "hub" or hub_offline() or (src.ref, revision) in _hub_checked:
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cached = try_to_load_from_cache(src.ref, "config.json", revision=revision)
    if constants.HF_HUB_OFFLINE or isinstance(cached, str):
        _hub_checked.add((src.ref, revision))
        return
    url = hf_hub_url(src.ref, "config.json", revision=revision)
    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RevisionNotFoundError:
        raise ModelError(f"model {src.ref} has no revision {revision} on the hub",
                         hint="check --revision (a branch, tag or commit of the model)") from None
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise _hub_error(src.ref, exc) from None
    except HfHubHTTPError:
        pass  # the hub answered: transformers' own request says what is wrong (e.g. no config.json)
    except Exception as exc:  # noqa: BLE001 - no answer at all (refused, timed out, DNS, proxy): say so now
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"model {src.ref} is not in the local cache and the hub ({constants.ENDPOINT}) is "
                         f"unreachable: {reason[:200]}",
                         hint="check the network (or HF_ENDPOINT), pass a local folder, or download the model on a "
                              "connected machine and set HF_HUB_OFFLINE=1") from None
    _hub_checked.add((src.ref, revision))


def load_tokenizer(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer and apply the pad policy (see `apply_pad_policy`)."""
    from transformers import AutoTokenizer

    src = resolve_model_source(ref)
    check_hub_reachable(src, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if src.kind == "hub":
            raise _hub_error(ref, exc) from None
        raise ModelError(f"cannot load the tokenizer from {src.path}: {exc}") from None
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer of {ref}: {first}",
                         hint="the model folder needs tokenizer.json (or the files its tokenizer class reads)") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {ref} has no end-of-sequence token",
                         hint="use a tokenizer that defines eos_token, or set it in tokenizer_config.json")
    apply_pad_policy(tokenizer)
    return tokenizer


PAD_POLICY_ATTR = "ftcli_pad_policy"


def apply_pad_policy(tokenizer: Any) -> str:
    """Give the tokenizer a pad token without ever hiding EOS from the loss; returns what was done.

    A tokenizer's own pad token is kept. Without one, pad = EOS (as the reference scripts do),
    which is safe here because ftcli builds labels itself and the collator masks padding by
    position, never by token id, so every example's final EOS stays in the loss. The decision is
    remembered on the tokenizer: asking again reports what was done the first time, not the pad
    token the first call set.
    """
    done = getattr(tokenizer, PAD_POLICY_ATTR, None)
    if done is not None:
        return done
    if tokenizer.pad_token_id is not None:
        policy = "own pad token"
    else:
        tokenizer.pad_token = tokenizer.eos_token
        policy = "pad = eos (masked by position)"
    setattr(tokenizer, PAD_POLICY_ATTR, policy)
    return policy


VISIBLE = "CUDA_VISIBLE_DEVICES"
# What CUDA_VISIBLE_DEVICES held before ftcli narrowed it to the one GPU of a one-process run ("" when unset).
VISIBLE_BEFORE = "FTCLI_CUDA_VISIBLE_BEFORE"
_resolved: dict[str, str] = {}  # this process's CUDA devices, as asked -> as resolved
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def cuda_choice(device: str, env: Any, count: int | None = None) -> tuple[int, str | None]:
    """Which GPU a process uses: (its index as torch will see it, the CUDA_VISIBLE_DEVICES to set first, or None).

    One process: the GPU `cuda:N` names (the first for `auto` / `cuda`) becomes the only visible one, so torch
    sees it as cuda:0 and the trainer counts one GPU (with several it would use nn.DataParallel, which TRL
    refuses). N counts the GPUs CUDA_VISIBLE_DEVICES lists (indices or UUIDs), as CUDA itself does. Under a
    launcher (WORLD_SIZE and LOCAL_RANK set) each rank takes its local rank's GPU among those it sees, modulo
    their number as accelerate does: with one GPU visible per rank (Slurm's way) every rank uses cuda:0.
    `count` is the number of GPUs torch sees, for a launcher's rank without CUDA_VISIBLE_DEVICES."""
    before = env.get(VISIBLE_BEFORE)
    # "" before: it was unset (an empty CUDA_VISIBLE_DEVICES is never narrowed).
    listed = env.get(VISIBLE) if before is None else (before or None)
    visible = [v.strip() for v in listed.split(",") if v.strip()] if listed is not None else None
    if visible == []:
        return 0, None  # no GPU visible on purpose (CUDA_VISIBLE_DEVICES=""): nothing to narrow
    if "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        local = int(env["LOCAL_RANK"])
        seen = len(visible) if visible is not None else count
        return (local % seen if seen else local), None
    wanted = int(device.split(":")[1]) if ":" in device else 0
    if visible is not None and wanted >= len(visible):
        raise ConfigError(f"--device {device} names CUDA device {wanted}, but {VISIBLE}={listed} makes only "
                          f"{len(visible)} visible (numbered 0 to {len(visible) - 1})",
                          hint=f"use --device cuda:0 .. cuda:{len(visible) - 1}, or change {VISIBLE}")
    return 0, visible[wanted] if visible is not None else str(wanted)


def _narrow_visible(value: str | None) -> None:
    """Make only GPU `value` visible to this process (undone with None), before CUDA initialises."""
    if value is None:
        if VISIBLE_BEFORE in os.environ:
            before = os.environ.pop(VISIBLE_BEFORE)
            if before:
                os.environ[VISIBLE] = before
            else:
                os.environ.pop(VISIBLE, None)
        return
    os.environ.setdefault(VISIBLE_BEFORE, os.environ.get(VISIBLE, ""))
    os.environ[VISIBLE] = value


def resolve_device(device: str = "auto") -> str:
    """The device string this process uses: cpu, mps, or cuda:I (I as torch sees it after `cuda_choice`)."""
    if not _DEVICE.match(device):
        raise ConfigError(f"--device {device} is not a device", hint="use auto, cpu, cuda or cuda:N")
    if device in ("cpu", "mps"):
        return device
    if device in _resolved:
        return _resolved[device]
    import torch

    narrow = cuda_choice(device, os.environ)[1]
    if not torch.cuda.is_initialized():
        # Only before CUDA starts does CUDA_VISIBLE_DEVICES count; after that it is too late to narrow it.
        _narrow_visible(narrow)
    if not torch.cuda.is_available():
        _narrow_visible(None)
        if device == "auto":
            return "cpu"
        shown = os.environ.get(VISIBLE)
        which = [f"GPU {narrow}"] if narrow is not None else []
        which += [f"{VISIBLE}={shown}"] if shown is not None else []
        raise ConfigError(f"--device {device} asked for CUDA{' (' + ' of '.join(which) + ')' if which else ''} "
                          "but no CUDA device is visible",
                          hint=f"use --device cpu, or check {VISIBLE} and the driver")
    index, narrow = cuda_choice(device, os.environ, torch.cuda.device_count())
    if narrow is not None and (os.environ.get(VISIBLE) != narrow or torch.cuda.device_count() != 1):
        # CUDA had started before ftcli could narrow the visible GPUs (torch, or the driver when something asked
        # torch.cuda.is_available() first, still sees them all): address the GPU by its number instead.
        index = int(device.split(":")[1]) if ":" in device else 0
    resolved = f"cuda:{index}"
    # Asked again (by the same or a later step of this command), a device resolves the same: the request, and
    # the device string it became, which after narrowing names the one visible GPU.
    _resolved[device] = _resolved[resolved] = resolved
    return resolved


def physical_device(device: str) -> dict[str, Any]:
    """What the manifest records about the device: the GPU's name and the CUDA_VISIBLE_DEVICES it ran under."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"gpu": torch.cuda.get_device_name(device), "cuda_visible_devices": os.environ.get(VISIBLE),
            "cuda_visible_devices_before": os.environ.get(VISIBLE_BEFORE)}


def resolve_dtype(dtype: str, device: str) -> Any:
    """`auto` means bfloat16 on CUDA that supports it (the reference default), float16 on older
    CUDA, float32 on CPU (half-precision matmuls are slow and lossy there)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def resolve_attn_implementation(attn: str, device: str, torch_dtype: Any) -> str:
    """SDPA by default; FlashAttention 2 when asked or, on `auto`, when installed on CUDA in half precision."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    half = torch_dtype in (torch.float16, torch.bfloat16)
    if attn == "flash_attention_2" and not (device.startswith("cuda") and half and is_flash_attn_2_available()):
        raise ConfigError("--attn-implementation flash_attention_2 needs CUDA, a 16-bit --dtype and the flash-attn "
                          "package", hint="install flash-attn on a CUDA machine, or use --attn-implementation sdpa")
    if attn == "auto":
        return "flash_attention_2" if device.startswith("cuda") and half and is_flash_attn_2_available() else "sdpa"
    return attn


def load_model(
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    device_map: Any = "device",
    head: str = CAUSAL_HEAD,
    pad_token_id: int | None = None,
) -> Any:
    """Load a causal LM from safetensors, on one device (`device_map="device"`) or as the caller maps it.

    `head="classification"`: the same decoder with one score per sequence instead of the LM head (a reward model,
    AutoModelForSequenceClassification, num_labels=1; a new head starts random, seeded by the caller), its config
    given `pad_token_id` (see `classifier_pad_token_id`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    load_model_config(ref, revision=revision, trust_remote_code=trust_remote_code)
    src = resolve_model_source(ref)
    if src.kind != "hub":  # a truncated or empty weight file: one line naming it, not a safetensors traceback
        from ftcli.inspection.weights import check_weight_files

        check_weight_files(Path(src.path))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "attn_implementation": resolve_attn_implementation(attn_implementation, dev, torch_dtype),
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": _has_safetensors(src),
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    auto_class = AutoModelForCausalLM
    if head == CLASSIFICATION_HEAD:
        auto_class = AutoModelForSequenceClassification
        kwargs["num_labels"] = 1
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
        if quantization_config is not None:
            # The score head trains in full (LoRA's modules_to_save): it stays a float layer, not 4-bit.
            quantization_config.llm_int8_skip_modules = ["score"]
    if device_map == "device":
        kwargs["device_map"] = {"": dev}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return auto_class.from_pretrained(src.path, **kwargs)
    except OSError as exc:
        if src.kind == "hub":
            raise _hub_error(ref, exc) from None
        raise ModelError(f"cannot load model weights from {src.path}: {exc}") from None


def _has_safetensors(src: ModelSource) -> bool | None:
    """Prefer safetensors; allow pickle weights only for a local folder that has nothing else."""
    if src.kind == "hub":
        return None  # transformers prefers safetensors on the hub and falls back only if absent
    folder = Path(src.path)
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        return True
    return None


def attach_adapter(base: Any, adapter_dir: Path) -> Any:
    """base + the saved adapter, unmerged and frozen; one clear line when they do not fit together."""
    from peft import PeftModel

    from ftcli.inspection.weights import check_weight_files

    check_weight_files(Path(adapter_dir))
    options: dict[str, Any] = {}
    if type(base).__name__.endswith(CLASSIFIER_SUFFIX):
        from peft import PeftConfig

        # An SFT adapter under a reward model (`--model SFT_RUN`): the decoder's LoRA, without the LM task's hooks.
        adapter_config = PeftConfig.from_pretrained(str(adapter_dir))
        if adapter_config.task_type == "CAUSAL_LM":
            adapter_config.task_type = None
            options["config"] = adapter_config
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False, **options)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the adapter in {adapter_dir} does not fit its base model: {first[:300]}",
                         hint="pass the base model it was trained on with --base") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_adapter_tokenizer(folder: Path, base: str, *, revision: str | None = None,
                           trust_remote_code: bool = False) -> Any:
    """An adapter's (or run's) own tokenizer when the folder holds one, else its base model's; as saved
    (no pad policy: what is exported or generated with is the tokenizer the run used)."""
    from transformers import AutoTokenizer

    here = any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)
    if not here:
        check_hub_reachable(resolve_model_source(base), revision)
    where = str(folder) if here else resolve_model_source(base).path
    try:
        return AutoTokenizer.from_pretrained(where, revision=None if here else revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer from {where}: {first}",
                         hint="the source or its base needs tokenizer files (tokenizer.json, tokenizer_config.json)"
                         ) from None



# Functions of the libraries that remember whether bitsandbytes is installed (cleared when `without_bitsandbytes`
# ends, so that a later 4-bit load in the same process finds it again).
_BNB_CHECKS = (("peft.import_utils", "is_bnb_available"), ("peft.import_utils", "is_bnb_4bit_available"),
               ("transformers.utils.import_utils", "is_bitsandbytes_available"))


@contextmanager
def without_bitsandbytes(active: bool = True) -> Iterator[None]:
    """Within: bitsandbytes counts as not installed (unless it is already imported), so that a method that loads
    no 4-bit weights never imports it.

    peft imports it whenever it is installed (`peft.helpers`, and LoRA's layer dispatch), and importing it costs
    seconds (it pulls in torch's Inductor compiler) and starts CUDA probing, for nothing outside QLoRA."""
    if not active or sys.modules.get("bitsandbytes") is not None:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import fails, find_spec says absent
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        for module, name in _BNB_CHECKS:
            check = getattr(sys.modules.get(module), name, None)
            if hasattr(check, "cache_clear"):
                check.cache_clear()
