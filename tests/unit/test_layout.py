"""The package's shape: stage subpackages in data-flow order, no cycles, no upward imports, few floors,
tests that mirror the source and short modules. bench/ is in the same graph, one layer above the package:
it may import any finetune layer, finetune never imports it, and its own modules form no cycle either."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "finetune"
BENCH = ROOT / "bench"
# Lower layers first; a module may import its own layer or any earlier one, never a later one.
ORDER = [
    "errors",
    "faults",
    "system",
    "gates",
    "config",
    "data",
    "models",
    "train",
    "export",
    "serve",
    "evaluate",
    "report",
    "stages",
    "recipes",
    "cli",
    "bench",  # the benchmarks (bench/) stand on the whole package
]
MAX_FLOORS = 7  # import depth inside finetune/
MAX_BENCH_FLOORS = MAX_FLOORS  # import depth inside bench/, the package counted as the ground it stands on
MAX_LINES = 350  # a module of finetune/
MAX_BENCH_LINES = 400
MAX_FUNCTION_LINES = 60  # a function of finetune/ (complexity: ruff C901 at 12, pyproject.toml)


def modules() -> dict[str, Path]:
    """Every module of finetune/ and bench/ by dotted name."""
    out = {}
    for path in sorted([*PKG.rglob("*.py"), *BENCH.rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def package_modules() -> dict[str, Path]:
    return {m: p for m, p in modules().items() if m.split(".")[0] == "finetune"}


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of mods imported anywhere in the file (function-level imports count: they are edges too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in mods}
    return found


@cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {m: imports(p, mods) - {m} for m, p in mods.items()}
    # `import finetune` only preloads BLAS; a package's __init__ is an edge to the package, not its modules
    return {m: {d for d in deps if mods[d].name != "__init__.py"} for m, deps in edges.items()}


def layer(module: str) -> str:
    top, *rest = module.split(".")
    if top == "bench":
        return "bench"
    return rest[0] if rest else "__init__"


def floors(g: dict[str, set[str]]) -> dict[str, int]:
    """Each module's import depth (1 = imports none of g's modules); fails naming the cycle if there is one."""
    floor: dict[str, int] = {}
    path: list[str] = []

    def depth(m: str) -> int:
        if m in floor:
            return floor[m]
        assert m not in path, "import cycle: " + " -> ".join([*path[path.index(m) :], m])
        path.append(m)
        floor[m] = 1 + max((depth(d) for d in g[m]), default=0)
        path.pop()
        return floor[m]

    for m in g:
        depth(m)
    return floor


def test_every_module_belongs_to_a_known_layer():
    assert {layer(m) for m in modules() if m != "finetune"} - {"__init__"} <= set(ORDER)


def test_no_import_points_to_a_later_stage():
    def rank(module: str) -> int:
        return ORDER.index(layer(module))

    upward = [(m, d) for m, deps in graph().items() for d in deps if layer(m) in ORDER and rank(d) > rank(m)]
    assert upward == []


def test_the_package_never_imports_bench():
    users = {m for m, deps in graph().items() for d in deps if layer(d) == "bench" and layer(m) != "bench"}
    assert users == set()


def test_no_cycles_and_at_most_max_floors():
    g = graph()
    floor = floors(g)  # over finetune/ and bench/ together: no cycle anywhere
    package = {m: f for m, f in floor.items() if layer(m) != "bench"}
    assert max(package.values()) <= MAX_FLOORS, sorted(package.items(), key=lambda kv: -kv[1])[:5]
    # bench's floors: its own modules stacked on one another, whatever package depth they stand on
    bench = floors(
        {m: {d for d in deps if layer(d) == "bench"} for m, deps in g.items() if layer(m) == "bench"}
    )
    assert max(bench.values()) <= MAX_BENCH_FLOORS, sorted(bench.items(), key=lambda kv: -kv[1])[:5]


def test_bench_imports_itself_at_module_level():
    """bench modules import one another at the top of the file, where a reader looks for what a module stands
    on; no function-level forwarder (the graph counts those edges too, so a cycle fails either way)."""
    lazy = []
    for name, path in modules().items():
        if layer(name) != "bench":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bench":
                        lazy.append(f"{name}.{fn.name}")
    assert lazy == []


def test_nothing_uses_the_cli_or_the_recipes_as_a_library():
    users = {
        m
        for m, deps in graph().items()
        for d in deps
        if layer(d) in ("cli", "recipes") and layer(m) not in ("cli", "recipes")
    }
    assert users == set()


def test_modules_are_short():  # finetune/ and bench/
    lines = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    long = {
        m: n for m, n in lines.items() if n > (MAX_LINES if m.startswith("finetune") else MAX_BENCH_LINES)
    }
    assert long == {}


def test_functions_are_short():
    long = {}
    for m, path in package_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                long[f"{m}.{node.name}"] = n
    assert long == {}


def test_tests_mirror_the_source():
    missing = []
    for path in package_modules().values():
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(PKG)
        expected = ROOT / "tests" / "unit" / rel.parent / f"test_{rel.name}"
        if not expected.is_file():
            missing.append(str(expected.relative_to(ROOT)))
    assert missing == []
