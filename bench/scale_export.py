"""`ftcli export` at real sizes against the plain libraries, side by side (a section of bench/scale.py).

    $ python bench/scale_export.py --size 1b                 # LoRA merge + verify + save vs peft's bare merge + save
    $ python bench/scale_export.py --size 150m --reps 3 --gguf
    $ python bench/scale_export.py --size 1b --run runs/lora-1b   # an existing LoRA run of that base instead
    $ python bench/scale_export.py --size 1b --before /path/to/other/checkout   # its export measured alongside

The base is scale_common's random Llama of that size (float32). The adapter is a LoRA of rank 8 on the seven
projections with random, non-zero B matrices (bench/export.py's `build_adapter`), saved as a bare adapter folder
(what `ftcli export` accepts besides a run folder), so the merge changes every targeted weight. Each side runs in
a child process of its own, measured by `scale_common.measure` (wall seconds including the imports, and the
child's peak RSS), the two sides interleaved `--reps` times; the figures are the best of the repetitions for each
side (the machine is shared: the best is the least disturbed) and the ratio is ftcli / plain.

- export: `ftcli export ADAPTER --output DIR` (merge, verification by logits, safetensors, model card, fsync,
  atomic rename) vs `PeftModel.from_pretrained(base) -> merge_and_unload() -> save_pretrained(DIR)`.
- `--gguf`: `ftcli export ADAPTER --format gguf` (the same merge and verification, then llama.cpp's converter and
  the read-back check) vs the plain merge + save followed by llama.cpp's `convert_hf_to_gguf.py` on the merged
  folder (the converter ftcli uses, from ftcli's cache), f16 both. The bench tokenizer's pre-tokenizer is not in
  llama.cpp's table, so the plain converter is given the name ftcli maps it to (`--gguf-pre` below).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_common  # noqa: E402

PLAIN_EXPORT = r"""
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

# `python -m ftcli ARGS` with the ftcli of another checkout (argv[1]).
RUN_CHECKOUT = r"""
import runpy, sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["ftcli", *sys.argv[2:]]
runpy.run_module("ftcli", run_name="__main__", alter_sys=True)
"""

# The converter as its script runs, with the pre-tokenizer name given (the bench tokenizer's hash is unknown to it).
PLAIN_CONVERT = r"""
import sys
tree, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion
conversion.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[3:]]
import runpy
runpy.run_path(tree + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def base_folder(size: str, work: Path) -> Path:
    """scale_common's model of `size` (built once, reused); the smoke size lives in `work`."""
    folder = work / f"m{size}" if size == "tiny" else Path(f"/tmp/scale/m{size}")
    return scale_common.build_model(folder, size)


def make_adapter(base: Path, work: Path) -> Path:
    """A bare LoRA adapter folder of `base` (rank 8, non-zero B), built in a child process (it loads the base)."""
    folder = work / "adapter"
    if not (folder / "adapter_config.json").exists():
        code = (f"import sys; sys.path.insert(0, {str(scale_common.BENCH)!r}); from export import build_adapter; "
                f"build_adapter(__import__('pathlib').Path({str(base)!r}), __import__('pathlib').Path({str(folder)!r}), 8)")
        result = scale_common.measure(scale_common.python(code), log=work / "adapter.log")
        if result["rc"] != 0:
            raise SystemExit(f"building the adapter failed: see {work / 'adapter.log'}")
    return folder


def _figure(result: dict) -> str:
    return f"{result['seconds']:.1f} s, {scale_common.gib(result['peak_bytes'])}"


def _best(results: list[dict]) -> dict:
    return min(results, key=lambda r: r["seconds"])


def _check(result: dict, log: Path) -> dict:
    if result["rc"] != 0:
        raise SystemExit(f"a measured command failed (exit {result['rc']}): see {log}")
    return result


def measure_export(base: Path, source: Path, work: Path, reps: int, before: Path | None = None) -> list[dict]:
    """The export row: ftcli export vs peft's bare merge + save, interleaved `reps` times; with `before` (another
    checkout of ftcli), a second row for that checkout's export, measured in the same rounds."""
    sides: dict[str, list[dict]] = {"plain": [], "ftcli": [], "before": []}
    commands = {"plain": scale_common.python(PLAIN_EXPORT) + [str(base), str(source)],
                "ftcli": scale_common.ftcli("export", str(source), "--output")}
    if before is not None:  # `python -m ftcli` would import this checkout's ftcli (the working folder comes first)
        commands["before"] = scale_common.python(RUN_CHECKOUT) + [str(before), "export", str(source), "--output"]
    for rep in range(reps):
        order = list(commands) if rep % 2 == 0 else list(commands)[::-1]  # no side always runs first
        for side in order:
            out, log = work / f"{side}-{rep}", work / f"{side}-{rep}.log"
            sides[side].append(_check(scale_common.measure(commands[side] + [str(out)], log=log), log))
            shutil.rmtree(out, ignore_errors=True)
    p = _best(sides["plain"])
    rows = []
    for side in ("ftcli", "before"):
        if not sides[side]:
            continue
        f = _best(sides[side])
        rows.append({"what": "export (LoRA merge + verify + save)" + (f" [{before}]" if side == "before" else ""),
                     "ftcli": _figure(f), "plain": _figure(p), "ratio": round(f["seconds"] / p["seconds"], 2),
                     "baseline": "peft merge_and_unload + save_pretrained",
                     "runs": {"ftcli": [round(r["seconds"], 1) for r in sides[side]],
                              "plain": [round(r["seconds"], 1) for r in sides["plain"]]}})
    return rows


def measure_gguf(base: Path, source: Path, work: Path, reps: int) -> dict:
    """One row: ftcli export --format gguf vs peft's merge + save, then llama.cpp's converter on the merged folder."""
    from ftcli.export.gguf.convert import converter_source

    tree = converter_source()[0]
    ftcli_runs, plain_runs = [], []
    for rep in range(reps):
        merged, gguf = work / f"plain-merged-{rep}", work / f"plain-{rep}.gguf"
        log = work / f"plain-gguf-{rep}.log"
        merge = _check(scale_common.measure(scale_common.python(PLAIN_EXPORT) + [str(base), str(source), str(merged)],
                                            log=log), log)
        shutil.copy(base / "tokenizer.json", merged / "tokenizer.json")  # what the converter reads besides weights
        shutil.copy(base / "tokenizer_config.json", merged / "tokenizer_config.json")
        convert = _check(scale_common.measure(scale_common.python(PLAIN_CONVERT) + [
            str(tree), "gpt-2", str(merged), "--outfile", str(gguf), "--outtype", "f16"], log=log.with_suffix(".convert.log")),
            log.with_suffix(".convert.log"))
        plain_runs.append({"seconds": merge["seconds"] + convert["seconds"],
                           "peak_bytes": max(merge["peak_bytes"], convert["peak_bytes"]), "convert": convert["seconds"]})
        shutil.rmtree(merged, ignore_errors=True)
        gguf.unlink(missing_ok=True)
        out = work / f"ftcli-gguf-{rep}"
        log = work / f"ftcli-gguf-{rep}.log"
        ftcli_runs.append(_check(scale_common.measure(scale_common.ftcli(
            "export", str(source), "--output", str(out), "--format", "gguf", "--gguf-type", "f16"), log=log), log))
        shutil.rmtree(out, ignore_errors=True)
    f, p = _best(ftcli_runs), _best(plain_runs)
    return {"what": "export --format gguf (f16)", "ftcli": _figure(f), "plain": _figure(p) + f" ({p['convert']:.1f} s "
            "converting)", "ratio": round(f["seconds"] / p["seconds"], 2),
            "baseline": "peft merge + save, then llama.cpp convert_hf_to_gguf.py",
            "runs": {"ftcli": [round(r["seconds"], 1) for r in ftcli_runs],
                     "plain": [round(r["seconds"], 1) for r in plain_runs]}}


def rows(size: str, work: Path, quick: bool = False, reps: int | None = None, gguf: bool = False,
         run: Path | None = None, before: Path | None = None) -> list[dict]:
    """The export rows of bench/scale.py's table for `size` ("tiny", "150m", "1b"); `work` is an empty scratch
    folder. `quick`: one repetition (the smoke test on "tiny")."""
    work.mkdir(parents=True, exist_ok=True)
    base = base_folder(size, work)
    source = run if run is not None else make_adapter(base, work)
    reps = reps or (1 if quick else 2)
    out = measure_export(base, source, work, reps, before)
    if gguf:
        out.append(measure_gguf(base, source, work, reps))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="150m", choices=sorted(scale_common.SIZES))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 2, 1 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gguf", action="store_true", help="also the --format gguf row")
    parser.add_argument("--run", type=Path, default=None, help="export this LoRA run (of the --size base) instead")
    parser.add_argument("--before", type=Path, default=None,
                        help="another ftcli checkout whose export is measured in the same rounds (a second row)")
    args = parser.parse_args()
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="scale-export-"))
    print(scale_common.loadavg() + " (before)", flush=True)
    for row in rows(args.size, work, quick=args.quick, reps=args.reps, gguf=args.gguf, run=args.run,
                    before=args.before):
        print(json.dumps(row), flush=True)
    print(scale_common.loadavg() + " (after)", flush=True)


if __name__ == "__main__":
    main()
