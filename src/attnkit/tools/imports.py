"""Print attnkit's import graph between its layers and any import cycle between modules.

    python -m attnkit.tools.imports

The rules themselves are import-linter contracts in ``pyproject.toml`` (checked by ``tests/test_layers.py``);
this is the picture: one line per layer with the layers it imports, then the module-level cycles (none).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Set

LAYERS = ["core", "ops", "dispatch", "catalog", "cache", "nn", "integrations", "distributed", "analysis", "tools"]


def layer_edges(graph) -> Dict[str, Set[str]]:
    """``{layer: {layers it imports}}`` from grimp's module graph."""
    out: Dict[str, Set[str]] = {name: set() for name in LAYERS}
    for mod in graph.modules:
        parts = mod.split(".")
        if len(parts) < 2 or parts[1] not in out:
            continue
        for dep in graph.find_modules_directly_imported_by(mod):
            d = dep.split(".")
            if len(d) >= 2 and d[1] in out and d[1] != parts[1]:
                out[parts[1]].add(d[1])
    return out


def cycles(graph) -> List[List[str]]:
    """Import cycles between modules (each as a list of module names), by depth-first search."""
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.find_modules_directly_imported_by(m)):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph.modules):
        if m not in state:
            visit(m)
    return found


def main() -> int:
    import grimp  # installed with import-linter (the test extra)

    graph = grimp.build_graph("attnkit")
    edges = layer_edges(graph)
    for name in LAYERS:
        deps = [d for d in LAYERS if d in edges[name]]
        print(f"{name:<13} -> {', '.join(deps) if deps else '(nothing)'}")
    cyc = cycles(graph)
    print(f"module import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " -> ".join(c))
    upward = [(a, b) for a in LAYERS for b in edges[a] if LAYERS.index(b) > LAYERS.index(a)]
    for a, b in upward:
        print(f"upward import: {a} -> {b}")
    return 1 if cyc or upward else 0


if __name__ == "__main__":
    sys.exit(main())
