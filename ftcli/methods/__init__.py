"""The training methods, in one registry (the order `--help` lists them).

    >>> from ftcli.methods import METHODS
    >>> method = METHODS["lora"]
    >>> model = load_model(config.model, **method.load_options(config, device))
    >>> plan = method.plan(config, model)   # -> MethodPlan(model=PeftModel, saves="adapter", ...)

A method (ftcli/methods/base.py) declares its facts (adapter? 4-bit? sharded? its defaults), how
its model is loaded (`load_options`: extra keyword arguments for `models.load_model`, e.g. a
quantization config or no device placement) and how the loaded model is adapted before training
(`plan`), including what the run folder will hold. Adding a method is its file plus one line here.
"""

from __future__ import annotations

from ftcli.methods import fsdp, full, lora, qlora
from ftcli.methods.base import PER_METHOD_OPTIONS, Method, MethodPlan, count_parameters

METHODS: dict[str, Method] = {m.name: m for m in (
    full.METHOD,
    lora.METHOD,
    qlora.METHOD,
    fsdp.METHOD,
)}

__all__ = ["METHODS", "PER_METHOD_OPTIONS", "Method", "MethodPlan", "count_parameters"]
