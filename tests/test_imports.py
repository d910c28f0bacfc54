"""The package's import graph: no cycles, no edge from an earlier stage to a later one (docs/design.md §11).

Every import counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "layercard"

# Stage order. A module may import modules of its own unit or of an earlier unit only.
ORDER = [
    "errors",
    "progress",
    "artifacts",
    "plotting",
    "models",
    "tasks",
    "config",
    "adapters",
    "inference",  # generation, eval loss and the eval mode, which the cost model's timing uses too
    "cost",
    "card",
    "plan",
    "export",
    "train",
    "integrations",
    "trim",
    "evaluate",
    "run_layout",
    "report",
    "pipeline",
    "api",
    "cli",
    "__main__",  # `layercard` and `python -m layercard`: the command line, for launchers too
]
RANK = {name: i for i, name in enumerate(ORDER)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return _imports_in(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_in(text: str, here: str, *, is_package: bool = False) -> set[str]:
    """layercard modules imported anywhere in the source (relative imports resolved)."""
    tree = ast.parse(text)
    package = here if is_package else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("layercard")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod == "layercard":  # `from layercard import x`: x may be a submodule
                out |= {f"layercard.{a.name}" for a in node.names}
            elif mod.startswith("layercard"):
                out.add(mod)
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    return {_module_name(f): _imports(f) for f in files}


def test_every_unit_has_a_place_in_the_order():
    units = {_unit(m) for m in _graph()} - {""}
    assert units <= set(RANK), f"modules outside the stage order: {sorted(units - set(RANK))}"


def _backward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        src = _unit(mod)
        for dep in deps:
            dst = _unit(dep)
            if src in RANK and dst in RANK and RANK[dst] > RANK[src]:
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def test_no_backward_edges():
    bad = _backward(_graph())
    assert not bad, "imports from an earlier stage to a later one:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    names = set(graph)

    def resolve(dep: str) -> str | None:
        while dep and dep not in names:  # `from pkg.mod import name` where name is not a module
            dep = dep.rpartition(".")[0]
        return dep or None

    edges = {m: {d for d in map(resolve, deps) if d and d != m} for m, deps in graph.items()}
    # A package's __init__ re-exports its modules; that edge is not a dependency of theirs.
    edges = {m: {d for d in ds if not (m.startswith(d + ".") and d in names)} for m, ds in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checker_sees_lazy_and_relative_backward_edges():
    """A function-level or relative import of a later stage is caught like a top-level one."""
    lazy = "def f():\n    from layercard.report import build_report\n"
    relative = "from ..pipeline import run_pipeline\n"
    graph = {
        "layercard.card.artifact": _imports_in(lazy, "layercard.card.artifact"),
        "layercard.plan.make": _imports_in(relative, "layercard.plan.make"),
    }
    assert _backward(graph) == [
        "layercard.card.artifact -> layercard.report",
        "layercard.plan.make -> layercard.pipeline",
    ]
