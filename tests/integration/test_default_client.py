"""The process default daemon (client/chosen.py, client/default.py): the first
connect, or `shmarena.set_default(client)`, is what dumps/loads, share/
attach_array, SharedMemory/ShareableList and Queue use without `client=`.

Each case runs in a child process of its own (the default is per process),
with real daemons: `first` is the one the child's environment names (or
none), `second` one it names only in code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import pytest

import shmarena
from tests.conftest import Daemon

# The child's preamble: the two daemons from argv, numpy, shmarena.
PREAMBLE = """
import os, sys
import numpy as np
import shmarena
FIRST = (sys.argv[1], sys.argv[2])
SECOND = (sys.argv[3], sys.argv[4])
def where(client):
    return (client.name, client.runtime_dir)
def pickle_owners(client):
    return sum(o["name"].startswith("pickle-") for o in client.list_owners())
"""


def run_child(code: str, first: Daemon, second: Daemon, *, env_names: str | None) -> str:
    """Run PREAMBLE + `code` in a child whose $SHMARENA_NAME/_RUNTIME_DIR name
    `env_names` ("first") or nothing (None); return its stdout."""
    env = first.env  # PYTHONPATH to this checkout
    if env_names is None:
        env = {k: v for k, v in env.items() if not k.startswith("SHMARENA_")}
    args = [first.name, first.run_dir, second.name, second.run_dir]
    # A file, not -c: a spawned grandchild re-imports its parent's __main__.
    with tempfile.TemporaryDirectory() as where:
        script = os.path.join(where, "child.py")
        with open(script, "w") as f:
            f.write(PREAMBLE + code)
        done = subprocess.run(
            [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, f"child failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def two(make_daemon: Callable[..., Daemon]) -> tuple[Daemon, Daemon]:
    return make_daemon("32M"), make_daemon("32M")


def test_dumps_and_loads_use_the_daemon_a_process_connected_to_without_env_vars(
    two: tuple[Daemon, Daemon],
) -> None:
    # The case: before, dumps raised DaemonUnavailable (it looked for "default").
    _, second = two
    out = run_child(
        "assert not any(k.startswith('SHMARENA_') for k in os.environ)\n"
        "c = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "data = shmarena.dumps({'a': np.arange(1 << 16, dtype=np.int64)})\n"
        "assert pickle_owners(c) == 1  # its blocks went to SECOND\n"
        "got = shmarena.loads(data)\n"
        "assert got['a'].sum() == sum(range(1 << 16))\n"
        "shmarena.discard(shmarena.dumps(bytearray(1 << 17)))\n"
        "assert pickle_owners(c) == 0\n"
        "d = shmarena.get_default()\n"
        "assert where(d) == SECOND and d is not c and d.cache_max_bytes == 0\n"
        "print('ok')\n",
        *two,
        env_names=None,
    )
    assert out == "ok\n"


def test_share_shared_memory_and_queue_use_the_first_connect(
    two: tuple[Daemon, Daemon],
) -> None:
    _, second = two
    out = run_child(
        "c = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "a = c.ndarray(1000, 'int32')\n"
        "a[:] = np.arange(1000)\n"
        "b = shmarena.attach_array(shmarena.share(a))\n"
        "assert b.tolist() == list(range(1000))\n"
        "seg = shmarena.SharedMemory(create=True, size=5000)\n"
        "seg.buf[:3] = b'abc'\n"
        "other = shmarena.SharedMemory(seg.name)\n"
        "assert bytes(other.buf[:3]) == b'abc' and where(other._client) == SECOND\n"
        "other.close(); seg.close(); seg.unlink()\n"
        "sl = shmarena.ShareableList([1, 'two', 3.0])\n"
        "assert list(shmarena.ShareableList(name=sl.shm.name)) == [1, 'two', 3.0]\n"
        "sl.shm.close(); sl.shm.unlink()\n"
        "q = shmarena.Queue()\n"
        "assert q._where == SECOND\n"
        "q.put(np.full(1 << 16, 7, dtype=np.int64))\n"
        "assert q.get(timeout=30).sum() == 7 << 16\n"
        "q.close()\n"
        "print('ok')\n",
        *two,
        env_names=None,
    )
    assert out == "ok\n"


def test_the_first_connect_wins_over_the_environment_and_set_default_over_both(
    two: tuple[Daemon, Daemon],
) -> None:
    out = run_child(
        "c2 = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "assert where(shmarena.get_default()) == SECOND  # not $SHMARENA_NAME's FIRST\n"
        "c1 = shmarena.connect(FIRST[0], runtime_dir=FIRST[1])\n"
        "assert where(shmarena.get_default()) == SECOND  # only the first connect chooses\n"
        "shmarena.set_default(c1)\n"
        "assert shmarena.get_default() is c1  # that very client, cache and all\n"
        "data = shmarena.dumps(np.ones(1 << 16))\n"
        "assert (pickle_owners(c1), pickle_owners(c2)) == (1, 0)\n"
        "assert shmarena.loads(data).sum() == 1 << 16\n"
        "mine = shmarena.dumps(np.ones(1 << 16), client=c2)  # an explicit client wins\n"
        "assert (pickle_owners(c1), pickle_owners(c2)) == (0, 1)\n"
        "assert shmarena.loads(mine, client=c2).sum() == 1 << 16\n"
        "q = shmarena.Queue(client=c2)\n"
        "assert q._where == SECOND\n"
        "q.close()\n"
        "shmarena.set_default(None)  # forgotten: the environment applies again\n"
        "d = shmarena.get_default()\n"
        "assert where(d) == FIRST and d is not c1\n"
        "c3 = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "assert where(shmarena.get_default()) == SECOND  # and the next connect chooses\n"
        "c1.close()\n"
        "print('ok')\n",
        *two,
        env_names="first",
    )
    assert out == "ok\n"


def test_a_cached_client_given_to_set_default_serves_dumps_queue_and_share(
    two: tuple[Daemon, Daemon],
) -> None:
    # A cached client frees into its cache: a block a queued message still
    # names must not be handed out again and overwritten meanwhile.
    out = run_child(
        "c = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "assert c.cache_max_bytes > 0\n"
        "shmarena.set_default(c)\n"
        "q = shmarena.Queue()\n"
        "for k in range(8):\n"
        "    q.put(np.full(1 << 14, k, dtype=np.int64))\n"
        "    scratch = c.alloc(1 << 17); scratch.view[:] = b'x' * (1 << 17); scratch.free()\n"
        "assert [int(q.get(timeout=30)[-1]) for k in range(8)] == list(range(8))\n"
        "q.close()\n"
        "data = [shmarena.dumps(np.full(1 << 14, k, dtype=np.int64)) for k in range(4)]\n"
        "assert [int(shmarena.loads(d)[0]) for d in data] == [0, 1, 2, 3]\n"
        "a = c.ndarray(10, 'int8'); a[:] = 5\n"
        "assert shmarena.attach_array(shmarena.share(a)).sum() == 50\n"
        "seg = shmarena.SharedMemory(create=True, size=100)\n"
        "assert seg._client is c\n"
        "seg.close(); seg.unlink()\n"
        "print('ok')\n",
        *two,
        env_names="first",
    )
    assert out == "ok\n"


def test_the_default_clients_own_connect_chooses_nothing(two: tuple[Daemon, Daemon]) -> None:
    out = run_child(
        "shmarena.discard(shmarena.dumps(bytearray(1 << 17)))  # $SHMARENA_NAME's FIRST\n"
        "assert where(shmarena.get_default()) == FIRST\n"
        "c = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])  # the first user connect\n"
        "assert where(shmarena.get_default()) == SECOND\n"
        "print('ok')\n",
        *two,
        env_names="first",
    )
    assert out == "ok\n"


def test_a_forked_child_keeps_the_choice_of_daemon_not_the_session(
    two: tuple[Daemon, Daemon],
) -> None:
    out = run_child(
        "c = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "mine = shmarena.get_default()\n"
        "explicit = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "def child():\n"
        "    d = shmarena.get_default()\n"
        "    ok = where(d) == SECOND and d is not mine and d.session != mine.session\n"
        "    return ok and shmarena.loads(shmarena.dumps(np.ones(1 << 16))).sum() == 1 << 16\n"
        "def forked(check):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(0 if check() else 3)\n"
        "    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n"
        "assert forked(child) == 0\n"
        "shmarena.set_default(explicit)\n"
        "def child_of_explicit():\n"
        "    d = shmarena.get_default()  # the daemon set_default chose, a session of its own\n"
        "    return d is not explicit and where(d) == SECOND\n"
        "assert forked(child_of_explicit) == 0\n"
        "print('ok')\n",
        *two,
        env_names="first",
    )
    assert out == "ok\n"


def test_a_queue_sent_to_a_spawned_child_keeps_its_daemon(two: tuple[Daemon, Daemon]) -> None:
    # The spawned child's environment names FIRST and it connects nowhere:
    # the queue it unpickles still means SECOND, the daemon it was made for.
    out = run_child(
        "import multiprocessing as mp\n"
        "def produce(q):\n"
        "    q.put(np.arange(1 << 15))\n"
        "if __name__ == '__main__':\n"
        "    c = shmarena.connect(SECOND[0], runtime_dir=SECOND[1])\n"
        "    q = shmarena.Queue()\n"
        "    p = mp.get_context('spawn').Process(target=produce, args=(q,))\n"
        "    p.start()\n"
        "    assert q.get(timeout=60).sum() == sum(range(1 << 15))\n"
        "    p.join(60)\n"
        "    assert p.exitcode == 0\n"
        "    q.close()\n"
        "    print('ok')\n",
        *two,
        env_names="first",
    )
    assert out == "ok\n"


def test_set_default_refuses_what_is_not_a_client() -> None:
    with pytest.raises(TypeError, match="shmarena.Client or None, got str"):
        shmarena.set_default("default")  # type: ignore[arg-type]
