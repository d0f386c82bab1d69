"""The pure core must stay pure: these modules decide things and do no I/O."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "shmarena"
PURE_MODULES = [
    "shm/buddy.py",
    "shm/extents.py",
    "shm/space.py",
    "shm/gens.py",
    "client/cache.py",
    "daemon/ledger.py",
    "daemon/service.py",
    "daemon/exchange.py",
    "daemon/logs.py",
    "daemon/table.py",
    "protocol.py",
    "errors.py",
    "config.py",
]
FORBIDDEN = {"zmq", "mmap", "socket", "os", "time", "posix_ipc", "subprocess", "signal", "select"}


def imported_roots(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io(module: str) -> None:
    found = imported_roots(PACKAGE / module) & FORBIDDEN
    assert not found, f"{module} imports {sorted(found)}; keep I/O in server/arena/client"


def test_checker_sees_a_forbidden_import(tmp_path: pathlib.Path) -> None:
    sample = tmp_path / "impure.py"
    sample.write_text("import os\nfrom zmq import Context\n")
    assert imported_roots(sample) & FORBIDDEN == {"os", "zmq"}
