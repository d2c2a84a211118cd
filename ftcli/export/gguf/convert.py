"""Converting a merged model folder to GGUF with llama.cpp's own conversion code.

    >>> from ftcli.export.gguf.convert import convert
    >>> info = convert(Path("stage/hf"), Path("stage/model-f16.gguf"), "f16", prompt, name="my-model")
    >>> info["pre_tokenizer"]      # {'name': 'gpt-2', 'from': 'tokenizer.json'} (or 'from': 'llama.cpp hash')

The code is llama.cpp's `conversion/` package (what its `convert_hf_to_gguf.py` runs) with the
gguf-py of the same commit, imported from a llama.cpp source tree; ftcli carries none of it. PyPI's
`gguf` is that gguf-py, but released less often than the converter changes (0.19.0 lacks what the
converter calls), and the converter itself is published only in llama.cpp's repository, whose one
copy on PyPI is the llama.cpp tree vendored in llama-cpp-python's source archive. The tree is:
`FTCLI_LLAMA_CPP=/path/to/llama.cpp` (a checkout: a newer architecture), else the one fetched
once into ftcli's cache (`$FTCLI_HOME/llama.cpp/<commit>`) from that archive at a pinned version,
checked against its pinned sha256 (`pip download`: whatever index pip is configured with).
The converter is driven as its script does; ftcli adds two things on top: a pre-tokenizer
llama.cpp's hash table does not know is mapped from the tokenizer's own config
(ftcli.export.gguf.pretokenizer) or refused, and the prompt format of the run replaces what the
converter read (chat template, EOS / end-of-turn ids, whether BOS is added).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ftcli.console import console
from ftcli.errors import ConfigError, ModelError, RunFailed
from ftcli.export.gguf.pretokenizer import llama_cpp_pre_tokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# The archive on PyPI that vendors llama.cpp at LLAMA_CPP_COMMIT, and its sha256 (what is fetched is checked).
SOURCE_ARCHIVE = ("llama-cpp-python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
VENDORED = "vendor/llama.cpp/"  # the tree inside the archive
TREE_PARTS = ("conversion/", "gguf-py/gguf/", "LICENSE", "convert_hf_to_gguf.py")
CHECKOUT_ENV = "FTCLI_LLAMA_CPP"
# What the converter imports beyond ftcli's own requirements (the `gguf` extra).
REQUIRED = {"numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "sentencepiece": "sentencepiece"}
_QUIET = ("hf-to-gguf", "gguf", "gguf.gguf_writer", "gguf.vocab", "gguf.lazy", "gguf.metadata")


def is_llama_cpp_tree(root: Path) -> bool:
    return (root / "conversion" / "__init__.py").is_file() and (root / "gguf-py" / "gguf" / "__init__.py").is_file()


def cached_tree() -> Path:
    from ftcli.paths import ftcli_home

    return ftcli_home() / "llama.cpp" / LLAMA_CPP_COMMIT[:12]


def converter_source() -> tuple[Path, str]:
    """(the llama.cpp tree the converter is imported from, how to name it in the record); fetched into the
    cache first when there is none."""
    checkout = os.environ.get(CHECKOUT_ENV)
    if checkout:
        root = Path(checkout).expanduser()
        if not is_llama_cpp_tree(root):
            raise ConfigError(f"{CHECKOUT_ENV}={checkout} is not a llama.cpp checkout (no conversion/ and gguf-py/)",
                              hint=f"point it at a llama.cpp source folder, or unset {CHECKOUT_ENV} to use llama.cpp "
                              f"{LLAMA_CPP_COMMIT[:7]} from ftcli's cache")
        return root, f"llama.cpp checkout {root}"
    root = cached_tree()
    problem = tree_problem(root)
    if problem is not None:
        damaged = root.exists()
        try:
            fetch_tree(root)
        except ConfigError as exc:
            if not damaged:
                raise
            raise ConfigError(f"the cached llama.cpp converter in {root} is damaged ({problem}), and fetching it "
                              f"again failed: {exc.message}", hint=exc.hint) from None
        if damaged:
            console.print(f"[yellow]note:[/] replaced the damaged cached llama.cpp converter ({problem})",
                          soft_wrap=True)
    return root, f"llama.cpp {LLAMA_CPP_COMMIT[:12]}"


TREE_RECORD = "ftcli-tree.json"  # sha256 of every file of the extracted tree, written when it was extracted
_verified: set[Path] = set()


def _tree_digests(root: Path) -> dict[str, str]:
    from ftcli.files import file_sha256

    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != TREE_RECORD and "__pycache__" not in p.parts}


def tree_problem(root: Path) -> str | None:
    """Why the cached tree at `root` cannot be used as extracted (missing, no record, a file changed), or None."""
    import json

    if root in _verified:
        return None
    if not is_llama_cpp_tree(root):
        return "no converter there" if root.exists() else "not fetched yet"
    try:
        recorded = json.loads((root / TREE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {TREE_RECORD} (the record of what was extracted)"
    found = _tree_digests(root)
    changed = sorted(set(recorded) ^ set(found) | {k for k in recorded if found.get(k) not in (None, recorded[k])})
    if changed:
        return f"{changed[0]} differs from what was extracted" + (f", and {len(changed) - 1} more" if
                                                                     len(changed) > 1 else "")
    _verified.add(root)
    return None


def fetch_tree(root: Path) -> None:
    """Put llama.cpp's converter (and its gguf-py and LICENSE) at `root`, from the pinned PyPI archive that
    vendors it; one process at a time, the tree renamed into place whole."""
    import json
    import shutil
    import tempfile

    from ftcli.files import exclusive

    name, version, sha256 = SOURCE_ARCHIVE
    from ftcli.paths import home_folder

    if root.parent == cached_tree().parent:
        home_folder(root.parent.name)  # an FTCLI_HOME that cannot be written: one line, exit 5
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(root, "llama.cpp's converter", wait=True):
        if tree_problem(root) is None:
            return
        console.print(f"gguf: fetching llama.cpp {LLAMA_CPP_COMMIT[:7]}'s converter once, from {name} {version}'s "
                      f"source archive on PyPI, into {root}")
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.ftcli-fetch.", dir=root.parent))
        try:
            archive = _download(name, version, sha256, work)
            _extract_tree(archive, work / "tree")
            (work / "tree" / TREE_RECORD).write_text(json.dumps(_tree_digests(work / "tree"), indent=1),
                                                     encoding="utf-8")
            if root.exists():  # a damaged tree: set aside (removed with `work`) only now that a good one is here
                os.replace(root, work / "damaged")
            os.replace(work / "tree", root)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _download(name: str, version: str, sha256: str, work: Path) -> Path:
    import subprocess

    from ftcli.files import file_sha256

    how = (f"set {CHECKOUT_ENV} to a llama.cpp checkout (git clone https://github.com/ggml-org/llama.cpp), or make "
           "PyPI reachable")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", str(work), f"{name}=={version}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"--format gguf: cannot fetch llama.cpp's converter ({exc})", hint=how) from None
    archives = sorted(work.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["pip failed"]
        raise ConfigError(f"--format gguf: cannot fetch llama.cpp's converter ({name} {version}'s source from "
                          f"PyPI): {last[0]}", hint=how)
    digest = file_sha256(archives[0])
    if digest != sha256:
        raise ConfigError(f"--format gguf: {archives[0].name} from the package index has sha256 {digest[:16]}..., "
                          f"not the {sha256[:16]}... ftcli pins", hint=how)
    return archives[0]


def _extract_tree(archive: Path, dest: Path) -> None:
    """The parts of the vendored llama.cpp the converter needs, extracted with tarfile's safe `data` filter."""
    import tarfile

    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/")
            if inner.startswith(VENDORED) and inner[len(VENDORED):].startswith(TREE_PARTS) \
                    and "__pycache__" not in inner:
                member.name = inner[len(VENDORED):]
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    if not is_llama_cpp_tree(dest):
        raise RunFailed(f"{archive.name} holds no llama.cpp converter under {VENDORED}",
                        hint=f"set {CHECKOUT_ENV} to a llama.cpp checkout")


def check_requirements() -> None:
    """Refuse, before anything loads, when the converter's own imports are missing (the `gguf` extra); fetch the
    converter into the cache when it is not there yet."""
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"--format gguf needs {', '.join(missing)}, which is not installed",
                          hint="pip install 'ftcli[gguf]'")
    converter_source()


def load_converter() -> tuple[Any, Any]:
    """(gguf, conversion): llama.cpp's modules, imported from `converter_source()`; another `gguf` already
    imported (PyPI's) is set aside so that the converter gets the gguf-py of its own commit."""
    root, _ = converter_source()
    paths = [str(root), str(root / "gguf-py")]
    loaded = sys.modules.get("gguf")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(paths[1]):
        for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
            del sys.modules[name]
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["NO_LOCAL_GGUF"] = "1"  # its base.py would add its own gguf-py again
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    import conversion
    import gguf

    return gguf, conversion


def convert(folder: Path, out_file: Path, gguf_type: str, prompt: Any, name: str) -> dict[str, Any]:
    """Write `out_file` from the model folder `folder`; returns what the record keeps of the conversion."""
    import torch

    gguf, conversion = load_converter()
    hparams = conversion.ModelBase.load_hparams(folder, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        base_class = conversion.get_model_class(arch)
    except NotImplementedError:
        raise ModelError(f"llama.cpp's converter does not support the architecture {arch}",
                         hint=f"export with --format hf; a newer llama.cpp may support it ({CHECKOUT_ENV})") from None
    found: dict[str, Any] = {}
    export_class = _export_class(base_class, folder, prompt, found)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    try:
        with torch.inference_mode():
            model = export_class(folder, file_types[gguf_type], out_file, is_big_endian=False, use_temp_file=False,
                                 eager=False, metadata_override=None, model_name=name, split_max_tensors=0,
                                 split_max_size=0, dry_run=False, small_first_shard=False, remote_hf_model_id=None)
            model.write()
    except (ModelError, ConfigError):
        raise
    except SystemExit as exc:  # the converter's scripts end with sys.exit on some errors: no message of their own
        raise RunFailed(f"llama.cpp's converter stopped on the merged model ({arch}) with exit code {exc.code}",
                        hint="nothing was written; export with --format hf and convert it yourself") from None
    except Exception as exc:  # noqa: BLE001 - the converter's own failure, in one line
        raise RunFailed(f"llama.cpp's converter failed on the merged model ({arch}): {type(exc).__name__}: {exc}",
                        hint="nothing was written; export with --format hf and convert it yourself") from None
    return {"architecture": arch, "gguf_architecture": gguf.MODEL_ARCH_NAMES[export_class.model_arch],
            "pre_tokenizer": found.get("pre_tokenizer")}


def _export_class(base_class: Any, folder: Path, prompt: Any, found: dict[str, Any]) -> Any:
    """The converter's class for the architecture, with ftcli's pre-tokenizer rule and the run's prompt format."""

    class Export(base_class):
        model_arch = base_class.model_arch

        def get_vocab_base_pre(self, tokenizer: Any) -> str:
            try:
                name = super().get_vocab_base_pre(tokenizer)
                found["pre_tokenizer"] = {"name": name, "from": "llama.cpp's hash of its test string"}
                return name
            except NotImplementedError:
                pass
            name, why = llama_cpp_pre_tokenizer(folder / "tokenizer.json")
            if name is None:
                raise ModelError(f"llama.cpp does not know this tokenizer's pre-tokenizer, and it cannot be read "
                                 f"from its config: {why}", hint="llama.cpp would split text differently than the "
                                 "model was trained on, so no GGUF was written; export with --format hf")
            found["pre_tokenizer"] = {"name": name, "from": "tokenizer.json (llama.cpp does not know its hash)"}
            return name

        def set_vocab(self) -> None:
            super().set_vocab()
            writer = self.gguf_writer
            write_tensors = writer.write_tensors_to_file

            def quietly(*args: Any, **kwargs: Any) -> Any:  # no progress bar on ftcli's terminal
                kwargs["progress"] = False
                return write_tensors(*args, **kwargs)

            writer.write_tensors_to_file = quietly
            writer.add_chat_template(prompt.chat_template)
            writer.add_add_bos_token(prompt.add_bos)
            if prompt.eos_id is not None:
                writer.add_eos_token_id(prompt.eos_id)
            if prompt.eot_id is not None:
                writer.add_eot_token_id(prompt.eot_id)

    Export.__name__ = Export.__qualname__ = f"ftcli{base_class.__name__}"
    return Export
