"""Cold vs warm compile: what `ftcli warmup`'s persistent cache saves a later run.

    $ python bench/compile.py                          # tiny model, full fine-tuning, batch 8, seq 256
    $ python bench/compile.py --method lora --seq-length 512 --dataset-size 128

Runs `ftcli warmup` twice with the same options, each in its own process and with the same fresh
FTCLI_HOME: the first compiles from an empty cache (cold), the second starts from the cache the
first one left (warm: Inductor's cache folder and PyTorch's portable compile artefacts). Prints
both compile times (the first steps minus steady-state steps), both process wall times and the
ratios cold/warm. Then it runs `ftcli train --compile` once more against the warm cache and prints
its wall time and how many graphs it had to compile that the warmup had not (0 when the cache
covers the run). CPU timings are noisy on a busy machine: run it on an idle one, and look at ratios.
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

REPORT = """
import json, sys
from ftcli.cli.common import run_config_from_flags
from ftcli.training.warmup import run_warmup
flags = json.loads(sys.argv[1])
report = run_warmup(run_config_from_flags(flags))
print("REPORT " + json.dumps({k: report[k] for k in ("cache", "compile_s", "step_s", "shapes",
                                                      "real_tokens_per_second", "peak_memory_bytes")}))
"""


def compiled_graphs(home: Path) -> set[Path]:
    """The FX graph and AOTAutograd cache entries under every compile cache of `home`."""
    return {p for p in (home / "compile").rglob("*")
            if p.is_file() and ("fxgraph" in p.parts or "aotautograd" in p.parts)}


def run_warmup(flags: dict, env: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", REPORT, json.dumps(flags)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"warmup failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT ")), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--dataset", default="builtin:alpaca-sample")
    parser.add_argument("--dataset-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args()

    flags = {"method": args.method, "model": args.model, "dataset": args.dataset, "dataset_size": args.dataset_size,
             "batch_size": args.batch_size, "seq_length": args.seq_length}
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-compile-") as home:
        env = {**os.environ, "FTCLI_HOME": home, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        # Build the tiny model first so that neither timed process pays for it.
        subprocess.run([sys.executable, "-c", "from ftcli.builtin import resolve_builtin_model as r; "
                        "r('builtin:tiny-llama')"], env=env, check=True)
        cold, cold_wall = run_warmup(flags, env)
        warm, warm_wall = run_warmup(flags, env)
        before = compiled_graphs(Path(home))
        start = time.perf_counter()
        train = subprocess.run([sys.executable, "-m", "ftcli", "train", "--compile", "--max-steps", "2",
                                *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()],
                                "--output-dir", str(Path(home) / "run")], capture_output=True, text=True, env=env)
        train_wall = time.perf_counter() - start
        if train.returncode != 0:
            sys.exit(f"train failed:\n{train.stdout}\n{train.stderr}")
        hit = "compile cache: warm" in train.stdout
        new_graphs = len(compiled_graphs(Path(home)) - before)

    print(f"ftcli warmup, {args.method}, {args.model}, batch {args.batch_size}, seq {args.seq_length}, "
          f"shapes {', '.join('x'.join(map(str, s)) for s in cold['shapes'])}")
    print(f"{'':22}{'cold':>10}{'warm':>10}{'cold/warm':>11}")
    print(f"{'compile time (s)':22}{cold['compile_s']:>10.2f}{warm['compile_s']:>10.2f}"
          f"{cold['compile_s'] / max(warm['compile_s'], 1e-3):>10.1f}x")
    print(f"{'process wall time (s)':22}{cold_wall:>10.2f}{warm_wall:>10.2f}{cold_wall / warm_wall:>10.1f}x")
    print(f"{'steady step (ms)':22}{cold['step_s'] * 1000:>10.1f}{warm['step_s'] * 1000:>10.1f}")
    print(f"caches: first run {cold['cache']}, second run {warm['cache']}")
    print(f"train --compile --max-steps 2 on the warm cache: {train_wall:.1f} s wall, cache found: {hit}, "
          f"graphs compiled anew: {new_graphs}")


if __name__ == "__main__":
    main()
