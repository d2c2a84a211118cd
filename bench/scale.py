"""ftcli's cost at real sizes, side by side with the plain libraries, in one table.

    $ python bench/scale.py --size 150m                 # about 10 minutes on 2 CPU cores
    $ python bench/scale.py --size 1b --parts export,train,estimate
    $ python bench/scale.py --size tiny --quick          # a smoke run of every part (a few minutes)
    $ python bench/scale.py --parts prepare --prepare-rows 200k,1m

Builds (once, under /tmp/scale, reused) a random Llama of the size (bench/scale_common.py: 0.15B or
0.98B parameters, vocabulary 4096, float32) and Alpaca files of 20k, 200k and 1M rows; nothing is
downloaded. Each part measures ftcli and its plain-library equivalent in child processes of the same
run (wall seconds and each child's own peak RSS) and gives table rows:

- train (bench/scale_train.py): model load, training step and checkpoint save against a plain
  transformers + peft Trainer script;
- export (bench/scale_export.py): the verified LoRA merge and save against peft's bare
  merge_and_unload + save_pretrained, and GGUF against llama.cpp's converter run by hand;
- prepare (bench/scale_prepare.py): tokenising 200k rows against datasets.map(num_proc=2), memory
  from 200k to 1M rows, and a cache hit against the import floor;
- estimate (bench/scale_estimate.py): the memory estimate against the measured peak.

ratio = ftcli / plain (for the estimate: estimate / measured peak). The load average is printed
with the table: compare figures only within one run.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_common  # noqa: E402

PARTS = ("train", "export", "prepare", "estimate")


def table(rows: list[dict], width: int = 0) -> str:
    """The rows as a plain-text table (no Rich: it is pasted into docs as it is printed)."""
    head = ("", "ftcli", "plain", "ratio", "baseline")
    lines = [(r["what"], str(r.get("ftcli", "")), str(r.get("plain", "")),
              "" if r.get("ratio") is None else f"{r['ratio']:.2f}x", str(r.get("baseline", ""))) for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(5)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="150m", choices=sorted(scale_common.SIZES))
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--quick", action="store_true", help="a fast smoke version of every part")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--prepare-rows", default="20k,200k",
                        help="the prepare part's data sizes, of 20k, 200k, 1m (1m: about 15 minutes here)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    model = scale_common.build_model(Path(f"/tmp/scale/m{args.size}"), args.size)
    print(f"model: random Llama '{args.size}', {scale_common.parameters(model) / 1e9:.3f}B parameters, "
          f"float32 ({model})")
    print(f"machine: {platform.processor() or platform.machine()}, {scale_common.cpus()} CPU cores; "
          f"{scale_common.loadavg()} at the start")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for part in parts:
            start = time.perf_counter()
            module = importlib.import_module(f"scale_{part}")
            work = Path(tmp) / part
            work.mkdir()
            extra = {"labels": args.prepare_rows.split(",")} if part == "prepare" and not args.quick else {}
            got = module.rows(args.size, work, quick=args.quick, **extra)
            rows.extend(got)
            print(f"[{part}: {len(got)} rows in {time.perf_counter() - start:.0f} s]", flush=True)
    print()
    print(table(rows))
    print(f"\n{scale_common.loadavg()} at the end")


if __name__ == "__main__":
    main()
