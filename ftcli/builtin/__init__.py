"""Built-in models and datasets that work offline: `builtin:tiny-llama` and `builtin:alpaca-sample`.

    >>> from ftcli.builtin import builtin_dataset_rows, is_builtin, resolve_builtin_model
    >>> is_builtin("builtin:tiny-llama"), is_builtin("gpt2")
    (True, False)
    >>> len(builtin_dataset_rows("builtin:alpaca-sample"))
    400
    >>> folder = resolve_builtin_model("builtin:tiny-llama")  # built once under ftcli_home()

They let every command run end to end with no network and no download, which is
what the test suite and first-time users rely on.

Importing this package stays cheap: torch and transformers load only when a
model is actually resolved.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-llama",)
BUILTIN_DATASETS = ("alpaca-sample",)

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "builtin_dataset_rows",
    "builtin_name",
    "is_builtin",
    "resolve_builtin_model",
]


def is_builtin(ref: str) -> bool:
    """True for references such as `builtin:tiny-llama`, whatever the name after the prefix."""
    return ref.startswith(BUILTIN_PREFIX)


def builtin_name(ref: str) -> str:
    """The name after the prefix: `builtin:tiny-llama` -> `tiny-llama`; a bare name is returned as is."""
    return ref[len(BUILTIN_PREFIX):] if is_builtin(ref) else ref


def _unknown(kind: str, ref: str, valid: tuple[str, ...]) -> ValueError:
    names = ", ".join(BUILTIN_PREFIX + name for name in valid)
    return ValueError(f"unknown built-in {kind} {ref!r}; available: {names}")


def resolve_builtin_model(ref: str, home: Path | None = None) -> Path:
    """The local folder of a built-in model (building it on first use), loadable with `from_pretrained`.

    Raises ValueError, naming the valid choices, for an unknown name.
    """
    name = builtin_name(ref)
    if name == "tiny-llama":
        from ftcli.builtin.tiny_llama import ensure_tiny_llama

        return ensure_tiny_llama(home)
    raise _unknown("model", ref, BUILTIN_MODELS)


def builtin_dataset_rows(ref: str) -> list[dict[str, str]]:
    """The rows of a built-in dataset, each with `instruction`, `input` and `output`.

    Raises ValueError, naming the valid choices, for an unknown name.
    """
    name = builtin_name(ref)
    if name == "alpaca-sample":
        from ftcli.builtin.alpaca_sample import alpaca_sample_rows

        return alpaca_sample_rows()
    raise _unknown("dataset", ref, BUILTIN_DATASETS)
