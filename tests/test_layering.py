"""The package's layers follow the flow of data and import only downward (no cycles).

Every ``import`` of a ``source_proj`` module, at the top of a file or inside a function, is an
edge (except those under ``if TYPE_CHECKING:``, which never run). Subpackages (and root modules) are ranked below; an edge may only point to the same rank
or a lower one, and the module graph has no cycle. The reasons for the order are in each
subpackage's docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "source_proj"
KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# Lowest first: what a layer may import is its own rank and below.
LAYERS = (
    ("errors", "threads"),  # the root exception, thread pinning: used everywhere
    ("kernels",),  # the random matrix, CPU and Triton
    ("distributed",),  # ranks, shares, failures: infrastructure for every pass
    ("trajectory",),  # checkpoints, learning rates, optimizer states
    ("gradients",),  # the model as a function, tasks, per-example gradients
    ("projection",),  # random projections of gradients (dense, factored)
    ("curvature",),  # segment Hessians and their matrix functions
    ("features",),  # the feature store: layout, ledger, locks
    ("retrieval",),  # top-k and bulk scores over stored features
    ("config", "attributor", "store_fit"),  # the user-facing attributor
    ("evaluation",),  # LDS, retraining, baselines
    ("curation",),  # finding, pruning and re-weighting rows
    ("cli",),  # the command line
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in KERNELS.glob("*.py"):
        name = "source_proj.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    targets = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {  # imports under ``if TYPE_CHECKING:`` are for annotations, not run-time edges
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in modules and candidate != name:
                targets.add(candidate)
    return targets


def _unit(module: str) -> str:
    return module.split(".")[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_subpackage_has_a_rank() -> None:
    units = {_unit(m) for m in _graph() if m != "source_proj"}
    assert units <= set(RANK), f"rank these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_point_only_downward() -> None:
    upward = []
    for source, targets in _graph().items():
        if source == "source_proj":  # the root re-exports lazily from every layer
            continue
        for target in targets:
            if target != "source_proj" and RANK[_unit(target)] > RANK[_unit(source)]:
                upward.append(f"{source} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_the_module_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]) if target in path else f"{node} -> {target}")
            elif target not in state:
                visit(target, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
