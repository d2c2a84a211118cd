"""Bench: `ftcli inspect`'s memory estimate against the measured peak of the training it estimates.

    python bench/scale_estimate.py --size 150m        # LoRA and full fine-tuning, batch 4 x 512 tokens
    python bench/scale_estimate.py --size 1b          # batch 2 x 256 tokens; full only where memory allows

For each method: `ftcli inspect MODEL --json --batch-size B --seq-length T` (the dtype auto resolves to here: float32
on a CPU) gives the estimate; `ftcli train --method M --max-steps 2` at that batch and length, in its own measured
process (scale_common.measure: its peak RSS), gives the peak. Every example is longer than T (truncated), so each
batch is B x T tokens as the estimate assumes, and the data is prepared before the measured runs (preparing would
otherwise add its own memory to the first run's peak). ratio = estimate / measured peak; the estimate's target is
0.75-1.5x. Runs of 150m and 1b take several GiB: run them under `flock /tmp/ftcli-big.lock`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_common as sc  # noqa: E402

# (batch size, sequence length) per size: long enough that activations count, short enough for a CPU.
SHAPES = {"tiny": (2, 256), "150m": (4, 512), "1b": (2, 256)}
BASELINE = "ftcli train --max-steps {}: the process's peak RSS"


def long_rows(path: Path, rows: int = 64) -> Path:
    """Alpaca rows whose answers run past any bench length (700 words), so every example fills --seq-length."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"instruction": f"Task {i}: " + " ".join(rng.choice(sc.WORDS) for _ in range(8)),
                                "input": "", "output": " ".join(rng.choice(sc.WORDS) for _ in range(700))}) + "\n")
    return path


def estimate(model: Path, batch: int, seq: int) -> dict:
    """{method: its estimate} from `ftcli inspect --json`, and the dtype it is for."""
    out = subprocess.run(sc.ftcli("inspect", str(model), "--json", "--batch-size", str(batch), "--seq-length",
                                  str(seq)), capture_output=True, text=True, env=sc.env(), cwd=str(sc.ROOT))
    if out.returncode:
        raise SystemExit(f"ftcli inspect failed: {out.stderr.strip()}")
    memory = json.loads(out.stdout)["memory"]
    return {"dtype": memory["dtype"], **{e["method"]: e for e in memory["methods"]}}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rows(size: str, work: Path, quick: bool = False) -> list[dict]:
    folder = Path(f"/tmp/scale/m{size}") if size in ("150m", "1b") else work / f"m{size}"
    model = sc.build_model(folder, size)
    batch, seq = SHAPES[size]
    data = long_rows(work / "long.jsonl", 16 if quick else 64)
    steps = "1" if quick else "2"
    common = ["--model", str(model), "--dataset", str(data), "--batch-size", str(batch), "--seq-length", str(seq)]
    if not quick:  # quick: the first run prepares the data (a tiny share of a tiny model's peak)
        prepared = sc.measure(sc.ftcli("prepare", *common), log=work / "prepare.log")
        if prepared["rc"]:
            raise SystemExit(f"ftcli prepare failed: see {work / 'prepare.log'}")
    est = estimate(model, batch, seq)
    out = []
    for method in ("lora", "full"):
        what = f"memory estimate, {method} ({batch} x {seq} tokens, {est['dtype']})"
        total = est[method]["total_bytes"]
        if total > available_bytes() - (2 << 30):
            out.append({"what": what, "ftcli": f"estimate {sc.gib(total)}",
                        "plain": f"not run: {sc.gib(available_bytes())} available", "ratio": None,
                        "baseline": BASELINE.format(steps)})
            continue
        log = work / f"train-{method}.log"
        run = sc.measure(sc.ftcli("train", "--method", method, *common, "--max-steps", steps, "--report-to", "none",
                                  "--output-dir", str(work / f"run-{method}")), log=log)
        if run["rc"]:
            raise SystemExit(f"ftcli train --method {method} failed (exit {run['rc']}): see {log}")
        out.append({"what": what, "ftcli": f"estimate {sc.gib(total)}",
                    "plain": f"measured {sc.gib(run['peak_bytes'])} ({run['seconds']:.0f} s)",
                    "ratio": round(total / run["peak_bytes"], 2), "baseline": BASELINE.format(steps)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="150m", choices=sorted(SHAPES))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="scale-estimate-"))
    work.mkdir(parents=True, exist_ok=True)
    print(sc.loadavg(), flush=True)
    for row in rows(args.size, work, args.quick):
        print(f"{row['what']}: {row['ftcli']} vs {row['plain']}  ratio {row['ratio']}  [{row['baseline']}]")
    print(sc.loadavg())


if __name__ == "__main__":
    main()
