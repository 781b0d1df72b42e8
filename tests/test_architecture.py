"""The package's shape: no import cycle anywhere, and the math imports nothing but NumPy.

Imports are read from the source with `ast`, those inside functions included (a lazy import is
still a dependency), so a cycle hidden behind a function-level import fails here too, and so does
one through `importlib.import_module("gpt2np.x")`, which no import statement shows.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2np"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The gpt2np modules that module `name` imports, at any depth of its code."""
    path = MODULES[name]
    return imports_in(path.read_text(), name, is_package=path.name == "__init__.py", known=MODULES.keys())


def imports_in(source: str, name: str, *, is_package: bool, known) -> set[str]:
    """The modules of `known` that the code `source` of module `name` imports: its import statements,
    and the modules it loads by name through `importlib.import_module` (see `dynamic_imports`)."""
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(source, name)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            named = {f"{base}.{alias.name}" for alias in node.names} & known  # `from . import engine`
            found |= named if named and not node.module else {base} | named
    found |= dynamic_imports(tree, package, known)
    return {m for m in found if m in known and m != name}


def dynamic_imports(tree: ast.AST, package: str, known) -> set[str]:
    """What a module imports by name: in a module that calls `import_module` (or `__import__`), every
    string that names a module counts, whether it is the call's argument or sits in a table the call
    reads (gpt2np.cli's `MODULE_COMMANDS`); a relative name (`import_module(".batch", "gpt2np")`)
    counts as the module it resolves to. A loop through such a call is a loop like any other."""
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")
    ]
    if not calls:
        return set()
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    found = strings & known
    for call in calls:
        first = call.args[0] if call.args else None
        anchor = (
            call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "package"), None)
        )
        if isinstance(first, ast.Constant) and str(first.value).startswith("."):
            base = anchor.value if isinstance(anchor, ast.Constant) else package
            found.add(importlib.util.resolve_name(first.value, base))
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_modules_loaded_by_name():
    """gpt2np.cli loads `serve`, `eval` and `batch` through import_module, from a table of names."""
    assert {"gpt2np.server", "gpt2np.evaluate", "gpt2np.batch"} <= GRAPH["gpt2np.cli"]


@pytest.mark.parametrize(
    "loader",
    [
        'COMMANDS = {"batch": "gpt2np.batch"}\n\ndef run(c):\n    return importlib.import_module(COMMANDS[c])\n',
        'def run():\n    return importlib.import_module(".batch", package="gpt2np")\n',
        'from importlib import import_module\n\ndef run():\n    return import_module(".batch", "gpt2np")\n',
    ],
)
def test_a_loop_through_import_module_is_a_cycle(loader):
    """The loop cli.py and batch.py once made: cli loaded batch by name, batch imported cli's flags."""
    known = {"gpt2np", "gpt2np.cli", "gpt2np.batch"}
    graph = {
        "gpt2np": set(),
        "gpt2np.cli": imports_in("import importlib\n" + loader, "gpt2np.cli", is_package=False, known=known),
        "gpt2np.batch": imports_in(
            "def parser():\n    from .cli import add_hub_arguments\n", "gpt2np.batch", is_package=False, known=known
        ),
    }
    assert find_cycle(graph) == ["gpt2np.batch", "gpt2np.cli", "gpt2np.batch"]


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("name", ["gpt2np.model", "gpt2np.reference"])
def test_the_math_imports_only_numpy_and_the_standard_library(name):
    tree = ast.parse(MODULES[name].read_text())
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            top.add("gpt2np")
    allowed = {"numpy", "__future__"} | set(sys.stdlib_module_names)
    if name == "gpt2np.reference":
        allowed |= {"regex", "gpt2np"}  # the split pattern and the byte alphabet, from gpt2np.tokenizer
        assert GRAPH[name] <= {"gpt2np.tokenizer"}, GRAPH[name]
    assert top <= allowed, f"{name} imports {sorted(top - allowed)}"


def test_only_the_engine_runs_the_trunk():
    """`gpt2()` (the transformer trunk) is called from gpt2np.engine alone (and the textbook twin's own)."""
    callers = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "gpt2" and name != "gpt2np.reference":
                callers.add(name)
    assert callers == {"gpt2np.engine"}


def test_model_py_is_the_formulas_with_no_execution_detail():
    """model.py imports NumPy (and math) only, and no function of it takes a pool, threads or a
    runner: how a pass is split over threads is gpt2np.runner's business."""
    tree = ast.parse(MODULES["gpt2np.model"].read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or ".")
    assert imported <= {"numpy", "math", "__future__"}, imported
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            names = [a.arg for a in node.args.args + node.args.kwonlyargs]
            assert not {"pool", "threads", "executor", "runner"} & set(names), (node.name, names)


LIBRARY = ("api", "engine", "model", "runner", "sampling", "scoring", "tokenizer", "generation", "checkpoint", "config")
COMMANDS = ("evaluate", "server", "httpd", "routes", "completions", "modelcard", "scheduler", "cli", "batch", "console")


def test_no_library_module_imports_a_command_level_one():
    """The library (the model, its engine, scoring, the tokenizer and the public class) sits below the
    commands (evaluation, the server's rooms, the command line, batch jobs): no arrow points up."""
    for name in LIBRARY:
        module = f"gpt2np.{name}"
        upward = {m for m in GRAPH[module] if m.split(".")[1] in COMMANDS}
        assert not upward, f"{module} imports {sorted(upward)}"
