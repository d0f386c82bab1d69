"""shmarena/ imports as a graph: no cycle anywhere, no module too long.

Every import statement is an edge, those inside functions too (a lazy import
is still a dependency, only deferred); only imports under `if TYPE_CHECKING:`
are not, since they never run. The figures match ../shared/tools/arch-check.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "shmarena"
MAX_LINES = 650
# The ledger may stay whole as long as it does one job (issue 21).
LONGER_ALLOWED = {"daemon/ledger.py": 1100}


def module_files(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py under `package`."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def imported_names(module: str, path: pathlib.Path) -> set[str]:
    """Every dotted name the module's import statements name: `import a.b` is
    a.b; `from a import b` is a and a.b (b may be a submodule); a relative
    import is resolved against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    files = module_files(package)
    return {
        module: {name for name in imported_names(module, path) if name in files} - {module}
        for module, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's
    algorithm, iterative so a deep package cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            step = next(successors, None)
            if step is None:
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
            elif step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                on_stack.add(step)
                work.append((step, iter(sorted(graph[step]))))
            elif step in on_stack:
                low[node] = min(low[node], index[step])
    return found


def a_loop(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One closed path through a component, to show in a failure: start at its
    first module and follow edges inside it until a module repeats."""
    members = set(component)
    path = [component[0]]
    while True:
        step = min(graph[path[-1]] & members)
        if step in path:
            return [*path[path.index(step) :], step]
        path.append(step)


def describe(graph: dict[str, set[str]], found: list[list[str]]) -> str:
    return "\n".join(
        f"cycle of {len(c)} modules {c}: " + " -> ".join(a_loop(graph, c)) for c in found
    )


def test_shmarena_imports_have_no_cycle() -> None:
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    assert not found, "import cycles in shmarena/ (lazy imports count):\n" + describe(graph, found)


def test_checker_finds_a_lazy_import_cycle(tmp_path: pathlib.Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def later():\n    from .. import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    (package / "d.py").write_text("from .leaf import x\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg", "pkg.c"}
    assert graph["pkg.leaf"] == set() and graph["pkg.d"] == {"pkg.leaf"}
    found = cycles(graph)
    assert found == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert "pkg.a -> pkg.sub.b -> pkg.c -> pkg.a" in describe(graph, found)


def test_no_module_is_too_long() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        lines = path.read_text().count("\n")
        if lines > LONGER_ALLOWED.get(relative, MAX_LINES):
            too_long.append(f"{relative}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


# Which part may import which (docs/architecture.md, "Layers"): a module whose
# name starts with the key may not import a module whose name starts with any
# of the prefixes listed. The daemon and the client meet only in the shared
# core (protocol, errors, config, shm); the CLI and the test harness sit on top.
_USER_SIDE = (
    "shmarena.client",
    "shmarena.aio",
    "shmarena.queue",
    "shmarena.pickling",
    "shmarena.compat",
    "shmarena.reader",
    "shmarena.dask",
)
FORBIDDEN_EDGES = {
    "shmarena.daemon": (*_USER_SIDE, "shmarena.cli", "shmarena.testing", "shmarena.demo"),
    "shmarena.shm": (*_USER_SIDE, "shmarena.daemon", "shmarena.cli", "shmarena.testing"),
    "shmarena.protocol": (*_USER_SIDE, "shmarena.daemon", "shmarena.shm", "shmarena.cli"),
    "shmarena.errors": ("shmarena",),
    "shmarena.config": ("shmarena",),
    "shmarena.limits": ("shmarena",),
    "shmarena._version": ("shmarena",),
    **{side: ("shmarena.daemon", "shmarena.cli", "shmarena.testing") for side in _USER_SIDE},
}


def _under(module: str, prefix: str) -> bool:
    """`module` is `prefix` or inside it, by whole dotted parts."""
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every edge `a -> b` that FORBIDDEN_EDGES rules out."""
    found = []
    for module, targets in sorted(graph.items()):
        for start, banned in FORBIDDEN_EDGES.items():
            if not _under(module, start):
                continue
            found.extend(
                f"{module} -> {target}"
                for target in sorted(targets)
                if target != module and any(_under(target, b) for b in banned)
            )
    return found


def test_each_part_imports_only_the_parts_below_it() -> None:
    found = layer_violations(import_graph(PACKAGE))
    assert not found, "imports across layers:\n" + "\n".join(found)


def test_the_layer_check_sees_a_daemon_module_importing_the_client() -> None:
    graph = {
        "shmarena.daemon.x": {"shmarena.client.cache", "shmarena.protocol"},
        "shmarena.client.y": {"shmarena.cli", "shmarena.client.z"},
    }
    assert layer_violations(graph) == [
        "shmarena.client.y -> shmarena.cli",
        "shmarena.daemon.x -> shmarena.client.cache",
    ]
