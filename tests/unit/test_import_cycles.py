"""No import cycle among netsurv's modules, function-local imports included.

A cycle hidden in function-local imports still couples the modules (each needs the other to be
importable and consistent) and breaks as soon as one import moves to module level, so every
``import`` / ``from ... import`` counts wherever it is, except inside ``if TYPE_CHECKING:``
blocks (never executed).  Importing ``a.b.c`` also runs the packages ``a.b`` and ``a``, so those
count too, except the importer's own enclosing packages (already initialised when it runs).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "netsurv"


def _modules(pkg: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is_package)} of every module under ``pkg``."""
    out = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(pkg.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (p, is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_pkg: bool) -> list[str]:
    """Dotted names of everything imported anywhere in ``tree`` (TYPE_CHECKING blocks excluded);
    ``from x import y`` gives ``x.y`` (the caller keeps it if that is a module, else ``x``)."""
    names: list[str] = []
    package = module if is_pkg else module.rpartition(".")[0]

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names.extend(f"{base}.{a.name}" for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = _modules(pkg)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        own = set(_ancestors(m))
        for name in _imported_names(ast.parse(path.read_text(encoding="utf-8"), str(path)), m, is_pkg):
            if name not in mods:
                continue  # not a netsurv module (``from x import y`` with y a function, ...)
            for target in [*_ancestors(name), name]:
                if target in mods and target != m and target not in own:
                    graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_detector_finds_a_cycle_through_function_local_imports(tmp_path):
    pkg = tmp_path / "netsurv"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "tasks" / "a.py").write_text("def f():\n    from netsurv.tasks.b import g\n")
    (pkg / "tasks" / "b.py").write_text("from . import c\n")
    (pkg / "tasks" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from netsurv.tasks import d\n"
        "def h():\n    import netsurv.tasks.a\n")
    (pkg / "tasks" / "d.py").write_text("from netsurv.tasks.c import h\n")
    assert cycles(import_graph(pkg)) == [["netsurv.tasks.a", "netsurv.tasks.b",
                                          "netsurv.tasks.c"]]
    # an import in a TYPE_CHECKING block is no edge: d -> c -> (d) is no cycle
    assert "netsurv.tasks.d" not in import_graph(pkg)["netsurv.tasks.c"]


def test_no_import_cycle_in_netsurv():
    graph = import_graph()
    # the walk found the package (a wrong path would give an empty graph, hence no cycle)
    assert "netsurv.cli" in graph and "netsurv.stages.cache" in graph["netsurv.stages"]
    found = cycles(graph)
    assert not found, "import cycles among netsurv modules:\n" + "\n".join(
        " <-> ".join(c) for c in found)
