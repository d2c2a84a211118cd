"""Prepare and cache hits at scale: `ftcli prepare` of Alpaca JSONL files of 20k, 200k and 1M rows against
`datasets.load_dataset("json") + .map(tokenize, batched=True, num_proc=2)` producing the same tokens, and a
second `ftcli prepare` on unchanged data (a cache hit) against the import floor (a process that imports only
torch + transformers + datasets). Each side runs in its own child process (wall seconds, its own peak RSS),
interleaved. The 1M-row pair runs under /tmp/ftcli-big.lock (one large job at a time on a shared machine).

    $ python bench/scale_prepare.py --size 150m                 # 20k, 200k and 1M rows
    $ python bench/scale_prepare.py --size 150m --rows 200k     # one size
    $ python bench/scale_prepare.py --size tiny --quick         # a smoke run (2,000 rows)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_common as sc  # noqa: E402

ROW_COUNTS = {"2k": 2_000, "20k": 20_000, "200k": 200_000, "1m": 1_000_000}
BIG = 500_000  # from this many rows a run takes the shared machine's big-job lock
SEQ_LENGTH = 1024

# The plain-library side: the Alpaca template, prompt and response tokenized apart, BOS in front, EOS after the
# response, prompt labels -100, cut at SEQ_LENGTH: the tokens ftcli prepares for the same rows.
PLAIN = r'''
import json, sys
import datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
model, data, cache, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n### Instruction: {}\n\n### Input: {}\n\n"
            "### Response: ")
def tokenize(batch):
    prompts = [TEMPLATE.format(i or "", x or "") for i, x in zip(batch["instruction"], batch["input"])]
    p = tok(prompts, add_special_tokens=True)["input_ids"]
    r = tok(batch["output"], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for a, b in zip(p, r):
        x = a + b + [tok.eos_token_id]
        ids.append(x[:seq])
        labels.append(([-100] * len(a) + b + [tok.eos_token_id])[:seq])
    return {"input_ids": ids, "labels": labels, "length": [len(x) for x in ids]}
ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
out = ds.map(tokenize, batched=True, num_proc=2, remove_columns=ds.column_names)
print(json.dumps({"rows": len(out), "tokens": sum(out["length"])}))
'''
FLOOR = "import torch, transformers, datasets"
FLOOR_TOKENIZER = FLOOR + "; import sys; transformers.AutoTokenizer.from_pretrained(sys.argv[1])"


@contextlib.contextmanager
def big_lock(rows: int) -> Iterator[None]:
    """The shared machine's lock for jobs that may use several GiB (held by this process, not timed)."""
    if rows < BIG:
        yield
        return
    with open("/tmp/ftcli-big.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def _anon_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss_Anon:"):  # shared pages of forked workers counted once
                    total += int(line.split()[1]) * 1024
    return total


def measure(cmd: list[str], log: Path | None = None, **extra_env: str) -> dict:
    """`scale_common.measure`'s figures (wall seconds, the child's own peak RSS, which counts the pages of the
    memory-mapped Arrow files it has read), plus `peak_anon_bytes`: the most anonymous memory (heap: what cannot
    be given back to the page cache) the child and its worker processes held together, sampled every 50 ms."""
    import os
    import subprocess
    import threading
    import time

    out = log.open("w") if log else subprocess.DEVNULL
    peak, done = [0], threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=sc.env(**extra_env), cwd=str(sc.ROOT))

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon_bytes(_tree(proc.pid)))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        done.set()
        sampler.join()
        if log:
            out.close()
    return {"seconds": time.perf_counter() - start, "peak_bytes": usage.ru_maxrss * 1024,
            "peak_anon_bytes": peak[0], "rc": os.waitstatus_to_exitcode(status)}


def data_file(label: str, work: Path) -> Path:
    """The Alpaca file of `label` rows: the shared one under /tmp/scale when built, else one written in `work`."""
    n = ROW_COUNTS[label]
    shared = Path(f"/tmp/scale/alpaca-{label}.jsonl")
    done = shared.with_suffix(".jsonl.done")
    if shared.exists() and done.exists() and done.read_text() == str(n):
        return shared
    return sc.write_alpaca(work / f"alpaca-{label}.jsonl", n)


def model_folder(size: str, work: Path) -> Path:
    folder = Path(f"/tmp/scale/m{size}") if size in ("150m", "1b") else work / f"m{size}"
    return sc.build_model(folder, size)


def _fmt(m: dict) -> str:
    return f"{m['seconds']:.1f} s, {sc.gib(m['peak_bytes'])}" if m["rc"] == 0 else f"failed (rc {m['rc']})"


def measure_rows(model: Path, label: str, work: Path, quick: bool = False) -> list[dict]:
    """The rows of one file: prepare (cache miss) vs datasets.map, their peak RSS and heap, the cache hit vs the
    import floor (and, unless `quick`, vs the floor plus loading the tokenizer)."""
    data = data_file(label, work)
    home, logs = work / f"home-{label}", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args = sc.ftcli("prepare", "--model", str(model), "--dataset", str(data), "--seq-length", str(SEQ_LENGTH))
    with big_lock(ROW_COUNTS[label]):
        plain = measure(sc.python(PLAIN) + [str(model), str(data), str(work / f"hf-{label}"), str(SEQ_LENGTH)],
                       logs / f"plain-{label}.log")
        miss = measure(args, logs / f"miss-{label}.log", FTCLI_HOME=str(home))
        floor = sc.measure(sc.python(FLOOR))
        hit = sc.measure(args, logs / f"hit-{label}.log", FTCLI_HOME=str(home))
        floor_tok = None if quick else sc.measure(sc.python(FLOOR_TOKENIZER) + [str(model)])
    shutil.rmtree(work / f"hf-{label}", ignore_errors=True)
    same = _same_tokens(logs / f"plain-{label}.log", home)
    rows = [
        {"what": f"prepare {label} rows (cache miss)", "ftcli": _fmt(miss), "plain": _fmt(plain),
         "ratio": round(miss["seconds"] / plain["seconds"], 2), "baseline": "load_dataset('json') + "
         f"map(tokenize, batched, num_proc=2){'' if same else ' (TOKENS DIFFER)'}"},
        {"what": f"prepare {label} rows, peak RSS", "ftcli": sc.gib(miss["peak_bytes"]),
         "plain": sc.gib(plain["peak_bytes"]), "ratio": round(miss["peak_bytes"] / plain["peak_bytes"], 2),
         "baseline": "the same datasets.map run (RSS counts memory-mapped Arrow pages read)"},
        {"what": f"prepare {label} rows, peak heap", "ftcli": sc.gib(miss["peak_anon_bytes"]),
         "plain": sc.gib(plain["peak_anon_bytes"]),
         "ratio": round(miss["peak_anon_bytes"] / max(plain["peak_anon_bytes"], 1), 2),
         "baseline": "the same run: anonymous memory of the process and its workers together (sampled)"},
        {"what": f"prepare {label} rows again (cache hit)", "ftcli": _fmt(hit), "plain": _fmt(floor),
         "ratio": round(hit["seconds"] / floor["seconds"], 2),
         "baseline": f"import floor (torch + transformers + datasets); hit - floor = "
                     f"{hit['seconds'] - floor['seconds']:+.1f} s"},
    ]
    if floor_tok is not None:
        rows.append({"what": f"prepare {label} rows again (cache hit)", "ftcli": _fmt(hit),
                     "plain": _fmt(floor_tok), "ratio": round(hit["seconds"] / floor_tok["seconds"], 2),
                     "baseline": "import floor + AutoTokenizer.from_pretrained (what every start loads); "
                                 f"hit - that = {hit['seconds'] - floor_tok['seconds']:+.1f} s"})
    shutil.rmtree(home, ignore_errors=True)
    return rows


def _same_tokens(plain_log: Path, home: Path) -> bool:
    """Whether both sides made as many examples and tokens (the tokens themselves are checked by the tests)."""
    try:
        plain = json.loads(plain_log.read_text().strip().splitlines()[-1])
        manifest = json.loads(next((home / "datasets").glob("*/ftcli_prepared.json")).read_text())
    except (OSError, ValueError, StopIteration, IndexError):
        return False
    stats = manifest["stats"]
    return plain["rows"] == stats["rows_kept"] and plain["tokens"] == stats["tokens"]


def rows(size: str, work: Path, quick: bool = False, labels: list[str] | None = None) -> list[dict]:
    model = model_folder(size, work)
    out = []
    for label in labels or (["2k"] if quick else ["20k", "200k", "1m"]):
        out.extend(measure_rows(model, label, work, quick))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="150m", choices=sorted(sc.SIZES))
    parser.add_argument("--rows", nargs="*", choices=sorted(ROW_COUNTS), help="row counts (default 20k 200k 1m)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftcli-scale-prepare-") as tmp:
        print(sc.loadavg(), flush=True)
        for label in args.rows or (["2k"] if args.quick else ["20k", "200k", "1m"]):  # printed as measured
            for row in rows(args.size, Path(tmp), quick=args.quick, labels=[label]):
                print(f"{row['what']:<38} ftcli {row['ftcli']:<20} plain {row['plain']:<20} ratio {row['ratio']}"
                      f"  ({row['baseline']})", flush=True)
            print(sc.loadavg(), flush=True)


if __name__ == "__main__":
    main()
