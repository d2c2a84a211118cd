"""A tiny, randomly initialised Llama model with a real tokenizer, built offline on first use.

    >>> from ftcli.builtin.tiny_llama import ensure_tiny_llama
    >>> folder = ensure_tiny_llama()  # ~/.cache/ftcli/builtin/tiny-llama-v1, built once
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> model = AutoModelForCausalLM.from_pretrained(folder)
    >>> tokenizer = AutoTokenizer.from_pretrained(folder)

It lets every training method run end to end in seconds on a CPU with no network:
the weights are random, but the tokenizer is a byte-level BPE trained on the
built-in Alpaca sample, with a distinct pad token and a ChatML chat template, so
tokenisation, masking and chat formatting behave like they do on a real model.

The build is deterministic (same bytes on every machine) and atomic: it happens
in a temporary folder next to the target and is renamed into place, and a folder
without the completion marker `ftcli_builtin.json` is never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftcli.builtin.alpaca_sample import alpaca_sample_rows
from ftcli.paths import ftcli_home

TINY_LLAMA_NAME = "tiny-llama"
# Bump whenever the build changes what ends up on disk, so stale caches are not reused.
TINY_LLAMA_VERSION = 1
COMPLETION_MARKER = "ftcli_builtin.json"

_VOCAB_SIZE = 2048
_BOS, _EOS, _PAD, _UNK = "<s>", "</s>", "<pad>", "<unk>"
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <|im_start|>=4, <|im_end|>=5.
_SPECIAL_TOKENS = [_UNK, _BOS, _EOS, _PAD, _IM_START, _IM_END]

_ALPACA_TEXT_TEMPLATE = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
### Instruction: {}

### Input: {}

### Response: {}"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SYSTEM_PROMPT = "You are a helpful assistant."


def tiny_llama_dir(home: Path | None = None) -> Path:
    """Where the tiny model lives (built or not) under `home`, default `ftcli_home()`."""
    return (home or ftcli_home()) / "builtin" / f"tiny-llama-v{TINY_LLAMA_VERSION}"


def is_built(folder: Path) -> bool:
    """True when `folder` holds a finished build: the completion marker is written last."""
    return (folder / COMPLETION_MARKER).is_file()


def ensure_tiny_llama(home: Path | None = None) -> Path:
    """Return the folder of the tiny Llama model and tokenizer, building it first if needed.

    Safe to call from several processes at once: each builds privately and the
    first finished build wins; the others throw theirs away.
    """
    target = tiny_llama_dir(home)
    if is_built(target):
        return target
    parent = target.parent
    if home is None:
        from ftcli.paths import home_folder

        home_folder(parent.name)  # an FTCLI_HOME that cannot be written: one line, exit 5
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tiny-llama-tmp-"))
    try:
        # mkdtemp makes the folder private (0700); the cache may be shared read-only with others.
        os.chmod(tmp, 0o755)
        _build(tmp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _install(tmp: Path, target: Path) -> None:
    """Move a finished build into place, replacing an unfinished folder but never a finished one."""
    for _ in range(5):
        if is_built(target):
            return
        if target.exists():
            _discard(target)
        try:
            os.rename(tmp, target)
            return
        except OSError:
            # Another process put a folder there between our check and our rename; look again.
            continue
    raise RuntimeError(f"could not install the built-in model into {target}")


def _discard(folder: Path) -> None:
    """Remove an unfinished folder by first renaming it aside, so no reader sees it half-deleted."""
    trash = folder.parent / f".tiny-llama-stale-{uuid.uuid4().hex}"
    try:
        os.rename(folder, trash)
    except OSError:
        # Someone else moved or replaced it first; the caller re-checks.
        return
    shutil.rmtree(trash, ignore_errors=True)


def _training_texts() -> Iterator[str]:
    """The tokenizer's training corpus: every sample row, once as Alpaca text and once as a chat."""
    for row in alpaca_sample_rows():
        yield _ALPACA_TEXT_TEMPLATE.format(row["instruction"], row["input"], row["output"])
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        yield (
            f"{_IM_START}system\n{_SYSTEM_PROMPT}{_IM_END}\n"
            f"{_IM_START}user\n{user}{_IM_END}\n"
            f"{_IM_START}assistant\n{row['output']}{_IM_END}\n"
        )


def build_tokenizer() -> Any:
    """Train the byte-level BPE tokenizer and wrap it for transformers (`PreTrainedTokenizerFast`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=_SPECIAL_TOKENS,
        # The full byte alphabet means any text encodes, so <unk> is never needed in practice.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(), trainer=trainer)
    bos_id = backend.token_to_id(_BOS)
    # Like Llama tokenizers: <s> in front, no </s> at the end (the data layer decides about eos).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        unk_token=_UNK,
        extra_special_tokens=[_IM_START, _IM_END],
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=2048,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def _check_tokenizer(tokenizer: Any) -> None:
    """Fail the build loudly rather than cache a tokenizer that mangles text or adds eos."""
    sample = "Hello  world!\n\tIndented line, 123 + 45 = 168.\n\nÜnïcode ✓"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != sample:
        raise RuntimeError("built-in tokenizer does not round-trip text")
    ids = tokenizer("hello")["input_ids"]
    if ids[0] != tokenizer.bos_token_id or ids[-1] == tokenizer.eos_token_id:
        raise RuntimeError("built-in tokenizer must add bos and not eos")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise RuntimeError("built-in tokenizer needs a pad token distinct from eos")


def _build_model(tokenizer: Any) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        # Wider than the usual 0.02: with frozen random output rows that small, adapters (LoRA) could not move
        # the logits far enough to show learning on a model this narrow.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' shard-writing bar, which is noise for a few-hundred-KB model."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build(folder: Path) -> None:
    """Write tokenizer, model, generation config and, last, the completion marker into `folder`."""
    tokenizer = build_tokenizer()
    _check_tokenizer(tokenizer)
    model = _build_model(tokenizer)
    tokenizer.save_pretrained(folder)
    # transformers 5 always writes safetensors (the old safe_serialization switch is gone).
    with _quiet_progress_bars():
        model.save_pretrained(folder)
    info = {
        "name": TINY_LLAMA_NAME,
        "version": TINY_LLAMA_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (folder / COMPLETION_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
