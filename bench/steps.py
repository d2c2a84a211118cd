"""ftcli's training step against a plain `transformers.Trainer` on identical batches, in one process.

    $ python bench/steps.py                  # 5 alternating rounds of 12 steps, LoRA r=8, about 3 minutes
    $ python bench/steps.py --rounds 7 --steps 20 --method full

Both trainers start from copies of the same model (the LoRA plan ftcli builds), read the same
tokenized data in the same random order (the same seed, the same sampler) and get their batches from
the same collator object (ftcli's: pad to a multiple of 8), so each step of one is the step of the
other. The ftcli side is the real run's trainer (`build_trainer` with the run guard, display,
TensorBoard callback and metrics file); the plain side is `transformers.Trainer` with the same
arguments (batch, learning rate, optimizer kernel, logging every step), as LLaMA-Factory and axolotl
use it. Rounds alternate (plain, ftcli, plain, ftcli, ...); each prints the trainer's own seconds per
step, and the last line the median per-step ratio ftcli / plain (target <= 1.05).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf  # noqa: E402  (bench/perf.py: the long-tailed data, the tokenizer and the random Llama)


def build(work: Path, rows: int) -> tuple[Path, Path]:
    data = perf.make_rows("longtail", rows, seed=1)
    path = perf.write_jsonl(work / "longtail.jsonl", data)
    corpus = [perf.ALPACA_PROMPT_TEMPLATE.format(r["instruction"], r["input"], r["output"]) for r in data]
    model, _, _ = perf.build_model(work / "model", corpus, 4096, 160, 4)
    return model, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side (default 5)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per round (default 12)")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-loss", action="store_true", help="also time ftcli's trainer with TRL's own loss "
                        "(its fused LM head and per-step metrics, as before bench/steps.py found them): the before figure")
    parser.add_argument("--group-by-length", action="store_true", help="both sides in ftcli's grouped order "
                        "(default: random order, the comparison the target is for)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from ftcli.console import console

    from ftcli.config import build_run_config
    from ftcli.training.guard import StopRequest, run_guard_class
    from ftcli.training import trainer as trainer_module
    from ftcli.training.setup import set_up
    from ftcli.training.trainer import build_trainer

    print("command: python bench/steps.py " + " ".join(sys.argv[1:]))
    print(f"machine: {perf.machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="ftcli-steps-") as tmp:
        work = Path(tmp)
        os.environ["FTCLI_HOME"] = str(work / "home")  # prepared data goes here, not into the user's cache
        model_dir, data = build(work, args.rows)
        config = build_run_config({"method": args.method, "model": str(model_dir), "dataset": str(data),
                                   "seq_length": 1024, "batch_size": 4, "dtype": "float32",
                                   "group_by_length": args.group_by_length, "max_steps": args.steps,
                                   "output_dir": str(work / "ftcli"), "lora_rank": 8})
        ready = set_up(config, "bench")
        plain_model = copy.deepcopy(ready.plan.model)  # before TRL patches the model's forward
        trl_model = copy.deepcopy(ready.plan.model) if args.trl_loss else None

        def ftcli_side(name: str, plan) -> Any:
            out = work / name
            out.mkdir()
            guard = run_guard_class()(out, {}, StopRequest(), save_total_limit=None, epoch_saves=False, display=None)
            return build_trainer(config, plan, ready.tokenizer, ready.dataset, out, out / "logs", ready.device,
                                 guard)[0]

        ftcli_trainer = ftcli_side("ftcli", ready.plan)
        sides = {}
        if args.trl_loss:
            import dataclasses

            lean = trainer_module.lean_loss_class
            trainer_module.lean_loss_class = lambda base: base
            try:
                sides["ftcli-trl"] = ftcli_side("ftcli-trl", dataclasses.replace(ready.plan, model=trl_model))
            finally:
                trainer_module.lean_loss_class = lean
        fa = ftcli_trainer.args
        plain_args = TrainingArguments(
            output_dir=str(work / "plain"), per_device_train_batch_size=fa.per_device_train_batch_size,
            max_steps=args.steps, learning_rate=fa.learning_rate, optim=fa.optim, seed=fa.seed,
            logging_steps=fa.logging_steps, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=ready.device == "cpu", train_sampling_strategy=fa.train_sampling_strategy,
            remove_unused_columns=True)
        # The plain trainer reads the same dataset through the same collator (and, grouped, the same sampler).
        plain_class = Trainer
        if args.group_by_length:
            from ftcli.training import batching

            class PlainGrouped(Trainer):
                def _get_train_sampler(self, train_dataset=None):
                    return batching.EffectiveBatchLengthSampler(batching.example_lengths(self.train_dataset),
                                                                fa.per_device_train_batch_size, fa.seed)
            plain_class = PlainGrouped
        plain = plain_class(model=plain_model, args=plain_args, train_dataset=ready.dataset,
                            data_collator=ftcli_trainer.data_collator)
        plain.remove_callback(PrinterCallback)
        console.quiet = True  # the ftcli display's lines; the figures below are printed directly
        sides = {"plain": plain, "ftcli": ftcli_trainer, **sides}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds + 1):
            for name, trainer in sides.items():
                start = time.perf_counter()
                trainer.train()
                per_step = (time.perf_counter() - start) / args.steps
                if r:  # round 0 warms both up (first-call allocations, thread pools)
                    times[name].append(per_step)
                    print(f"  round {r} {name:9s}: {per_step * 1000:7.1f} ms/step "
                          f"(loss {trainer.state.log_history[-1].get('train_loss', float('nan')):.4f})", flush=True)
        print("median ms/step: " + ", ".join(f"{n} {statistics.median(t) * 1000:.1f}" for n, t in times.items()))
        order = "grouped" if args.group_by_length else "random"
        for name in [n for n in times if n != "plain"]:
            ratios = [f / p for p, f in zip(times["plain"], times[name])]
            print(f"{name} / plain Trainer per-step time: median {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}] over {len(ratios)} interleaved rounds ({args.method}, "
                  f"{order} order)")


if __name__ == "__main__":
    main()
