"""The shape of the code: folders by concern, imports only downward, no circles, no reaching into
another package's private names, small modules, package __init__ files that only hand names on.

Reads the source (ast), imports nothing: it runs in a blink and fails with the offending edge.
Every import is an edge, those under `if TYPE_CHECKING:` and inside functions too: a dependency
hidden from the interpreter is still one a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "harness"

# Each concern's floor: a module may import its own package and packages on lower floors only.
FLOORS = {
    "harness.errors": 0,
    "harness.config": 1,
    "harness.runtime": 2,
    "harness.assets": 3,
    "harness.observe": 3,
    "harness.data": 4,
    "harness.model": 4,
    "harness.numerics": 5,
    "harness.parallel": 6,
    "harness.checkpoint": 7,
    "harness.estimate": 7,
    "harness.train": 8,
    "harness.cli": 9,
    "harness": 10,
}
MAX_LINES = 400
"""A module longer than this says why at its top ("Longer than 400 lines because ...")."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _concern(module: str) -> str:
    """The FLOORS entry a module belongs to (its longest matching prefix)."""
    return max((c for c in FLOORS if module == c or module.startswith(c + ".")), key=len)


def _resolve(target: str) -> str:
    """A dotted name from an import, as the module file it loads (a package's __init__ otherwise)."""
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every harness import, lazy ones included."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:  # `from harness.runtime import dist`
                    found.append((submodule, [], node.lineno))
                else:
                    found.append((_resolve(node.module), [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "harness":
                    found.append((_resolve(alias.name), [], node.lineno))
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_floor():
    assert all(_concern(m) for m in MODULES)
    top_level = sorted(m for m in MODULES if m.count(".") == 1 and not MODULES[m].name == "__init__.py")
    assert top_level == ["harness.__main__", "harness.assets", "harness.errors"], top_level


def test_imports_go_down_the_floors():
    upward = []
    for module, imports in GRAPH.items():
        mine = _concern(module)
        for target, _, line in imports:
            theirs = _concern(target)
            if theirs != mine and FLOORS[theirs] >= FLOORS[mine]:
                upward.append(f"{module}:{line} imports {target} ({mine} floor {FLOORS[mine]} -> {theirs} "
                              f"floor {FLOORS[theirs]})")
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    edges = {m: sorted({t for t, _, _ in imports if t != m}) for m, imports in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module)


def test_no_module_imports_another_packages_private_names():
    reaching = []
    for module, imports in GRAPH.items():
        for target, names, line in imports:
            if _concern(target) == _concern(module):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                reaching.append(f"{module}:{line} takes {', '.join(private) or target} from {target}")
    assert not reaching, "\n".join(reaching)


def test_long_modules_say_why():
    unexplained = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES and "Longer than 400 lines because" not in text[:3000]:
            unexplained.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not unexplained, "\n".join(unexplained)


def test_package_inits_only_hand_names_on():
    allowed = (ast.Import, ast.ImportFrom)
    doing_work = []
    for path in MODULES.values():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, allowed) or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                continue
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                continue  # __all__, __version__, a table of lazily handed-on names
            if isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__"):
                continue  # handing names on lazily (no torch import until one is used)
            doing_work.append(f"{path.relative_to(ROOT)}:{node.lineno} {type(node).__name__}")
    assert not doing_work, "\n".join(doing_work)


TORCH_FREE = ("harness", "harness.runtime.process", "harness.parallel", "harness.parallel.preflight")
"""Besides harness.config: what `harness train --check` imports on its way."""


def test_the_config_package_imports_no_torch():
    """Launch scripts check a config before any rank starts: that must not pay a torch import."""
    heavy = []
    for module, path in MODULES.items():
        if _concern(module) != "harness.config" and module not in TORCH_FREE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            heavy += [f"{module} imports {n}" for n in names if n.split(".")[0] in ("torch", "transformers", "deepspeed")]
    assert not heavy, "\n".join(heavy)
