"""The import graph of the lower floors: models < attribution < neurons < interventions,
synapses, evaluation; no cycle, no import of a higher floor, no private name across
modules."""

from __future__ import annotations

import ast
from pathlib import Path

import knowloc

SRC = Path(knowloc.__file__).resolve().parent

# floor of each lower module (dotted name below knowloc); higher floors are not listed
FLOORS = {
    "errors": 0, "data": 0, "embedded": 0, "store": 0,
    "models": 1, "attribution": 2, "neurons": 3,
    "interventions": 4, "synapses": 4, "evaluation": 4,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _floor(name: str) -> int | None:
    return FLOORS.get(name.split(".")[0]) if name else None


def _lower_modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        if name and _floor(name) is not None:
            out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported knowloc module, imported names) of every runtime import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x
                found.extend((f"{target}.{n}".strip("."), []) for n in names)
            else:
                found.append((target, names))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("knowloc"):
            found.append((node.module.removeprefix("knowloc").strip("."),
                          [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_lower_floors_import_no_higher_floor_and_no_private_name():
    modules = _lower_modules()
    assert {"models.forward", "models.compat", "attribution.engine", "synapses",
            "interventions.attention"} <= set(modules)
    problems = []
    for name, path in modules.items():
        for target, names in _imports(name, path):
            floor = _floor(target)
            if floor is None:
                problems.append(f"{name} imports {target or 'knowloc'} (a higher floor)")
            elif floor > _floor(name):
                problems.append(f"{name} imports {target} (floor {floor} > {_floor(name)})")
            private = [n for n in names if n.startswith("_")]
            if private and target != name:
                problems.append(f"{name} imports private {private} from {target}")
    assert not problems, "\n".join(problems)


def test_lower_floors_have_no_import_cycle():
    modules = _lower_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _imports(name, path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules and cand != name:
                    graph[name].add(cand)
                    break
    state: dict[str, int] = {}

    def cycle_from(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*stack, node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = cycle_from(start, [])
            assert found is None, " -> ".join(found)
