"""The shape of the package: no import circle anywhere, and the library never imports the toolkit.

The graph is built from the source (every ``import`` and ``from ... import``
statement of every module, at any depth: inside functions and under
``if TYPE_CHECKING`` too, since a circle a type checker needs is still a
circle a reader must untangle).  An edge goes to the deepest module a
statement names: ``from . import lock`` is an edge to ``shmheap.lock``, not
to the package.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shmheap

PACKAGE = Path(shmheap.__file__).parent
DESIGN = PACKAGE.parent / "docs" / "design.md"
#: The toolkit, and the entry points that start it (``python -m shmheap``).
TOOLKIT = ("shmheap.tools", "shmheap.__main__")


def module_names() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``module`` imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules or {source})
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {module: imported(module, path, modules) for module, path in modules.items()}


def is_toolkit(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLKIT)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    assert "shmheap.lock" in graph["shmheap.heap"]
    assert "shmheap.tools.cli" in graph["shmheap.__main__"]
    assert "shmheap.tools.display" in graph["shmheap.tools.cli"]
    assert "shmheap.heap" in graph["shmheap.tools.bench.common"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_toolkit() -> None:
    graph = import_graph()
    wrong = {module: sorted(t for t in targets if is_toolkit(t))
             for module, targets in graph.items() if not is_toolkit(module)}
    assert {module: targets for module, targets in wrong.items() if targets} == {}


def test_public_names_stay_where_users_import_them() -> None:
    for name in ("Heap", "destroy", "ShmHeapError", "HeapNotFoundError", "CRASH_POINTS", "NATIVE"):
        assert hasattr(shmheap, name), name
    from shmheap import pytest_plugin
    assert callable(pytest_plugin.unique_heap_name)


def documented_layers() -> dict[str, int]:
    """The library's modules in the order of docs/design.md's package map: module -> row."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {"shmheap" if name == "__init__" else f"shmheap.{name}": row
            for row, line in enumerate(rows)
            for name in re.findall(r"`(\w+)\.py`", line.split("|")[1])}


def test_the_design_documents_the_layers_the_imports_keep() -> None:
    layers = documented_layers()
    graph = import_graph()
    library = {module for module in graph if not is_toolkit(module)}
    assert library == layers.keys()
    upward = sorted(f"{module} -> {target}" for module in library for target in graph[module]
                    if layers[target] > layers[module])
    assert upward == []


#: What ``import shmheap`` must not load: a spawned worker pays for every module it imports
#: (issue 21: workers start fast), and these are loaded on first use where they are needed
#: (the checks, walks, owners and coordination, and the stdlib modules only they use).
NOT_AT_IMPORT = ("ctypes", "numpy", "secrets", "platform", "shmheap.tools", "hypothesis",
                 "rich", "matplotlib", "dataclasses", "inspect", "ast", "queue",
                 "shmheap.coord", "shmheap.owners", "shmheap.repair", "shmheap.walker")
#: What a worker that attaches a clean heap and allocates must not load either.
NOT_AT_WORK = tuple(name for name in NOT_AT_IMPORT if name != "numpy")


def loaded_by(code: str, pure: bool) -> set[str]:
    """The modules loaded in a fresh interpreter that runs ``code``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SHMHEAP_")}
    if pure:
        env["SHMHEAP_PURE_PYTHON"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    return set(proc.stdout.split())


def among(names: tuple[str, ...], loaded: set[str]) -> list[str]:
    return [name for name in names if name in loaded
            or any(m.startswith(name + ".") for m in loaded)]


@pytest.mark.parametrize("pure", [False, True], ids=["native", "pure"])
def test_import_loads_nothing_a_worker_may_not_need(pure: bool) -> None:
    assert among(NOT_AT_IMPORT, loaded_by("import shmheap", pure)) == []


@pytest.mark.parametrize("pure", [False, True], ids=["native", "pure"])
def test_a_worker_that_attaches_and_allocates_loads_no_more(pure: bool,
                                                            shm_heap_name: str) -> None:
    shmheap.Heap.create(shm_heap_name, arena_size=1 << 20, reserve=False).close()
    loaded = loaded_by(f"import shmheap\nwith shmheap.Heap.attach({shm_heap_name!r}) as h:\n"
                       "    h.free(h.alloc(64))", pure)
    allowed = ("ctypes",) if pure else ()  # (the pure core's lock calls libc through ctypes)
    assert among(tuple(n for n in NOT_AT_WORK if n not in allowed), loaded) == []
