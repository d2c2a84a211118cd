"""Inspect: what a model, adapter, dataset, cache or run is, before trusting it.

    >>> from ftcli.inspection.detect import inspect_target
    >>> inspect_target("builtin:tiny-llama")["kind"]
    'model'

detect.py (what a target is), views.py (one plain dict per kind), render.py (Rich tables),
estimate.py (parameter counts on the meta device, the training-memory estimate), weights.py (safetensors
headers and finite weights checked before a model or adapter loads: the loading core's check).
"""
