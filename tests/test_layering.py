"""Imports point down only: capture/ is the ground, no package cycle, no floor imports a higher one.

Every module under graphrt/ is parsed (imports at module level and inside functions alike), and
each import between graphrt modules becomes an edge between nodes: a package (``capture``,
``replay``, ...) or a top-level module (``attention``, ``kv``). ``graphrt/__init__.py`` is the
facade on top: nothing below it may import it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "graphrt"
FACADE = "graphrt"

# lowest first; a node may import its own floor and the floors below it, never one above
FLOORS = [
    {"errors", "_version", "tolerance", "noise", "kv", "offload", "threads"},   # leaves used by all
    {"capture"},                                                     # the ground of the graph runtime
    {"kernels", "attention", "parallel", "quant"},
    {"replay"},
    {"models", "llm"},
    {"pipeline"},
    {"bench", "serve", "generate", "check"},                         # command lines and servers
]
# what nothing under capture/ may import
ABOVE_CAPTURE = {"replay", "pipeline", "models", "llm", "bench", "attention", "serve", "kernels", "quant", FACADE}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _node(module: str) -> str:
    """``graphrt.capture.undo`` -> ``capture``; ``graphrt.attention`` -> ``attention``; ``graphrt`` -> facade."""
    parts = module.split(".")
    return FACADE if len(parts) == 1 else parts[1]


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imports() -> list[tuple[str, int, str, str]]:
    """(importing file, line, importing module, imported graphrt module) for every import in graphrt/."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _module_name(path)
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # ``from graphrt import attention`` imports the module graphrt.attention, not the facade
                targets = [f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base for a in node.names]
            else:
                continue
            for t in targets:
                if t == FACADE or t.startswith(FACADE + "."):
                    out.append((str(path.relative_to(ROOT.parent)), node.lineno, me, t))
    return out


def _edges():
    """(from node, to node) -> the first import that makes the edge, for messages."""
    edges: dict[tuple[str, str], tuple[str, int, str]] = {}
    for file, line, me, target in imports():
        a, b = _node(me), _node(target)
        if a != b:
            edges.setdefault((a, b), (file, line, target))
    return edges


def _where(site) -> str:
    file, line, target = site
    return f"{file}:{line} imports {target}"


def test_capture_imports_nothing_above_it():
    bad = sorted({f"{file}:{line} imports {target}" for file, line, me, target in imports()
                  if _node(me) == "capture" and _node(target) in ABOVE_CAPTURE})
    assert not bad, "capture/ is the ground floor and must not import the layers above it:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    edges = _edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        if FACADE not in (a, b):
            graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(n, stack):
        state[n] = "open"
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                loop = stack[stack.index(m):] + [m]
                cycles.append(" -> ".join(loop) + ":\n    " + "\n    ".join(
                    _where(edges[(x, y)]) for x, y in zip(loop, loop[1:])))
            elif m not in state:
                visit(m, stack + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles between graphrt packages:\n" + "\n".join(cycles)


def test_floors_import_down_only():
    floor = {n: i for i, nodes in enumerate(FLOORS) for n in nodes}
    edges = _edges()
    unknown = sorted({n for e in edges for n in e if n != FACADE and n not in floor})
    assert not unknown, f"give these graphrt modules a floor in tests/test_layering.py FLOORS: {unknown}"
    bad = []
    for (a, b), site in sorted(edges.items()):
        if b == FACADE:
            bad.append(f"{_where(site)}: the facade graphrt/__init__.py is above every floor; import the module")
        elif a != FACADE and floor[b] > floor[a]:
            bad.append(f"{_where(site)}: {a} (floor {floor[a]}) imports {b} (floor {floor[b]}), a higher floor")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_the_graph_is_read_from_the_sources():
    """The walk sees imports inside functions too (so a test above can fail on them)."""
    found = {(me, t) for _, _, me, t in imports()}
    assert ("graphrt", "graphrt.errors") in found
    assert any(me.startswith("graphrt.bench") and t.startswith("graphrt.capture") for me, t in found)
