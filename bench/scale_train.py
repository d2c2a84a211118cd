"""Training at scale: ftcli against a plain transformers + peft Trainer script on the same model and data.

    $ python bench/scale_train.py --size 150m          # LoRA and full fine-tuning, about 10 minutes on 2 cores
    $ flock /tmp/ftcli-big.lock python bench/scale_train.py --size 1b     # LoRA, 3 steps a side: minutes

Both sides train bench/scale_common.py's random Llama of the size (float32 on CPU) on the same rows: Alpaca
rows whose answers are long enough that every example is cut at --seq-length 256, so every batch of both
sides is exactly 2 x 256 tokens and the step times compare compute for compute. LoRA is r=16, alpha 16, on
the seven projections (ftcli's default targets); both use the fused AdamW, learning rate 1e-4 (full: 5e-5),
batch 2, a checkpoint after every optimizer step.

Each side runs in its own child process (scale_common.measure: wall seconds and the child's own peak RSS),
the plain side first, then ftcli's, with the same small timing patch in both: the model load (plain:
from_pretrained + get_peft_model; ftcli: its loading core, the non-finite check and the method's plan), each
optimizer step (the trainer's on_step_begin to on_step_end: the median of the steps after the first), and
each checkpoint save (from the trainer's `_save_checkpoint` to the end of its `on_save` callbacks: what the
training loop waits for) and, for ftcli, the time until the checkpoint is marked complete (its files flushed
and hashed, then the marker: done on a thread of its own while training goes on). The save's floor is the time
to write the same bytes (ftcli's own checkpoint folder, read into memory first) into a fresh folder with
an fsync of each file and of the folder: what a durable checkpoint cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 256
BATCH = 2
LEARNING_RATE = {"lora": 1e-4, "full": 5e-5}

# Runs first in both children: times the model load, each optimizer step and each checkpoint save, and writes
# them as JSON to $BENCH_TIMES at exit.
PATCH = r"""
import atexit, json, os, time
import transformers
from transformers.trainer_callback import CallbackHandler
TIMES = {"load": None, "steps": [], "saves": []}
_at = {}
def _wrap(cls, name, before=None, after=None):
    original = getattr(cls, name)
    def wrapped(self, *args, **kwargs):
        if before: before()
        try:
            return original(self, *args, **kwargs)
        finally:
            if after: after()
    setattr(cls, name, wrapped)
def _mark(key):
    def f():
        _at[key] = time.perf_counter()
    return f
_wrap(CallbackHandler, "on_step_begin", before=_mark("step"))
_wrap(CallbackHandler, "on_step_end", before=lambda: TIMES["steps"].append(time.perf_counter() - _at["step"]))
_wrap(transformers.Trainer, "_save_checkpoint", before=_mark("save"))
_wrap(CallbackHandler, "on_save", after=lambda: TIMES["saves"].append(time.perf_counter() - _at["save"]))
def _dump():
    with open(os.environ["BENCH_TIMES"], "w") as fh:
        json.dump(TIMES, fh)
atexit.register(_dump)
"""

FTCLI = PATCH + r"""
import sys
import peft, transformers.models.llama.modeling_llama  # imported before its clock starts, as the plain side does
import ftcli.training.guard as guard
import ftcli.training.setup as setup
TIMES["marked"], _started = [], {}
_mark_complete = guard.mark_complete
def mark_complete(folder, step, *args, **kwargs):  # on the marking thread: until the checkpoint counts
    _mark_complete(folder, step, *args, **kwargs)
    TIMES["marked"].append(time.perf_counter() - _started.get(step, _at["save"]))
guard.mark_complete = mark_complete
_on_save = guard.RunGuardCallbacks.on_save
def on_save(self, args, state, control, **kwargs):
    _started[state.global_step] = _at["save"]
    return _on_save(self, args, state, control, **kwargs)
guard.RunGuardCallbacks.on_save = on_save
_load, _setup = setup.load_start_model, setup.RunSetup
def load_start_model(*args, **kwargs):
    _at["load"] = time.perf_counter()
    return _load(*args, **kwargs)
def run_setup(*args, **kwargs):
    TIMES["load"] = time.perf_counter() - _at["load"]
    return _setup(*args, **kwargs)
setup.load_start_model, setup.RunSetup = load_start_model, run_setup
from ftcli.cli import entrypoint
sys.argv = ["ftcli", *sys.argv[1:]]
entrypoint()
"""

PLAIN = PATCH + r"""
import sys
import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)
model_dir, data, out, method, steps, lr, seq, batch = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:\n")
ds = load_dataset("json", data_files=data, split="train")
def tokenize(rows):
    texts = [PROMPT.format(i) + o + tok.eos_token for i, o in zip(rows["instruction"], rows["output"])]
    return tok(texts, truncation=True, max_length=int(seq))
ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
if method == "lora":
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=%(targets)r))
TIMES["load"] = time.perf_counter() - start
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps),
                         save_strategy="steps", save_steps=1, learning_rate=float(lr), logging_steps=1,
                         report_to="none", use_cpu=True, optim="adamw_torch_fused", disable_tqdm=True, seed=42)
Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
""" % {"targets": TARGETS}

# Writes the bytes of a checkpoint folder (read into memory first) into a fresh folder, each file and the folder
# fsynced: prints the seconds of the writing alone.
FLOOR = r"""
import os, sys, time
src, dst = sys.argv[1], sys.argv[2]
blobs = {}
for root, _, names in os.walk(src):
    for name in names:
        path = os.path.join(root, name)
        with open(path, "rb") as fh:
            blobs[os.path.relpath(path, src)] = fh.read()
start = time.perf_counter()
for rel, data in blobs.items():
    path = os.path.join(dst, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
fd = os.open(dst, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
print(time.perf_counter() - start)
"""


def long_rows(path: Path, rows: int) -> Path:
    """Alpaca rows whose answers run past SEQ tokens (about 300 words each, one token a word or so)."""
    import random

    rng = random.Random(7)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            row = scale_common.alpaca_row(rng, i)
            row["output"] = " ".join(rng.choice(scale_common.WORDS) for _ in range(320))
            fh.write(json.dumps(row) + "\n")
    return path


def run_side(side: str, method: str, model: Path, data: Path, work: Path, steps: int, seq: int) -> dict:
    out = work / f"{side}-{method}"
    times = work / f"{side}-{method}.times.json"
    if side == "plain":
        cmd = scale_common.python(PLAIN) + [str(model), str(data), str(out), method, str(steps),
                                            str(LEARNING_RATE[method]), str(seq), str(BATCH)]
    else:
        cmd = scale_common.python(FTCLI) + [
            "train", "--method", method, "--model", str(model), "--dataset", str(data), "--batch-size", str(BATCH),
            "--seq-length", str(seq), "--max-steps", str(steps), "--save-steps", "1", "--dtype", "float32",
            "--learning-rate", str(LEARNING_RATE[method]), "--report-to", "none", "--output-dir", str(out),
            *(["--lora-rank", "16", "--lora-alpha", "16"] if method == "lora" else [])]
    result = scale_common.measure(cmd, log=work / f"{side}-{method}.log", BENCH_TIMES=str(times),
                                  FTCLI_HOME=str(work / "home"))
    if result["rc"] != 0:
        raise RuntimeError(f"{side} {method} run failed (exit {result['rc']}): see {work / f'{side}-{method}.log'}")
    result.update(json.loads(times.read_text()))
    result["out"] = out
    return result


def floor_seconds(checkpoint: Path, work: Path, repeats: int) -> float:
    """The median time to write `checkpoint`'s bytes durably (each repeat into a fresh folder, removed after)."""
    import subprocess

    found = []
    for i in range(repeats):
        dst = work / f"floor-{i}"
        dst.mkdir()
        done = subprocess.run(scale_common.python(FLOOR) + [str(checkpoint), str(dst)], capture_output=True,
                              text=True, check=True, env=scale_common.env())
        found.append(float(done.stdout.strip()))
        shutil.rmtree(dst)
    return statistics.median(found)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def secs(x: float) -> str:
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def method_rows(method: str, model: Path, data: Path, work: Path, steps: int, seq: int,
                repeats: int) -> list[dict]:
    plain = run_side("plain", method, model, data, work, steps, seq)
    ours = run_side("ftcli", method, model, data, work, steps, seq)
    checkpoint = ours["out"] / "checkpoint-1"
    size = folder_bytes(checkpoint)
    floor = floor_seconds(checkpoint, work, repeats)
    label = "LoRA r=16" if method == "lora" else "full"
    step = {k: statistics.median(r["steps"][1:] or r["steps"]) for k, r in (("plain", plain), ("ftcli", ours))}
    save = {k: statistics.median(r["saves"]) for k, r in (("plain", plain), ("ftcli", ours))}
    marked = statistics.median(ours["marked"]) if ours.get("marked") else None
    rows = [
        {"what": f"model load ({label})", "ftcli": secs(ours["load"]), "plain": secs(plain["load"]),
         "ratio": round(ours["load"] / plain["load"], 2), "baseline": "from_pretrained"
         + (" + get_peft_model" if method == "lora" else "")},
        {"what": f"training step ({label}, batch {BATCH} x {seq})", "ftcli": secs(step["ftcli"]),
         "plain": secs(step["plain"]), "ratio": round(step["ftcli"] / step["plain"], 2),
         "baseline": "transformers Trainer + peft, "
         + (f"median of steps 2..{steps}" if steps > 1 else "its one step")},
        {"what": f"checkpoint save ({label}, {scale_common.gib(size)}): the training loop waits",
         "ftcli": secs(save["ftcli"]), "plain": secs(floor), "ratio": round(save["ftcli"] / floor, 2),
         "baseline": f"the same bytes written + fsync (the plain Trainer's save, not flushed: {secs(save['plain'])})"},
        *([{"what": f"checkpoint save ({label}): until marked complete", "ftcli": secs(marked),
            "plain": secs(floor), "ratio": round(marked / floor, 2),
            "baseline": "the same bytes written + fsync (ftcli marks it on a thread of its own while training "
                        "goes on)"}] if marked is not None else []),
        {"what": f"peak RSS ({label} run)", "ftcli": scale_common.gib(ours["peak_bytes"]),
         "plain": scale_common.gib(plain["peak_bytes"]), "ratio": round(ours["peak_bytes"] / plain["peak_bytes"], 2),
         "baseline": "the plain script's child process"},
    ]
    for side in ("plain", "ftcli"):
        shutil.rmtree(work / f"{side}-{method}", ignore_errors=True)
    return rows


def rows(size: str, work: Path, quick: bool = False) -> list[dict]:
    """The training rows at `size` ("tiny", "150m", "1b"); `quick`: LoRA only, one step and its
    checkpoint, one floor write."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    model = scale_common.build_model(Path(f"/tmp/scale/m{size}") if size != "tiny" else work / "mtiny", size)
    data = long_rows(work / "long.jsonl", 32)
    steps, seq = (1 if quick else 3), SEQ
    methods = ["lora"] if quick or size == "1b" else ["lora", "full"]
    found = []
    for method in methods:
        found += method_rows(method, model, data, work, steps, seq, repeats=1 if quick else 3)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="150m", choices=sorted(scale_common.SIZES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    import tempfile

    print(f"command: python bench/scale_train.py {' '.join(sys.argv[1:])}")
    print(f"before: {scale_common.loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ftcli-scale-train-") as tmp:
        work = args.work or Path(tmp)
        start = time.perf_counter()
        found = rows(args.size, work, quick=args.quick)
    for row in found:
        print(json.dumps(row))
    print(f"after: {scale_common.loadavg()}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
