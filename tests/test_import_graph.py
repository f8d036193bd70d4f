"""The project's modules import each other without a cycle.

The graph comes from the source: every import statement of every module (at module level,
inside functions and under `if TYPE_CHECKING:` alike), resolved to the project module it
names. `plugins/` and `scripts/` are folders on the path, not packages: their files are
top-level modules (`loraflow_reports`, `loraflow_cluster`, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_core", "tasks", "bench", "dags")  # imported by their dotted names
PATH_FOLDERS = ("plugins", "scripts")  # their files are imported as top-level modules


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the project."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    for folder in PATH_FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            modules[path.stem] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import statement of `name` can refer to (absolute, dotted);
    `from a import b` yields both `a` and `a.b`, since b may be a submodule."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name loads: the longest dotted prefix that is one."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {resolve(i, modules) for i in imported_names(name, path)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_imports_inside_functions_and_type_checking_blocks():
    graph = import_graph()
    assert "tasks.registry" in graph["dags.lora_imdb_experiment"]  # module level
    assert "tasks.pipeline" in graph["tasks.cli"]  # inside a function
    assert "tasks.job" in graph["tasks.methods.lora"]


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "d"}, "b": set(), "d": {"e"}, "e": {"d"}}, ["d", "e", "d"]),
    ],
)
def test_find_cycle_names_the_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_method_modules_import_the_contract_not_the_dispatcher():
    graph = import_graph()
    methods = [m for m in graph if m.startswith("tasks.methods.")]
    assert methods and all("tasks.job" in graph[m] for m in methods)
    users = methods + ["tasks.train", "tasks.evaluate", "tasks.job"]
    assert [m for m in users if "tasks.variants" in graph[m]] == []
