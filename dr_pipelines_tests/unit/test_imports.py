"""The one direction of imports (config -> core -> defs / cli): no cycle anywhere in the package, and
the domain layer never imports dagster or the sandbox. Imports inside functions count too: a lazy
import is still a dependency."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dr_pipelines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the modules (of any package) it imports, resolved to the deepest known name."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:  # `from pkg import module` names a module
                    deps.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
        graph[name] = deps
    return graph


GRAPH = _imports()


def test_there_are_modules_to_check():
    assert len(GRAPH) > 40 and "dr_pipelines.core.config" in GRAPH


def test_no_import_cycle():
    ours = {m: {d for d in deps if d in GRAPH and d != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(ours[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(ours):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "forbidden",
    ["dagster", "dagster_aws", "dagster_gcp", "dr_pipelines.sandbox", "dr_pipelines.defs", "dr_pipelines.cli"],
)
def test_core_imports_neither_dagster_nor_the_layers_above(forbidden):
    bad = sorted(
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        if m.startswith("dr_pipelines.core")
        for d in deps
        if d == forbidden or d.startswith(forbidden + ".")
    )
    assert not bad, "\n".join(bad)


def test_config_imports_nothing_of_the_domain():
    deps = {d for d in GRAPH["dr_pipelines.core.config"] if d.startswith("dr_pipelines")}
    assert deps <= {"dr_pipelines.core.errors"}, deps
