"""What bench/scale.py's parts share: random Llama models at real sizes, Alpaca files of many rows, and a
measured child process (wall seconds and its own peak RSS). Nothing is downloaded.

Sizes (vocabulary 4096, float32 on disk, untied embeddings off: the 1B shape is Llama-3.2-1B's with a
small vocabulary):
- 150m: hidden 1024, 12 layers, 16 heads (4 key/value heads), intermediate 3072: 0.16B parameters;
- 1b:   hidden 2048, 16 layers, 32 heads (8 key/value heads), intermediate 8192: 0.98B parameters.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=704),
    "150m": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=3072),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
}
VOCAB = 4096

WORDS = ("apple river stone cloud green seven table music light winter garden paper silver window yellow "
         "mountain quiet number letter simple answer question morning evening planet ocean forest bright "
         "under over carry follow listen window basket candle marble rocket violet sudden gentle").split()


def alpaca_row(rng: random.Random, i: int) -> dict[str, str]:
    """One Alpaca row with a realistic spread of lengths (mostly short answers, a long tail)."""
    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out_len = rng.choice([3, 5, 8, 12, 20, 40]) if rng.random() < 0.9 else rng.randint(80, 300)
    return {"instruction": f"Task {i}: {words(rng.randint(4, 16))}.",
            "input": words(rng.randint(0, 20)) if rng.random() < 0.4 else "", "output": words(out_len)}


def write_alpaca(path: Path, rows: int, seed: int = 0) -> Path:
    """An Alpaca JSONL file of `rows` rows, written as it is generated (flat memory), reused if present."""
    done = path.with_suffix(path.suffix + ".done")
    if path.exists() and done.exists() and done.read_text() == str(rows):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps(alpaca_row(rng, i)) + "\n")
    done.write_text(str(rows))
    return path


def build_tokenizer(folder: Path):
    """A byte-level BPE of VOCAB tokens trained on the bench's words, with a Llama-like chat-less setup."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    texts = [json.dumps(alpaca_row(rng, i)) for i in range(3000)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def build_model(folder: Path, size: str) -> Path:
    """A randomly initialised Llama of `size` (SIZES) saved in float32 safetensors with its tokenizer; reused
    if `folder` already holds one of that size."""
    marker = folder / "bench-size.txt"
    if marker.exists() and marker.read_text() == size:
        return folder
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype="float32", **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    del model
    marker.write_text(size)
    return folder


def parameters(folder: Path) -> int:
    """Parameters of a saved model, from its safetensors headers (no load)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def env(**extra: str) -> dict[str, str]:
    """The environment of a measured child: offline, ftcli importable from this checkout."""
    out = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    out["PYTHONPATH"] = str(ROOT) + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    out.update(extra)
    return out


def measure(cmd: list[str], log: Path | None = None, **extra_env: str) -> dict:
    """Run `cmd` (a child process), return {"seconds", "peak_bytes" (its own peak RSS, with the children it
    waited for), "rc"}. Output goes to `log` (or is discarded)."""
    out = log.open("w") if log else subprocess.DEVNULL
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(**extra_env), cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if log:
            out.close()
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "peak_bytes": usage.ru_maxrss * 1024, "rc": proc.returncode}


def ftcli(*args: str) -> list[str]:
    """The command line of `ftcli ARGS` in this checkout's Python."""
    return [sys.executable, "-m", "ftcli", *args]


def python(code: str) -> list[str]:
    """The command line of a plain-library script (`python -c CODE`)."""
    return [sys.executable, "-c", code]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def loadavg() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def cpus() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
