"""numpy arrays in the arena (client.ndarray, ndarray_like, share, attach_array)
and BufferReader over arena Buffers, with a real daemon and real child
processes."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import shmarena
from shmarena.client import arrays, default, registry
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

MiB = 1 << 20

# A child that attaches each token given on the command line and prints, per
# token, what it sees: dtype, shape, strides, contiguity, the bytes in logical
# order and whether the data lies in its own arena mapping.
DESCRIBE = """
import json, sys
import numpy as np
import shmarena
from shmarena.client import registry
rows = []
for token in sys.argv[1:]:
    a = shmarena.attach_array(token)
    low, high = registry.mapping_ranges()[0]
    rows.append({
        "descr": np.lib.format.dtype_to_descr(a.dtype) if a.dtype.names else a.dtype.str,
        "shape": list(a.shape), "strides": list(a.strides),
        "c": a.flags.c_contiguous, "f": a.flags.f_contiguous, "writeable": a.flags.writeable,
        "hex": a.tobytes(order="A" if a.flags.f_contiguous else "C").hex(),
        "inside": any(lo <= a.ctypes.data < hi for lo, hi in registry.mapping_ranges()),
    })
print(json.dumps(rows), flush=True)
"""


def describe_in_child(daemon: Daemon, tokens: list[str]) -> list[dict]:
    child = daemon.python(DESCRIBE, *tokens, stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, f"the describing child exited with {child.returncode}"
    return json.loads(out)


def inside_arena(address: int) -> bool:
    return any(low <= address < high for low, high in registry.mapping_ranges())


def settled_used(client: shmarena.Client) -> int:
    gc.collect()
    return int(client.stats()["used_bytes"])


STRUCT = np.dtype([("id", "<u4"), ("pos", ">f8", (3,)), ("tag", "S5")], align=True)


def sample_arrays(c: shmarena.Client) -> dict[str, np.ndarray]:
    """One arena array of each kind the round trip must preserve."""
    made = {
        "c_float64": c.ndarray((3, 4)),
        "f_int32": c.ndarray((5, 3), "int32", order="F"),
        "big_endian_u2": c.ndarray(7, ">u2"),
        "structured": c.ndarray(4, STRUCT),
        "complex": c.ndarray((2, 2), "complex128"),
    }
    for a in made.values():
        if a.dtype.names:
            a["id"] = np.arange(a.size)
            a["pos"] = np.arange(a.size * 3).reshape(a.size, 3) * 0.5
            a["tag"] = [b"t%d" % i for i in range(a.size)]
        else:
            a[...] = np.arange(a.size).reshape(a.shape) * 3 + 1
    grid = c.ndarray((6, 8), "float32")
    grid[...] = np.arange(48).reshape(6, 8)
    made["sliced"] = grid[1:5, 2::3]  # a start inside the block, strided
    made["reversed"] = made["big_endian_u2"][::-1]  # negative stride
    return made


def expected(a: np.ndarray) -> dict:
    """What DESCRIBE prints for an array equal to `a` (through JSON, as it is)."""
    descr = np.lib.format.dtype_to_descr(a.dtype) if a.dtype.names else a.dtype.str
    row = {
        "descr": descr,
        "shape": list(a.shape),
        "strides": list(a.strides),
        "c": a.flags.c_contiguous,
        "f": a.flags.f_contiguous,
        "writeable": True,
        "hex": a.tobytes(order="A" if a.flags.f_contiguous else "C").hex(),
        "inside": True,
    }
    return json.loads(json.dumps(row))


# -- making arrays -----------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["float64", "int8", ">i4", STRUCT])
def test_ndarray_lies_in_the_arena_with_the_asked_layout(daemon: Daemon, order, dtype) -> None:
    c = daemon.client()
    a = c.ndarray((3, 5), dtype, order=order)
    assert a.shape == (3, 5) and a.dtype == np.dtype(dtype)
    assert a.flags.f_contiguous if order == "F" else a.flags.c_contiguous
    assert inside_arena(a.ctypes.data) and inside_arena(a.ctypes.data + a.nbytes - 1)
    found = registry.find(a.ctypes.data, a.nbytes)
    assert found is not None and found[0].size == a.nbytes and found[1] == 0


def test_an_empty_array_still_gets_a_block(daemon: Daemon) -> None:
    c = daemon.client()
    a = c.ndarray((0, 3), "float64")
    assert a.size == 0 and registry.find(a.ctypes.data, 0)[0].size == 1


def test_ndarray_like_copies_data_shape_dtype_and_fortran_order(daemon: Daemon) -> None:
    c = daemon.client()
    for source in (
        np.arange(12, dtype=">i8").reshape(3, 4),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(10)[::3],  # not contiguous: the copy is
        np.zeros(3, STRUCT),
    ):
        copy = c.ndarray_like(source)
        assert copy.dtype == source.dtype and copy.shape == source.shape
        assert np.array_equal(copy, source)
        assert not np.shares_memory(copy, source)
        fortran = source.flags.f_contiguous and not source.flags.c_contiguous
        assert copy.flags.f_contiguous if fortran else copy.flags.c_contiguous
        assert copy.flags.c_contiguous != fortran
        assert inside_arena(copy.ctypes.data)


def test_object_dtypes_are_refused(daemon: Daemon) -> None:
    c = daemon.client()
    with pytest.raises(TypeError, match="object pointers"):
        c.ndarray(3, object)


# -- lifetime ----------------------------------------------------------------


@pytest.mark.parametrize("size", [4096, 3 * MiB])  # from the cache, from the daemon
def test_the_block_is_freed_when_the_last_view_is_gone(daemon: Daemon, size: int) -> None:
    c = daemon.client()
    start = settled_used(c)
    a = c.ndarray(size, "uint8")
    view = a[100:200]
    del a
    assert settled_used(c) > start  # the view alone keeps the block
    view[:] = 5  # and its memory is still ours to write
    del view
    wait_for(lambda: settled_used(c) == start, what="the block to be freed")


def test_an_attached_array_keeps_the_block_after_the_sharer_drops_it(daemon: Daemon) -> None:
    sharer, receiver = daemon.client(), daemon.client()
    start = settled_used(sharer)
    a = sharer.ndarray(1000, "int64")
    a[...] = np.arange(1000)
    token = shmarena.share(a)
    b = shmarena.attach_array(token, client=receiver)
    del a
    wait_for(lambda: sharer.stats()["retained_only_blocks"] == 1, what="the free to wait")
    assert np.array_equal(b, np.arange(1000))  # still the same bytes, not reused
    del b
    wait_for(
        lambda: settled_used(sharer) == start and sharer.stats()["retained_only_blocks"] == 0,
        what="the release to give the block back",
    )


def test_a_token_of_a_freed_block_is_refused(daemon: Daemon) -> None:
    c = daemon.client()
    start = settled_used(c)
    a = c.ndarray(16, "float64")
    token = shmarena.share(a)
    del a
    wait_for(lambda: settled_used(c) == start, what="the block to be freed")
    with pytest.raises(shmarena.StaleHandle, match="keep its array alive"):
        shmarena.attach_array(token, client=c)


def test_a_process_that_dies_holding_an_attached_array_leaks_nothing(daemon: Daemon) -> None:
    c = daemon.client()
    start = settled_used(c)
    a = c.ndarray((256, 256), "float32")
    child = daemon.python(
        "import sys, shmarena\n"
        "held = shmarena.attach_array(sys.argv[1])[10:20]  # a view of it, too\n"
        "print('attached', flush=True)\n"
        "sys.stdin.readline()\n",
        shmarena.share(a),
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline().strip() == "attached"
        del a
        wait_for(lambda: c.stats()["retained_only_blocks"] == 1, what="the child's reference")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    wait_for(
        lambda: settled_used(c) == start and c.stats()["retained_only_blocks"] == 0,
        what="the dead child's reference to be dropped",
    )
    assert c.check() == []


# -- share and attach_array across processes ---------------------------------


def test_round_trip_keeps_dtype_shape_strides_order_and_offset(daemon: Daemon) -> None:
    c = daemon.client()
    made = sample_arrays(c)
    rows = describe_in_child(daemon, [shmarena.share(a) for a in made.values()])
    for (name, a), row in zip(made.items(), rows, strict=True):
        assert row == expected(a), name


def test_attach_array_in_the_same_process_is_the_same_memory(daemon: Daemon) -> None:
    c = daemon.client()
    for name, a in sample_arrays(c).items():
        b = shmarena.attach_array(shmarena.share(a), client=c)
        assert b.ctypes.data == a.ctypes.data and b.strides == a.strides, name
        assert b.dtype == a.dtype and np.array_equal(b, a), name


def test_another_process_writes_and_we_see_it(daemon: Daemon) -> None:
    c = daemon.client()
    a = c.ndarray((4, 6), "int32", order="F")
    a[...] = 0
    column = a[:, 2]
    child = daemon.python(
        "import sys, shmarena\n"
        "b = shmarena.attach_array(sys.argv[1])\n"
        "b[...] = [[10 * i + j for j in range(b.shape[1])] for i in range(b.shape[0])]\n"
        "shmarena.attach_array(sys.argv[2])[:] = -1\n",
        shmarena.share(a[1:3]),
        shmarena.share(column),
    )
    assert child.wait(timeout=60) == 0
    written = [[10 * i + j for j in range(6)] for i in range(2)]
    for row in written:
        row[2] = -1  # the second attach wrote the whole column after
    assert a[1:3].tolist() == written
    assert a[:, 2].tolist() == [-1] * 4
    assert a[0].tolist() == [0, 0, -1, 0, 0, 0] and a[3].tolist() == [0, 0, -1, 0, 0, 0]


def test_a_read_only_array_arrives_read_only(daemon: Daemon) -> None:
    c = daemon.client()
    a = c.ndarray(8, "uint16")
    view = a[2:]
    view.flags.writeable = False
    (row,) = describe_in_child(daemon, [shmarena.share(view)])
    assert row["writeable"] is False


def test_a_buffer_ndarray_can_be_shared(daemon: Daemon) -> None:
    c = daemon.client()
    buf = c.alloc(4096)
    a = buf.ndarray((8, 8), "float64")
    a[...] = np.eye(8)
    (row,) = describe_in_child(daemon, [shmarena.share(a[2:, 1])])
    assert row["hex"] == a[2:, 1].tobytes().hex() and row["inside"]


def test_share_of_memory_outside_the_arena_says_what_to_do(daemon: Daemon) -> None:
    c = daemon.client()
    plain = np.arange(10.0)
    with pytest.raises(ValueError, match=rf"{plain.ctypes.data:#x}.*client.ndarray_like"):
        shmarena.share(plain)
    token = shmarena.share(c.ndarray_like(plain))  # the remedy the message names works
    assert np.array_equal(shmarena.attach_array(token, client=c), plain)


def test_share_of_arena_memory_in_no_known_block_says_so(daemon: Daemon) -> None:
    c = daemon.client()
    buf = c.alloc(4096)
    raw = np.frombuffer(buf.view, dtype=np.uint8)  # not made through shmarena's helpers
    with pytest.raises(ValueError, match="inside the arena mapping"):
        shmarena.share(raw)


def test_a_malformed_token_is_refused(daemon: Daemon) -> None:
    c = daemon.client()
    for bad in ["", "shmarena:1:1:2:3", "shmarena:2:" + "0:" * 9 + "'<f8'", "hello"]:
        with pytest.raises(ValueError, match="not an array token.*shmarena.share"):
            shmarena.attach_array(bad, client=c)


def test_a_token_of_another_daemon_is_refused(make_daemon) -> None:
    first, second = make_daemon(), make_daemon()
    a = first.client().ndarray(4)
    other = second.client()
    assert other.epoch != first.clients[0].epoch  # random 52-bit epochs differ
    with pytest.raises(shmarena.StaleHandle, match="epoch"):
        shmarena.attach_array(shmarena.share(a), client=other)


def test_the_default_client_is_made_anew_after_fork(daemon: Daemon) -> None:
    c = daemon.client()
    a = c.ndarray(3, "int64")
    a[...] = [7, 8, 9]
    child = daemon.python(
        "import os, sys, shmarena\n"
        "from shmarena.client.arrays import default_client\n"
        "parent = default_client()\n"
        "assert default_client() is parent\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    mine = default_client()\n"
        "    ok = mine is not parent and mine.session != parent.session\n"
        "    ok = ok and shmarena.attach_array(sys.argv[1]).tolist() == [7, 8, 9]\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n",
        shmarena.share(a),
    )
    assert child.wait(timeout=60) == 0


def test_without_numpy_the_error_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None\n"
        "import shmarena\n"
        "from shmarena.client import arrays\n"
        "for call in (lambda: arrays.ndarray(None, 3), lambda: shmarena.share([1]),\n"
        "             lambda: shmarena.attach_array('x')):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as e:\n"
        "        assert \"pip install 'shmarena[numpy]'\" in str(e), e\n"
        "    else:\n"
        "        sys.exit('no ImportError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_default_client_follows_the_environment(daemon: Daemon, monkeypatch) -> None:
    monkeypatch.setenv("SHMARENA_NAME", daemon.name)
    monkeypatch.setenv("SHMARENA_RUNTIME_DIR", daemon.run_dir)
    monkeypatch.setattr(default, "_CLIENTS", {})
    client = arrays.default_client()
    try:
        assert client.name == daemon.name and arrays.default_client() is client
    finally:
        client.close()


# -- BufferReader over arena Buffers -----------------------------------------


def test_reader_chunks_over_arena_buffers_are_zero_copy(daemon: Daemon) -> None:
    c = daemon.client()
    bufs = [c.alloc(n) for n in (4096, 10000, 1, 70000)]
    for i, buf in enumerate(bufs):
        buf.view[:] = bytes([i + 1]) * buf.size
    spans = [(registry.address_of(b.view), b.size) for b in bufs]
    reader = shmarena.BufferReader(bufs)
    assert len(reader) == sum(b.size for b in bufs)
    chunks = list(reader)
    assert len(chunks) == len(bufs)
    for chunk, (address, size) in zip(chunks, spans, strict=True):
        pointer = np.frombuffer(chunk, dtype=np.uint8).ctypes.data
        assert pointer == address and chunk.nbytes == size
    reader.seek(5000)
    for chunk in reader.chunks(max_bytes=3000):
        pointer = np.frombuffer(chunk, dtype=np.uint8).ctypes.data
        assert any(a <= pointer and pointer + chunk.nbytes <= a + n for a, n in spans)
    reader.seek(0)
    assert reader.read() == b"".join(bytes(b.view) for b in bufs)
    reader.close()
    for buf in bufs:
        buf.free()
