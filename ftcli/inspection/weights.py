"""Checks on weights before and after they load: whole safetensors files, finite values.

    >>> from ftcli.inspection.weights import check_weight_files, safetensors_problem
    >>> check_weight_files(Path("runs/lora-1"), "adapter")   # ModelError (exit 4) naming a damaged file
    >>> safetensors_problem(Path("model.safetensors"))        # None, or why the file is not whole

The model-loading core (ftcli.models: `load_model`, `attach_adapter`) runs `check_weight_files` on
every local folder it loads, so every command (train, eval, generate, chat, export, a DPO chain)
refuses a truncated or empty weight file in one line instead of a safetensors traceback. The
check reads only each file's header (a few KiB), never the tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ftcli.errors import ModelError

DAMAGED_HINT = "copy the folder again from an intact source (or train it again)"


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a whole safetensors file, or None when its header and size agree."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            if size < 8:
                return f"it holds {size} bytes, less than a safetensors header" if size else "it is empty (0 bytes)"
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                return f"its header claims {length} bytes, more than the file holds ({size})"
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError, RecursionError) as exc:
        return f"its header does not parse ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        return "its header lists a tensor without valid data offsets"
    data = size - 8 - length
    if max(ends, default=0) != data:
        return f"its tensors need {max(ends, default=0)} bytes of data, the file holds {data} (truncated or grown)"
    return None


def weight_files_in(folder: Path) -> list[Path]:
    """The safetensors files a model or adapter folder loads from (its index's shards included)."""
    files = set(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
            files.update(folder / str(name) for name in names)
        except (OSError, ValueError, AttributeError):
            raise ModelError(f"{index} is damaged: it is not a JSON index of weight files",
                             hint=DAMAGED_HINT) from None
    return sorted(files)


def check_weight_files(folder: Path, hint: str = DAMAGED_HINT, files: list[Path] | None = None) -> None:
    """Refuse, before anything loads, a weight file of `folder` that cannot be read whole: missing (an index names
    it), a header that does not parse, or tensors that do not fill the file exactly (truncated, grown)."""
    for file in (files if files is not None else weight_files_in(folder)):
        if not file.is_file():
            raise ModelError(f"{file} is missing (the folder's weight index names it)", hint=hint)
        problem = safetensors_problem(file)
        if problem:
            raise ModelError(f"{file} is damaged: {problem}", hint=hint)


def nonfinite_parameter(model: Any) -> str | None:
    """The name of a floating-point parameter holding NaN or inf, or None: one float32 sum per tensor (NaN and inf
    survive a sum; no tensor-sized temporary), cheap beside training; quantized and meta tensors are skipped."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            packed = hasattr(param, "quant_state") or hasattr(param, "bnb_quantized")  # 4-bit: bytes, not values
            if param.is_floating_point() and not packed and param.device.type != "meta" and \
                    not torch.isfinite(param.sum(dtype=torch.float32)):
                return name
    return None
