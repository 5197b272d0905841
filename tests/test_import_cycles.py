"""The ``training`` package imports in one direction: no module reaches itself again through its imports,
counting imports inside functions (which hide a cycle until someone moves them to the top)."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[1] / "training"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "training":
                names.update(f"training.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("training.")}


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
        module, path = stack.pop()
        for nxt in sorted(graph.get(module, ())):
            if nxt == start:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_training_modules_have_no_import_cycles():
    graph = {f"training.{p.stem}": _imports(p) for p in TRAINING.glob("*.py") if p.stem != "__init__"}
    cycles = [cycle for module in sorted(graph) if (cycle := _cycle_from(module, graph))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
