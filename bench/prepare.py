"""Benchmark the data layer: tokenization throughput with 1 and N processes, and a `train` start that
hits the prepared-data cache against one that does not.

    $ python bench/prepare.py                 # 50,000 generated Alpaca rows, the built-in tiny tokenizer
    $ python bench/prepare.py --rows 5000 --repeats 1   # a quick look
    $ python bench/prepare.py --rows 200000 --procs 1 2 4

Everything is generated locally and runs offline; a private FTCLI_HOME is used and removed. The
figures are wall-clock seconds on this machine, so compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("apple river stone cloud green seven table music light winter garden paper silver window yellow "
         "mountain quiet number letter simple answer question morning evening planet ocean forest").split()


def generate_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca rows with a realistic spread of lengths (short answers, a long tail)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        out_len = rng.choice([3, 5, 8, 12, 20, 40]) if rng.random() < 0.9 else rng.randint(80, 300)
        rows.append({"instruction": f"Task {i}: {words(rng.randint(4, 16))}.",
                     "input": words(rng.randint(0, 20)) if rng.random() < 0.4 else "",
                     "output": words(out_len)})
    return rows


def bench_tokenize(data: Path, rows: int, procs: list[int], repeats: int) -> list[dict]:
    from ftcli.config import build_run_config
    from ftcli.data.prepare import prepare_dataset
    from ftcli.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-llama")
    config = build_run_config({"model": "builtin:tiny-llama", "dataset": str(data), "dataset_size": rows,
                               "seq_length": 2048})
    results = []
    # 1 process with the Rust tokenizer's own threads off: what the processes have to beat on their own.
    variants = [(1, "false")] + [(n, None) for n in procs]
    for n, tok_threads in variants:
        best = None
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        if tok_threads is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = tok_threads
        else:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        for _ in range(repeats):
            out = Path(tempfile.mkdtemp(prefix="ftcli-bench-out-"))
            shutil.rmtree(out)
            start = time.perf_counter()
            prepared = prepare_dataset(config, tokenizer, output=out, num_proc=n)
            seconds = time.perf_counter() - start
            tokens = prepared.manifest["stats"]["tokens"]
            shutil.rmtree(out, ignore_errors=True)
            if best is None or seconds < best["seconds"]:
                best = {"num_proc": n, "seconds": round(seconds, 3), "tokens": tokens,
                        "label": f"num_proc={n}" + (", tokenizer threads off" if tok_threads else ""),
                        "tokens_per_second": round(tokens / seconds), "rows_per_second": round(rows / seconds)}
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
        results.append(best)
    return results


def bench_train_start(data: Path, rows: int) -> dict:
    """`ftcli train ... --max-steps 1` twice on a fresh cache: the first prepares, the second reuses."""
    runs = {}
    for name in ("miss", "hit"):
        out = Path(tempfile.mkdtemp(prefix="ftcli-bench-run-"))
        cmd = [sys.executable, "-m", "ftcli", "train", "--method", "full", "--model", "builtin:tiny-llama",
               "--dataset", str(data), "--dataset-size", str(rows), "--max-steps", "1", "--output-dir", str(out),
               "--overwrite"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"train failed ({name}):\n{proc.stdout}\n{proc.stderr}")
        manifest = json.loads((out / "ftcli_run.json").read_text())
        runs[name] = {"wall_s": round(wall, 2), "load_s": manifest["timings"]["load_s"],
                      "reused": manifest["data"]["reused"]}
        shutil.rmtree(out, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ftcli-bench-home-"))
    os.environ["FTCLI_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        data = home / "bench.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in generate_rows(args.rows)), encoding="utf-8")
        from ftcli.builtin import resolve_builtin_model

        resolve_builtin_model("builtin:tiny-llama")  # built once, outside the timings
        print(f"data: {args.rows:,} generated Alpaca rows ({data.stat().st_size / 1e6:.1f} MB), tokenizer "
              f"builtin:tiny-llama, {os.cpu_count()} CPUs visible")
        print("\ntokenization (ftcli prepare: read, format, tokenize, mask, stats, save; best of "
              f"{args.repeats})")
        results = bench_tokenize(data, args.rows, args.procs, args.repeats)
        base = results[1]["tokens_per_second"]
        for r in results:
            print(f"  {r['label']:<36} {r['seconds']:7.2f} s  {r['tokens_per_second']:>10,} tokens/s  "
                  f"{r['rows_per_second']:>8,} rows/s  x{r['tokens_per_second'] / base:.2f}")
        print("\nftcli train --max-steps 1 (process start to exit; load_s = config to model ready)")
        runs = bench_train_start(data, args.rows)
        for name, r in runs.items():
            print(f"  cache {name:4}: wall {r['wall_s']:6.2f} s  load {r['load_s']:6.2f} s  reused={r['reused']}")
        print(f"  load speed-up from the cache: x{runs['miss']['load_s'] / max(runs['hit']['load_s'], 1e-9):.1f}, "
              f"{runs['miss']['wall_s'] - runs['hit']['wall_s']:.1f} s saved per start")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
