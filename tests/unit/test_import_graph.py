"""The package's shape, checked on the source: no import circle between moe_dist's modules, and no
module past 400 lines.

The graph has an edge A -> B for every ``import``/``from ... import`` anywhere in A's file (function-
local ones included: they are circles too, only deferred), relative imports resolved against A's
package. ``from pkg import name`` points at the submodule ``pkg.name`` when there is one, else at
``pkg``. An edge into a package's ``__init__.py`` is left out: an ``__init__`` only re-exports its own
submodules (``moe_dist.config`` re-exports ``config/sections.py`` and ``config/presets.py``), so what
matters is the edge to the submodule that defines the name; edges out of an ``__init__`` are kept.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moe_dist

PACKAGE = Path(moe_dist.__file__).parent
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(mods: dict[str, Path], here: str, node: ast.AST) -> list[str]:
    """Module names an import node names (not yet cut to one that exists)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = here.split(".") if mods[here].name == "__init__.py" else here.split(".")[:-1]
        kept = package[: len(package) - node.level + 1]
        base = ".".join(kept + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for here, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(mods, here, node):
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]   # moe_dist.config.RunConfig -> moe_dist.config
                if target in mods and target != here and mods[target].name != "__init__.py":
                    graph[here].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(_cycle_in(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle inside a strongly connected component, from its first module back to it (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_the_graph_sees_relative_and_function_local_imports():
    """The circle check would pass vacuously if the scan missed these."""
    g = import_graph()
    assert "moe_dist.parallel.world" in g["moe_dist.parallel.deepspeed.setup"]      # from ..world import
    assert "moe_dist.parallel.deepspeed.setup" in g["moe_dist.parallel.runtime"]    # inside a function
    assert "moe_dist.config.sections" in g["moe_dist.config.presets"]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles in moe_dist (a module imports one that imports it back):\n" + "\n".join(
        "  " + " -> ".join(c) for c in found) + "\nmove what both need into a lower module that neither imports back"


def test_no_module_past_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, (f"modules over {MAX_LINES} lines (one idea per file: split along a seam): "
                      + ", ".join(f"{k} ({v})" for k, v in sorted(long.items())))
