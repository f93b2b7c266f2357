"""The import rules of DESIGN.md, read from the code: what a module may import.

Every ``import`` statement of the project's packages counts, wherever it stands (module top, a
function body, an ``if TYPE_CHECKING:`` block): a lazy import is still a dependency. The
packages stand on floors, and an import runs only down, never sideways or up:

    floor 8  strata
    floor 7  bench
    floor 6  cluster
    floor 5  prefill_worker, decode_worker   (the workers never import each other)
    floor 4  worker                          (what both workers share)
    floor 3  engine, router                  (they never import each other)
    floor 2  kvtransfer
    floor 1  kvstore                         (bytes and layouts, never models)
    floor 0  proto, textproc

A module may import modules of its own package and of lower floors. Besides the floors: no
import cycle among the project's modules, and the router's process loads neither ``engine`` nor
torch (checked by importing ``router.servicer`` in a fresh interpreter), and no module is over
500 lines (STYLE.md). A failure names the file, the line and the import, so the fix starts
there.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS: dict[str, int] = {
    "proto": 0, "textproc": 0,
    "kvstore": 1,
    "kvtransfer": 2,
    "engine": 3, "router": 3,
    "worker": 4,
    "prefill_worker": 5, "decode_worker": 5,
    "cluster": 6,
    "bench": 7,
    "strata": 8,
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported project module, dotted (the longest name that is a module)
    where: str  # "path:line"


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return name.removesuffix(".__init__")


@cache
def project_modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file, for every ``.py`` of the project's packages."""
    modules: dict[str, str] = {}
    for package in FLOORS:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    modules[_module_name(path)] = path
    return modules


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``None``: not the project's)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, modules: dict[str, str]) -> list[Import]:
    """Every project module ``module`` imports, anywhere in its file."""
    path = modules[module]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from a import b``: b may be a module of a, or a name defined in a
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                rel = os.path.relpath(path, ROOT)
                found.append(Import(module, target, f"{rel}:{node.lineno}"))
    return found


@cache
def import_graph(root: str = ROOT) -> tuple[Import, ...]:
    modules = project_modules(root)
    return tuple(imp for m in sorted(modules) for imp in imports_of(m, modules))


def _package(module: str) -> str:
    return module.split(".")[0]


def floor_violations(graph: tuple[Import, ...]) -> list[str]:
    out = []
    for imp in graph:
        src, dst = _package(imp.source), _package(imp.target)
        if src != dst and FLOORS[dst] >= FLOORS[src]:
            way = "sideways" if FLOORS[dst] == FLOORS[src] else "up"
            out.append(
                f"{imp.where}: {imp.source} (floor {FLOORS[src]}) imports {imp.target} "
                f"(floor {FLOORS[dst]}): runs {way}"
            )
    return out


def cycles(graph: tuple[Import, ...]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    edges: dict[str, set[str]] = {}
    for imp in graph:
        edges.setdefault(imp.source, set()).add(imp.target)
        edges.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _imports_between(graph: tuple[Import, ...], src: str, dst: str) -> list[str]:
    return [
        f"{imp.where}: {imp.source} imports {imp.target}"
        for imp in graph
        if _package(imp.source) == src and _package(imp.target) == dst
    ]


# ---------------------------------------------------------------------------------- the rules
def test_every_package_has_a_floor() -> None:
    tops = {
        d for d in os.listdir(ROOT)
        if os.path.isfile(os.path.join(ROOT, d, "__init__.py")) and d != "tests"
    }
    assert tops <= set(FLOORS), f"packages without a floor: {sorted(tops - set(FLOORS))}"


def test_the_graph_is_read() -> None:
    """The reader sees imports at all (a reader that finds none would pass every rule)."""
    graph = import_graph()
    pairs = {(_package(i.source), _package(i.target)) for i in graph}
    assert ("engine", "kvstore") in pairs and ("router", "proto") in pairs, pairs


def test_the_workers_never_import_each_other() -> None:
    graph = import_graph()
    bad = _imports_between(graph, "prefill_worker", "decode_worker")
    bad += _imports_between(graph, "decode_worker", "prefill_worker")
    assert not bad, "the workers meet over gRPC, never by import:\n" + "\n".join(bad)


def test_kvstore_imports_nothing_above_it() -> None:
    graph = import_graph()
    bad = [
        f"{i.where}: {i.source} imports {i.target}"
        for i in graph
        if _package(i.source) == "kvstore" and FLOORS[_package(i.target)] >= FLOORS["kvstore"]
        and _package(i.target) != "kvstore"
    ]
    assert not bad, "kvstore knows bytes and layouts, never models:\n" + "\n".join(bad)


def test_the_router_never_imports_the_engine() -> None:
    graph = import_graph()
    bad = _imports_between(graph, "router", "engine") + _imports_between(graph, "engine", "router")
    assert not bad, "\n".join(bad)


def test_imports_run_down_the_floors() -> None:
    bad = floor_violations(import_graph())
    assert not bad, "imports that do not run down (see the floors above):\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "modules that import each other (move the shared part down):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_router_process_loads_neither_engine_nor_torch() -> None:
    probe = (
        "import sys, router.servicer\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('engine', 'torch'))\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert not loaded, f"importing router.servicer loads {loaded[:10]}"


def test_no_module_over_500_lines() -> None:
    """STYLE.md: modules of 100-300 lines, split at 500 (generated stubs aside)."""
    long = []
    for path in project_modules().values():
        if path.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > 500:
            long.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not long, "split these modules:\n" + "\n".join(long)
