"""shmarena under Dask: real clusters (LocalCluster with worker processes, and
`dask scheduler` / `dask worker` processes) on real daemons. Same-daemon
transfers must arrive as views of the arena; other workers get Dask's bytes;
every block goes back when Dask lets the keys go or a worker dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest
from distributed import Client as DaskClient
from distributed import Event, LocalCluster, wait
from distributed.protocol.serialize import serialize

import shmarena
import shmarena.dask as sd
from tests.conftest import Daemon, unique_name, wait_for

# The workers cannot import this module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MIB = 1 << 20


# -- what the tasks do ----------------------------------------------------------


def produce(n: int, in_arena: bool) -> Any:
    """n bytes with a pattern: made in the arena, or as a plain array."""
    import numpy

    import shmarena.dask

    x = shmarena.dask.ndarray(n, "uint8") if in_arena else numpy.empty(n, "uint8")
    x[:] = 7
    x[::4096] = numpy.arange(len(x[::4096]), dtype=numpy.uint64) % 251
    return x


def checksum(n: int) -> int:
    expected = np.full(n, 7, dtype=np.uint8)
    expected[::4096] = np.arange(len(expected[::4096]), dtype=np.uint64) % 251
    return int(expected[::1024].astype(np.int64).sum())


def where(x: Any) -> dict[str, Any]:
    """Where x's data lies in this process: inside an arena mapping or not,
    and at which offset of it."""
    from shmarena.client import registry

    address = x.__array_interface__["data"][0]
    for low, high in registry.mapping_ranges():
        if low <= address and address + x.nbytes <= high:
            return {"in_arena": True, "offset": address - low}
    return {"in_arena": False, "offset": None}


def consume(x: Any) -> dict[str, Any]:
    import os

    return {
        "sum": int(x[::1024].astype("int64").sum()),
        "pid": os.getpid(),
        "writeable": bool(x.flags.writeable),
        **where(x),
    }


def head(x: Any) -> Any:
    return x[:4096]  # a view: it keeps x's block alive on this worker


def hold(x: Any, event_name: str) -> int:
    """Mid-computation: wait for the test's go (with a deadline) while holding x."""
    from distributed import Event

    if not Event(event_name).wait(120):
        raise TimeoutError(f"event {event_name} was never set")
    return int(x[::1024].astype("int64").sum())


def held_keys(dask_worker: Any) -> list[str]:
    return list(dask_worker.data)


def held_where(dask_worker: Any, key: str) -> dict[str, Any]:
    return where(dask_worker.data[key])


# -- helpers ---------------------------------------------------------------------


def plugin_for(daemon: Daemon, **kwargs: Any) -> sd.ShmarenaPlugin:
    return sd.ShmarenaPlugin(daemon.name, runtime_dir=daemon.run_dir, start=False, **kwargs)


def with_plugin(daemon: Daemon, dask: DaskClient) -> tuple[shmarena.Client, str, str]:
    """Register the plugin for `daemon`: a client watching it and the two workers."""
    watch = daemon.client()
    dask.register_plugin(plugin_for(daemon))
    a, b = workers(dask)
    return watch, a, b


@pytest.fixture
def cluster() -> Iterator[DaskClient]:
    with (
        LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as local,
        DaskClient(local) as dask,
    ):
        yield dask


def workers(dask: DaskClient) -> list[str]:
    return sorted(dask.scheduler_info()["workers"])


def registrations(client: shmarena.Client) -> list[str]:
    return sorted(row["name"] for row in client.names("dask-worker:"))


def idle_bytes(client: shmarena.Client) -> int:
    """What the arena holds with no data in it: one registration block per worker."""
    return len(registrations(client)) * client.stats()["min_block_bytes"]


def session_bytes(client: shmarena.Client, pid: int) -> int:
    return sum(row["bytes"] for row in client.list_clients() if row["pid"] == pid)


def used(client: shmarena.Client) -> int:
    """Bytes in blocks someone holds: an owner's, or only a reader's once the
    owner let go (Dask's memory manager drops extra replicas by itself)."""
    stats = client.stats()
    return stats["used_bytes"] + stats["retained_only_bytes"]  # type: ignore[no-any-return]


# -- same host --------------------------------------------------------------------


@pytest.mark.parametrize("in_arena", [True, False], ids=["made-in-arena", "plain-array"])
def test_a_256_mib_array_reaches_another_worker_as_a_view_of_the_arena(
    make_daemon: Any, cluster: DaskClient, in_arena: bool
) -> None:
    watch, a, b = with_plugin(make_daemon("1G"), cluster)
    assert registrations(watch) == sorted(f"dask-worker:{w}" for w in (a, b))
    start = used(watch)
    assert start == idle_bytes(watch)

    n = 256 * MIB
    x = cluster.submit(produce, n, in_arena, workers=[a], pure=False)
    wait([x])
    at_a = cluster.run(held_where, key=x.key, workers=[a])[a]
    assert at_a["in_arena"] == in_arena
    if in_arena:  # labelled with its key while A holds it (A alone, so far)
        sites = [site for row in watch.list_owners() for site in row.get("sites", [])]
        assert {"site": f"dask {x.key}", "blocks": 1, "bytes": n} in sites
    got = cluster.submit(consume, x, workers=[b], pure=False).result(timeout=120)
    assert got["sum"] == checksum(n)
    assert got["in_arena"], "B's array does not lie in the arena: it was copied"
    assert not got["writeable"] if in_arena else got["writeable"]
    fetched = cluster.run(
        lambda dask_worker: [k for e in dask_worker.transfer_incoming_log for k in e["keys"]],
        workers=[b],
    )[b]
    assert x.key in fetched, "B did not fetch x from A"
    if in_arena:
        assert at_a["offset"] == got["offset"], "B's array is not A's block: it was copied"
        assert used(watch) == start + n
    else:
        # A's array stays on A's heap; A frees the copy it made for the transfer,
        # which is B's alone from then on (until Dask drops a replica).
        pid_a = cluster.run(os.getpid, workers=[a])[a]
        wait_for(
            lambda: session_bytes(watch, pid_a) == watch.stats()["min_block_bytes"],
            what="A to free its transfer copy",
        )
        assert used(watch) <= start + n

    during = used(watch)
    del x
    wait_for(lambda: used(watch) == start, what="stats to return to the starting used bytes")
    assert watch.check() == []
    print(
        f"FIGURE: dask 256 MiB {'in-arena' if in_arena else 'plain'}: B's array in the arena "
        f"{got['in_arena']} at offset {got['offset']} (A's array at {at_a['offset']}), "
        f"held bytes {start} at start, {during} with x, {used(watch)} after release"
    )


def test_a_block_lives_while_any_worker_still_views_it(
    make_daemon: Any, cluster: DaskClient
) -> None:
    watch, a, b = with_plugin(make_daemon("256M"), cluster)
    start = used(watch)
    x = cluster.submit(produce, 32 * MIB, True, workers=[a], pure=False)
    part = cluster.submit(head, x, workers=[b], pure=False)
    wait([part])
    key = x.key
    del x  # Dask forgets x on both workers; B's `part` still views x's block
    wait_for(
        lambda: not any(key in keys for keys in cluster.run(held_keys).values()),
        what="the workers to forget x",
    )
    assert used(watch) == start + 32 * MIB
    assert int(part.result()[::4096][0]) == 0 and int(part.result()[1]) == 7
    del part
    wait_for(lambda: used(watch) == start, what="the block to go with its last view")


def test_a_killed_worker_is_recomputed_and_its_blocks_reclaimed(
    make_daemon: Any, cluster: DaskClient
) -> None:
    watch, a, _ = with_plugin(make_daemon("256M"), cluster)
    pid_a = cluster.run(os.getpid, workers=[a])[a]
    before = watch.stats()["counters"]["reclaimed_bytes"]
    go = Event(unique_name("go"), client=cluster)

    n = 48 * MIB
    x = cluster.submit(produce, n, True, workers=[a], allow_other_workers=True, pure=False)
    held = cluster.submit(hold, x, go.name, workers=[a], allow_other_workers=True, pure=False)
    wait([x])
    hold_key = held.key
    wait_for(
        lambda: any(hold_key in keys for keys in cluster.processing().values()), what="hold to run"
    )
    session_a = [c for c in watch.list_clients() if c["pid"] == pid_a]
    assert session_a and session_a[0]["bytes"] >= n

    os.kill(pid_a, signal.SIGKILL)  # mid-computation: A holds x and runs `hold`
    wait_for(
        lambda: all(c["pid"] != pid_a for c in watch.list_clients()),
        timeout_s=30,
        what="the daemon to reclaim the killed worker's session",
    )
    assert watch.stats()["counters"]["reclaimed_bytes"] - before >= n
    assert f"dask-worker:{a}" not in registrations(watch)  # it went with the session
    wait_for(
        lambda: len(registrations(watch)) == 2,
        timeout_s=60,
        what="the nanny's new worker to register",
    )

    reclaimed = watch.stats()["counters"]["reclaimed_bytes"] - before
    go.set()
    assert held.result(timeout=120) == checksum(n), "the recomputed result differs"
    assert cluster.who_has(x)[x.key], "x was not recomputed"
    on = cluster.who_has(x)[x.key]
    del x, held
    wait_for(lambda: used(watch) == idle_bytes(watch), what="every data block to go back")
    assert watch.check() == []
    print(
        f"FIGURE: dask kill: worker {a} (pid {pid_a}) SIGKILLed while holding x; "
        f"{reclaimed} bytes reclaimed; x recomputed on {on}; hold's result correct; "
        f"held bytes {used(watch)} = {len(registrations(watch))} registrations at the end"
    )


def make_buffer(n: int) -> Any:
    import shmarena.dask

    buf = shmarena.dask.get_client().alloc(n)
    buf.view[:5] = b"hello"
    return buf


def read_buffer(buf: Any) -> tuple[bytes, str, list[int]]:
    return bytes(buf.view[:5]), buf._state, list(buf.handle)


def free_held(dask_worker: Any, key: str) -> None:
    dask_worker.data[key].free()


def test_a_buffer_crosses_as_its_handle(make_daemon: Any, cluster: DaskClient) -> None:
    watch, a, b = with_plugin(make_daemon("64M"), cluster)
    start = used(watch)
    buf = cluster.submit(make_buffer, MIB, workers=[a], pure=False)
    handle_at_a = cluster.submit(read_buffer, buf, workers=[a], pure=False).result(timeout=60)[2]
    text, state, handle = cluster.submit(read_buffer, buf, workers=[b], pure=False).result(
        timeout=60
    )
    assert (text, state, handle) == (b"hello", "retained", handle_at_a)
    # A Buffer is freed explicitly (arrays go by themselves): A frees its own.
    cluster.run(free_held, key=buf.key, workers=[a])
    del buf  # B's retained Buffer is released once Dask drops it
    wait_for(lambda: used(watch) == start, what="the Buffer's block to go back")


def test_without_the_plugin_transfers_are_dask_bytes_again(
    make_daemon: Any, cluster: DaskClient
) -> None:
    watch, a, b = with_plugin(make_daemon("64M"), cluster)
    cluster.unregister_worker_plugin("shmarena")
    wait_for(lambda: registrations(watch) == [], what="the workers to unregister")
    x = cluster.submit(produce, 4 * MIB, False, workers=[a], pure=False)
    got = cluster.submit(consume, x, workers=[b], pure=False).result(timeout=60)
    assert got["sum"] == checksum(4 * MIB) and not got["in_arena"]


def make_frame(rows: int) -> Any:
    import numpy
    import pandas

    return pandas.DataFrame({"a": numpy.arange(rows, dtype="float64"), "b": numpy.ones(rows)})


def make_table(rows: int) -> Any:
    import numpy
    import pyarrow

    return pyarrow.table({"a": numpy.arange(rows, dtype="float64")})


def make_pair(rows: int) -> Any:
    import numpy

    return (numpy.ones(rows), {"b": numpy.zeros(rows)})


def pair_where(pair: Any) -> list[bool]:
    return [where(pair[0])["in_arena"], where(pair[1]["b"])["in_arena"]]


def frame_where(frame: Any) -> tuple[float, list[bool]]:
    return float(frame["a"].sum()), [where(frame[c].to_numpy())["in_arena"] for c in frame]


def table_where(table: Any) -> tuple[float, bool]:
    from shmarena.client import registry

    data = table.column("a").chunks[0].buffers()[1]
    inside = any(low <= data.address < high for low, high in registry.mapping_ranges())
    return float(table.column("a").to_numpy().sum()), inside


def test_pandas_arrow_and_containers_cross_with_their_buffers_in_the_arena(
    make_daemon: Any, cluster: DaskClient
) -> None:
    watch, a, b = with_plugin(make_daemon("256M"), cluster)
    start = used(watch)
    rows = MIB  # 8 MiB per column
    frame = cluster.submit(make_frame, rows, workers=[a], pure=False)
    total, inside = cluster.submit(frame_where, frame, workers=[b], pure=False).result(timeout=60)
    assert total == rows * (rows - 1) / 2 and inside == [True, True]
    table = cluster.submit(make_table, rows, workers=[a], pure=False)
    total, inside = cluster.submit(table_where, table, workers=[b], pure=False).result(timeout=60)
    assert total == rows * (rows - 1) / 2 and inside
    pair = cluster.submit(make_pair, rows, workers=[a], pure=False)
    assert cluster.submit(pair_where, pair, workers=[b], pure=False).result(timeout=60) == [
        True,
        True,
    ]
    del frame, table, pair
    wait_for(lambda: used(watch) == start, what="the columns' blocks to go back")


def test_workers_that_share_a_process_share_one_client(make_daemon: Any) -> None:
    daemon = make_daemon("64M")
    watch = daemon.client()
    with (
        LocalCluster(
            n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None
        ) as local,
        DaskClient(local) as dask,
    ):
        dask.register_plugin(plugin_for(daemon))
        a, b = workers(dask)
        assert registrations(watch) == sorted(f"dask-worker:{w}" for w in (a, b))
        assert len([c for c in watch.list_clients() if c["label"].startswith("dask")]) == 1
        x = dask.submit(produce, 4 * MIB, True, workers=[a], pure=False)
        assert dask.submit(consume, x, workers=[b], pure=False).result(timeout=60)[
            "sum"
        ] == checksum(4 * MIB)
        dask.unregister_worker_plugin("shmarena")
        wait_for(lambda: registrations(watch) == [], what="both workers to unregister")
        del x


def test_the_plugin_starts_one_daemon_for_the_workers_of_a_host() -> None:
    run_dir = tempfile.mkdtemp(prefix="shmarena-dask-")
    name = unique_name("dask")
    env = dict(os.environ, SHMARENA_NAME=name, SHMARENA_RUNTIME_DIR=run_dir)
    try:
        with (
            LocalCluster(
                n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
            ) as local,
            DaskClient(local) as dask,
        ):
            dask.register_plugin(sd.ShmarenaPlugin(name, runtime_dir=run_dir, size="64M"))
            a, b = workers(dask)
            with shmarena.connect(name, runtime_dir=run_dir) as watch:
                assert watch.stats()["size_bytes"] == 64 * MIB
                assert registrations(watch) == sorted(f"dask-worker:{w}" for w in (a, b))
            x = dask.submit(produce, MIB, True, workers=[a], pure=False)
            assert dask.submit(consume, x, workers=[b], pure=False).result(timeout=60)["in_arena"]
    finally:
        stopped = subprocess.run(
            [sys.executable, "-m", "shmarena", "shutdown"], env=env, capture_output=True, text=True
        )
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not os.path.exists(os.path.join(run_dir, f"{name}.sock")), what="shutdown")
    leftovers = [f for f in os.listdir(run_dir) if not f.endswith(".log")]
    assert leftovers == []
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")
    shutil.rmtree(run_dir)  # the detached daemon's log is all that is left


# -- dask scheduler / dask worker, and a second "host" --------------------------


class _Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli." + args[0], *args[1:]],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_dask_worker_processes_use_handles_within_a_daemon_and_bytes_across(
    make_daemon: Any, tmp_path: Any
) -> None:
    """Workers 1 and 2 share daemon `here`; worker 3 uses daemon `there`, as a
    worker on another host would: it must get plain bytes, and correct ones."""
    here, there = make_daemon("256M"), make_daemon("256M")
    scheduler_file = str(tmp_path / "scheduler.json")
    procs = _Processes()
    try:
        procs.start(
            [
                "dask_scheduler",
                "--scheduler-file",
                scheduler_file,
                "--port",
                "0",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
            ],
            here.env,
        )
        wait_for(lambda: os.path.exists(scheduler_file), timeout_s=60, what="the scheduler file")
        for worker, daemon in (("w1", here), ("w2", here), ("w3", there)):
            procs.start(
                [
                    "dask_worker",
                    "--scheduler-file",
                    scheduler_file,
                    "--name",
                    worker,
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                    "--preload",
                    "shmarena.dask",
                ],  # the plugin, on the daemon of its env
                daemon.env,
            )
        with open(scheduler_file) as f:
            address = json.load(f)["address"]
        with DaskClient(address, timeout=60) as dask:
            dask.wait_for_workers(3, timeout=60)
            by_name = {info["name"]: w for w, info in dask.scheduler_info()["workers"].items()}
            wait_for(lambda: len(registrations(here.client())) == 2, what="w1, w2 to register")
            near, there_watch = here.client(), there.client()
            assert registrations(near) == sorted(f"dask-worker:{by_name[w]}" for w in ("w1", "w2"))
            assert registrations(there_watch) == [f"dask-worker:{by_name['w3']}"]
            start_here, start_there = used(near), used(there_watch)
            n = 64 * MIB

            x = dask.submit(produce, n, True, workers=[by_name["w1"]], pure=False)
            same = dask.submit(consume, x, workers=[by_name["w2"]], pure=False).result(timeout=60)
            assert same["in_arena"] and same["sum"] == checksum(n)

            far = dask.submit(consume, x, workers=[by_name["w3"]], pure=False).result(timeout=60)
            assert far["sum"] == checksum(n)
            assert not far["in_arena"], "w3 got a view of an arena it does not use"
            there_after = used(there_watch)
            assert there_after == start_there  # nothing of x went into `there`

            # And back: w3 makes an array in its own arena; w1 gets bytes.
            y = dask.submit(produce, n, True, workers=[by_name["w3"]], pure=False)
            back = dask.submit(consume, y, workers=[by_name["w1"]], pure=False).result(timeout=60)
            assert back["sum"] == checksum(n) and not back["in_arena"]

            print(
                f"FIGURE: dask second host: w1->w2 in arena {same['in_arena']}; w1->w3 "
                f"(other daemon) in arena {far['in_arena']}, sum ok; w3->w1 in arena "
                f"{back['in_arena']}, sum ok; `there` held {start_there} bytes before w3 "
                f"got x and {there_after} after"
            )
            del x, y
            wait_for(lambda: used(near) == start_here, what="`here` to let x go")
            wait_for(lambda: used(there_watch) == start_there, what="`there` to let y go")
    finally:
        procs.stop()


# -- the family on its own ----------------------------------------------------


def test_outside_a_same_arena_transfer_the_family_leaves_arrays_to_dask() -> None:
    array = np.ones(1 << 20, dtype="uint8")
    header, frames = serialize(array, serializers=[sd.FAMILY, "dask", "pickle"])
    assert header["serializer"] == "dask"


def test_handles_reaching_a_process_without_the_plugin_are_refused_clearly() -> None:
    loads = sd._loads  # what Dask calls for the family's frames
    with pytest.raises(shmarena.InvalidRequest, match="no shmarena plugin"):
        loads({"epoch": 1, "handles": []}, [b""])
