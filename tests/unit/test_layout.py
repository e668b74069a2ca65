"""The package's shape: stage subpackages in data-flow order, no cycles, no upward imports, few floors,
tests that mirror the source, short modules, and profiles shipped inside the package."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "finetune"
# Lower layers first; a module may import its own layer or any earlier one, never a later one.
ORDER = ["errors", "faults", "system", "config", "data", "models", "train", "gates", "export", "serve", "evaluate",
         "report", "tiers", "cli"]  # fmt: skip
MAX_FLOORS = 8
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """finetune modules imported anywhere in the file (function-level imports count: they are edges too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in mods and n.startswith("finetune"):
                found.add(n)
    return found


@cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {m: imports(p, mods) - {m} for m, p in mods.items()}
    # `import finetune` only preloads BLAS; a package's __init__ is an edge to the package, not its modules
    return {
        m: {d for d in deps if d != "finetune" and mods[d].name != "__init__.py"} for m, deps in edges.items()
    }


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_known_layer():
    assert {layer(m) for m in modules() if m != "finetune"} - {"__init__"} <= set(ORDER)


def test_no_import_points_to_a_later_stage():
    upward = [(m, d) for m, deps in graph().items() for d in deps
              if layer(m) in ORDER and ORDER.index(layer(d)) > ORDER.index(layer(m))]  # fmt: skip
    assert upward == []


def test_no_cycles_and_at_most_max_floors():
    g, floor, visiting = graph(), {}, set()

    def depth(m: str) -> int:
        if m in floor:
            return floor[m]
        assert m not in visiting, f"import cycle through {m}"
        visiting.add(m)
        floor[m] = 1 + max((depth(d) for d in g[m]), default=0)
        visiting.discard(m)
        return floor[m]

    floors = {m: depth(m) for m in g}
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda kv: -kv[1])[:5]


def test_nothing_uses_the_cli_or_the_tiers_as_a_library():
    users = {
        m
        for m, deps in graph().items()
        for d in deps
        if layer(d) in ("cli", "tiers") and layer(m) not in ("cli", "tiers")
    }
    assert users == set()


def test_modules_are_short():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_tests_mirror_the_source():
    missing = []
    for path in modules().values():
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(PKG)
        expected = ROOT / "tests" / "unit" / rel.parent / f"test_{rel.name}"
        if not expected.is_file():
            missing.append(str(expected.relative_to(ROOT)))
    assert missing == []
