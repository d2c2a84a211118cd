"""Peak memory of `ftcli export` divided by the size of the merged model in memory (goal: close to 1.0, never 2.0).

    $ python bench/export.py                        # a 134M-parameter random Llama, four cases
    $ python bench/export.py --hidden 512 --layers 4 --cases lora-bfloat16

Builds a randomly-initialised Llama-architecture model (hidden 768, 12 layers, vocabulary 32000:
134M parameters by default) with the built-in tiny model's tokenizer, saves it in the case's dtype,
and saves a LoRA adapter (r=16 on the seven projections) whose B matrices are random and non-zero,
so the merge really changes every targeted weight. Then each case runs `ftcli export` (verification
on, the default) in a fresh process and prints:

- extra peak = peak RSS during the export - RSS of the same process after importing torch,
  transformers, peft, bitsandbytes and ftcli (before the command starts). Both are read from
  /proc/self/status (VmRSS, VmHWM); the peak counter is reset with /proc/self/clear_refs after the
  imports, so the peak is the export's own. (Without that reset, the figure falls back to peak RSS
  since process start, and says so.)
- model = bytes of the merged model's tensors in the output dtype (read from the exported
  safetensors headers, so exactly what one copy of the merged model takes in memory).
- ratio = extra peak / model. Holding two copies of the model would read about 2.0.
- anon = the same ratio for anonymous memory alone (RssAnon, sampled every 2 ms by a thread of the
  measured process, so a spike shorter than that can be missed). Peak RSS also counts the pages of
  the memory-mapped base checkpoint (clean, file-backed, reclaimable by the kernel under pressure).

The `qlora` case exports the same adapter as a QLoRA adapter (`--merge-into dequantized`): the base
is loaded in 4-bit NF4, each layer is dequantised and merged in turn. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    # name: (base dtype, extra export flags)
    "lora-bfloat16": ("bfloat16", []),
    "lora-float32": ("float32", []),
    "qlora-bfloat16": ("bfloat16", ["--merge-into", "dequantized"]),
    # A float32 checkpoint exported in bfloat16: the 32-bit file is read (and mapped) to build the 16-bit model.
    "lora-float32-as-bfloat16": ("float32", ["--dtype", "bfloat16"]),
}

# Runs inside the measured process: import the libraries, reset the peak counter, run the command.
MEASURE = r"""
import json, sys, threading, time
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields
import torch, transformers, peft, bitsandbytes  # noqa: E401
import ftcli.export.run, ftcli.export.merge, ftcli.cli
now = status()
baseline, anon_baseline, anon_peak = now["VmRSS"], now["RssAnon"], [now["RssAnon"]]
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
done = threading.Event()
def sample():  # anonymous memory has no peak counter: sample it
    while not done.is_set():
        anon_peak[0] = max(anon_peak[0], status()["RssAnon"])
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
code = 0
try:
    ftcli.cli.app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
except Exception as exc:
    code = repr(exc)
done.set()
print("MEASURE " + json.dumps({"baseline": baseline, "peak": status()["VmHWM"], "reset": reset, "code": code,
                               "anon_extra_peak": anon_peak[0] - anon_baseline}))
"""


def build_base(folder: Path, hidden: int, layers: int, vocab: int, dtype: str) -> int:
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftcli.builtin import resolve_builtin_model

    transformers.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(resolve_builtin_model("builtin:tiny-llama")))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def build_adapter(base: Path, folder: Path, rank: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)  # B starts at zero; a real trained adapter does not
    peft_model.save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def tensor_bytes(folder: Path) -> int:
    """Bytes of every tensor in the folder's safetensors files (from their headers)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


def run_case(name: str, adapter: Path, out: Path) -> dict:
    _, extra = CASES[name]
    cmd = [sys.executable, "-c", MEASURE, "export", str(adapter), "--output", str(out), *extra]
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}  # one unwrapped `verify:` line
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURE ")]
    if proc.returncode != 0 or not lines:
        return {"case": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    measured = json.loads(lines[-1].removeprefix("MEASURE "))
    if measured["code"] != 0:
        return {"case": name, "error": [f"exit {measured['code']}", *proc.stderr.strip().splitlines()[-2:]]}
    verify = next((ln.strip() for ln in proc.stdout.splitlines() if ln.startswith("verify:")), "")
    model = tensor_bytes(out)
    extra_peak = measured["peak"] - measured["baseline"]
    return {"case": name, "wall_s": wall, "baseline": measured["baseline"], "extra_peak": extra_peak,
            "model": model, "ratio": extra_peak / model, "anon_ratio": measured["anon_extra_peak"] / model,
            "reset": measured["reset"], "verify": verify}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    results = []
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-export-") as tmp:
        work = Path(tmp)
        for name in args.cases.split(","):
            dtype, _ = CASES[name]
            base, adapter = work / f"base-{dtype}", work / f"adapter-{dtype}"
            if not base.exists():
                params = build_base(base, args.hidden, args.layers, args.vocab, dtype)
                build_adapter(base, adapter, args.rank)
                print(f"built a random Llama: {params / 1e6:.1f}M parameters ({dtype}), LoRA r={args.rank}", flush=True)
            result = run_case(name, adapter, work / f"out-{name}")
            results.append(result)
            print(json.dumps(result), flush=True)
    print()
    print(f"{'case':<24} {'model':>10} {'extra peak':>11} {'above model':>12} {'ratio':>6} {'anon':>5} {'wall':>7}"
          "  verification")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<24} error: {' | '.join(r['error'])}")
            continue
        print(f"{r['case']:<24} {mib(r['model']):>10} {mib(r['extra_peak']):>11} "
              f"{mib(r['extra_peak'] - r['model']):>12} {r['ratio']:>6.2f} {r['anon_ratio']:>5.2f} "
              f"{r['wall_s']:>6.1f}s  {r['verify'].removeprefix('verify: ')}")
    how = "peak RSS during the export" if all(r.get("reset", True) for r in results) else \
        "peak RSS since process start (clear_refs unavailable)"
    print(f"\nratio = ({how} - RSS after imports) / merged model's tensor bytes; two copies would read ~2.0")
    print("anon  = the same for anonymous memory only (sampled every 2 ms): RSS also counts the pages of the "
          "memory-mapped base checkpoint, which the kernel can reclaim")


if __name__ == "__main__":
    main()
