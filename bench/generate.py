"""Generation speed of `ftcli generate` against transformers' own `generate`, same model, same process.

    $ python bench/generate.py                       # a 40M-parameter random Llama, 128 new tokens
    $ python bench/generate.py --hidden 256 --layers 4 --new 64

Builds a randomly-initialised Llama-architecture model (the built-in tiny model's tokenizer, a
wider and deeper config) in a temporary folder, loads it the way `ftcli generate` does, and times
greedy decoding of the same rendered prompt three ways: ftcli's generation path (its stops,
streaming off), plain `model.generate` with the KV cache, and plain `model.generate` without it.
Prints tokens/s (median of --repeats) and the ratios. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import build_model  # noqa: E402  (the same random model as the method benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new", type=int, default=128, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from ftcli.inference.generate import Decoding, complete
    from ftcli.inference.prompts import prompt_example, render
    from ftcli.inference.target import TargetOptions, load_target
    from ftcli.training.setup import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "model", args.hidden, args.layers)
        target = load_target(str(folder), TargetOptions(device="cpu"))
        ids = render(target, prompt_example(target, "Write a long story about a river, a stone and a cloud."))
        params = sum(p.numel() for p in target.model.parameters())
        decoding = Decoding(max_new_tokens=args.new)

        def ftcli_path() -> int:
            done = complete(target, ids, decoding)
            return done.new_tokens

        def plain(use_cache: bool) -> int:
            inputs = torch.tensor([ids])
            with torch.no_grad():
                out = target.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                            max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                            use_cache=use_cache, pad_token_id=target.tokenizer.eos_token_id)
            return out.shape[1] - len(ids)

        results = {}
        for name, fn in (("ftcli generate path", ftcli_path), ("transformers generate, KV cache", lambda: plain(True)),
                         ("transformers generate, no KV cache", lambda: plain(False))):
            fn()  # warm-up
            rates = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                tokens = fn()
                rates.append(tokens / (time.perf_counter() - start))
            results[name] = (statistics.median(rates), tokens)
    print(f"model: {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), prompt "
          f"{len(ids)} tokens, greedy, CPU, {torch.get_num_threads()} threads")
    reference = results["transformers generate, KV cache"][0]
    # ftcli stops at EOS / end of turn; a random model rarely picks them, and the "new tokens" column shows it.
    print(f"{'':38} {'tokens/s':>10} {'new tokens':>11} {'vs transformers':>16}")
    for name, (rate, tokens) in results.items():
        print(f"{name:38} {rate:10.1f} {tokens:11d} {rate / reference:15.2f}x")


if __name__ == "__main__":
    main()
