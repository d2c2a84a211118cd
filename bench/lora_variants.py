"""What the LoRA variants cost on this machine: adapter set-up time and training-step time, against plain LoRA.

    $ python bench/lora_variants.py                  # a Llama-shaped random model, hidden 256, 2 layers
    $ python bench/lora_variants.py --hidden 1024 --layers 4 --rounds 7

The variants are built the way `ftcli train` builds them (ftcli.methods.variants.lora_config_args on a
RunConfig); each round times one set-up and a few forward+backward+AdamW steps of every variant in
turn (A B C ..., then B C ... A, ...), so a load change on the machine hits them all alike. Prints medians and
the ratio to plain LoRA measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"lora_init": "pissa"},
    "olora": {"lora_init": "olora"},
}


def build_model(hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(torch.float32)


def one_round(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(set-up seconds, median step seconds) of one variant."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ftcli.config import build_run_config
    from ftcli.methods import variants
    from ftcli.methods.base import LLAMA_PROJECTIONS

    config = build_run_config({"method": "lora", "model": "builtin:tiny-llama", **VARIANTS[name]})
    model = build_model(args.hidden, args.layers, seed=0)
    start = time.perf_counter()
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                  target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM",
                                                  **variants.lora_config_args(config)))
    setup = time.perf_counter() - start
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 2048, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(args.steps + 2):  # the first two steps warm up allocations and are not counted
        start = time.perf_counter()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return setup, statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    setups: dict[str, list[float]] = {n: [] for n in VARIANTS}
    steps: dict[str, list[float]] = {n: [] for n in VARIANTS}
    names = list(VARIANTS)
    for round_ in range(args.rounds):
        # Each round starts at another variant, so none is always first (right after the previous round's).
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            setup, step = one_round(name, args)
            setups[name].append(setup)
            steps[name].append(step)
    base_setup, base_step = statistics.median(setups["plain"]), statistics.median(steps["plain"])
    print(f"hidden {args.hidden}, {args.layers} layers, r={args.rank}, batch {args.batch}x{args.seq}, "
          f"{args.rounds} interleaved rounds of {args.steps} steps; medians, ratio to plain LoRA")
    print(f"{'variant':<8} {'set-up s':>9} {'x plain':>8} {'step s':>8} {'x plain':>8}")
    for name in VARIANTS:
        setup, step = statistics.median(setups[name]), statistics.median(steps[name])
        print(f"{name:<8} {setup:9.3f} {setup / base_setup:8.2f} {step:8.3f} {step / base_step:8.2f}")


if __name__ == "__main__":
    main()
