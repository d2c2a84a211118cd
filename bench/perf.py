"""ftcli's defaults against the reference workflow: real tokens/s, wall time, loss and peak memory, one command.

    $ python bench/perf.py                   # 3 alternating pairs per dataset, about 20 minutes on 2 CPU cores
    $ python bench/perf.py --repeats 5 --rows 1200
    $ python bench/perf.py --quick           # a smoke run: 1 pair, 200 rows

Everything is built locally in a temporary folder, nothing is downloaded:
- data: Alpaca-format JSONL with a long tail of lengths (log-normal responses: median far below the
  maximum) and a control set of uniform lengths; the words follow a random Markov chain, so there is
  something to learn;
- tokenizer: a byte-level BPE trained on that data (--vocab tokens), with BOS / EOS and no pad token;
- model: a randomly initialised Llama (--hidden / --layers), saved once; both sides load the same weights.

The reference workflow is a copy of the reference full fine-tuning script's code path (the Alpaca
template plus EOS as one `text` column, `pad_token = eos_token`, a plain TRL `SFTTrainer` with
`packing=False` and its defaults: padded batches, random order, batch 8, lr 5e-5, adamw_torch,
seed 42, one epoch, TensorBoard logging every step). ftcli runs through its real CLI with its
defaults (`ftcli train --method full`), plus `--train-on-inputs` so that both put the whole text in
the loss, and `--dtype` set to the reference's dtype (its default, bfloat16: the same numerics on
both sides). A third workflow, plain (skip it with --no-plain), is what a peer built on the plain
`transformers.Trainer` runs (LLaMA-Factory, axolotl): the same text + EOS tokenized once, the Trainer's own
defaults (random order, its optimizer), the reference's batch, learning rate, epoch and seed, padded
batches to a multiple of 8. Runs alternate (reference, plain, ftcli, reference, ...), each in its own process.

Figures per run: real tokens/s = non-padding tokens trained / the trainer's train_runtime; wall =
the whole process (start-up, loading, training, saving); peak = the process's own peak RSS (its
VmHWM); loss = the final model's mean token loss on the same held-out rows (the reference's
tokenization, whole text, evaluated here in float32): the fair comparison, since the two tokenize
the prompt/response seam slightly differently and order the data differently; train loss = the
trainer's mean training loss. The table prints medians with [min-max] ranges, ftcli/reference and
ftcli/plain ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALPACA_PROMPT_TEMPLATE = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
### Instruction: {}

### Input: {}

### Response: {}"""

REFERENCE = {"batch_size": 8, "learning_rate": 5e-5, "seq_length": 2048, "gradient_accumulation_steps": 1}


# ---- data, tokenizer, model -----------------------------------------------------------------------


def make_words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "po", "an", "de", "ri", "mo", "zu", "shi", "ter", "ba"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


class Chain:
    """A random Markov chain over words: each word has a few likely successors (learnable structure)."""

    def __init__(self, rng: random.Random, words: list[str]) -> None:
        self.rng = rng
        self.words = words
        self.next = {w: rng.sample(words, 6) for w in words}

    def text(self, n: int) -> str:
        w = self.rng.choice(self.words)
        out = [w]
        for _ in range(n - 1):
            w = self.rng.choice(self.next[w]) if self.rng.random() < 0.85 else self.rng.choice(self.words)
            out.append(w)
        return " ".join(out)


def make_rows(kind: str, rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    chain = Chain(rng, make_words(rng, 6000))
    out = []
    for _ in range(rows):
        if kind == "longtail":
            # Log-normal response lengths: median ~12 words, a long tail up to 700 words.
            n_out = int(min(700, max(2, rng.lognormvariate(math.log(12), 1.9))))
            instruction = chain.text(rng.randint(4, 16))
            inp = chain.text(rng.randint(3, 30)) if rng.random() < 0.4 else ""
        else:
            n_out = rng.randint(14, 16)
            instruction = chain.text(6)
            inp = ""
        out.append({"instruction": instruction, "input": inp, "output": chain.text(n_out)})
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def build_model(folder: Path, texts: list[str], vocab: int, hidden: int, layers: int) -> tuple[Path, int, int]:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    tok = build_tokenizer(texts, vocab)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder, sum(p.numel() for p in model.parameters()), len(tok)


# ---- the reference workflow (run in its own process) ----------------------------------------------


def reference_main(argv: list[str]) -> None:
    """The reference full fine-tuning script's code path, on a local JSONL file instead of tatsu-lab/alpaca."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dataset_size", type=int, default=500)
    parser.add_argument("--num_epochs", type=float, default=1)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    def get_alpaca_dataset(eos_token, dataset_size=500):
        def preprocess(x):
            texts = [
                ALPACA_PROMPT_TEMPLATE.format(instruction, input, output) + eos_token
                for instruction, input, output in zip(x["instruction"], x["input"], x["output"])
            ]
            return {"text": texts}

        dataset = load_dataset("json", data_files=args.data, split="train").select(range(dataset_size)).shuffle(seed=42)
        return dataset.map(preprocess, remove_columns=dataset.column_names, batched=True)

    model = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=args.dtype, device_map="auto",
                                                 trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name, trust_remote_code=True)
    tokenizer.pad_token = tokenizer.eos_token
    dataset = get_alpaca_dataset(tokenizer.eos_token, args.dataset_size)
    config = {
        "per_device_train_batch_size": REFERENCE["batch_size"],
        "num_train_epochs": args.num_epochs,
        "gradient_accumulation_steps": REFERENCE["gradient_accumulation_steps"],
        "learning_rate": REFERENCE["learning_rate"],
        "optim": "adamw_torch",
        "save_strategy": "no",
        "remove_unused_columns": False,
        "seed": 42,
        "dataset_text_field": "text",
        "packing": False,
        "max_length": REFERENCE["seq_length"],
        "torch_compile": False,
        "report_to": "tensorboard",  # the real run's setting; transformers 5 reads the folder from the environment
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "output_dir": args.output_dir,
    }
    if not torch.cuda.is_available():
        # The one addition: on a machine without CUDA, transformers refuses TRL's default bf16=True without it.
        config["use_cpu"] = True
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=SFTConfig(**config))
    stats = trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    # Real tokens: every non-padding token of the prepared (tokenized, truncated) set, once per epoch.
    real = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * args.num_epochs
    Path(args.result).write_text(json.dumps({
        "train_runtime": stats.metrics["train_runtime"], "train_loss": stats.metrics["train_loss"],
        "real_tokens": real, "steps": trainer.state.global_step,
    }))


def plain_main(argv: list[str]) -> None:
    """The plain-Trainer workflow a peer runs (LLaMA-Factory, axolotl): tokenize the same text + EOS, then
    `transformers.Trainer` with its own defaults (random order, its optimizer) and the reference's batch,
    learning rate, epochs and seed; padded batches (a multiple of 8) behind an attention mask."""
    parser = argparse.ArgumentParser()
    for name in ("--model_name", "--data", "--output_dir", "--result"):
        parser.add_argument(name, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dataset_size", type=int, default=500)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize(x):
        texts = [ALPACA_PROMPT_TEMPLATE.format(i, n, o) + tokenizer.eos_token
                 for i, n, o in zip(x["instruction"], x["input"], x["output"])]
        ids = tokenizer(texts, truncation=True, max_length=REFERENCE["seq_length"])["input_ids"]
        return {"input_ids": ids, "labels": [list(r) for r in ids]}

    dataset = load_dataset("json", data_files=args.data, split="train").select(range(args.dataset_size))
    dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
    model = AutoModelForCausalLM.from_pretrained(args.model_name, dtype=getattr(torch, args.dtype))
    targs = TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=REFERENCE["batch_size"],
                              learning_rate=REFERENCE["learning_rate"], num_train_epochs=1, seed=42,
                              logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                              use_cpu=not torch.cuda.is_available(), bf16=args.dtype == "bfloat16")
    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8))
    stats = trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    Path(args.result).write_text(json.dumps({
        "train_runtime": stats.metrics["train_runtime"], "train_loss": stats.metrics["train_loss"],
        "real_tokens": sum(len(ids) for ids in dataset["input_ids"]), "steps": trainer.state.global_step,
    }))


# ---- one run of each side -------------------------------------------------------------------------


def run_process(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, int]:
    """Run `cmd`; return (exit code, wall seconds, peak RSS bytes of that process alone).

    The peak is the kernel's high-water mark of the process's own memory (VmHWM), sampled every 20 ms
    until it exits: getrusage/wait4 would not do, since a child's ru_maxrss starts from this (large,
    torch-importing) parent's RSS at fork time.
    """
    start = time.perf_counter()
    peak = 0
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.02)
    wall = time.perf_counter() - start
    return proc.returncode, wall, peak


def run_reference(model: Path, data: Path, rows: int, dtype: str, work: Path, tag: str, mode: str = "_reference") -> dict:
    tag = f"{mode.strip('_')}-{tag}"
    out, result = work / f"ref-{tag}", work / f"ref-{tag}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TENSORBOARD_LOGGING_DIR": str(work / f"ref-{tag}-tb")}
    cmd = [sys.executable, os.path.abspath(__file__), mode, "--model_name", str(model), "--data", str(data),
           "--dtype", dtype, "--dataset_size", str(rows), "--output_dir", str(out), "--result", str(result)]
    code, wall, peak = run_process(cmd, work / f"ref-{tag}.log", env)
    if code != 0:
        raise SystemExit(f"{mode} run failed (exit {code}); see the end of {work / f'ref-{tag}.log'}:\n"
                         + "\n".join((work / f"ref-{tag}.log").read_text().splitlines()[-15:]))
    r = json.loads(result.read_text())
    return {"tps": r["real_tokens"] / r["train_runtime"], "wall": wall, "peak": peak, "train_loss": r["train_loss"],
            "runtime": r["train_runtime"], "steps": r["steps"], "real_tokens": r["real_tokens"], "dir": out}


def run_ftcli(model: Path, data: Path, rows: int, dtype: str, work: Path, tag: str, extra: list[str]) -> dict:
    out = work / f"ftcli-{tag}"
    ftcli = Path(sys.executable).with_name("ftcli")
    exe = [str(ftcli)] if ftcli.exists() else [sys.executable, "-m", "ftcli"]
    cmd = [*exe, "train", "--method", "full", "--model", str(model), "--dataset", str(data), "--dataset-size",
           str(rows), "--dtype", dtype, "--train-on-inputs", "--output-dir", str(out), "--overwrite", *extra]
    code, wall, peak = run_process(cmd, work / f"ftcli-{tag}.log", {**os.environ, "HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise SystemExit(f"ftcli run failed (exit {code}); see the end of {work / f'ftcli-{tag}.log'}:\n"
                         + "\n".join((work / f"ftcli-{tag}.log").read_text().splitlines()[-15:]))
    m = json.loads((out / "ftcli_run.json").read_text())
    metrics = m["metrics"]
    return {"tps": metrics["real_tokens"] / metrics["train_runtime"], "wall": wall, "peak": peak,
            "train_loss": metrics["train_loss"], "runtime": metrics["train_runtime"], "steps": metrics["steps"],
            "real_tokens": metrics["real_tokens"], "dir": out}


def heldout_loss(model_dir: Path, rows: list[dict[str, str]], tokenizer_dir: Path) -> float:
    """Mean token loss of a saved model on `rows` formatted like the reference (whole text + EOS), in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = tok(ALPACA_PROMPT_TEMPLATE.format(r["instruction"], r["input"], r["output"]) + tok.eos_token,
                      return_tensors="pt")["input_ids"][:, :REFERENCE["seq_length"]]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            n = ids.shape[1] - 1
            total += float(loss) * n
            count += n
    return total / count


# ---- what each default buys (in this process, alternating, same batches) --------------------------


def micro(model_dir: Path, data: Path, rows: int, dtype: str, steps: int) -> list[str]:
    """Median seconds per optimizer step of the pieces ftcli changes, measured on the same batches:
    random vs length-grouped padded batches vs padding-free rows (SDPA), and per-tensor vs fused AdamW."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.training import batching
    from ftcli.config import build_run_config
    from ftcli.data import load_training_dataset
    from ftcli.models import apply_pad_policy, load_tokenizer

    config = build_run_config({"method": "full", "model": str(model_dir), "dataset": str(data), "dataset_size": rows,
                               "train_on_inputs": True})
    tok = load_tokenizer(config.model)
    apply_pad_policy(tok)
    ds, _ = load_training_dataset(config, tok)
    lengths = batching.example_lengths(ds)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.train()
    grouped = batching.grouped_order(lengths, 8, seed=42, epoch=0)
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(42)).tolist()
    padded = batching.Collator(pad_token_id=tok.pad_token_id, seq_length=config.seq_length)
    free = batching.Collator(pad_token_id=tok.pad_token_id, seq_length=config.seq_length, padding_free=True)
    pick = torch.randperm(len(lengths) // 8, generator=torch.Generator().manual_seed(0))[:steps].tolist()

    def step(batch: dict) -> float:
        batch = {k: v for k, v in batch.items() if k != batching.REAL_TOKENS}
        start = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"random order, padded": [], "grouped, padded": [], "grouped, padding-free": []}
    tokens: dict[str, int] = dict.fromkeys(times, 0)
    for k in pick:
        for name, order, coll in (("random order, padded", shuffled, padded), ("grouped, padded", grouped, padded),
                                  ("grouped, padding-free", grouped, free)):
            examples = [ds[i] for i in order[8 * k:8 * k + 8]]
            times[name].append(step(coll(examples)))
            tokens[name] += sum(len(e["input_ids"]) for e in examples)
    lines = [f"forward+backward, {steps} random steps of 8 examples, real tokens/s:"]
    for name in times:
        lines.append(f"  {name:24s} {tokens[name] / sum(times[name]):8,.0f}")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    lines.append("AdamW step, median of 5:")
    for name, kwargs in (("adamw_torch (per tensor)", {"foreach": False}), ("adamw_torch_fused", {"fused": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5, **kwargs)
        samples = []
        for _ in range(6):
            start = time.perf_counter()
            opt.step()
            samples.append(time.perf_counter() - start)
        lines.append(f"  {name:24s} {statistics.median(samples[1:]) * 1000:8.1f} ms")
    return lines


# ---- report ---------------------------------------------------------------------------------------


def fmt_range(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def mib(n: float) -> float:
    return n / 2**20


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    """Medians [min-max] per side; the ratio row: ftcli / reference, the median [min-max] of the per-pair
    ratios (each ftcli run against the reference run just before it) for tokens/s and training time,
    the ratio of the medians for the rest."""
    cols = (("tps", "real tokens/s", ",.0f", 1), ("runtime", "training s", ".1f", 1),
            ("wall", "wall s", ".1f", 1), ("heldout", "held-out loss", ".4f", 1),
            ("train_loss", "train loss", ".4f", 1), ("peak", "peak RSS MiB", ",.0f", 2**20))
    lines = ["| data | workflow | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for data, sides in results.items():
        for side in [s for s in ("reference", "plain", "ftcli") if sides.get(s)]:
            cells = [fmt_range([r[key] / scale for r in sides[side]], f) for key, _, f, scale in cols]
            lines.append(f"| {data} | {side} | " + " | ".join(cells) + " |")
        for base in [s for s in ("reference", "plain") if sides.get(s)]:
            cells = []
            for key, _, _, _ in cols:
                if key in ("tps", "runtime"):
                    pairs = [f[key] / r[key] for r, f in zip(sides[base], sides["ftcli"])]
                    cells.append(f"**{statistics.median(pairs):.2f}x** [{min(pairs):.2f}-{max(pairs):.2f}]")
                else:
                    ref = statistics.median(r[key] for r in sides[base])
                    cells.append(f"{statistics.median(r[key] for r in sides['ftcli']) / ref:.3f}x")
            lines.append(f"| {data} | ftcli / {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_data(path: Path, tokenizer_dir: Path, rows: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = path.read_text().splitlines()[:rows]
    lengths = sorted(len(tok(ALPACA_PROMPT_TEMPLATE.format(r["instruction"], r["input"], r["output"])
                             + tok.eos_token)["input_ids"]) for r in map(json.loads, lines))
    return (f"{len(lengths)} rows, tokens per example: median {statistics.median(lengths):.0f}, "
            f"p90 {lengths[int(0.9 * (len(lengths) - 1))]}, max {lengths[-1]}, total {sum(lengths):,}")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_reference", "_plain"):
        (reference_main if sys.argv[1] == "_reference" else plain_main)(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs per dataset (default 3)")
    parser.add_argument("--rows", type=int, default=1000, help="training rows per dataset (default 1000)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out rows for the loss (default 64)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary (default 4096)")
    parser.add_argument("--hidden", type=int, default=160)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", help="both sides (the reference default: bfloat16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run, both sides (default 1: on a "
                        "shared machine, 2-thread kernels stall on every op while the other core is busy)")
    parser.add_argument("--datasets", default="longtail,uniform")
    parser.add_argument("--ftcli-args", default="", help="extra flags for ftcli train, e.g. '--packing'")
    parser.add_argument("--micro", type=int, default=24, help="steps of the in-process measurement of each "
                        "default on the long-tailed data (0: skip)")
    parser.add_argument("--pairs-only", dest="micro", action="store_const", const=0, help="skip that measurement")
    parser.add_argument("--quick", action="store_true", help="1 pair, 200 rows: a smoke run")
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain-Trainer workflow "
                        "(transformers.Trainer with its defaults: what a peer built on it runs)")
    parser.add_argument("--keep", type=Path, help="keep the run folders here instead of a temporary folder")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rows, args.heldout = 1, 200, 16

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # inherited by every run
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print("command: python bench/perf.py " + " ".join(sys.argv[1:]))
    print(f"machine: {machine()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="ftcli-perf-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data: dict[str, tuple[Path, list[dict[str, str]]]] = {}
        corpus: list[str] = []
        for i, kind in enumerate(args.datasets.split(",")):
            rows = make_rows(kind, args.rows + args.heldout, seed=1 + i)
            data[kind] = (write_jsonl(work / f"{kind}.jsonl", rows[:args.rows]), rows[args.rows:])
            corpus += [ALPACA_PROMPT_TEMPLATE.format(r["instruction"], r["input"], r["output"]) for r in rows[:args.rows]]
        model, params, vocab = build_model(work / "model", corpus, args.vocab, args.hidden, args.layers)
        print(f"model: random Llama, {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), "
              f"byte-level BPE vocabulary {vocab:,} trained on the data; dtype {args.dtype}; CPU")
        for kind, (path, _) in data.items():
            print(f"data {kind}: {describe_data(path, model, args.rows)}")
        print(f"settings: reference full fine-tune (batch {REFERENCE['batch_size']}, lr {REFERENCE['learning_rate']}, "
              f"seq {REFERENCE['seq_length']}, 1 epoch); ftcli train --method full {args.ftcli_args}".rstrip())
        if args.micro and "longtail" in data:
            print("\n".join(micro(model, data["longtail"][0], args.rows, args.dtype, args.micro)), flush=True)
        results: dict[str, dict[str, list[dict]]] = {kind: {"reference": [], "plain": [], "ftcli": []}
                                                      for kind in data}
        sides = ("reference", "plain", "ftcli") if args.plain else ("reference", "ftcli")
        extra = args.ftcli_args.split()
        # Repeat-major order: every repeat runs each data set's pair, so slow drifts in load hit both alike.
        for rep in range(args.repeats):
            for kind, (path, heldout) in data.items():
                for side in sides:
                    tag = f"{kind}-{rep}"
                    if side != "ftcli":
                        r = run_reference(model, path, args.rows, args.dtype, work, tag, f"_{side}")
                    else:
                        r = run_ftcli(model, path, args.rows, args.dtype, work, tag, extra)
                    r["heldout"] = heldout_loss(r["dir"], heldout, model)
                    results[kind][side].append(r)
                    print(f"  {kind} #{rep + 1} {side:9s}: {r['tps']:8,.0f} real tokens/s, {r['runtime']:6.1f} s "
                          f"training, {r['wall']:6.1f} s wall, {r['steps']} steps, held-out loss "
                          f"{r['heldout']:.4f}, train loss {r['train_loss']:.4f}, peak {mib(r['peak']):,.0f} MiB",
                          flush=True)
        load = os.getloadavg()
        print(f"\nmedians [min-max] of {args.repeats} runs each; load average at end {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}\n")
        print(table(results))


if __name__ == "__main__":
    main()
