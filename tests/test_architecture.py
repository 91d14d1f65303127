"""The layering of docs/architecture.md, checked on the source: imports only point down,
no import cycle between modules (typing-only imports count: they are edges of the design too),
no module imports another module's private name or reads one through an imported module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("creps", "renderer", "jobs", "viewer", "training")
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "creps": set(),
    "renderer": {"creps"},
    "training": {"creps"},
    "jobs": {"creps", "renderer"},
    "viewer": {"creps", "renderer"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            mods[name] = path
    for script in ("render", "train"):
        mods[script] = ROOT / f"{script}.py"
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, names imported from it, inside a function) for each import of ours."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append((alias.name, [], nested))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                names = [a.name for a in child.names]
                # `from . import fsio` imports a module, not a name
                subs = [n for n in names if f"{target}.{n}" in MODULES]
                for n in subs:
                    out.append((f"{target}.{n}", [], nested))
                rest = [n for n in names if n not in subs]
                if rest:
                    out.append((target, rest, nested))
            visit(child, nested)

    visit(tree, False)
    return [(m, n, f) for m, n, f in out if m.split(".")[0] in (*PACKAGES, "render", "train")]


def _private_reads(name: str, path: Path) -> list[str]:
    """``alias._name`` read through a module of ours imported as ``alias`` (``from jobs import run``,
    ``import renderer.store as store``): a private name used across modules all the same."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in MODULES:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if module != name and node.attr.startswith("_") and not node.attr.startswith("__"):
                out.append(f"{module}.{node.attr}")
    return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_and_use_public_names(name: str) -> None:
    top = name.split(".")[0]
    for target, names, _ in _imports(name, MODULES[name]):
        other = target.split(".")[0]
        if top in ALLOWED and other != top:
            assert other in ALLOWED[top], f"{name} imports {target}: {top} may import only {sorted(ALLOWED[top])}"
        if other != top or target != name:
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{name} imports private names {private} from {target}"
        assert not target.rsplit(".", 1)[-1].startswith("_"), f"{name} imports the private module {target}"
    assert not _private_reads(name, MODULES[name]), f"{name} reads private names {_private_reads(name, MODULES[name])}"


def test_no_import_cycles() -> None:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target in MODULES and target != name:
                graph[name].add(target)
    # a package's __init__ re-exporting its modules is not a cycle of behaviour; drop those edges
    for name in list(graph):
        if name in PACKAGES:
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = [*stack[stack.index(m) :], m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)


def test_the_checks_see_typing_imports_and_private_reads(tmp_path: Path) -> None:
    """The checker itself: an import under TYPE_CHECKING is an edge, and a private name read
    through an imported module (``alias._name``) is reported like one imported by name."""
    src = tmp_path / "probe.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "from jobs import run as run_mod\n"
        "import renderer.store as st\n"
        "from . import plan\n"
        "if TYPE_CHECKING:\n"
        "    from .stages import LineStage\n"
        "a, b, c = run_mod._private, st._Private, plan.public\n"
    )
    assert ("jobs.stages", ["LineStage"], False) in _imports("jobs.probe", src)
    assert _private_reads("jobs.probe", src) == ["jobs.run._private", "renderer.store._Private"]
