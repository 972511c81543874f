"""The package's layout follows its data flow: every module sits on a floor, imports only
modules of its own floor or below, the import graph has no cycle, and no private name
crosses a module boundary. Parsed from the sources (every import counts, also the ones
inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "knowloc"

# floor of each top-level module or subpackage of knowloc (lower floors know nothing of higher)
FLOORS: dict[str, int] = {
    "errors": 0,
    "store": 1, "data": 1, "embedded": 1,
    "models": 2,
    "attribution": 3,
    "neurons": 4, "consistency": 4,
    "intervals": 4,
    "interventions": 5, "synapses": 5, "evaluation": 5,
    "pipeline": 6,
    "report": 7,
    "reproduce": 8, "study": 8,
    "cli": 9,
    "__main__": 10,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == "knowloc" else None
    base = _package_of(module, path).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(module: str, path: Path, *, runtime_only: bool = False
             ) -> list[tuple[str, str | None, int]]:
    """(imported knowloc module, imported name or None, line) for every import in the file
    (with ``runtime_only``, without those under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_only(tree) if runtime_only else set()
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names
                      if a.name.split(".")[0] == "knowloc"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target is None:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from . import models` imports a module
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path, runtime_only=True):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def test_every_module_has_a_floor() -> None:
    unplaced = sorted({_top(m) for m in MODULES if m != "knowloc" and _top(m) not in FLOORS})
    assert not unplaced, f"modules without a floor in tests/test_layout.py: {unplaced}"


def test_no_module_imports_a_higher_floor() -> None:
    bad = []
    for module, path in MODULES.items():
        if module == "knowloc":  # the package's lazy export table
            continue
        for target, name, line in _imports(module, path):
            if target == "knowloc" or _top(target) not in FLOORS:
                bad.append(f"{path.name}:{line} imports {target} (use the defining module)")
                continue
            if FLOORS[_top(target)] > FLOORS[_top(module)]:
                bad.append(f"{module}:{line} imports {target}{'.' + name if name else ''} "
                           f"from a higher floor")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle() -> None:
    """Every import that runs counts, also inside functions (type-only imports do not)."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module() -> None:
    bad = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module, path):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                bad.append(f"{module}:{line} imports {target}.{name}")
        # `mod._name` through an imported knowloc module
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (target := _resolve(module, path, node)):
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("knowloc") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("stage_floor", ["pipeline"])
def test_pipeline_never_draws(stage_floor: str) -> None:
    """Stages compute and store tables; figures and prose belong to the report."""
    bad = []
    for module, path in MODULES.items():
        if _top(module) != stage_floor:
            continue
        text = path.read_text()
        for word in ("matplotlib", "from ..report", "import report"):
            if word in text:
                bad.append(f"{module} mentions {word}")
    assert not bad, "\n".join(bad)


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    """The parser resolves relative imports: a private name imported from a sibling counts."""
    pkg = tmp_path / "knowloc" / "models"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("from ..attribution.engine import _secret\nfrom . import y\n")
    got = _imports("knowloc.models.x", f)
    assert ("knowloc.attribution.engine", "_secret", 1) in got
    assert ("knowloc.models", "y", 2) in got
