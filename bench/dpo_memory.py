"""Peak memory of LoRA DPO vs LoRA SFT on the same data, and the held-out reward margin of a DPO run.

    $ python bench/dpo_memory.py                       # a random Llama (hidden 512, 8 layers), 3 rounds
    $ python bench/dpo_memory.py --hidden 256 --layers 4 --rounds 1 --steps 10

Builds a randomly initialised Llama-architecture model (the built-in tiny model's tokenizer; see
bench/methods.py) and a preference sample from the built-in Alpaca sample: each pair's prompt is a row's
instruction, its chosen answer that row's response, its rejected answer the response of a row from a small
pool that never appears as a prompt; held-out pairs have prompts the training never sees. SFT trains on the
same prompts with the chosen answers (prompt/completion). Each run is its own `ftcli train` process; its
figure is the process's peak RSS (the manifest's) minus a baseline: the peak RSS of a process that imports
the same libraries and loads the same model, then stops. Runs are interleaved (baseline, SFT, DPO, baseline,
SFT, DPO, ...) and medians reported. Then one DPO run evaluates on the held-out pairs: TRL's implicit reward
margin (beta times the policy-minus-reference log-probability margin, chosen minus rejected, summed over the
answer tokens) and accuracy (the share of pairs whose margin is positive), before and after training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import build_model  # noqa: E402  (the same random Llama as bench/methods.py)

BASELINE = """
import sys
import datasets, peft, transformers, trl  # what a training process imports
from ftcli.models import load_model
from ftcli.system import peak_memory
load_model(sys.argv[1], dtype="float32", device="cpu")
print(peak_memory("cpu")[1])  # the process's own peak (VmHWM), as the runs' manifests record it
"""


def write_data(folder: Path, train: int, held: int, pool: int = 4) -> dict[str, Path]:
    from ftcli.builtin.alpaca_sample import alpaca_sample_rows

    rows = [r for r in alpaca_sample_rows() if len(r["output"]) < 200]
    rejected, train_rows, held_rows = rows[:pool], rows[pool:pool + train], rows[pool + train:pool + train + held]

    def pair(i: int, r: dict) -> dict:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") + "\n"
        return {"prompt": prompt, "chosen": r["output"], "rejected": rejected[i % pool]["output"]}

    def write(name: str, items: list[dict]) -> Path:
        path = folder / name
        path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
        return path

    pairs = [pair(i, r) for i, r in enumerate(train_rows)]
    return {"pairs": write("pairs.jsonl", pairs),
            "held": write("held.jsonl", [pair(i, r) for i, r in enumerate(held_rows)]),
            "sft": write("sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])}


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def baseline(model: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", BASELINE, str(model)], capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed: {proc.stderr.strip().splitlines()[-1:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def train(out: Path, model: Path, data: Path, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "ftcli", "train", "--method", "lora", "--model", str(model), "--dataset", str(data),
           "--seq-length", str(args.seq_length), "--batch-size", str(args.batch_size), "--device", "cpu",
           "--dtype", "float32", "--output-dir", str(out), "--overwrite", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return json.loads((out / "ftcli_run.json").read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--held", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-dpo-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FTCLI_HOME", str(work / "home"))
        model = build_model(work / "model", args.hidden, args.layers)
        data = write_data(work, args.pairs, args.held)
        steps = ["--max-steps", str(args.steps)]
        figures: dict[str, list[int]] = {"baseline": [], "sft": [], "dpo": []}
        for _ in range(args.rounds):
            figures["baseline"].append(baseline(model))
            figures["sft"].append(train(work / "sft", model, data["sft"], args, *steps)["metrics"]["peak_memory_bytes"])
            figures["dpo"].append(train(work / "dpo", model, data["pairs"], args, "--objective", "dpo",
                                        *steps)["metrics"]["peak_memory_bytes"])
        base = statistics.median(figures["baseline"])
        sft = statistics.median(figures["sft"]) - base
        dpo = statistics.median(figures["dpo"]) - base
        print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers; LoRA r=8; batch {args.batch_size}, "
              f"seq length {args.seq_length}, {args.steps} steps, CPU float32; medians of {args.rounds} rounds")
        print(f"baseline (imports + model loaded): {mib(base)}")
        print(f"LoRA SFT peak RSS - baseline: {mib(sft)}")
        print(f"LoRA DPO peak RSS - baseline: {mib(dpo)}  (x{dpo / max(sft, 1):.2f} of SFT; "
              "reference = the adapter disabled, no copy)")
        manifest = train(work / "dpo-eval", model, data["pairs"], args, "--objective", "dpo", "--eval-dataset",
                         str(data["held"]), "--num-epochs", str(args.epochs), "--learning-rate", "5e-4")
        evaluation = manifest["eval"]
        records = [r for r in manifest["log_history"] if "eval_rewards/margins" in r]
        first, last = records[0], records[-1]
        print(f"held-out pairs: {evaluation['examples']} ({args.epochs:g} epochs on {args.pairs} pairs, "
              f"{manifest['metrics']['steps']} steps, beta 0.1)")
        for name, r in (("before training (step 0)", first), (f"after step {last['step']}", last)):
            print(f"  {name}: eval loss {r['eval_loss']:.4f}, reward margin {r['eval_rewards/margins']:.4f}, "
                  f"accuracy {r['eval_rewards/accuracies']:.1%}, chosen {r['eval_rewards/chosen']:.4f}, "
                  f"rejected {r['eval_rewards/rejected']:.4f}")


if __name__ == "__main__":
    main()
