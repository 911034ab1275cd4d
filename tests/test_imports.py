"""Package boundaries: which top-level packages import which (every import statement, those
inside functions and `TYPE_CHECKING` blocks too, read with ast: nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "server", "clients", "cli", "trainer", "protocol", "midi")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Other top-level packages `package` imports -> the files that import them."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                top = parts[1] if parts[0] == "improv" and len(parts) > 1 else parts[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


GRAPH = {p: imported_packages(p) for p in PACKAGES}


def test_engine_imports_none_of_the_others():
    assert not GRAPH["engine"], GRAPH["engine"]


def test_protocol_and_midi_are_neutral():
    """Both sides use them; they use neither side (nor torch's engine)."""
    for p in ("protocol", "midi"):
        assert not GRAPH[p], (p, GRAPH[p])


def test_server_and_clients_never_import_each_other():
    assert "clients" not in GRAPH["server"], GRAPH["server"]["clients"]
    assert "server" not in GRAPH["clients"], GRAPH["clients"]["server"]


def test_no_import_cycle_between_packages():
    def visit(p: str, path: list[str]) -> None:
        for q in GRAPH[p]:
            assert q not in path, f"import cycle: {' -> '.join([*path, q])}"
            visit(q, [*path, q])

    for p in PACKAGES:
        visit(p, [p])
