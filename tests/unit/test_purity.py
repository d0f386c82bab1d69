"""The pure core must stay pure: these modules decide things and do no I/O."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "shmarena"
# The one list of pure modules: both checks below read it. Add a module here
# when it joins the pure core.
PURE_MODULES = [
    "shmarena",
    "shmarena._version",
    "shmarena.protocol",
    "shmarena.limits",
    "shmarena.errors",
    "shmarena.config",
    "shmarena.shm.buddy",
    "shmarena.shm.extents",
    "shmarena.shm.space",
    "shmarena.shm.segments",
    "shmarena.shm.gens",
    "shmarena.daemon.ledger",
    "shmarena.daemon.service",
    "shmarena.daemon.admission",
    "shmarena.daemon.effects",
    "shmarena.daemon.model",
    "shmarena.daemon.failures",
    "shmarena.daemon.lifecycle",
    "shmarena.daemon.handlers",
    "shmarena.daemon.handlers.alloc",
    "shmarena.daemon.handlers.owners",
    "shmarena.daemon.handlers.exchange",
    "shmarena.daemon.handlers.sessions",
    "shmarena.daemon.handlers.admin",
    "shmarena.daemon.handlers.paging",
    "shmarena.daemon.handlers.base",
    "shmarena.daemon.records",
    "shmarena.daemon.gone",
    "shmarena.daemon.growth",
    "shmarena.daemon.pressure",
    "shmarena.daemon.refusals",
    "shmarena.daemon.audit",
    "shmarena.daemon.exchange",
    "shmarena.daemon.queues",
    "shmarena.daemon.waiters",
    "shmarena.daemon.table",
    "shmarena.daemon.logs",
    "shmarena.daemon.usage",
]
# Does no I/O but takes a lock (threading), so only its own imports are read.
NO_IO_WITH_LOCKS = ["shmarena.client.cache"]
FORBIDDEN = {"zmq", "mmap", "socket", "os", "time", "posix_ipc", "subprocess", "signal", "select"}


def source_of(module: str) -> pathlib.Path:
    """The file of a dotted module name under PACKAGE."""
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_roots(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE_MODULES + NO_IO_WITH_LOCKS)
def test_pure_module_imports_no_io(module: str) -> None:
    found = imported_roots(source_of(module)) & FORBIDDEN
    assert not found, f"{module} imports {sorted(found)}; keep I/O in server/arena/client"


def test_checker_sees_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "impure.py"
    sample.write_text("import os\nfrom zmq import Context\n")
    assert imported_roots(sample) & FORBIDDEN == {"os", "zmq"}


# -- the pure modules, imported for real -------------------------------------
#
# The check above reads each module's own import lines; it cannot see what the
# modules it imports pull in (the package root once loaded the whole client).
# So each pure module is also imported in a fresh interpreter whose import
# system refuses the packages that do I/O or start threads.

BLOCKED = ["zmq", "posix_ipc", "mmap", "socket", "threading", "subprocess", "select", "signal"]

# Run in the child: a finder first on sys.meta_path that raises for a blocked
# package (only packages not loaded at start-up reach it), then the import.
_BLOCKER = """
import importlib, importlib.abc, sys
BLOCKED = set(sys.argv[2].split(","))
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: a pure module may not import it")
sys.meta_path.insert(0, Refuse())
importlib.import_module(sys.argv[1])
"""


def import_blocked(
    module: str, *, cwd: pathlib.Path = PACKAGE.parent
) -> subprocess.CompletedProcess[str]:
    """Import `module` in a new interpreter that refuses BLOCKED; the result
    (returncode 0 when the import succeeded)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER, module, ",".join(BLOCKED)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_with_io_packages_blocked(module: str) -> None:
    done = import_blocked(module)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    assert done.returncode == 0, f"importing {module} needs a blocked package: {last}"


def test_blocker_refuses_an_impure_module(tmp_path: pathlib.Path) -> None:
    (tmp_path / "uses_socket.py").write_text("import socket\n")
    done = import_blocked("uses_socket", cwd=tmp_path)
    assert done.returncode != 0
    assert "socket is blocked" in done.stderr


def test_package_root_loads_no_client() -> None:
    probe = (
        "import sys, shmarena\n"
        "heavy = {'zmq', 'msgpack', 'posix_ipc', 'mmap'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
        "for name in shmarena.__all__:\n"
        "    getattr(shmarena, name)\n"
        "from shmarena import Client, aio\n"
        "assert 'Client' in dir(shmarena) and 'aio' in dir(shmarena)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE.parent,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert done.returncode == 0, done.stderr


def test_unknown_name_is_an_attribute_error() -> None:
    import shmarena

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        shmarena.nothing_here  # noqa: B018
