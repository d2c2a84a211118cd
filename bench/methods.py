"""Peak memory and real tokens/s of every training method, same model, same data, one invocation.

    $ python bench/methods.py                       # a 40M-parameter random Llama, 20 steps per method
    $ python bench/methods.py --hidden 256 --layers 4 --steps 10

Builds a randomly-initialised Llama-architecture model (the built-in tiny model's tokenizer, a wider
and deeper config) in a temporary folder, then runs `ftcli train` for full, LoRA, QLoRA and FSDP
(2 processes) on `builtin:alpaca-sample` through the real CLI, each in its own process, and prints
the figures each run's manifest recorded, with ratios against full fine-tuning. CPU figures are peak
RSS (whole process: Python, libraries and all); FSDP's is rank 0's. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = [("full", []), ("lora", []), ("qlora", []), ("fsdp", ["--nproc-per-node", "2"])]


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.logging.disable_progress_bar()

    from ftcli.builtin import resolve_builtin_model

    tiny = resolve_builtin_model("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(tiny))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def run_method(method: str, extra: list[str], model: Path, steps: int, seq: int, work: Path) -> dict:
    out = work / method
    cmd = [sys.executable, "-m", "ftcli", "train", "--method", method, "--model", str(model),
           "--dataset", "builtin:alpaca-sample", "--max-steps", str(steps), "--seq-length", str(seq),
           "--batch-size", "4", "--output-dir", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"method": method, "error": f"exit {proc.returncode}: {tail[0]}"}
    manifest = json.loads((out / "ftcli_run.json").read_text())
    m = manifest["metrics"]
    return {"method": method + (" (2 proc)" if extra else ""), "wall_s": wall, "tps": m["real_tokens_per_second"],
            "peak": m["peak_memory_bytes"], "kind": m["peak_memory_kind"], "loss": m["train_loss"],
            "trainable": manifest["resolved"]["trainable_parameters"],
            "total": manifest["resolved"]["total_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--methods", default="full,lora,qlora,fsdp")
    args = parser.parse_args()
    wanted = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model", args.hidden, args.layers)
        rows = [run_method(m, extra, model, args.steps, args.seq_length, work)
                for m, extra in METHODS if m in wanted]
    base = next((r for r in rows if r["method"] == "full" and "error" not in r), None)
    print(f"model: random Llama hidden={args.hidden} layers={args.layers}; {args.steps} steps, batch 4, "
          f"seq {args.seq_length}, builtin:alpaca-sample; CPU: {os.cpu_count()} cores")
    print(f"{'method':<16}{'params (train/total)':>24}{'real tok/s':>12}{'x full':>8}"
          f"{'peak MiB':>10}{'x full':>8}{'loss':>8}{'wall s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<16} failed: {r['error']}")
            continue
        tps_ratio = r["tps"] / base["tps"] if base else float("nan")
        mem_ratio = r["peak"] / base["peak"] if base else float("nan")
        params = f"{r['trainable'] / 1e6:.2f}M/{r['total'] / 1e6:.1f}M"
        print(f"{r['method']:<16}{params:>24}{r['tps']:>12,.0f}{tps_ratio:>8.2f}"
              f"{r['peak'] / 2**20:>10,.0f}{mem_ratio:>8.2f}{r['loss']:>8.3f}{r['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()
