"""The floors of docs/DESIGN.md, read from every module's imports: core imports nothing above it; compress,
exporters and devices import core (devices also the exporters' declared entry points) and not each other;
vcompress sits on top. And no two modules import each other at load time, directly or around a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "vcompress.core", "compress": "vcompress.compress", "exporters": "vcompress.exporters", "devices": "vcompress.devices"}
FACE = "vcompress"  # the top floor: vcompress/ (cli, commands, pipeline...), installed as the namespace root
ALLOWED = {  # floor -> the floors it may import besides its own
    "core": set(),
    "compress": {"core"},
    "exporters": {"core"},
    "devices": {"core"},
    FACE: {"core", "compress", "exporters", "devices"},
}
# What a floor may import from a floor it otherwise may not: the package itself, never its private modules.
# devices/bench.py opens an HF folder through the exporters' open_runner (torch Runner), in a torch process.
ENTRY_POINTS = {"devices": {"vcompress.exporters"}}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed namespace."""
    found = {}
    for folder, package in {**FOLDERS, "vcompress": FACE}.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


MODULES = module_files()


def floor_of(module: str) -> str | None:
    """core/compress/exporters/devices, FACE for the rest of vcompress, None for the bare namespace root
    (vcompress/__init__.py: the version, imported by every vcompress.x import) and third-party modules."""
    if module == FACE:
        return None
    for floor, package in FOLDERS.items():
        if module == package or module.startswith(package + "."):
            return floor
    return FACE if module.startswith(FACE + ".") else None


def load_time_nodes(node: ast.AST):
    """The nodes that run when a module loads: all but the bodies of functions (classes' bodies do run)."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from load_time_nodes(child)


def imports(module: str, top_level_only: bool) -> set[str]:
    """The vcompress modules `module` imports: every import statement, or those run when it loads."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = list(load_time_nodes(tree)) if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES}


def test_the_scan_sees_every_floor_and_resolves_relative_imports():
    assert {floor_of(m) for m in MODULES} >= {"core", "compress", "exporters", "devices", FACE}
    assert "vcompress.core.errors" in imports("vcompress.core.registry", top_level_only=True)
    assert "vcompress.exporters.base" in imports("vcompress.exporters.onnx", top_level_only=True)
    assert "vcompress.exporters._onnx_quant" in imports("vcompress.exporters.tensorrt", top_level_only=True)


def floor_breaches(module: str) -> list[str]:
    floor = floor_of(module)
    breaches = []
    for target in sorted(imports(module, top_level_only=False)):
        other = floor_of(target)
        if other in (None, floor) or other in ALLOWED[floor] or target in ENTRY_POINTS.get(floor, set()):
            continue
        breaches.append(f"{MODULES[module].relative_to(ROOT)} ({floor}) imports {target} ({other})")
    return breaches


@pytest.mark.parametrize("floor", ["core", "compress", "exporters", "devices"])
def test_each_floor_imports_only_the_floors_below_it(floor):
    breaches = [b for m in MODULES if floor_of(m) == floor for b in floor_breaches(m)]
    assert not breaches, "a floor imports only core below it (docs/DESIGN.md):\n" + "\n".join(breaches)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself), sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_the_cycle_finder_finds_loops_and_only_loops():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]


@pytest.mark.parametrize("top_level_only", [True, False], ids=["at-load-time", "anywhere"])
def test_no_import_cycles_among_the_modules(top_level_only):
    """At load time a cycle breaks an import; one closed by an import inside a function only defers it, and
    still means two modules that cannot be read (or moved) apart."""
    graph = {m: imports(m, top_level_only) - {m} for m in MODULES}
    found = cycles(graph)
    assert not found, "modules that import each other at load time:\n" + "\n".join(" <-> ".join(g) for g in found)
