"""Checking a written GGUF: read back with gguf's reader always, and run in llama.cpp when it is installed.

    >>> from ftcli.export.gguf.check import read_back, reference_outputs, compare_in_llama_cpp
    >>> ref = reference_outputs(model, prompt)                 # the merged model's logits + greedy tokens
    >>> figures = read_back(gguf_file, hf_folder, prompt, info)  # tensors, shapes, values, metadata
    >>> figures = compare_in_llama_cpp(gguf_file, prompt, ref, "f16")

The reader check maps each tensor of the merged model to its GGUF name with gguf's own
TensorNameMap, and compares the dequantised GGUF values with the merged weights. The converter
may reorder rows (llama.cpp's Q/K layout), so values are compared as sorted lists: a reordering
leaves them equal, and sorting never widens the largest elementwise error. The llama.cpp check
compares the prompts' ids, the logits and a greedy continuation with the merged model's own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ftcli.errors import RunFailed

GREEDY_TOKENS = 8
# Largest |dequantised - merged| over max |merged| per GGUF tensor type (elementwise rounding bounds, with room).
VALUE_TOLERANCE = {"F32": 1e-6, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}
# llama.cpp's logits against the merged model's (relative to the largest logit, at least 1): float32 only reorders
# sums; float16 rounds each weight to 11 bits. bfloat16 keeps 8 bits, so a float32 model written as bf16 moves its
# logits by about 1% from the rounding alone (1.1% on the tiny model): bf16 gets the bound ftcli's own bfloat16
# export check uses (ftcli.export.merge.RELATIVE_TOLERANCE), 5e-2.
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 5e-2}
TOP1_AGREEMENT = {"q8_0": 0.95}
GREEDY_IDENTICAL = ("f32", "f16")


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def reference_outputs(model: Any, prompt: Any) -> list[dict[str, Any]]:
    """The merged model's float32 logits on each probe, and its greedy continuation (no early stop)."""
    import torch

    out = []
    with torch.inference_mode():
        for probe in prompt.probes:
            ids = torch.tensor([probe.ids], dtype=torch.long, device=model.device)
            logits = model(input_ids=ids).logits[0].float().cpu().numpy()
            tokens = []
            for _ in range(GREEDY_TOKENS):
                nxt = int(model(input_ids=ids).logits[0, -1].float().argmax())
                tokens.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
            out.append({"logits": logits, "greedy": tokens})
    return out


def read_back(path: Path, hf_folder: Path, prompt: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Every merged tensor present with its shape and values, and the prompt format in the metadata."""
    from ftcli.export.gguf.convert import load_converter

    gguf, _ = load_converter()
    reader = gguf.GGUFReader(str(path))
    meta = _metadata(reader, gguf)
    problems = _metadata_problems(meta, prompt, info)
    tensors = {t.name: t for t in reader.tensors}
    config = _read_json(hf_folder / "config.json")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == info["gguf_architecture"])
    names = gguf.get_tensor_name_map(arch, int(config.get("num_hidden_layers", 0)))
    worst: dict[str, float] = {}
    matched = set()
    for name, weight in _merged_weights(hf_folder):
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        tensor = tensors.get(gname) if gname else None
        if tensor is None:
            problems.append(f"the merged tensor {name} is not in the GGUF" + (f" (as {gname})" if gname else ""))
            continue
        matched.add(gname)
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if tuple(values.shape) != tuple(weight.shape):
            problems.append(f"{gname} has the shape {tuple(values.shape)}, the merged {name} {tuple(weight.shape)}")
            continue
        kind = tensor.tensor_type.name
        error = _sorted_difference(values, weight)
        worst[kind] = max(worst.get(kind, 0.0), error)
        if error > VALUE_TOLERANCE.get(kind, 1e-2):
            problems.append(f"{gname} ({kind}) differs from the merged {name} by {error:.3g} of its largest "
                            f"value (tolerance {VALUE_TOLERANCE.get(kind, 1e-2):g})")
    extra = sorted(set(tensors) - matched)
    figures = {"tensors": len(tensors), "matched": len(matched), "extra_tensors": extra,
               "max_relative_value_error": worst, "types": sorted({t.tensor_type.name for t in reader.tensors}),
               "metadata": {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}, "problems": problems}
    if problems:
        raise RunFailed(f"the GGUF read back wrong: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                        if len(problems) > 1 else ""), hint="nothing was written; this is a bug, please report it")
    return figures


def _metadata(reader: Any, gguf: Any) -> dict[str, Any]:
    keep = ("general.architecture", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
    meta = {key: reader.fields[key].contents() for key in keep if key in reader.fields}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["vocabulary"] = len(tokens.data) if tokens is not None else 0
    return meta


def _metadata_problems(meta: dict[str, Any], prompt: Any, info: dict[str, Any]) -> list[str]:
    want = {"general.architecture": info["gguf_architecture"], "tokenizer.chat_template": prompt.chat_template,
            "tokenizer.ggml.add_bos_token": prompt.add_bos, "tokenizer.ggml.eos_token_id": prompt.eos_id}
    if prompt.eot_id is not None:
        want["tokenizer.ggml.eot_token_id"] = prompt.eot_id
    if info.get("pre_tokenizer"):
        want["tokenizer.ggml.pre"] = info["pre_tokenizer"]["name"]
    return [f"its {key} is {meta.get(key)!r}, not {value!r}" for key, value in want.items() if meta.get(key) != value]


def _merged_weights(folder: Path):
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _sorted_difference(values: Any, weight: Any) -> float:
    import numpy as np

    a = np.sort(values.astype(np.float32, copy=False), axis=None)
    b = np.sort(weight.astype(np.float32, copy=False), axis=None)
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-12)
    return float(np.abs(a - b).max() / scale) if a.size else 0.0


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def compare_in_llama_cpp(path: Path, prompt: Any, reference: list[dict[str, Any]], gguf_type: str) -> dict[str, Any]:
    """Load the GGUF in llama.cpp (llama-cpp-python, in a child process: native code that crashes must not take
    the export with it) and compare ids, logits and greedy tokens per probe with the merged model's."""
    import json
    import subprocess
    import sys
    import tempfile

    import numpy as np

    job = {"model": str(path), "add_bos": prompt.add_bos, "bos_token": prompt.bos_token, "greedy": GREEDY_TOKENS,
           "probes": [{"text": p.text, "ids": p.ids} for p in prompt.probes]}
    with tempfile.TemporaryDirectory(prefix="ftcli-llama-cpp-", dir=path.parent) as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "ftcli.export.gguf.llama_worker", tmp], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            raise RunFailed(f"llama.cpp (llama-cpp-python) crashed loading or running the GGUF ({why}) {last}".strip(),
                            hint="nothing was written; a llama-cpp-python built for another CPU? rebuild it with "
                            "CMAKE_ARGS=-DGGML_NATIVE=OFF, or uninstall it to check with gguf's reader only")
        result = json.loads((Path(tmp) / "result.json").read_text(encoding="utf-8"))
        logits = [np.load(Path(tmp) / f"logits-{i}.npy") for i in range(len(prompt.probes))]
    rows = []
    for probe, ref, got, row in zip(prompt.probes, reference, logits, result["probes"]):
        scale = max(1.0, float(np.abs(ref["logits"]).max()))
        rows.append({"ids_identical": row["ids"] == list(probe.ids),
                     "max_relative_logit_difference": float(np.abs(got - ref["logits"]).max() / scale),
                     "top1_agreement": float(np.mean(got.argmax(-1) == ref["logits"].argmax(-1))),
                     "greedy_identical": row["greedy"] == ref["greedy"], "greedy": row["greedy"],
                     "greedy_reference": ref["greedy"]})
    return _verdict(rows, gguf_type)


def _verdict(rows: list[dict[str, Any]], gguf_type: str) -> dict[str, Any]:
    diff = max(r["max_relative_logit_difference"] for r in rows)
    top1 = min(r["top1_agreement"] for r in rows)
    figures = {"prompts": len(rows), "ids_identical": all(r["ids_identical"] for r in rows),
               "max_relative_logit_difference": diff, "min_top1_agreement": top1,
               "greedy_identical": all(r["greedy_identical"] for r in rows), "per_prompt": rows}
    problems = []
    if not figures["ids_identical"]:
        problems.append("llama.cpp tokenizes the prompts into other ids than the model was trained on")
    if gguf_type in LOGIT_TOLERANCE and diff > LOGIT_TOLERANCE[gguf_type]:
        problems.append(f"llama.cpp's logits differ by {diff:.3g} of the largest, more than the {gguf_type} "
                        f"tolerance {LOGIT_TOLERANCE[gguf_type]:g}")
    if gguf_type in TOP1_AGREEMENT and top1 < TOP1_AGREEMENT[gguf_type]:
        problems.append(f"llama.cpp's top token agrees on {top1:.1%} of positions, less than "
                        f"{TOP1_AGREEMENT[gguf_type]:.0%}")
    if gguf_type in GREEDY_IDENTICAL and not figures["greedy_identical"]:
        problems.append("llama.cpp's greedy continuation differs from the merged model's")
    figures["tolerance"] = {"logits": LOGIT_TOLERANCE.get(gguf_type), "top1": TOP1_AGREEMENT.get(gguf_type),
                            "greedy_identical": gguf_type in GREEDY_IDENTICAL}
    figures["passed"] = not problems
    figures["problems"] = problems
    return figures
