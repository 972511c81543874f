"""The package's import graph: floors (a module imports only modules of lower floors), no
cycle, no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import knowloc

SRC = Path(knowloc.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, imported name)] for every knowloc import (any depth)."""
    graph: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out: list[tuple[str, str]] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "knowloc":
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        is_module = (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists() \
                            or (SRC.parent / sub.replace(".", "/") / "__init__.py").exists()
                        out.append((sub, "") if is_module else (target, alias.name))
            elif isinstance(node, ast.Import):
                out += [(a.name, "") for a in node.names if a.name.split(".")[0] == "knowloc"]
        graph[mod] = out
    return graph


def _floor(mod: str) -> int | None:
    for prefix, floor in (("knowloc.cli", 4), ("knowloc.reproduce", 3), ("knowloc.report", 2),
                          ("knowloc.pipeline", 1)):
        if mod == prefix or mod.startswith(prefix + "."):
            return floor
    return None


def test_stages_import_only_lower_floors():
    bad = []
    for mod, deps in _imports().items():
        floor = _floor(mod) or 0
        for dep, _ in deps:
            dep_floor = _floor(dep) or 0
            if dep_floor > floor:
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad
    assert {m for m in _imports() if m.startswith("knowloc.pipeline.")} >= {
        "knowloc.pipeline.units", "knowloc.pipeline.run", "knowloc.pipeline.localize",
        "knowloc.pipeline.consistency", "knowloc.pipeline.modify", "knowloc.pipeline.mapping",
        "knowloc.pipeline.attention"}


def test_no_private_name_crosses_a_module_line():
    bad = [f"{mod} imports {dep}.{name}" for mod, deps in _imports().items()
           for dep, name in deps if name.startswith("_") or dep.rpartition(".")[2].startswith("_")
           and dep != mod]
    assert not bad, bad


def test_the_import_graph_has_no_cycle():
    graph = {m: {d for d, _ in deps if d in _imports() and d != m}
             for m, deps in _imports().items()}
    # a package imports its own modules through __init__; that is not a cycle
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, " -> ".join(cycle)
