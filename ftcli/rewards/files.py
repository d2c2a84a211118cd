"""`--reward FILE.py:function`: the file imported as a module of its own, the function looked up in it.

    >>> from ftcli.rewards.files import load
    >>> name, fn = load("rewards.py:correct")

Every way this can go wrong is one ConfigError naming the file, the function and the fix: no such file, a
file that is not Python, a syntax error (with its line), an import that raises, no such function, a name that
is not callable. Loading runs the file's top-level code, as `python FILE.py` would.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from ftcli.errors import ConfigError

FORM = "pass FILE.py:function (e.g. --reward rewards.py:correct) or builtin:NAME (see docs/grpo.md)"


def split_spec(spec: str) -> tuple[Path, str]:
    path, sep, function = spec.rpartition(":")
    if not sep or not path or not function:
        raise ConfigError(f"--reward {spec} names no function", hint=FORM)
    return Path(path).expanduser(), function


def short_name(path: Path, function: str) -> str:
    return f"{path.name}:{function}"


def load(spec: str) -> tuple[str, Callable[..., list[Any]]]:
    path, function = split_spec(spec)
    name = short_name(path, function)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"--reward {spec} failed: the file {path} {what}", hint="check the path (relative to the "
                          "current folder)")
    if path.suffix != ".py":
        raise ConfigError(f"--reward {spec} failed: {path} is not a .py file", hint=FORM)
    module = _import(path, spec)
    fn = getattr(module, function, None)
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"--reward {spec} failed: {path.name} has no function {function} (functions found: "
                          f"{', '.join(found) or 'none'})", hint="check the name after the colon")
    if not callable(fn):
        raise ConfigError(f"--reward {spec} failed: {function} in {path.name} is a {type(fn).__name__}, not a "
                          "function", hint="name a function def'd in the file")
    return name, fn


def _import(path: Path, spec: str) -> Any:
    # Imported once per version of the file (a run loads its rewards twice: the check, then the trainer); an
    # edited file is imported afresh, as a new process would.
    stat = path.stat()
    module_name = f"ftcli_reward_{abs(hash((str(path.resolve()), stat.st_mtime_ns, stat.st_size)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"--reward {spec} failed: {path} cannot be imported", hint=FORM)
    module = importlib.util.module_from_spec(loader_spec)
    # The file's own folder first, so that it can import its neighbours (as `python FILE.py` could).
    sys.path.insert(0, str(path.resolve().parent))
    try:
        loader_spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ConfigError(f"--reward {spec} failed: syntax error in {path.name} line {exc.lineno}: {exc.msg}",
                          hint="fix the file (python -m py_compile shows the same)") from None
    except Exception as exc:  # noqa: BLE001 - any error of the user's module code is reported the same way
        raise ConfigError(f"--reward {spec} failed: importing {path.name} raised {type(exc).__name__}: {exc}",
                          hint="fix the file's top-level code (imports, constants)") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    sys.modules[module_name] = module
    return module
