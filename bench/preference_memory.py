"""Peak memory and step time of full fine-tuning with DPO, KTO, ORPO and SimPO on the same pairs.

    $ python bench/preference_memory.py                 # a random Llama (hidden 512, 8 layers), 3 rounds
    $ python bench/preference_memory.py --hidden 256 --layers 4 --rounds 1 --steps 5

The model and the data are bench/dpo_memory.py's (a random Llama-architecture model with the built-in tiny model's
tokenizer; pairs from the built-in Alpaca sample, KTO reading the same pairs unpaired). With `--method full` DPO and
KTO hold a reference model, a frozen copy of the weights; ORPO and SimPO hold none. Each run is its own
`ftcli train` process; its figure is the process's peak RSS (the manifest's) minus a baseline (a process that
imports the same libraries and loads the same model, then stops), and its training time per step. Runs are
interleaved (baseline, SFT, DPO, KTO, ORPO, SimPO, baseline, ...) and medians reported. SFT on the chosen answers is
the floor: one sequence per example, no reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_memory import baseline, env, mib, write_data  # noqa: E402  (the same model, data and baseline)
from methods import build_model  # noqa: E402

OBJECTIVES = ("sft", "dpo", "kto", "orpo", "simpo")


def train(out: Path, model: Path, data: Path, args: argparse.Namespace, objective: str) -> dict:
    cmd = [sys.executable, "-m", "ftcli", "train", "--method", args.method, "--objective", objective, "--model",
           str(model), "--dataset", str(data), "--seq-length", str(args.seq_length), "--batch-size",
           str(args.batch_size), "--max-steps", str(args.steps), "--device", "cpu", "--dtype", "float32",
           "--output-dir", str(out), "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads((out / "ftcli_run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="full", help="full (DPO/KTO hold a frozen copy) or lora")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=160)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-pref-") as tmp:
        work = Path(tmp)
        import os

        os.environ.setdefault("FTCLI_HOME", str(work / "home"))
        model = build_model(work / "model", args.hidden, args.layers)
        data = write_data(work, args.pairs, 4)
        peaks: dict[str, list[int]] = {name: [] for name in ("baseline", *OBJECTIVES)}
        times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
        for _ in range(args.rounds):
            peaks["baseline"].append(baseline(model))
            for objective in OBJECTIVES:
                manifest = train(work / objective, model, data["sft" if objective == "sft" else "pairs"], args,
                                 objective)
                peaks[objective].append(manifest["metrics"]["peak_memory_bytes"])
                times[objective].append(manifest["metrics"]["train_runtime"] / manifest["metrics"]["steps"])
        base = statistics.median(peaks["baseline"])
        print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers; --method {args.method}; batch "
              f"{args.batch_size}, seq length {args.seq_length}, {args.steps} steps, CPU float32; medians of "
              f"{args.rounds} rounds")
        print(f"baseline (imports + model loaded): {mib(base)}")
        dpo = statistics.median(peaks["dpo"]) - base
        for objective in OBJECTIVES:
            peak = statistics.median(peaks[objective]) - base
            step = statistics.median(times[objective])
            print(f"{objective:>5}: peak RSS - baseline {mib(peak):>12}  (x{peak / max(dpo, 1):.2f} of DPO)  "
                  f"{step:.3f} s/step")


if __name__ == "__main__":
    main()
