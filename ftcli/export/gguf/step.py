"""The GGUF step of `ftcli export --format gguf`, run inside the export's staging folder after the merge and its
verification (ftcli.export.run).

    >>> prompt = prepare(src, tokenizer, opts)                 # before loading: what the GGUF must carry
    >>> reference = reference_for(model, prompt)              # the merged model's outputs, when llama.cpp runs
    >>> record = write_gguf(hf_folder, stage, title, gguf_type, prompt, reference)

It converts the merged folder (written into the staging folder), checks the file, writes the Modelfile
and returns the record's `gguf` entry; the caller removes the merged folder and renames the staging
folder into place, so a failed check leaves nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ftcli.console import console
from ftcli.errors import ConfigError, RunFailed

MERGED = ".ftcli-merged"  # inside the staging folder: the merged model the converter reads, removed before commit
MODELFILE = "Modelfile"


def gguf_type_for(requested: str | None, dtype_name: str) -> str:
    """--gguf-type, or its default: bf16 for a bfloat16 model, else f16."""
    from ftcli.export.gguf.convert import GGUF_TYPES

    if requested is None:
        return "bf16" if dtype_name == "bfloat16" else "f16"
    if requested not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {requested} is not a GGUF type ftcli writes",
                          hint="use " + ", ".join(GGUF_TYPES))
    return requested


def check_gguf_options(fmt: str, gguf_type: str | None) -> None:
    """Before anything loads: the format, the type, and the converter's requirements."""
    from ftcli.export.gguf.convert import GGUF_TYPES, check_requirements

    if fmt not in ("hf", "gguf"):
        raise ConfigError(f"--format {fmt} is not an export format", hint="use hf (a model folder) or gguf")
    if fmt == "hf":
        if gguf_type is not None:
            raise ConfigError("--gguf-type applies to --format gguf", hint="add --format gguf, or drop --gguf-type")
        return
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type} is not a GGUF type ftcli writes", hint="use " + ", ".join(GGUF_TYPES))
    check_requirements()


def prepare(src: Any, tokenizer: Any) -> Any:
    from ftcli.export.gguf.prompt import prompt_format

    return prompt_format(src, tokenizer)


def reference_for(model: Any, prompt: Any, verify: bool) -> list[dict[str, Any]] | None:
    """The merged model's outputs on the probes, computed in float32 (the model is cast in place: call it after
    saving), when llama.cpp is installed to compare with (and --no-verify was not given); else None."""
    import torch

    from ftcli.export.gguf.check import llama_cpp_installed, reference_outputs

    if not verify or not llama_cpp_installed():
        return None
    model.to(torch.float32)
    return reference_outputs(model, prompt)


def write_gguf(folder: Path, stage: Path, title: str, gguf_type: str, prompt: Any,
               reference: list[dict[str, Any]] | None, verify: bool = True) -> dict[str, Any]:
    """Convert, check, write the Modelfile; the record's `gguf` entry."""
    from ftcli.export.gguf import check
    from ftcli.export.gguf.convert import converter_source, convert
    from ftcli.export.gguf.prompt import modelfile
    from ftcli.system import format_bytes

    name = f"{title}-{gguf_type}.gguf"
    target = stage / name
    start = time.perf_counter()
    info = convert(folder, target, gguf_type, prompt, name=title)
    seconds = time.perf_counter() - start
    pre = info["pre_tokenizer"]
    console.print(f"gguf: {name} ({gguf_type}, {format_bytes(target.stat().st_size)}) converted by "
                  f"{converter_source()[1]} in {seconds:.1f}s" + (f"; pre-tokenizer {pre['name']} from {pre['from']}"
                                                                  if pre else ""))
    start = time.perf_counter()
    read = check.read_back(target, folder, prompt, info)
    read["seconds"] = round(time.perf_counter() - start, 3)
    errors = ", ".join(f"{kind} {err:.2g}" for kind, err in sorted(read["max_relative_value_error"].items()))
    console.print(f"gguf reader: {read['matched']} of {read['tensors']} tensors match the merged weights "
                  f"(largest relative value error: {errors}); chat template, EOS {prompt.eos_id}"
                  + (f", end of turn {prompt.eot_id}" if prompt.eot_id is not None else "")
                  + f", add BOS {prompt.add_bos} as the run trained")
    llama = None
    if reference is None:
        why = "--no-verify" if not verify else "llama-cpp-python is not installed"
        console.print(f"[yellow]note:[/] llama.cpp was not run ({why}): the file was checked with gguf's reader only")
    else:
        start = time.perf_counter()
        llama = check.compare_in_llama_cpp(target, prompt, reference, gguf_type)
        llama["seconds"] = round(time.perf_counter() - start, 3)
        _print_llama(llama, gguf_type)
        if not llama["passed"]:
            raise RunFailed(f"llama.cpp check failed ({gguf_type}): {llama['problems'][0]}",
                            hint="nothing was written; try --gguf-type f32 (or f16), or pass --no-verify to write "
                            "it anyway")
    (stage / MODELFILE).write_text(modelfile(prompt, name), encoding="utf-8")
    return {"file": name, "type": gguf_type, "bytes": target.stat().st_size, "conversion_seconds": round(seconds, 3),
            "converter": converter_source()[1], **info, "prompt": prompt.record(), "reader_check": read,
            "llama_cpp_check": llama if llama is not None else
            ("not run: --no-verify" if not verify else "not run: llama-cpp-python is not installed"),
            "modelfile": MODELFILE}


def _print_llama(figures: dict[str, Any], gguf_type: str) -> None:
    console.print(f"llama.cpp: {figures['prompts']} prompt(s), ids identical {figures['ids_identical']}, largest "
                  f"relative logit difference {figures['max_relative_logit_difference']:.3g}"
                  + (f" (tolerance {figures['tolerance']['logits']:g})" if figures["tolerance"]["logits"] else "")
                  + f", top-1 agreement {figures['min_top1_agreement']:.1%}, greedy continuation identical "
                  f"{figures['greedy_identical']} ({gguf_type})")
