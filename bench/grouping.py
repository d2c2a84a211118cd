"""Length grouping's quality and speed over seeds: held-out loss of grouped vs random order, and the time kept.

    $ python bench/grouping.py                    # 4 seeds x 3 orders, LoRA r=8, about 10 minutes on 2 CPU cores
    $ python bench/grouping.py --seeds 1,2,3,4,5,6 --orders random,grouped
    $ python bench/grouping.py --method full --dtype bfloat16 --batch-size 8 --learning-rate 5e-5 --rows 400 \
          --orders random,grouped     # closer to bench/perf.py's set-up

Data: bench/perf.py's long-tailed Alpaca rows (500 to train on, 100 held out) and random Llama (2.5M
parameters); LoRA r=8, seq 1024, batch 4, fp32, one epoch by default (--method, --dtype, --batch-size,
--learning-rate change them), every run through ftcli's own `run_training` in this process. Orders:
- random: `--no-group-by-length`;
- grouped: `--group-by-length` (the default for lora, qlora and fsdp; full fine-tuning trains in random
  order unless asked), length-grouped steps whose summed token loss is divided by the epoch's mean
  loss tokens per step (ftcli.training.batching.loss_tokens_per_step);
- grouped-step-mean: the same order with each step's loss its own mean token loss (ftcli before this
  bench: every step weighs the same, so the tokens of short-example steps weigh most);
- variants of grouped: `grouped+megaN` (megabatches of N steps instead of 64), `+nofirst` (the steps in
  plain shuffled order, not the longest first), `+stepmean` (as grouped-step-mean), combined freely,
  e.g. `--orders random,grouped,grouped+mega8+nofirst`.
Held-out loss: `ftcli eval` on the 100 held-out rows, one example at a time (ftcli.evaluation.loss:
token-weighted response loss). Per seed the orders run one after the other (interleaved), and the
table prints each order's losses, the mean difference from random order with its per-seed spread,
and the trainer's runtime with its speed against random order (median over seeds of random s / order s);
with all three default orders also grouping's speed gain kept = (random - grouped) / (random - step-mean).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf  # noqa: E402  (bench/perf.py: the long-tailed data, the tokenizer and the random Llama)

ORDERS = ("random", "grouped", "grouped-step-mean")


def knobs(order: str) -> dict[str, object]:
    """ftcli.training.batching's settings for an order: `grouped`, `grouped-step-mean`, or `grouped` with
    `+megaN` (megabatches of N steps), `+nofirst` (no longest step first), `+stepmean`
    (each step's own mean)."""
    if order == "random":
        return {}
    parts = ["grouped", "stepmean"] if order == "grouped-step-mean" else order.split("+")
    if parts[0] != "grouped":
        raise SystemExit(f"unknown order {order!r}: random, grouped, grouped-step-mean or grouped+megaN+nofirst+stepmean")
    out: dict[str, object] = {}
    for part in parts[1:]:
        if part.startswith("mega") and part[4:].isdigit():
            out["MEGABATCH_STEPS"] = int(part[4:])
        elif part == "nofirst":
            out["LONGEST_FIRST"] = False
        elif part == "stepmean":
            out["TOKEN_WEIGHTED_GROUPING"] = False
        else:
            raise SystemExit(f"unknown part {part!r} of order {order!r}")
    return out


def run_one(work: Path, model: Path, data: Path, heldout: Path, seed: int, order: str,
            args: argparse.Namespace) -> dict[str, float]:
    from ftcli.config import build_run_config
    from ftcli.evaluation.run import EvalOptions, run_eval
    from ftcli.training import batching
    from ftcli.training.run import run_training

    out = work / f"{order}-{seed}"
    config = build_run_config({"method": args.method, "model": str(model), "dataset": str(data), "seq_length": 1024,
                               "batch_size": args.batch_size, "dtype": args.dtype, "seed": seed,
                               **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
                               "group_by_length": order != "random", "output_dir": str(out),
                               "logging_steps": 10})
    settings = knobs(order)
    saved = {name: getattr(batching, name) for name in settings}
    for name, value in settings.items():
        setattr(batching, name, value)
    try:
        manifest = run_training(config).manifest
    finally:
        for name, value in saved.items():
            setattr(batching, name, value)
    report = run_eval(EvalOptions(target=str(out), dataset=str(heldout), batch_size=1))
    return {"loss": report["loss"], "runtime": manifest["metrics"]["train_runtime"],
            "train_loss": manifest["metrics"]["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the method's own")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    orders = args.orders.split(",")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from ftcli.console import console

    print("command: python bench/grouping.py " + " ".join(sys.argv[1:]))
    print(f"machine: {perf.machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="ftcli-grouping-") as tmp:
        work = Path(tmp)
        os.environ["FTCLI_HOME"] = str(work / "home")
        rows = perf.make_rows("longtail", args.rows + 100, seed=1)
        data = perf.write_jsonl(work / "train.jsonl", rows[:args.rows])
        heldout = perf.write_jsonl(work / "heldout.jsonl", rows[args.rows:])
        corpus = [perf.ALPACA_PROMPT_TEMPLATE.format(r["instruction"], r["input"], r["output"]) for r in rows]
        model, _, _ = perf.build_model(work / "model", corpus, 4096, 160, 4)
        for order in orders:
            knobs(order)  # an unknown order fails before any run
        results: dict[str, list[dict[str, float]]] = {o: [] for o in orders}
        for seed in seeds:
            for order in orders:
                console.quiet = True
                r = run_one(work, model, data, heldout, seed, order, args)
                console.quiet = False
                results[order].append(r)
                print(f"  seed {seed} {order:24s}: held-out loss {r['loss']:.5f}, train loss {r['train_loss']:.4f}, "
                      f"trainer {r['runtime']:6.1f} s", flush=True)
        print(report(results, seeds))


def report(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    lines = ["| order | held-out loss per seed | mean - random [min, max over seeds] | trainer s (median) | speed vs random |",
             "|---|---|---|---|---|"]
    base = results.get("random")
    for order, runs in results.items():
        losses = " ".join(f"{r['loss']:.4f}" for r in runs)
        if base and order != "random":
            diffs = [r["loss"] - b["loss"] for r, b in zip(runs, base)]
            diff = f"{statistics.mean(diffs):+.4f} [{min(diffs):+.4f}, {max(diffs):+.4f}]"
        else:
            diff = "-"
        speed = (f"{statistics.median(b['runtime'] / r['runtime'] for r, b in zip(runs, base)):.2f}x"
                 if base else "-")
        lines.append(f"| {order} | {losses} | {diff} | {statistics.median(r['runtime'] for r in runs):.1f} | {speed} |")
    if base and len(seeds) > 1:
        # Seed noise: how much random order's own loss moves between seeds.
        lines.append(f"seed noise (random order, stdev over {len(seeds)} seeds): "
                     f"{statistics.stdev(r['loss'] for r in base):.4f}")
    if {"random", "grouped", "grouped-step-mean"} <= results.keys():
        rnd, new, old = (statistics.median(r["runtime"] for r in results[o])
                         for o in ("random", "grouped", "grouped-step-mean"))
        if rnd > old:
            lines.append(f"speed gain kept: {(rnd - new) / (rnd - old):.0%} (random {rnd:.1f} s, grouped {new:.1f} s, "
                         f"grouped step-mean {old:.1f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
