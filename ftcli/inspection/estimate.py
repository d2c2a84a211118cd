"""What a model is and how much memory training it takes, from its config alone (no weights loaded).

    >>> from ftcli.inspection.estimate import describe_model, estimate_memory
    >>> info = describe_model("builtin:tiny-llama")
    >>> info.parameters, info.layers, info.hidden_size
    (301120, 2, 64)
    >>> est = estimate_memory(info, "lora", batch_size=4, seq_length=2048, dtype="float32", device="cpu")
    >>> est.total_bytes, est.process_bytes
    >>> estimate_setting("auto", gpu_memory=None)    # on a CPU-only machine
    ('cpu', 'float32', '--dtype auto on cpu')

Parameters are counted exactly, by building the architecture on PyTorch's "meta" device (shapes
only, no memory). The memory estimate adds weights, gradients, AdamW state and activations
(the tensors autograd keeps for the backward pass of a Llama-style decoder block, per token)
for a batch size, sequence length, gradient checkpointing on or off and a process count (FSDP
shards weights, gradients and optimizer state across processes; activations are per process).

It is for a device: on a GPU the total is the tensors (the verdict adds the CUDA context and
allocator slack); on a CPU the total is the whole process's peak RSS, so the CPU process's own
memory is added (`cpu_process`: the libraries' import floor, the plain loss's full logits, and
what glibc's allocator keeps of the forward pass's freed temporaries). The dtype is the one
`train --dtype auto` resolves to on that device (ftcli.models.resolve_dtype), unless given.
Checked against tensors autograd saves and measured CPU peaks in tests/test_inspect.py, and against
real 150M and 1B trainings by bench/scale_estimate.py (docs/inspect.md gives the figures).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ftcli.errors import ConfigError

# Bytes per element of the dtypes a config may name.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# bitsandbytes NF4 with double quantisation: 4 bits + one 8-bit absmax per 64 weights
# + a float32 absmax per 256 of those: 4 + 8/64 + 32/(64*256) bits.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# TRL's fused LM head projects at most this many tokens x vocabulary entries at a time (float32).
LOGIT_TILE_TOKENS = 4096
LOGIT_TILE_VOCAB = 32768
# The CUDA context and allocator slack a real process needs beyond its tensors (for the verdict only).
RUNTIME_OVERHEAD_BYTES = 1 << 30
RUNTIME_OVERHEAD_FRACTION = 0.10
# --dtype auto on a GPU that is not this machine's (--gpu-memory on a CPU-only machine): what ftcli.models.resolve_dtype
# picks on the GPUs people train on (bfloat16 support: Ampere and newer).
GPU_AUTO_DTYPE = "bfloat16"
# A CPU training process's resident memory besides its tensors: torch, transformers, TRL, peft and datasets imported,
# the trainer, data loader and thread pools (measured on Linux x86-64: 480 MiB after the imports, 535 MiB with the
# trainer built and the data loaded).
CPU_RUNTIME_BYTES = 535 << 20
# glibc's mmap threshold grows to at most this (64-bit): smaller blocks come from its heap, larger ones are mapped and
# unmapped whole. Of the forward pass's heap-sized temporaries, about this share of the activations stays resident.
MMAP_THRESHOLD_MAX = 32 << 20
HEAP_RETENTION = 1.0


@dataclass
class ModelInfo:
    source: str
    kind: str  # builtin | local | hub
    architecture: str
    model_type: str
    parameters: int
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int | None
    dtype: str
    tied_embeddings: bool
    chat_template: bool
    # name -> (in_features, out_features, count): the linear layers LoRA may target (lm_head excluded).
    linear_layers: dict[str, list[int]] = field(default_factory=dict)
    embedding_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryEstimate:
    method: str
    trainable_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    total_bytes: int
    reference_bytes: int = 0  # a preference objective's frozen reference copy (0: none, or no objective needs one)
    reference: str | None = None  # how the objective holds its reference model (ftcli.objectives)
    objective: str = "sft"
    generation_bytes: int = 0  # an objective that samples completions: their KV cache while generating
    device: str = "gpu"  # what the estimate is for: "gpu" (tensors) or "cpu" (the process's peak RSS)
    dtype: str = "bfloat16"  # the dtype the weights are held and computed in
    process_bytes: int = 0  # cpu: the process's own memory besides the tensors above (see cpu_process)
    process: dict[str, int] = field(default_factory=dict)  # its parts
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_model(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelInfo:
    """Read a model's config (and tokenizer config, for the chat template) and count its parameters exactly."""
    from ftcli.models import load_model_config, resolve_model_source

    src = resolve_model_source(ref)
    config = load_model_config(ref, revision=revision, trust_remote_code=trust_remote_code)
    import torch
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        from ftcli.errors import ModelError

        raise ModelError(f"{ref} is not a causal language model transformers can build ({exc})",
                         hint="pass a causal LM (e.g. a Llama, Mistral or Qwen model)") from None
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings()
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return ModelInfo(
        source=ref,
        kind=src.kind,
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        model_type=getattr(config, "model_type", "?"),
        parameters=parameters,
        layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 4 * hidden),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or (hidden // heads if heads else 0)),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0),
        context_length=getattr(text, "max_position_embeddings", None),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        chat_template=_has_chat_template(src.path, revision),
        linear_layers=_linear_layers(model),
        embedding_parameters=embedding.weight.numel() if embedding is not None else 0,
    )


def _linear_layers(model: Any) -> dict[str, list[int]]:
    import torch

    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "lm_head":
                continue
            shape = [module.in_features, module.out_features]
            if leaf in out and out[leaf][:2] == shape:
                out[leaf][2] += 1
            else:
                out.setdefault(leaf, [*shape, 1])
    return out


def _has_chat_template(path: str, revision: str | None) -> bool:
    """A chat template in tokenizer_config.json or chat_template.jinja, read without loading the tokenizer."""
    import json
    from pathlib import Path

    folder = Path(path)
    if folder.is_dir():
        if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
            return True
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            try:
                return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
            except ValueError:
                return False
        return False
    try:  # a hub model: only what is already in the local cache
        from huggingface_hub import try_to_load_from_cache

        for name in ("chat_template.jinja", "tokenizer_config.json"):
            cached = try_to_load_from_cache(path, name, revision=revision)
            if isinstance(cached, str):
                if name.endswith(".jinja"):
                    return True
                return bool(json.loads(Path(cached).read_text(encoding="utf-8")).get("chat_template"))
    except Exception:  # noqa: BLE001 - the cache is a convenience here, never a reason to fail
        return False
    return False


def lora_parameters(info: ModelInfo, rank: int, targets: list[str]) -> int:
    """LoRA's trainable parameters: rank x (in + out) for every targeted linear layer.

    Targets the model does not have (the Llama projection names on another architecture) count as
    all-linear, which is what a user of that model would pick."""
    names = targets if any(t in info.linear_layers for t in targets) else list(info.linear_layers)
    return sum(rank * (i + o) * n for name, (i, o, n) in info.linear_layers.items() if name in names)


def activation_elements_per_token(info: ModelInfo, gradient_checkpointing: bool) -> float:
    """Elements autograd keeps per token for the backward pass, over all decoder layers.

    Per Llama-style layer: the two RMSNorms keep their input and normalised output (4h); attention
    keeps q, k, v after RoPE, the SDPA output and the o_proj input (3q + 2kv, with q = heads x
    head_dim, kv = kv_heads x head_dim) and k, v repeated to all heads (2q); the MLP keeps gate,
    SiLU(gate), up and their product (4i). With checkpointing only each layer's input (h) stays,
    plus one layer's worth while it is recomputed.
    """
    h, i = info.hidden_size, info.intermediate_size
    q = info.heads * info.head_dim
    kv = info.kv_heads * info.head_dim
    per_layer = 4 * h + 5 * q + 2 * kv + 4 * i
    # Embedding output, final norm (input + output) and the final hidden states.
    outside = 4 * h
    if gradient_checkpointing:
        return info.layers * h + per_layer + outside
    return info.layers * per_layer + outside


def master_weight_bytes(dtype: str, trains_adapter: bool, loads_4bit: bool) -> int:
    """Bytes per trainable weight: float16 keeps float32 master weights (ftcli.training.precision); LoRA adapters
    on a 16-bit base are float32 (peft upcasts them); QLoRA's are bfloat16 (TRL casts them)."""
    if dtype == "float16":
        return 4
    if loads_4bit:
        return 2
    if trains_adapter:
        return 4
    return DTYPE_BYTES[dtype]


def estimate_memory(info: ModelInfo, method: str, *, batch_size: int, seq_length: int,
                    gradient_checkpointing: bool = False, nproc: int = 1, dtype: str | None = None,
                    lora_rank: int = 8, lora_targets: list[str] | None = None, objective: str = "sft",
                    precompute_ref: bool = False, num_generations: int = 8, kl_beta: float = 0.0,
                    device: str = "gpu") -> MemoryEstimate:
    """Peak training memory per process for `method` and `objective` on `device` ("gpu": the tensors; "cpu": the
    process's peak RSS, `cpu_process` added), from the model's shapes alone.

    A preference objective (DPO) puts `rows_per_example` sequences through the model per example (the chosen and
    the rejected answer after the prompt): activations for twice the batch. Its reference model is the same
    weights with the adapter disabled for LoRA methods (nothing more), a frozen copy of the weights in the
    training dtype for full fine-tuning (sharded like the policy under fsdp), or nothing with --precompute-ref.

    An objective that samples completions (GRPO) puts `batch_size` completions (`num_generations` per prompt), each
    after its prompt, through the model, and first generates them all at once: their KV cache at full length is
    counted too. Its reference model (with `kl_beta` > 0) is held as DPO's is."""
    from types import SimpleNamespace

    from ftcli.methods import METHODS
    from ftcli.models import CAUSAL_HEAD
    from ftcli.objectives import OBJECTIVES

    if method not in METHODS:
        raise ConfigError(f"unknown method {method}", hint=f"use one of: {', '.join(METHODS)}")
    facts = METHODS[method]
    dtype = dtype or info.dtype
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype {dtype} has no known size", hint=f"use one of: {', '.join(DTYPE_BYTES)}")
    width = DTYPE_BYTES[dtype]
    goal = OBJECTIVES[objective]
    notes: list[str] = []
    classifier = goal.head != CAUSAL_HEAD
    total = classifier_parameters(info) if classifier else info.parameters
    targets = lora_targets or list(facts.defaults["lora_target_modules"])
    master = master_weight_bytes(dtype, facts.trains_adapter, facts.loads_4bit)
    trainable, weights = weight_bytes(info, facts, total, width, master, lora_rank, targets, notes)
    trainable += info.hidden_size if classifier and facts.trains_adapter else 0
    if master != width:
        notes.append(f"trainable weights in {'float32' if master == 4 else 'bfloat16'}")
    # Gradients and AdamW's two moments are in the trainable weights' dtype; the foreach step adds about one
    # more temporary of that size while it runs.
    grads = trainable * master
    optimizer = 3 * trainable * master
    rows = batch_size * goal.rows_per_example
    tokens = rows * seq_length
    # QLoRA's residual stream is float32 (its embeddings are upcast, and bitsandbytes' 4-bit layers return their
    # input's dtype), so its activations are float32 whatever the compute dtype.
    act_width = 4 if facts.loads_4bit else width
    activations = int(activation_elements_per_token(info, gradient_checkpointing) * tokens * act_width)
    # TRL's fused LM head: one float32 logits tile forward and one backward, never the full logits.
    logits = 2 * min(tokens, LOGIT_TILE_TOKENS) * min(info.vocab_size, LOGIT_TILE_VOCAB) * 4
    activations += 0 if classifier else logits
    # The attention mask SDPA gets with padding: one byte per (query, key) pair of each row.
    activations += rows * seq_length * seq_length
    notes += [f"{objective}: {goal.rows_per_example} sequences per example, one score each (no LM-head logits)"
              ] if classifier else []
    cache = generation_cache(info, rows, seq_length, width) if goal.samples else 0
    if cache:
        notes.append(f"{objective}: {rows} completions per step ({num_generations} per prompt), each after its prompt "
                     f"within --seq-length; generating them holds a KV cache of {cache / 2**20:,.1f} MiB")
    reference, reference_bytes = objective_reference(goal, facts, SimpleNamespace(
        full_parameters=False, precompute_ref=precompute_ref, grpo_beta=kl_beta), total * width, notes)
    notes.append(how_it_scales(facts))
    if facts.shards and nproc > 1:
        weights, grads, optimizer = weights // nproc, grads // nproc, optimizer // nproc
        reference_bytes //= nproc
        notes.append(f"weights, gradients and optimizer state sharded over {nproc} processes")
    elif nproc > 1 and facts.multi_process:
        notes.append(f"data parallel over {nproc} processes: each holds all of the above; "
                     "the examples of each optimizer step are split between them")
    elif nproc > 1:
        notes.append(f"{method} runs in one process")
    est = MemoryEstimate(method=method, trainable_parameters=trainable, weights_bytes=int(weights),
                         gradients_bytes=int(grads), optimizer_bytes=int(optimizer),
                         activations_bytes=int(activations), reference_bytes=int(reference_bytes),
                         reference=reference, objective=objective, generation_bytes=int(cache),
                         total_bytes=int(weights + grads + optimizer + activations + reference_bytes + cache),
                         device=device, dtype=dtype, notes=notes)
    if device == "cpu":
        add_cpu_process(est, info, rows, seq_length, act_width, 0 if classifier else info.vocab_size)
    return est


def estimate_setting(dtype: str, gpu_memory: str | None) -> tuple[str, str, str]:
    """(the device the estimate is for: "cpu" or "gpu", its dtype, why that dtype), as `train` would run here.

    The device is this machine's (`--device auto`), a GPU when --gpu-memory names one; the dtype is `dtype` unless
    auto, which resolves as `train --dtype auto` does on that device (ftcli.models.resolve_dtype): float32 on a
    CPU, bfloat16 (float16 on older CUDA) on a GPU; GPU_AUTO_DTYPE for a GPU this machine does not have."""
    from ftcli.models import resolve_device, resolve_dtype

    if dtype != "auto" and dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype {dtype} is not a dtype", hint=f"use auto or one of: {', '.join(DTYPE_BYTES)}")
    here = resolve_device("auto")
    device = "cpu" if here == "cpu" and not gpu_memory else "gpu"
    if dtype != "auto":
        return device, dtype, f"--dtype {dtype}"
    if device == "gpu" and here == "cpu":
        return device, GPU_AUTO_DTYPE, "--dtype auto on a GPU with bfloat16; this machine has none"
    return device, str(resolve_dtype("auto", here)).removeprefix("torch."), f"--dtype auto on {here}"


def add_cpu_process(est: MemoryEstimate, info: ModelInfo, rows: int, seq_length: int, width: int,
                    vocab: int) -> None:
    """Add to `est` what a CPU training process holds besides the tensors counted (its total becomes the peak RSS).

    - runtime: the libraries imported, the trainer and data loader (CPU_RUNTIME_BYTES);
    - loss logits: on CPU the loss is the plain one (ftcli.training.trainer.lean_loss_class): the whole float32
      logits, the log-softmax kept for the backward pass and its gradient, 3 x tokens x vocabulary x 4 bytes,
      where the activations counted TRL's fused head's two tiles;
    - allocator: glibc serves allocations up to its largest mmap threshold (32 MiB) from its heap, where the
      forward pass's freed temporaries stay resident between the activations kept: about as much again as the
      activations made of such tensors (a layer's tensors are `rows` x `seq_length` x one of its widths),
      less what the gradients and the optimizer state, allocated after the forward pass, take of that freed
      memory (measured: LoRA keeps it all; full fine-tuning, whose gradients and AdamW state are larger, reuses it)."""
    tokens = rows * seq_length
    logits = max(0, 3 * tokens * vocab * 4 - 2 * min(tokens, LOGIT_TILE_TOKENS) * min(vocab, LOGIT_TILE_VOCAB) * 4)
    kept = est.activations_bytes - (2 * min(tokens, LOGIT_TILE_TOKENS) * min(vocab, LOGIT_TILE_VOCAB) * 4)
    h, q, kv, i = (info.hidden_size, info.heads * info.head_dim, info.kv_heads * info.head_dim,
                   info.intermediate_size)
    # A decoder layer's kept elements per token by tensor width (activation_elements_per_token's terms).
    parts = ((h, 4 * h), (q, 5 * q), (kv, 2 * kv), (i, 4 * i))
    heap = sum(n for w, n in parts if tokens * w * width <= MMAP_THRESHOLD_MAX) / sum(n for _, n in parts)
    allocator = int(max(0, max(kept, 0) * HEAP_RETENTION * heap - est.gradients_bytes - est.optimizer_bytes))
    est.process = {"runtime": CPU_RUNTIME_BYTES, "loss logits": logits, "allocator": allocator}
    est.process_bytes = sum(est.process.values())
    est.total_bytes += est.process_bytes
    est.notes.append("cpu: the process's peak RSS: libraries and trainer, the plain loss's whole logits, and the "
                     "freed temporaries glibc's allocator keeps")


def weight_bytes(info: ModelInfo, facts: Any, total: int, width: int, master: int, lora_rank: int,
                 targets: list[str], notes: list[str]) -> tuple[int, int]:
    """(trainable parameters, bytes of the weights held) for a method's facts, its note appended to `notes`."""
    if not facts.trains_adapter:
        return total, total * master
    trainable = lora_parameters(info, lora_rank, targets)
    if not facts.loads_4bit:
        return trainable, total * width + trainable * master
    linear = sum(i * o * n for i, o, n in info.linear_layers.values())
    # Linear layers in 4-bit; embeddings, norms and lm_head upcast to float32 by peft's
    # prepare_model_for_kbit_training, whatever --dtype is.
    notes.append("linear layers in 4-bit NF4 with double quantisation; the other weights in float32")
    return trainable, int(linear * NF4_BYTES_PER_PARAM) + (total - linear) * 4 + trainable * master


def objective_reference(goal: Any, facts: Any, config: Any, copy_bytes: int,
                        notes: list[str]) -> tuple[str | None, int]:
    """(how `goal` holds its reference model, the bytes of a frozen copy or 0), its note appended to `notes`."""
    from ftcli.objectives.base import FROZEN_COPY

    if goal.reference is None:
        if goal.rows_per_example > 1:  # a preference objective without a reference (ORPO, SimPO): shown as none
            notes.append(f"{goal.name}: {goal.rows_per_example} sequences per example; no reference model (none is "
                         "counted)")
            return "none", 0
        return None, 0
    reference = goal.reference(facts, config)
    held = copy_bytes if not facts.trains_adapter and not config.precompute_ref and reference == FROZEN_COPY else 0
    lead = "" if goal.samples else f"{goal.rows_per_example} sequences per example; "
    notes.append(f"{goal.name}: {lead}reference model: {reference}"
                 + (" (the weights once more, no gradients or optimizer state)" if held else ""))
    return reference, held


def generation_cache(info: ModelInfo, rows: int, seq_length: int, width: int) -> int:
    """The KV cache of generating `rows` completions at once: keys and values of every layer at full length."""
    return rows * seq_length * info.layers * 2 * info.kv_heads * info.head_dim * width


def classifier_parameters(info: ModelInfo) -> int:
    """A reward model's weights (ftcli/objectives/reward.py): the LM head gives way to one score per sequence (which
    trains in full under LoRA too)."""
    return info.parameters + info.hidden_size - (0 if info.tied_embeddings else info.vocab_size * info.hidden_size)


def how_it_scales(facts: Any) -> str:
    """One line: what more processes (GPUs) do for a method."""
    if facts.shards:
        return ("scales by sharding (FSDP): on N processes each holds 1/N of the weights, gradients and optimizer "
                "state, so N GPUs fit a model N times larger")
    if facts.multi_process:
        return ("scales data parallel (DDP): on N processes each holds the whole model and trains 1/N of each "
                "step's examples, so N GPUs train up to N times faster but fit no larger a model")
    return "runs in one process"


def fits(total_bytes: int, gpu_bytes: int) -> bool:
    """Whether a process of `total_bytes` of tensors fits a GPU, leaving room for the CUDA context and slack."""
    return total_bytes * (1 + RUNTIME_OVERHEAD_FRACTION) + RUNTIME_OVERHEAD_BYTES <= gpu_bytes


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`80GB`, `24GiB`, `16000MB`, `80G`, `80` -> bytes. Decimal units are powers of 1000 (GB, G: 10^9 bytes),
    binary ones powers of 1024 (GiB, Gi: 2^30 bytes); a bare number is GiB (what torch and nvidia-smi report)."""
    match = _SIZE.match(text or "")
    if not match:
        raise ConfigError(f"--gpu-memory {text!r} is not a size", hint="write e.g. 80GB, 24GiB or 16000MB")
    value, unit = float(match.group(1)), match.group(2).lower()
    prefix, binary = unit.rstrip("b").rstrip("i"), "i" in unit
    if not prefix:
        if unit in ("i", "ib"):
            raise ConfigError(f"--gpu-memory {text!r} is not a size", hint="write e.g. 80GB, 24GiB or 16000MB")
        scale = 1 if unit == "b" else 1 << 30
    else:
        power = "kmgt".index(prefix) + 1
        scale = 1024 ** power if binary else 1000 ** power
    if value <= 0:
        raise ConfigError(f"--gpu-memory {text!r} must be positive", hint="write e.g. 80GB")
    return int(value * scale)
