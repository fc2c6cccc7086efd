"""The walls of docs/architecture.md, checked by walking every import of the package.

Each room is a subpackage of `agentgw` or one of its top-level modules; an import inside a function
or under `TYPE_CHECKING` counts as much as one at the top, since it is the same dependency.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
from collections import defaultdict
from pathlib import Path

import pytest

import agentgw

PACKAGE = Path(agentgw.__file__).parent
CORE = {"call", "errors", "pipeline"}
# room -> the only rooms it may import
ONLY = {**{core: CORE for core in CORE}, "records": CORE}
# room -> rooms it must never import
WALLS = {
    "storage": {"filters", "ingress", "upstream", "oauth", "admin", "app", "cli", "identity", "settings"},
    "upstream": {"filters", "ingress", "storage", "admin", "app", "cli", "identity", "settings"},
    "filters": {"ingress", "upstream", "admin", "app", "cli", "identity", "settings"},
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "agentgw":
        return None
    return parts[1] if len(parts) > 1 else "agentgw"


def _imports() -> dict[str, dict[str, set[str]]]:
    """room -> imported room -> the modules of `room` that import it."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        source = _room(module)
        assert source is not None
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                names = [importlib.util.resolve_name("." * node.level + (node.module or ""), package)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                target = _room(name)
                if target is not None and target != source:
                    found[source][target].add(module)
    return found


IMPORTS = _imports()


def test_the_walk_sees_the_rooms() -> None:
    # A walk that found nothing would pass every wall below.
    assert {"filters", "storage", "upstream", "ingress", "app"} <= set(IMPORTS)
    assert "pipeline" in IMPORTS["app"]


@pytest.mark.parametrize("room", sorted(WALLS | ONLY))
def test_no_import_crosses_a_wall(room: str) -> None:
    crossing = {
        target: sorted(modules)
        for target, modules in IMPORTS.get(room, {}).items()
        if target in WALLS.get(room, ()) or (room in ONLY and target not in ONLY[room])
    }
    assert not crossing, f"{room} imports what lies above or beside it: {crossing}"


def test_rooms_import_each_other_in_no_circle() -> None:
    graph = {room: set(targets) for room, targets in IMPORTS.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(room: str, path: list[str]) -> None:
        state[room] = 1
        for target in sorted(graph.get(room, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[room] = 2

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])
    lines = [
        " -> ".join(cycle)
        + ": "
        + "; ".join(f"{a}->{b} in {sorted(IMPORTS[a][b])}" for a, b in itertools.pairwise(cycle))
        for cycle in cycles
    ]
    assert not cycles, "rooms import each other in a circle:\n" + "\n".join(lines)
