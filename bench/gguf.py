"""`ftcli export --format gguf`: time and peak memory against `--format hf` of the same adapter, and the
llama.cpp comparison figures per GGUF type.

    $ python bench/gguf.py                      # the built-in tiny model and a 134M-parameter random Llama
    $ python bench/gguf.py --models tiny --repeats 3

For each model a LoRA adapter with random non-zero B matrices (bench/export.py's builders) is exported
in a fresh process per export, interleaved (hf, gguf, hf, gguf, ...), and the medians are printed:
wall time, and extra peak RSS (peak during the command minus RSS after the imports, bench/export.py's
measurement), with the gguf/hf ratio of each. Then the tiny model is exported once per GGUF type
(f32, f16, bf16, q8_0) and the checks' figures are printed from each `ftcli_export.json`: the gguf
reader's largest relative value error per tensor type, and, when llama-cpp-python is installed,
llama.cpp's ids / logits / top-1 / greedy comparison with the merged model (else "llama.cpp was not run").
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import MEASURE, build_adapter, build_base  # noqa: E402  (bench/export.py)

MODELS = {"tiny": None, "134m": (768, 12, 32000)}  # None: the built-in tiny model itself
TYPES = ("f32", "f16", "bf16", "q8_0")


def prepare(work: Path, name: str) -> tuple[Path, int]:
    """(an adapter folder on the model, the model's parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcli.builtin import resolve_builtin_model

    adapter = work / f"adapter-{name}"
    if MODELS[name] is None:
        base = resolve_builtin_model("builtin:tiny-llama")
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
                     .parameters())
    else:
        hidden, layers, vocab = MODELS[name]
        base = work / f"base-{name}"
        params = build_base(base, hidden, layers, vocab, "float32")
    build_adapter(base, adapter, rank=16)
    return adapter, params


def export_once(adapter: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, "-c", MEASURE, "export", str(adapter), "--output", str(out), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEASURE ")]
    measured = json.loads(lines[-1].removeprefix("MEASURE ")) if lines else {"code": proc.returncode}
    if proc.returncode != 0 or measured.get("code") != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"export {' '.join(flags)} failed: {' | '.join(tail)}")
    record = json.loads((out / "ftcli_export.json").read_text())
    return {"wall_s": wall, "extra_peak": measured["peak"] - measured["baseline"], "record": record,
            "stdout": proc.stdout}


def timing(work: Path, name: str, adapter: Path, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"hf": [], "gguf": []}
    for i in range(repeats):
        for fmt in ("hf", "gguf"):  # interleaved: the machine's load changes under both alike
            out = work / f"out-{name}-{fmt}-{i}"
            flags = ["--format", "gguf", "--gguf-type", "f16"] if fmt == "gguf" else []
            runs[fmt].append(export_once(adapter, out, *flags))
            print(f"{name} {fmt} #{i + 1}: {runs[fmt][-1]['wall_s']:.1f}s, extra peak "
                  f"{mib(runs[fmt][-1]['extra_peak'])}", flush=True)
    return runs


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def type_figures(work: Path, adapter: Path) -> list[tuple[str, dict]]:
    rows = []
    for kind in TYPES:
        try:
            result = export_once(adapter, work / f"out-types-{kind}", "--format", "gguf", "--gguf-type", kind)
        except SystemExit as exc:  # a failed check (or a llama.cpp crash) is a figure too
            rows.append((kind, {"error": str(exc)}))
            continue
        rows.append((kind, result["record"]["gguf"]))
    return rows


def print_types(rows: list[tuple[str, dict]]) -> None:
    print("\nGGUF checks per type (tiny model; llama.cpp vs the merged transformers model on the fixed prompts)")
    print(f"{'type':<5} {'size':>9} {'reader: largest relative value error':<38} llama.cpp")
    for kind, gguf in rows:
        if "error" in gguf:
            print(f"{kind:<5} {gguf['error']}")
            continue
        errors = ", ".join(f"{k} {v:.2g}" for k, v in sorted(gguf["reader_check"]["max_relative_value_error"].items()))
        llama = gguf["llama_cpp_check"]
        if isinstance(llama, dict):
            said = (f"ids identical {llama['ids_identical']}, logits {llama['max_relative_logit_difference']:.2e} "
                    f"(tolerance {llama['tolerance']['logits']}), top-1 {llama['min_top1_agreement']:.1%}, "
                    f"greedy identical {llama['greedy_identical']}, passed {llama['passed']}")
        else:
            said = "llama.cpp was not run (llama-cpp-python not installed)"
        print(f"{kind:<5} {gguf['bytes'] / 2**20:>7.2f}Mi {errors:<38} {said}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-types", action="store_true", help="skip the per-type figures")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    summary = []
    type_rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="ftcli-bench-gguf-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            adapter, params = prepare(work, name)
            print(f"{name}: {params / 1e6:.1f}M parameters, LoRA r=16 (random B)", flush=True)
            runs = timing(work, name, adapter, args.repeats)
            med = {fmt: (statistics.median(r["wall_s"] for r in rs), statistics.median(r["extra_peak"] for r in rs))
                   for fmt, rs in runs.items()}
            summary.append((name, params, med, runs["gguf"][-1]["record"]["gguf"]))
            if name == "tiny" and not args.no_types:
                type_rows = type_figures(work, adapter)
    print(f"\n{'model':<6} {'params':>8} {'hf wall':>8} {'gguf wall':>9} {'ratio':>6} {'hf peak':>9} "
          f"{'gguf peak':>10} {'ratio':>6} {'conversion':>10} {'reader':>7} {'llama.cpp':>9}  (medians of {args.repeats}, f16, fresh process each)")
    for name, params, med, gguf in summary:
        (hw, hp), (gw, gp) = med["hf"], med["gguf"]
        print(f"{name:<6} {params / 1e6:>7.1f}M {hw:>7.1f}s {gw:>8.1f}s {gw / hw:>6.2f} {mib(hp):>9} {mib(gp):>10} "
              f"{gp / max(hp, 1):>6.2f} {gguf['conversion_seconds']:>9.1f}s {gguf['reader_check']['seconds']:>6.1f}s "
              + (f"{gguf['llama_cpp_check']['seconds']:>8.1f}s" if isinstance(gguf["llama_cpp_check"], dict)
                 else f"{'not run':>9}"))
    print("peak = peak RSS during the export - RSS after importing torch/transformers/peft/ftcli (bench/export.py)")
    if type_rows:
        print_types(type_rows)


if __name__ == "__main__":
    main()
