"""The shape of the code (ours, its tests and benchmarks), checked: imports only go down (no
module imports one that imports it back), no private name is used across modules, SQL
differences between databases live in the dialect layer only, and modules stay small enough to
read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("patch_ops", "resources", "stockrx_patches")
#: How long a module (of ours, its tests or benchmarks) may grow.
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*tops: str) -> dict[str, Path]:
    return {module_name(p): p for top in tops for p in sorted((ROOT / top).rglob("*.py"))}


OURS = modules(*PACKAGES)
#: Ours with the tests and benchmarks that use it: the same rules on imports hold for all.
EVERY = {**OURS, **modules("tests", "benchmarks")}


def imported(path: Path, *, deferred: bool = True) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) of every import of our own modules in a file;
    ``deferred=False``: module-level imports only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if deferred else iter(tree.body)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            for name in names:  # `from pkg import module` imports the module
                if f"{node.module}.{name}" in EVERY:
                    found.append((f"{node.module}.{name}", [], node.lineno))
            found.append((node.module, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return [(m, n, line) for m, n, line in found
            if m.split(".")[0] in (*PACKAGES, "tests", "benchmarks")]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in EVERY.items():
        graph[name] = {m for m, _, _ in imported(path) if m in EVERY and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back() -> None:
    # Package __init__ modules are left out: importing a.b runs a/__init__ too, but an
    # __init__ that imports its submodules is not a cycle of the code's design.
    graph = {m: {d for d in deps if not EVERY[d].name == "__init__.py" or d == m}
             for m, deps in import_graph().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_patch_ops_has_no_deferred_imports_of_its_own_modules() -> None:
    """A function-level import of our own code is how a cycle hides; none in the framework."""
    late = []
    for name, path in modules("patch_ops", "resources").items():
        top = {(m, line) for m, _, line in imported(path, deferred=False)}
        late += [f"{name}:{line} imports {m}" for m, _, line in imported(path) if (m, line) not in top]
    assert late == []


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = []
    for name, path in EVERY.items():
        for mod, names, line in imported(path):
            offenders += [f"{name}:{line} from {mod} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                   for a in node.names
                   if (isinstance(node, ast.Import) and a.name in EVERY)
                   or (isinstance(node, ast.ImportFrom) and f"{node.module}.{a.name}" in EVERY)}
        offenders += [f"{name}:{node.lineno} {node.value.id}.{node.attr}"
                      for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id in aliases and node.attr.startswith("_")
                      and not node.attr.startswith("__")]
    assert offenders == []


#: What reads which database (or driver, or flavour) a connection is on.
DIALECT_PROBES = (".dialect.name", "dialect.driver", ".driver ==", "is_mariadb",
                  "get_backend_name", "drivername", "server_version_info")


@pytest.mark.parametrize("top", PACKAGES)
def test_only_the_dialect_layer_asks_which_database_it_is_on(top: str) -> None:
    found = []
    for name, path in modules(top).items():
        if name.startswith("patch_ops.dialects"):
            continue
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{name}:{n}: {text.strip()}" for probe in DIALECT_PROBES if probe in text]
    assert found == []


@pytest.mark.parametrize("top", (*PACKAGES, "tests", "benchmarks"))
def test_modules_stay_readable_in_one_sitting(top: str) -> None:
    long = {name: n for name, path in modules(top).items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
