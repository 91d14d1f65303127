"""The layering of docs/architecture.md, checked on the source: imports only point down,
no import cycle between modules (typing-only imports count: they are edges of the design too),
no module imports another module's private name or reads one through an imported module.
And the page against the source: its module list names every module once, in layer order, and
every name it mentions exists."""

from __future__ import annotations

import ast
import re
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


# ---------------------------------------------------------------- docs/architecture.md against the source
DOC = ROOT / "docs" / "architecture.md"
MODULE_LIST = "## Modules"  # the section whose items name every product module, one line each
_DOTTED = re.compile(r"(?<![\w./])((?:creps|renderer|jobs|viewer|training)(?:\.[A-Za-z_]\w*)+)")
_PATH = re.compile(r"(?<![\w./])((?:creps|renderer|jobs|viewer|training)/\w+\.py|render\.py|train\.py)\b")
_CLASS_ATTR = re.compile(r"(?<![\w.])([A-Z]\w*)((?:\.[A-Za-z_]\w*)+)")  # ImageStore.read_rows, JobSpec.identity
_ITEM = re.compile(r"^- `((?:\w+/)?\w+\.py)`")


def _spans(text: str) -> list[str]:
    """The code of a markdown text: fenced blocks, and inline spans (which may wrap a line)."""
    fenced = re.compile(r"^```\w*\n(.*?)^```", re.S | re.M)
    return fenced.findall(text) + re.findall(r"`([^`]+)`", fenced.sub("", text))


def _module_of(dotted: str) -> tuple[str, list[str]]:
    """The longest prefix of ``dotted`` that is one of our modules, and the names after it."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i]), parts[i:]
    return "", parts


def _top_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines (defs, classes, assignments, annotated fields, imports),
    looking into ``if`` / ``try`` / ``with`` blocks."""
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for block in blocks:
                out.update(_top_names(block))
    return out


def _resolve(module: str, names: list[str], seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``module.names[0].names[1]...`` exists in the source: imports of ours are followed,
    a class's names include its methods, fields and those of its bases of ours."""
    if not names:
        return True
    if module in seen:
        return False
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    node = _top_names(tree.body).get(names[0])
    if node is None:
        sub = f"{module}.{names[0]}"  # a package's submodule, imported or not
        return sub in MODULES and _resolve(sub, names[1:])
    if isinstance(node, ast.ImportFrom):
        pkg = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
        base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        alias = next(a for a in node.names if (a.asname or a.name) == names[0])
        if f"{target}.{alias.name}" in MODULES:
            return _resolve(f"{target}.{alias.name}", names[1:])
        if target in MODULES:
            return _resolve(target, [alias.name, *names[1:]], seen | {module})
        return len(names) == 1  # a name imported from elsewhere (torch, numpy): it is there
    if isinstance(node, ast.ClassDef) and len(names) > 1:
        return _class_has(module, node, names[1:])
    return len(names) == 1


def _class_has(module: str, cls: ast.ClassDef, names: list[str]) -> bool:
    body = _top_names(cls.body)
    if names[0] in body:
        inner = body[names[0]]
        if isinstance(inner, ast.ClassDef) and len(names) > 1:
            return _class_has(module, inner, names[1:])
        return len(names) == 1
    # self.<name> = ... in a method is an attribute too
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == names[0]:
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return len(names) == 1
    return any(_resolve(module, [b.id, *names]) for b in cls.bases if isinstance(b, ast.Name) and b.id != cls.name)


def _doc_module_list() -> list[str]:
    """The module names of the module list, in its order (``renderer/store.py`` -> ``renderer.store``)."""
    text = DOC.read_text()
    section = text.split(MODULE_LIST + "\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in section.splitlines():
        m = _ITEM.match(line)
        if m:
            rel = m.group(1).removesuffix(".py")
            out.append(rel.replace("/__init__", "").replace("/", "."))
    return out


def _classes() -> dict[str, list[tuple[str, ast.ClassDef]]]:
    """Each top-level class of ours by name: the modules that define it."""
    out: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, []).append((name, node))
    return out


def test_doc_names_exist() -> None:
    """Every ``module.name``, every ``OurClass.name`` and every module path in backticks in
    docs/architecture.md names something the source has (renames and removals must reach the doc)."""
    text = DOC.read_text()
    classes = _classes()
    missing = []
    for span in _spans(text):
        for cls, rest in _CLASS_ATTR.findall(span):
            names = rest.strip(".").split(".")
            if cls in classes and not any(_class_has(m, node, names) for m, node in classes[cls]):
                missing.append(cls + rest)
        for dotted in _DOTTED.findall(span):
            module, names = _module_of(dotted)
            if not module or not _resolve(module, names):
                missing.append(dotted)
        for rel in _PATH.findall(span):
            if not (ROOT / rel).is_file():
                missing.append(rel)
    assert not missing, f"docs/architecture.md names what the source lacks: {sorted(set(missing))}"


def test_doc_lists_every_module_once() -> None:
    """The module list of docs/architecture.md has one line for each product module, and no other."""
    listed = _doc_module_list()
    doubles = sorted({m for m in listed if listed.count(m) > 1})
    assert not doubles, f"listed more than once in docs/architecture.md: {doubles}"
    assert sorted(set(MODULES) - set(listed)) == [], "modules missing from docs/architecture.md's module list"
    assert sorted(set(listed) - set(MODULES)) == [], "docs/architecture.md lists modules that do not exist"


def test_doc_module_list_is_in_layer_order() -> None:
    """The module list reads bottom-up: every module comes after each module of ours it imports (a
    package's ``__init__`` re-exporting its own modules excepted), so the list is also the layering."""
    order = {m: i for i, m in enumerate(_doc_module_list())}
    late = []
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            if target == name or target not in MODULES or (name in PACKAGES and target.startswith(name + ".")):
                continue
            if name in order and target in order and order[target] > order[name]:
                late.append(f"{name} imports {target}, listed after it")
    assert not late, "docs/architecture.md's module list is out of layer order: " + "; ".join(sorted(late))
