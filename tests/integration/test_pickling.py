"""shmarena.dumps / loads against a real daemon: large buffers land in the
arena and come back as views of it in another process; the lifetime rule of
shmarena/pickling.py holds (the message's owner goes at loads, the blocks go
with the last view, a dead receiver leaks nothing)."""

from __future__ import annotations

import gc
import pickle
import subprocess

import msgpack
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

# A child that loads the message on stdin and prints, per large column, whether
# its data lies inside this process's arena mapping; then checks the values.
LOAD_IN_CHILD = """
import sys, shmarena
from shmarena.client import registry
def inside(address):
    return any(start <= address < end for start, end in registry.mapping_ranges())
obj = shmarena.loads(bytes.fromhex(sys.stdin.read()))
kind = sys.argv[1]
if kind == "pandas":
    import numpy as np
    flags = [inside(obj[c].to_numpy().ctypes.data) for c in ("a", "b")]
    ok = obj["a"].sum() == np.arange(1 << 20).sum() and list(obj["s"][:2]) == ["s0", "s1"]
elif kind == "arrow":
    flags = [inside(b.address) for b in obj.column("x").chunks[0].buffers() if b is not None]
    ok = obj.column("x").to_pylist()[:3] == [0.0, 1.0, 2.0] and obj.num_rows == 1 << 20
else:
    flags = [inside(obj["a"].ctypes.data)]
    ok = int(obj["a"].sum()) == sum(range(1 << 18)) and obj["meta"] == {"k": 1}
print(all(flags), len(flags), ok)
"""


def load_in_child(daemon: Daemon, data: bytes, kind: str) -> str:
    child = daemon.python(LOAD_IN_CHILD, kind, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = child.communicate(data.hex(), timeout=60)
    assert child.returncode == 0, f"the loading child exited with {child.returncode}"
    return out.strip()


def settled(client: shmarena.Client, used: int) -> bool:
    stats = client.stats()
    return stats["used_bytes"] == used and stats["retained_only_bytes"] == 0


def test_a_pandas_dataframe_crosses_with_its_columns_in_the_arena(daemon: Daemon) -> None:
    client = daemon.client()
    start = client.stats()["used_bytes"]
    frame = pd.DataFrame(
        {
            "a": np.arange(1 << 20, dtype=np.int64),
            "b": np.linspace(0, 1, 1 << 20),
            "s": [f"s{i}" for i in range(1 << 10)] * (1 << 10),
        }
    )
    data = shmarena.dumps(frame, client=client)
    assert len(data) < 2048  # the columns travel as handles
    assert load_in_child(daemon, data, "pandas") == "True 2 True"
    wait_for(lambda: settled(client, start), what="the message's blocks to go back")
    assert client.list_owners() == []


def test_an_arrow_table_crosses_with_its_buffers_in_the_arena(daemon: Daemon) -> None:
    client = daemon.client()
    start = client.stats()["used_bytes"]
    table = pa.table({"x": np.arange(1 << 20, dtype=np.float64), "y": ["v"] * (1 << 20)})
    data = shmarena.dumps(table, client=client)
    assert len(data) < 2048
    flags, count, ok = load_in_child(daemon, data, "arrow").split()
    assert flags == "True" and int(count) >= 1 and ok == "True"
    wait_for(lambda: settled(client, start), what="the message's blocks to go back")


def test_loads_views_the_arena_and_the_blocks_go_with_the_last_view(daemon: Daemon) -> None:
    client = daemon.client()
    start = client.stats()["used_bytes"]
    data = shmarena.dumps(
        {"a": np.arange(1 << 18, dtype=np.int64), "meta": {"k": 1}}, client=client
    )
    (owner,) = client.list_owners()
    assert owner["scope"] == "detached" and owner["bytes"] >= 8 << 18
    obj = shmarena.loads(data, client=client)
    assert client.list_owners() == []  # loads recycled the message's owner ...
    view = obj["a"][10:20]  # ... and the loaded array keeps the block
    del obj
    gc.collect()
    assert client.stats()["retained_only_bytes"] >= 8 << 18
    assert list(view) == list(range(10, 20))
    del view
    wait_for(lambda: settled(client, start), what="the block to go with its last view")


def test_keep_allows_loading_twice_and_discard_gives_the_message_back(daemon: Daemon) -> None:
    client = daemon.client()
    start = client.stats()["used_bytes"]
    data = shmarena.dumps(bytearray(b"z" * 200_000), client=client)
    first = shmarena.loads(data, client=client, keep=True)
    second = shmarena.loads(data, client=client, keep=True)
    assert first == second == bytearray(b"z" * 200_000) and type(first) is bytearray
    shmarena.discard(data, client=client)
    shmarena.discard(data, client=client)  # twice is harmless
    del first, second
    wait_for(lambda: settled(client, start), what="the discarded message's blocks to go back")
    with pytest.raises(shmarena.StaleHandle):
        shmarena.loads(data, client=client)  # its blocks are gone


def test_an_array_already_in_the_arena_is_named_not_copied(daemon: Daemon) -> None:
    client = daemon.client()
    buf = client.alloc(1 << 20)
    array = buf.ndarray(dtype="float64")
    array[:] = 2.5
    before = client.stats()["used_bytes"]
    data = shmarena.dumps(array, client=client)
    assert client.stats()["used_bytes"] == before
    assert [o for o in client.list_owners() if o["scope"] == "detached"] == []
    got = shmarena.loads(data, client=client)
    assert got.ctypes.data == array.ctypes.data  # the very same bytes
    assert not got.flags.writeable  # shared with the sender: read-only
    assert float(got.sum()) == 2.5 * (1 << 17)


def test_small_objects_stay_in_the_pickle_and_cost_no_block(daemon: Daemon) -> None:
    client = daemon.client()
    before = client.stats()["used_bytes"]
    data = shmarena.dumps({"x": list(range(100)), "b": b"small"}, client=client)
    assert client.stats()["used_bytes"] == before
    assert shmarena.loads(data, client=client) == {"x": list(range(100)), "b": b"small"}


def test_bytes_that_are_not_a_message_get_a_clear_error(daemon: Daemon) -> None:
    client = daemon.client()
    forged = msgpack.packb({"shmarena-pickle": 1, "owner": None, "handles": [[1]], "payload": b""})
    for data in (b"", b"\x00\x01garbage", pickle.dumps({"a": 1}), forged):
        with pytest.raises(shmarena.InvalidRequest, match="not from shmarena.dumps"):
            shmarena.loads(data, client=client)


def test_a_receiver_killed_holding_the_result_leaks_nothing(daemon: Daemon) -> None:
    client = daemon.client()
    start = client.stats()["used_bytes"]
    data = shmarena.dumps(np.ones(1 << 20), client=client)
    child = daemon.python(
        "import sys, shmarena\n"
        "obj = shmarena.loads(bytes.fromhex(sys.stdin.readline()))\n"
        "print(float(obj.sum()), flush=True)\n"
        "sys.stdin.read()\n",  # holds the array until killed
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(data.hex() + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == str(float(1 << 20))
    assert client.stats()["retained_only_bytes"] >= 8 << 20
    child.kill()
    child.wait(timeout=10)
    child.stdin.close()
    wait_for(lambda: settled(client, start), what="the dead receiver's blocks to go back")
    assert client.check() == []
