"""--optim on CPU: step time and memory of each optimizer, as ratios against adamw_torch, measured interleaved.

    $ python bench/optim.py                       # 3 rounds of every optimizer, float32, a 23M-parameter Llama
    $ python bench/optim.py --dtype bfloat16 --rounds 5
    $ python bench/optim.py --quick               # a smoke run: 1 round, a small model, few steps

Each (optimizer, round) runs in its own process, in the order A B C ... A B C ..., so that a busy machine slows
every optimizer alike and each process's peak RSS (VmHWM) is its own. A process builds the same randomly
initialised Llama (seeded), builds the optimizer the way the trainer does (transformers'
`Trainer.get_optimizer_cls_and_kwargs`, weight decay on all but biases and norms, embeddings kept in 32-bit
state for bitsandbytes as the trainer registers them), then times:
- optimizer step: `optimizer.step()` alone, on fixed random gradients (median of --steps);
- train step: forward + backward + optimizer step on one fixed batch (median of --steps);
and records the optimizer state's bytes (every tensor in its state, bitsandbytes' nested quantization state
included) and the process's peak RSS. The table prints medians over rounds [min-max] and ratios against
adamw_torch. paged_* optimizers are left out on CPU (ftcli refuses them there: bitsandbytes runs them unpaged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adafactor", "sgd")


def state_bytes(optimizer) -> int:
    import torch

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    return sum(size(state) for state in optimizer.state.values())


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def build_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)
    return LlamaForCausalLM(config).to(getattr(torch, args.dtype)).train()


def build_optimizer(name: str, model, args: argparse.Namespace):
    """The optimizer as the trainer builds it for --optim NAME (its create_optimizer, without a Trainer)."""
    import torch
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir="/tmp/ftcli-bench-optim", optim=name, learning_rate=1e-4, weight_decay=0.01,
                              use_cpu=True, report_to="none")
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(targs, model)
    optimizer = cls(groups, **kwargs)
    if "8bit" in name:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def child(args: argparse.Namespace) -> None:
    """One optimizer, one round: print a JSON line of its figures."""
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args)
    optimizer = build_optimizer(args.child, model, args)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) * 1e-3 for p in model.parameters()]

    def optimizer_step() -> float:
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        start = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - start

    def train_step() -> float:
        start = time.perf_counter()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    optimizer_step()  # the first step allocates the state
    opt_times = [optimizer_step() for _ in range(args.steps)]
    train_step()
    train_times = [train_step() for _ in range(args.steps)]
    print(json.dumps({"optim": args.child, "optimizer_step_s": statistics.median(opt_times),
                      "train_step_s": statistics.median(train_times), "state_bytes": state_bytes(optimizer),
                      "peak_rss_bytes": peak_rss_bytes(),
                      "parameters": sum(p.numel() for p in model.parameters())}))


def fmt(values: list[float], scale: float, unit: str) -> str:
    med = statistics.median(values) / scale
    return f"{med:8.1f} {unit} [{min(values) / scale:.1f}-{max(values) / scale:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per process (median)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--quick", action="store_true", help="1 round, a small model, 3 steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.hidden, args.layers, args.vocab = 1, 3, 128, 2, 4000
    if args.child:
        child(args)
        return
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    passed = [f"--{k}={v}" for k, v in vars(args).items() if k in ("steps", "dtype", "hidden", "layers", "vocab",
                                                                   "seq", "batch", "threads")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names:  # interleaved: A B C ... then again
            proc = subprocess.run([sys.executable, __file__, "--child", name, *passed], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}")
                continue
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    base = results.get("adamw_torch") or []
    first = next((r for rs in results.values() for r in rs), None)
    if first is None:
        print("nothing ran")
        return
    print(f"CPU, {args.dtype}, Llama of {first['parameters'] / 1e6:.1f}M parameters, batch {args.batch}x{args.seq}, "
          f"{args.threads} threads; medians of {args.rounds} interleaved rounds [min-max]; x = ratio to adamw_torch")
    print(f"{'optim':18s} {'optimizer step':>26s} {'':>6s} {'train step':>26s} {'':>6s} {'state':>10s} {'':>6s} "
          f"{'peak RSS':>10s} {'':>6s}")

    def ratio(key: str, runs: list[dict]) -> str:
        if not base or not runs:
            return "   -  "
        return f"x{statistics.median(r[key] for r in runs) / statistics.median(b[key] for b in base):5.2f}"

    for name, runs in results.items():
        if not runs:
            continue
        print(f"{name:18s} {fmt([r['optimizer_step_s'] for r in runs], 1e-3, 'ms'):>26s} "
              f"{ratio('optimizer_step_s', runs)} {fmt([r['train_step_s'] for r in runs], 1e-3, 'ms'):>26s} "
              f"{ratio('train_step_s', runs)} {statistics.median(r['state_bytes'] for r in runs) / 2**20:7.1f} MiB "
              f"{ratio('state_bytes', runs)} {statistics.median(r['peak_rss_bytes'] for r in runs) / 2**20:7.0f} MiB "
              f"{ratio('peak_rss_bytes', runs)}")


if __name__ == "__main__":
    main()
