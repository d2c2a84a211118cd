"""The package's shape: commands in one list, methods asked for their facts, no import cycles, help that
shows every default (generated from the config and the methods' declared defaults)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ftcli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The ftcli modules `path` imports, inside functions too; `if TYPE_CHECKING:` blocks aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name`, the module.
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found |= subs if subs else {base}
    return {m for m in found if m in known and m != here}


def import_cycles() -> list[list[str]]:
    """Strongly connected components (more than one module) of the import graph (Tarjan)."""
    modules = package_modules()
    graph = {name: imports_of(path, set(modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "ftcli"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ftcli.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ftcli.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ftcli.sub\n"
                                      "def g():\n    from . import b\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert import_cycles() == [["ftcli.sub.b", "ftcli.sub.c"]]


def test_no_import_cycles_and_modules_of_readable_size() -> None:
    assert import_cycles() == []
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}


def test_no_function_over_80_lines_except_typer_signatures() -> None:
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body_start = node.body[0].lineno  # a Typer signature (every option) is long by nature
                if node.end_lineno - body_start + 1 > 80:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert too_long == []


@pytest.mark.parametrize("package", ["methods", "objectives"])
def test_code_asks_methods_and_objectives_for_their_facts_never_their_names(package: str) -> None:
    """Outside ftcli/methods/ (ftcli/objectives/), no comparison with a method's (an objective's) name."""
    from ftcli.methods import METHODS
    from ftcli.objectives import OBJECTIVES

    names = set(METHODS if package == "methods" else OBJECTIVES)
    comparisons = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in names]
                if consts:
                    comparisons.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert comparisons == []


def test_registry_config_and_defaults_agree() -> None:
    from ftcli.config import METHOD_DEFAULTS, RunConfig, build_run_config
    from ftcli.errors import ConfigError
    from ftcli.methods import METHODS, PER_METHOD_OPTIONS

    assert list(METHOD_DEFAULTS) == list(METHODS)
    for name, method in METHODS.items():
        assert method.name == name
        assert set(method.defaults) == set(PER_METHOD_OPTIONS)
        config = build_run_config({"method": name})
        for key in PER_METHOD_OPTIONS:
            assert RunConfig.model_fields[key].default is None  # filled per method, never a global default
            assert getattr(config, key) == method.defaults[key], (name, key)
    with pytest.raises(ConfigError, match="--method: Input should be 'full', 'lora', 'qlora' or 'fsdp'"):
        build_run_config({"method": "dpo"})


def test_commands_are_registered_from_one_list_in_help_order(cli) -> None:
    import typer.main

    from ftcli.cli import COMMANDS, app

    group = typer.main.get_command(app)
    assert list(group.commands) == [name for name, _ in COMMANDS]
    text = cli("--help").stdout
    assert [m.group(1) for m in re.finditer(r"^│ (\w+) ", text, re.M) if m.group(1) in group.commands] \
        == [name for name, _ in COMMANDS]
    # A command module imports shared pieces from cli.common, never another command.
    commands = {f"ftcli.cli.{name}" for name, _ in COMMANDS}
    known = set(package_modules())
    for name in commands:
        assert imports_of(PACKAGE / "cli" / f"{name.rsplit('.', 1)[1]}.py", known) & commands == set(), name


def flat(text: str) -> str:
    """Help text with the box drawing and the line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("command", ["train", "prepare", "warmup"])
def test_help_shows_every_default_generated_from_the_config(cli, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    from ftcli.cli.common import default_text

    # Wide enough that no description wraps: a wrapped one interleaves with the names column (a switch's
    # `--no-...` form sits on the second line), which `flat` cannot take apart. tests/test_terminal.py checks 80.
    monkeypatch.setenv("COLUMNS", "250")
    from ftcli.config import METHOD_DEFAULTS
    from ftcli.methods import METHODS

    text = flat(cli(command, "--help").stdout)
    assert "[default: 8 full/qlora, 4 lora/fsdp]" in text
    if command == "train":  # prepare and warmup list only the train options they read (no optimizer)
        assert "[default: 5e-5 full, 1e-4 lora/qlora/fsdp]" in text
    if command != "prepare":
        assert "[default: off full/lora/qlora, on fsdp]" in text  # --gradient-checkpointing
    assert "[default: all]" in text  # --dataset-size
    assert "[default: 2048]" in text and "[default: 42]" in text and "[default: tatsu-lab/alpaca]" in text
    assert f"[default: {default_text('model')}]" in text
    assert "meta-llama/Llama-3.2-3B-Instruct full," in text and "meta-llama/Llama-3.1-70B-Instruct qlora/fsdp" in text
    assert default_text("batch_size") == ", ".join(
        f"{v} {'/'.join(m for m in METHODS if METHOD_DEFAULTS[m]['batch_size'] == v)}"
        for v in dict.fromkeys(d["batch_size"] for d in METHOD_DEFAULTS.values()))
    assert "<bool>" not in text
    for method in METHODS if command != "prepare" else ():
        assert f"{method}:" in text  # --method lists every method with what it does


def test_top_level_help_names_every_method(cli) -> None:
    from ftcli.methods import METHODS

    text = flat(cli("--help").stdout)
    assert "<bool>" not in text
    head, _, commands = text.partition("Commands")
    assert all(m in head for m in METHODS)
    train_line = commands.split(" prepare ")[0]
    assert all(word in train_line for word in ("full", "LoRA", "QLoRA", "FSDP"))


def test_every_default_note_in_a_help_text_reaches_the_screen(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `[default: ...]` note written into an option's help must be printed, not eaten as Rich markup."""
    import typer.main

    monkeypatch.setenv("COLUMNS", "250")  # no wrapping: see test_help_shows_every_default_generated_from_the_config
    from ftcli.cli import COMMANDS, app

    from ftcli.objectives import OBJECTIVES

    group = typer.main.get_command(app)
    checked = 0
    for name, _ in COMMANDS:
        text = flat(cli(name, "--help").stdout)
        for param in group.commands[name].params:
            if getattr(param, "hidden", False):
                continue  # accepted, not listed (prepare's and warmup's train options they do not read)
            owner = next((o for o, objective in OBJECTIVES.items() if param.name in objective.options
                          and any(p.name == "objective" for p in group.commands[name].params)), None)
            # An objective's own options are described by `--objective NAME --help` (listed by name otherwise).
            shown = flat(cli(name, "--objective", owner, "--help").stdout) if owner else text
            for note in re.findall(r"\\?\[default: [^\]]*\]", getattr(param, "help", None) or ""):
                assert flat(note.lstrip("\\")) in shown, (name, param.name, note)
                checked += 1
    assert checked > 40
