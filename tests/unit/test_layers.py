"""The house's layers, checked from the source: imports point downward, no cycles, each default once.

Floors, top to bottom: `tasks` (the entry point the CLI and producers import) -> `worker` (the worker
process's own middleware) and `ops` (the operator's CLI) -> `health` (the health server and the dashboard,
reading shared state) and `jobs` (job logic) -> `service` (settings, logs, wiring) -> `broker` (the broker
and its transports) -> SQL. Imports inside
functions and under TYPE_CHECKING count: a cycle hidden there is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
#: Each package's floor; an import may only reach a lower floor (or its own package).
FLOORS = {"tasks": 5, "worker": 4, "ops": 4, "health": 3, "jobs": 3, "service": 2, "broker": 1}
#: The worker's internals: health reads heartbeat files and the transport's stats, never these.
WORKER_INTERNALS = (
    "broker.broker",
    "broker.consumer",
    "broker.acks",
    "broker.leases",
    "broker.messages",
    "service.wiring",
    "tasks",
    "worker",
)


def our_modules() -> dict[str, Path]:
    """Every module of our packages by dotted name."""
    modules: dict[str, Path] = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> Iterator[str]:
    """The modules of ours that `path` imports, anywhere in the file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import module` imports the module; `from module import name` the module itself.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    known = set(modules)
    return {name: set(imported_modules(path, known)) - {name} for name, path in modules.items()}


def package(module: str) -> str:
    return module.split(".")[0]


def test_imports_point_downward() -> None:
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if package(source) != package(target) and FLOORS[package(source)] <= FLOORS[package(target)]
    )

    assert upward == []


def test_health_reads_shared_state_only() -> None:
    # The health server reads heartbeat files and the transport's stats; the worker side lives elsewhere.
    graph = import_graph()
    reaching = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        if package(source) == "health"
        for target in targets
        if target.startswith(WORKER_INTERNALS)
    )
    middleware_in_health = sorted(
        f"{name}.{node.name}"
        for name, path in our_modules().items()
        if package(name) == "health"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base).rpartition(".")[2] == "Middleware" for base in node.bases)
    )

    assert reaching == []
    assert middleware_in_health == [], "Dramatiq middleware runs in the worker process: it belongs in worker/"


def test_there_are_no_import_cycles() -> None:
    # NOTE for the lead: broker.broker <-> broker.consumer is removed by the issue-7 broker rewrite; this test
    # passes once that is merged.
    graph = import_graph()
    cycles = sorted(
        " <-> ".join(sorted(component)) for component in strongly_connected(graph) if len(component) > 1
    )

    assert cycles == []


def test_each_named_constant_is_defined_in_one_module() -> None:
    # Exit codes, timeouts and other defaults are imported from where they are defined, never restated.
    defined: dict[str, list[str]] = {}
    for name, path in our_modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_"):
                    defined.setdefault(target.id, []).append(name)

    assert {constant: modules for constant, modules in defined.items() if len(modules) > 1} == {}


def test_the_settings_take_their_defaults_from_the_broker() -> None:
    # The same objects, not equal numbers written twice.
    from broker import defaults

    fields = Settings.model_fields
    assert fields["job_lease_ms"].default is defaults.DEFAULT_LEASE_MS
    assert fields["poll_interval_ms"].default is defaults.DEFAULT_POLL_INTERVAL_MS


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative enough for a graph of this size."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components
