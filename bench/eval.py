"""What held-out evaluation costs a LoRA run on the sample data, and what it reports.

    $ python bench/eval.py                         # 2 epochs, an eval at step 0 and at each epoch's end
    $ python bench/eval.py --eval-steps 10 --repeats 3

Writes `builtin:alpaca-sample` out as 360 training rows and 40 held-out rows (seeded), then runs
`ftcli train --method lora --model builtin:tiny-llama` through the real CLI, each run in its own
process: the same training with `--eval-dataset dev.jsonl` and without it (so both train on exactly
the same rows, in the same order), `--repeats` times each, in alternation. It prints the base and
final eval loss, the training time of each (the manifest's `train_s`, the best of the repeats), the
difference (what evaluation adds), the time spent inside the evaluations as the run measured it,
and the `--eval-split 0.1` run's figures on the built-in data directly. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = ["train", "--method", "lora", "--model", "builtin:tiny-llama", "--learning-rate", "1e-3"]


def write_split(folder: Path, held_out: int, seed: int) -> tuple[Path, Path]:
    from ftcli.data.sources import load_rows

    rows = [dict(r) for r in load_rows("builtin:alpaca-sample").dataset]
    random.Random(seed).shuffle(rows)
    train, dev = folder / "train.jsonl", folder / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[held_out:]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[:held_out]))
    return train, dev


def run(args: list[str], out: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ftcli", *COMMON, *args, "--output-dir", str(out), "--overwrite"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"ftcli failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads((out / "ftcli_run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", default="2")
    parser.add_argument("--eval-steps", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, dev = write_split(root, 40, seed=0)
        schedule = ["--eval-steps", opts.eval_steps] if opts.eval_steps else []
        with_eval = ["--dataset", str(train), "--num-epochs", opts.epochs, "--eval-dataset", str(dev), *schedule]
        without = ["--dataset", str(train), "--num-epochs", opts.epochs]
        run(["--dataset", str(train), "--max-steps", "1", "--eval-dataset", str(dev)], root / "warm", env)  # caches
        timed: dict[str, list[float]] = {"with": [], "without": []}
        manifest = None
        for _ in range(opts.repeats):
            manifest = run(with_eval, root / "with", env)
            timed["with"].append(manifest["timings"]["train_s"])
            timed["without"].append(run(without, root / "without", env)["timings"]["train_s"])
        split = run(["--dataset", "builtin:alpaca-sample", "--num-epochs", opts.epochs, "--eval-split", "0.1",
                     *schedule], root / "split", env)
    ev = manifest["eval"]
    best_with, best_without = min(timed["with"]), min(timed["without"])
    print(f"LoRA, builtin:tiny-llama, 360 training rows of builtin:alpaca-sample, {opts.epochs} epochs, "
          f"{manifest['metrics']['steps']} steps; eval set 40 rows ({ev['loss_tokens']} loss tokens), "
          f"{ev['evaluations']} evaluations (eval steps: {ev['eval_steps']})")
    print(f"eval loss: base {ev['base_loss']:.4f} -> final {ev['final_loss']:.4f} "
          f"(perplexity {ev['final_perplexity']:.2f})")
    print(f"train_s with eval {best_with:.2f} s, without {best_without:.2f} s (best of {opts.repeats}): "
          f"evaluation adds {best_with - best_without:+.2f} s ({(best_with / best_without - 1):+.1%}); "
          f"inside the evaluations: {ev['seconds']:.2f} s")
    sev = split["eval"]
    print(f"--eval-split 0.1 of builtin:alpaca-sample: {sev['examples']} rows held out, eval loss base "
          f"{sev['base_loss']:.4f} -> final {sev['final_loss']:.4f}, {sev['evaluations']} evaluations in "
          f"{sev['seconds']:.2f} s of {split['timings']['train_s']:.2f} s training")


if __name__ == "__main__":
    main()
