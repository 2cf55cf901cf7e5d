"""The package's layout: its modules import one another without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "mirasc"


def _module(path: Path) -> str:
    return "mirasc" if path.stem == "__init__" else f"mirasc.{path.stem}"


def _imports(path: Path) -> set[str]:
    """The mirasc modules that `path` imports, at module level or inside functions: `from mirasc
    import x` imports mirasc.x where mirasc/x.py exists (else the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mirasc"}
        elif isinstance(node, ast.ImportFrom):
            module = "mirasc" + (f".{node.module}" if node.module else "") if node.level else node.module
            if module.split(".")[0] != "mirasc":
                continue
            if module != "mirasc":
                found.add(module)
                continue
            found |= {f"mirasc.{alias.name}" if (PACKAGE / f"{alias.name}.py").exists() else "mirasc"
                      for alias in node.names}
    return found


def test_no_import_circle():
    graph = nx.DiGraph()
    for path in sorted(PACKAGE.glob("*.py")):
        graph.add_node(_module(path))
        graph.add_edges_from((_module(path), target) for target in _imports(path))
    assert ("mirasc.cli", "mirasc.catalog") in graph.edges  # imports inside functions count
    assert ("mirasc.op", "mirasc.reference") in graph.edges  # and `from mirasc import x`
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import circles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles)
