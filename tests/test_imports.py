"""The package's import graph, read from the source with `ast`: no module of bagel_ray imports
itself back through others, each floor imports only the floors below it (docs/ARCHITECTURE.md),
model/ and engine/ never import Ray, and the ingress never imports torch.

Every import statement counts: at the top of a module, inside `if`/`try` blocks and inside
functions (a deferred import closes a circle as surely as a top-level one, only later). Imports
under `if TYPE_CHECKING:` do not run and do not count."""

from __future__ import annotations

import ast
from functools import cache

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "bagel_ray"
# Leaf modules any floor may use: helpers (atomic writes, PNG encoding) and the two torch-free
# tables every floor reads (docs/ARCHITECTURE.md: where to change a knob / a modality).
HELPERS = {"bagel_ray.atomic", "bagel_ray.png", "bagel_ray.knobs", "bagel_ray.routes"}
# A floor and the floors it may import (besides itself and the helpers).
FLOORS = {
    "bagel_ray.model": set(),
    "bagel_ray.engine": {"bagel_ray.model"},
    "bagel_ray.transport": {"bagel_ray.engine", "bagel_ray.model"},
}
INGRESS = "bagel_ray.serve.driver"


@cache
def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imported_names(tree: ast.Module) -> set[str]:
    """Every module name an import statement of `tree` names (for `from a import b`: `a.b`,
    which is a module or else a name in `a`), skipping `if TYPE_CHECKING:` blocks."""
    names: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return names


@cache
def graph() -> dict[str, frozenset[str]]:
    """Each bagel_ray module -> the bagel_ray modules it imports."""
    mods = modules()
    edges = {}
    for name, tree in mods.items():
        targets = set()
        for imported in imported_names(tree):
            if imported.split(".")[0] != "bagel_ray":
                continue
            while imported not in mods:  # `from a import b` where b is not a module: the module a
                imported = imported.rpartition(".")[0]
            if imported != name:
                targets.add(imported)
        edges[name] = frozenset(targets)
    return edges


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The import circles: each strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def floor_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def closure(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph()[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_a_circle_when_there_is_one():
    edges = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": frozenset({"b"}), "b": frozenset()}) == []
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\ndef f():\n    from a.b import c\n")
    assert imported_names(tree) == {"os", "y", "a.b", "a.b.c"}


def test_no_import_circles():
    edges = graph()
    assert len(edges) > 50 and "bagel_ray.model.loader" in edges["bagel_ray.engine.pipeline"]
    assert cycles(edges) == []


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_each_floor_imports_only_the_floors_below(floor):
    allowed = FLOORS[floor] | {floor}
    wrong = {(m, t) for m, targets in graph().items() if floor_of(m) == floor for t in targets
             if t not in HELPERS and floor_of(t) not in allowed}
    assert not wrong


def test_the_leaf_modules_import_nothing_of_the_package():
    """What every floor may import must itself import no floor (only other leaves), or the
    floors' rules leak."""
    assert {m: graph()[m] - HELPERS for m in HELPERS if graph()[m] - HELPERS} == {}


@pytest.mark.parametrize("floor", ["bagel_ray.model", "bagel_ray.engine"])
def test_model_and_engine_never_import_ray(floor):
    importing = {m for m, tree in modules().items() if floor_of(m) == floor
                 and any(name == "ray" or name.startswith("ray.") for name in imported_names(tree))}
    assert not importing


def test_the_ingress_never_imports_torch():
    assert INGRESS in modules()
    reaching = sorted(m for m in closure(INGRESS)
                      if any(name == "torch" or name.startswith("torch.") for name in imported_names(modules()[m])))
    assert not reaching
