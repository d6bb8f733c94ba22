"""The package's import graph, read from the source: no cycles, and the layers of DESIGN.md.

Every ``import`` and ``from ... import`` of an hf_mousse module counts, including those inside functions
(a lazy import that dodges a cycle at import time is still a cycle in the design). The runtime check that
``import hf_mousse.optim`` does not load transformers is ``test_roles.py::test_optim_package_does_not_import_
transformers``; this file checks what the source says, so it also sees imports on paths no test runs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "hf_mousse"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# What hf_mousse/optim may import from the rest of the package: only the error classes.
OPTIM_MAY_IMPORT = ("hf_mousse.errors",)
# Libraries the optimizer package must never need (it is plain PyTorch).
NOT_IN_OPTIM = ("transformers", "peft", "accelerate", "datasets", "evaluate", "huggingface_hub")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(hf_mousse modules, other top-level packages) that ``path`` imports anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, others = set(), set()

    def add(target: str) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            while target not in known:  # e.g. a name imported from a module: the module
                target = target.rpartition(".")[0]
            ours.add(target)
        else:
            others.add(target.partition(".")[0])

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # `from . import data` imports the module hf_mousse.data
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    ours.discard(name)
    return ours, others


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    found = modules()
    graph, external = {}, {}
    for name, path in found.items():
        graph[name], external[name] = imports_of(name, path, set(found))
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    """One shortest cycle through the component's first module, e.g. ``a -> b -> a``, and all its members."""
    members, start = set(component), component[0]
    paths = {w: [start, w] for w in sorted(graph[start] & members)}
    queue = list(paths)
    while start not in paths:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return " -> ".join(paths[start]) + f" (in the strongly connected set {component})"


# ---------------------------------------------------------------------------- the graph reader itself
def test_reader_resolves_relative_and_function_local_imports(tmp_path):
    code = ("from . import b\nfrom .b import thing\nfrom ..errors import E\nimport torch.nn\n"
            "def f():\n    from .. import __version__\n    import transformers\n")
    path = tmp_path / "a.py"
    path.write_text(code)
    known = {"hf_mousse", "hf_mousse.errors", "hf_mousse.pkg", "hf_mousse.pkg.a", "hf_mousse.pkg.b"}
    ours, others = imports_of("hf_mousse.pkg.a", path, known)
    assert ours == {"hf_mousse.pkg.b", "hf_mousse.errors", "hf_mousse"}
    assert others == {"torch", "transformers"}


def test_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ---------------------------------------------------------------------------- the package
def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert "hf_mousse.integration.config" in graph  # the reader found the package
    found = cycles(graph)
    assert not found, "import cycles (make imports point one way): " + " | ".join(
        describe(graph, c) for c in found)


def test_nothing_imports_the_package_root():
    """``hf_mousse/__init__.py`` re-exports the public names; a module that imports from it (e.g.
    ``from .. import __version__``) depends on everything, itself included."""
    graph, _ = import_graph()
    importers = sorted(m for m, deps in graph.items() if PACKAGE in deps)
    assert importers == [], f"{importers} import from hf_mousse/__init__.py; import the defining module"


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.startswith("hf_mousse.optim")))
def test_optim_is_plain_pytorch(name):
    graph, external = import_graph()
    inside = sorted(d for d in graph[name]
                    if not d.startswith("hf_mousse.optim") and d not in OPTIM_MAY_IMPORT)
    assert inside == [], f"{name} imports {inside}: hf_mousse.optim may only import {OPTIM_MAY_IMPORT}"
    libraries = sorted(external[name] & set(NOT_IN_OPTIM))
    assert libraries == [], f"{name} imports {libraries}: hf_mousse.optim is plain PyTorch"
