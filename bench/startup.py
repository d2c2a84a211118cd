"""Where a short run's seconds go outside training: before the first step and after the last, before vs after.

    $ python bench/startup.py --before /path/to/other/checkout       # vs this checkout, 3 alternating pairs
    $ python bench/startup.py --before /path/to/other/checkout --repeats 5 --max-steps 5

The run is the README's sample LoRA run: `ftcli train --method lora --model builtin:tiny-llama --dataset
builtin:alpaca-sample` with the quick-start settings (`--num-epochs 5 --learning-rate 1e-3`), cut to
--max-steps steps (training time is not what this measures). Each side is a checkout of ftcli put first
on PYTHONPATH; the runs alternate (before, after, before, after, ...), each in its own process, after one
unmeasured run that builds the tiny model and the prepared data in a shared cache (as a user's second run).

Per run, from the process's wall time and the run manifest's timings (ftcli/training/run.py):
- cli: interpreter start, importing the CLI, options and config, the run-folder lock, and the process's exit;
- load: tokenizer, data, model and the method's plan (`timings.load_s`), imports made on the way included;
- trainer: from the model to the first step (trainer construction, train-time set-up): train_s - train_runtime;
- save: final weights, tokenizer, probe (`timings.save_s`);
- outside training = wall - train_runtime, the figure the issue asks to cut by 40%;
- cpu: the process's user + system CPU seconds (training included): on a loaded machine far steadier than wall.
- floor: a process that only imports what a LoRA run cannot do without (torch, transformers' Llama model,
  peft; bitsandbytes held off as the run holds it off), measured beside each pair: the part of `outside` no
  change inside ftcli can remove.
Then one run per side under `python -X importtime` lists the heaviest top-level imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
SAMPLE = ["train", "--method", "lora", "--model", "builtin:tiny-llama", "--dataset", "builtin:alpaca-sample",
          "--num-epochs", "5", "--learning-rate", "1e-3"]
PHASES = ("cli", "load", "trainer", "train", "save", "outside")
FLOOR = ("import sys; sys.modules['bitsandbytes'] = None\n"
         "import torch, transformers.modeling_utils, transformers.models.llama.modeling_llama, peft")


def floor(checkout: Path) -> float:
    """Wall seconds of a process importing only what a LoRA run needs (see the module docstring)."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def run(checkout: Path, work: Path, tag: str, max_steps: int, importtime: bool = False) -> dict[str, float] | str:
    out = work / tag
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "FTCLI_HOME": str(work / "home")}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "ftcli", *SAMPLE,
           "--max-steps", str(max_steps), "--output-dir", str(out), "--overwrite"]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if importtime:
        return proc.stderr
    manifest = json.loads((out / "ftcli_run.json").read_text())
    t, runtime = manifest["timings"], manifest["metrics"]["train_runtime"]
    return {"cli": wall - t["total_s"], "load": t["load_s"], "trainer": t["train_s"] - runtime, "train": runtime,
            "save": t["save_s"], "outside": wall - runtime, "wall": wall, "cpu": cpu}


def top_imports(stderr: str, n: int = 8) -> list[tuple[str, float]]:
    """The heaviest top-level imports (cumulative seconds) of a `-X importtime` log."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if cumulative.strip().isdigit() and not name.startswith("  ") and name.strip():
            out.append((name.strip(), int(cumulative) / 1e6))
    return sorted(out, key=lambda x: -x[1])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--after", type=Path, default=HERE, help="this checkout (default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=2)
    args = parser.parse_args()
    print("command: python bench/startup.py " + " ".join(sys.argv[1:]))
    print(f"before: {args.before}  after: {args.after}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="ftcli-startup-") as tmp:
        work = Path(tmp)
        run(args.after, work, "warm", args.max_steps)  # builds the tiny model and the prepared data once
        results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        floors = []
        for rep in range(args.repeats):
            floors.append(floor(args.after))
            for side in ("before", "after"):
                r = run(getattr(args, side), work, f"{side}-{rep}", args.max_steps)
                results[side].append(r)
                print(f"  #{rep + 1} {side:6s}: " + ", ".join(f"{k} {r[k]:.2f}" for k in (*PHASES, "wall", "cpu")),
                      flush=True)
        print("\n| phase (median s) | before | after | after / before |\n|---|---|---|---|")
        for key in (*PHASES, "wall", "cpu"):
            b, a = (statistics.median(r[key] for r in results[s]) for s in ("before", "after"))
            print(f"| {key} | {b:.2f} | {a:.2f} | {a / b if b else float('nan'):.2f} |")
        for key in ("outside", "cpu"):
            pairs = [a[key] / b[key] for b, a in zip(results["before"], results["after"])]
            print(f"{key}, after / before: median {statistics.median(pairs):.2f} "
                  f"[{min(pairs):.2f}-{max(pairs):.2f}] over {len(pairs)} pairs")
        shares = [f / r["outside"] for f, r in zip(floors, results["after"])]
        print(f"import floor: median {statistics.median(floors):.2f} s, {statistics.median(shares):.0%} of after's "
              f"outside [{min(shares):.0%}-{max(shares):.0%}]")
        for side in ("before", "after"):
            imports = top_imports(run(getattr(args, side), work, f"{side}-imports", args.max_steps, importtime=True))
            print(f"heaviest top-level imports, {side} (cumulative s, under -X importtime): "
                  + ", ".join(f"{name} {s:.2f}" for name, s in imports))


if __name__ == "__main__":
    main()
