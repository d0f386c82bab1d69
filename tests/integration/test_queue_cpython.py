"""shmarena.Queue against the behaviours CPython checks for multiprocessing.Queue.

Our own test code, written to check what CPython's Lib/test/_test_multiprocessing.py
checks; each test names the CPython case it stands for. Every test with a child
runs under both the spawn and the fork start method; children get the queue by
pickling (Process args, Pool and executor initargs), which sends its name and
its daemon's name and runtime dir.

Ported (CPython name -> ours):
- _TestQueue.test_put -> test_put (plus test_put_waits_for_room: the blocking
  put that succeeds once a child makes room, which CPython only times)
- _TestQueue.test_get -> test_get
- _TestQueue.test_fork -> test_fork
- _TestQueue.test_qsize -> test_qsize
- _TestQueue.test_no_import_lock_contention -> test_no_import_lock_contention
- _TestQueue.test_timeout -> test_timeout (without CPython's elapsed-time check:
  no timing assertions here; instead a waiting get is seen held by the daemon
  and is met by a put from another thread)
- _TestQueue.test_queue_feeder_donot_stop_onexc ->
  test_unpicklable_put_raises_and_queue_goes_on
- _TestQueue.test_queue_feeder_on_queue_feeder_error ->
  test_unpicklable_put_raises_the_picklers_error
  (both: the stdlib pickles in a feeder thread, reports the error there through
  the `_on_queue_feeder_error` hook and drops the object; ours has no feeder
  thread, so `put` itself raises the pickling error and nothing is queued)
- _TestQueue.test_closed_queue_empty_exceptions -> test_closed_queue_empty_exceptions
- _TestQueue.test_closed_queue_put_get_exceptions -> test_closed_queue_put_get_exceptions
- TestSimpleQueue.test_empty -> test_empty; TestSimpleQueue.test_close -> test_close_twice
- TestSyncManagerTypes.test_queue -> test_queue_state_seen_by_child
- TestManagerExceptions.test_queue_get -> test_empty_exception_is_not_in_a_cycle
- TestStdinBadfiledescriptor.test_queue_in_process -> test_queue_made_in_child

Left out: _TestQueue.test_task_done (JoinableQueue: shmarena has none),
_TestContainers.test_nested_queue and
the other manager tests (manager proxies, not Queue), TestSimpleQueue.test_closed
(private pipe attributes), thread- and manager-flavoured runs of _TestQueue
(shmarena.Queue is for processes; a thread case is in test_timeout).

Not in CPython, asked by issue 7: a queue in `multiprocessing.Pool` and
`concurrent.futures.ProcessPoolExecutor` initargs, a numpy array round trip that
stays in the arena; and besides: many large messages in flight from a caching
client, threads sharing one queue, a received array outliving close(), and a
plain pickle of a queue (the stdlib refuses one outside spawning; ours travels
by name, so it may).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import multiprocessing
import os
import pickle
import queue as stdqueue
import subprocess
import textwrap
import threading
import weakref
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

TIMEOUT_S = 60.0  # for gets and joins that must succeed: only a hang reaches it
SHORT_S = 0.2  # for gets and puts that must time out

START_METHODS = ["spawn", "fork"]


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> BaseContext:
    return multiprocessing.get_context(request.param)


@pytest.fixture
def make_queue(daemon: Daemon) -> Iterator[Any]:
    """Queues on the test's daemon, each closed after the test."""
    made: list[shmarena.Queue] = []

    def make(maxsize: int = 0, **kwargs: Any) -> shmarena.Queue:
        q = shmarena.Queue(maxsize, client=daemon.client(), **kwargs)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def _stop(proc: BaseProcess) -> None:
    proc.terminate()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join(10)


@contextlib.contextmanager
def child(
    ctx: BaseContext, target: Any, *args: Any, daemonic: bool = True
) -> Iterator[BaseProcess]:
    """A started child process; on leaving, it must exit by itself with 0 (it
    is terminated if the body failed or it does not end in time). Daemonic
    unless it must start children of its own."""
    proc = ctx.Process(target=target, args=args, daemon=daemonic)
    proc.start()
    try:
        yield proc
    except BaseException:
        _stop(proc)
        raise
    proc.join(TIMEOUT_S)
    hung = proc.is_alive()
    if hung:
        _stop(proc)
    assert not hung, f"child {proc.name} did not end within {TIMEOUT_S} s"
    assert proc.exitcode == 0, f"child {proc.name} exited with {proc.exitcode}"


# -- children (module level, so spawn can import them) -----------------------


def _get_six_in_order(q: Any, can_start: Any) -> None:
    assert can_start.wait(TIMEOUT_S)
    got = [q.get(timeout=TIMEOUT_S) for _ in range(6)]
    assert got == [1, 2, 3, 4, 5, 6], got


def _get_one(q: Any, expected: Any) -> None:
    got = q.get(timeout=TIMEOUT_S)
    assert got == expected, got


def _put_two_to_five(q: Any, can_start: Any, can_continue: Any) -> None:
    assert can_start.wait(TIMEOUT_S)
    for i in range(2, 6):
        q.put(i)
    can_continue.set()


def _put_ten_to_nineteen(q: Any) -> None:
    for i in range(10, 20):
        q.put(i)


def _put_emptiness_twice(q: Any, can_start: Any, can_continue: Any) -> None:
    assert can_start.wait(TIMEOUT_S)
    try:
        q.put(q.empty())
        q.put(q.empty())
    finally:
        can_continue.set()


def _check_two_queued(q: Any) -> None:
    assert q.qsize() == 2
    assert q.full()
    assert not q.empty()
    assert q.get(timeout=TIMEOUT_S) == 5
    assert not q.empty()
    assert q.get(timeout=TIMEOUT_S) == 6
    assert q.empty()


def _put_from_grandchild(q: Any) -> None:
    q.put("from the grandchild")


def _make_queue_and_grandchild(daemon_name: str, run_dir: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    q = shmarena.Queue(client=shmarena.connect(daemon_name, runtime_dir=run_dir))
    grandchild = ctx.Process(target=_put_from_grandchild, args=(q,), daemon=True)
    grandchild.start()
    try:
        assert q.get(timeout=TIMEOUT_S) == "from the grandchild"
    finally:
        grandchild.join(TIMEOUT_S)
        if grandchild.is_alive():
            _stop(grandchild)
    assert grandchild.exitcode == 0, grandchild.exitcode
    q.close()


_WORKER_QUEUE: Any = None


def _keep_queue(q: Any) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = q


def _square_onto_queue(x: int) -> int:
    _WORKER_QUEUE.put((x, x * x, os.getpid()))
    return x


def _in_arena(arr: Any) -> bool:
    """Whether all of `arr`'s data lies in an arena segment this process maps."""
    from shmarena.client import registry

    address = arr.ctypes.data
    return any(
        start <= address and address + arr.nbytes <= end for start, end in registry.mapping_ranges()
    )


def _numpy_echo(inbox: Any, outbox: Any) -> None:
    import numpy as np

    arr = inbox.get(timeout=TIMEOUT_S)
    equal = bool(np.array_equal(arr, np.arange(arr.size, dtype=np.float64).reshape(arr.shape)))
    outbox.put((equal, _in_arena(arr), arr))  # sent on: named, not copied


# -- _TestQueue --------------------------------------------------------------


def test_put(make_queue, ctx):
    """CPython: _TestQueue.test_put. Every put signature fills the queue; a full
    queue refuses puts with queue.Full whatever block/timeout say; a child
    empties it."""
    q = make_queue(maxsize=6)
    can_start = ctx.Event()
    with child(ctx, _get_six_in_order, q, can_start):
        assert q.empty() is True
        assert q.full() is False

        q.put(1)
        q.put(2, True)
        q.put(3, True, None)
        q.put(4, False)
        q.put(5, False, None)
        q.put_nowait(6)

        # No sleep needed, unlike the stdlib: a put returns once the daemon has it.
        assert q.empty() is False
        assert q.full() is True
        assert q.qsize() == 6

        with pytest.raises(stdqueue.Full):
            q.put(7, False)
        with pytest.raises(stdqueue.Full):
            q.put(7, False, None)
        with pytest.raises(stdqueue.Full):
            q.put_nowait(7)
        with pytest.raises(stdqueue.Full):
            q.put(7, True, SHORT_S)
        with pytest.raises(stdqueue.Full):
            q.put(7, False, TIMEOUT_S)  # block=False ignores the timeout
        with pytest.raises(shmarena.QueueFull):  # ours is also a queue.Full
            q.put(7, True, timeout=SHORT_S)
        assert q.qsize() == 6  # the refused puts left nothing behind

        can_start.set()
    assert q.empty() is True
    assert q.full() is False


def test_put_waits_for_room(make_queue, ctx):
    """CPython: _TestQueue.test_put (the blocking put, which CPython only times
    out): a put into a full queue waits, and is done when a child takes one."""
    q = make_queue(maxsize=1)
    q.put("first")
    with child(ctx, _get_one, q, "first"):
        q.put("second", timeout=TIMEOUT_S)
    assert q.get(timeout=TIMEOUT_S) == "second"
    assert q.empty()


def test_get(make_queue, ctx):
    """CPython: _TestQueue.test_get. A child's puts become visible after it says
    so (one-way, as the stdlib's feeder thread: CPython sleeps DELTA here);
    every get signature returns them in order; an empty queue raises
    queue.Empty whatever block/timeout say."""
    q = make_queue()
    can_start, can_continue = ctx.Event(), ctx.Event()
    with child(ctx, _put_two_to_five, q, can_start, can_continue):
        assert q.empty() is True
        can_start.set()
        assert can_continue.wait(TIMEOUT_S)
        wait_for(lambda: q.qsize() == 4, what="the child's four puts")
        assert q.empty() is False

        assert q.get(True, None) == 2
        assert q.get(True) == 3
        assert q.get(timeout=TIMEOUT_S) == 4
        assert q.get_nowait() == 5
        assert q.empty() is True

        with pytest.raises(stdqueue.Empty):
            q.get(False)
        with pytest.raises(stdqueue.Empty):
            q.get(False, None)
        with pytest.raises(stdqueue.Empty):
            q.get_nowait()
        with pytest.raises(stdqueue.Empty):
            q.get(True, SHORT_S)
        with pytest.raises(stdqueue.Empty):
            q.get(False, TIMEOUT_S)  # block=False ignores the timeout
        with pytest.raises(shmarena.QueueEmpty):  # ours is also a queue.Empty
            q.get(timeout=SHORT_S)


def test_fork(make_queue, ctx):
    """CPython: _TestQueue.test_fork (a child of a process that has put already
    can put too). The parent's ten come first, then the child's ten, then
    nothing."""
    q = make_queue()
    for i in range(10):
        q.put(i)
    with child(ctx, _put_ten_to_nineteen, q):
        assert [q.get(timeout=TIMEOUT_S) for _ in range(20)] == list(range(20))
    with pytest.raises(stdqueue.Empty):
        q.get(False)


def test_qsize(make_queue):
    """CPython: _TestQueue.test_qsize."""
    q = make_queue()
    assert q.qsize() == 0
    q.put(1)
    assert q.qsize() == 1
    q.put(5)
    assert q.qsize() == 2
    assert q.get(timeout=TIMEOUT_S) == 1
    assert q.qsize() == 1
    assert q.get(timeout=TIMEOUT_S) == 5
    assert q.qsize() == 0


def test_no_import_lock_contention(daemon, tmp_path):
    """CPython: _TestQueue.test_no_import_lock_contention (bpo-22853). A module
    that uses a queue while it is being imported, from its own thread as well
    as the importing one, must not deadlock on the import lock: our lazy
    imports (the default client) happen inside put and get."""
    (tmp_path / "uses_a_queue_on_import.py").write_text(
        textwrap.dedent(
            """
            import threading

            import shmarena

            q = shmarena.Queue()  # the default client: $SHMARENA_NAME's daemon
            q.put("knock knock")
            assert q.get(timeout=30) == "knock knock"
            helper = threading.Thread(target=q.put, args=("who's there",))
            helper.start()
            assert q.get(timeout=30) == "who's there"
            helper.join(30)
            q.close()
            """
        )
    )
    proc = daemon.python(
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "__import__('uses_a_queue_on_import')\n"
        "print('imported')\n",
        str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == "imported"


def test_timeout(make_queue, daemon):
    """CPython: _TestQueue.test_timeout. A get with a timeout raises
    queue.Empty when nothing comes. CPython checks it waited; we check instead
    that a waiting get is held by the daemon (so it truly waits) and is met by
    a put from another thread of the same process, which a blocked get must
    not hold up."""
    q = make_queue()
    with pytest.raises(stdqueue.Empty):
        q.get(True, SHORT_S)

    stats = daemon.client().stats
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(q.get(timeout=TIMEOUT_S)))
    waiter.start()
    try:
        wait_for(lambda: stats()["waiting_requests"] == 1, what="the get to wait in the daemon")
        q.put("late")
    finally:
        waiter.join(TIMEOUT_S)
    assert not waiter.is_alive()
    assert got == ["late"]


class NotPicklable:
    """Refuses to be pickled, and remembers that it was asked."""

    def __init__(self) -> None:
        self.reduce_was_called = False

    def __reduce__(self) -> Any:
        self.reduce_was_called = True
        raise AttributeError("NotPicklable refuses to be pickled")


def test_unpicklable_put_raises_and_queue_goes_on(make_queue, daemon):
    """CPython: _TestQueue.test_queue_feeder_donot_stop_onexc (bpo-30414,
    bpo-33078). The stdlib's feeder thread survives the error and the queue's
    size stays right; ours raises in put itself, queues nothing, and the queue
    goes on working, its size right. A failed put with a large buffer in it
    leaves no block behind."""
    q = make_queue()
    with pytest.raises(AttributeError):
        q.put(NotPicklable())
    q.put(True)
    assert q.get(timeout=TIMEOUT_S) is True

    q = make_queue(maxsize=1)
    used_before = daemon.client().stats()["used_bytes"]
    with pytest.raises(AttributeError):
        q.put([bytes(1 << 20), NotPicklable()])
    assert q.qsize() == 0
    q.put(True)
    assert q.qsize() == 1
    assert q.get(timeout=TIMEOUT_S) is True
    assert q.empty()
    assert daemon.client().stats()["used_bytes"] == used_before


def test_unpicklable_put_raises_the_picklers_error(make_queue):
    """CPython: _TestQueue.test_queue_feeder_on_queue_feeder_error (bpo-30006).
    The stdlib hands the feeder's error to `_on_queue_feeder_error(e, obj)`;
    with no feeder thread, ours has no such hook: the caller of put gets the
    very exception the object's reduce raised, and the queue still works."""
    q = make_queue()
    obj = NotPicklable()
    with pytest.raises(AttributeError, match="refuses to be pickled"):
        q.put(obj)
    assert obj.reduce_was_called
    q.put(True)
    assert q.get(timeout=TIMEOUT_S) is True


def test_closed_queue_empty_exceptions(make_queue):
    """CPython: _TestQueue.test_closed_queue_empty_exceptions. close() and then
    join_thread() are fine on a used and an unused queue. Differs from the
    stdlib: there, empty() on a closed queue returns True if it was never used
    and raises OSError("handle is closed") if it was; ours raises ValueError
    "... is closed" in both cases (it asks the daemon, which a closed queue
    may no longer do). qsize() too raises here, where the stdlib's still
    answers from its semaphore."""
    unused, used = make_queue(), make_queue()
    used.put("foo")
    for q in (unused, used):
        q.close()
        q.join_thread()
        with pytest.raises(ValueError, match="is closed"):
            q.empty()
        with pytest.raises(ValueError, match="is closed"):
            q.qsize()


def test_join_thread_before_close_raises(make_queue):
    """CPython: the assertion in multiprocessing.Queue.join_thread (exercised by
    close_queue() in every _TestQueue case): join_thread is for closed queues."""
    q = make_queue()
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    q.close()
    q.join_thread()


def test_closed_queue_put_get_exceptions(make_queue):
    """CPython: _TestQueue.test_closed_queue_put_get_exceptions, and the
    _nowait forms. The message left in the queue is not handed out."""
    q = make_queue()
    q.put("left behind")
    q.close()
    for call in (
        lambda: q.put("foo"),
        lambda: q.get(),
        lambda: q.put_nowait("foo"),
        lambda: q.get_nowait(),
    ):
        with pytest.raises(ValueError, match="is closed"):
            call()


# -- TestSimpleQueue, TestSyncManagerTypes, TestManagerExceptions, ... -------


def test_empty(make_queue, ctx):
    """CPython: TestSimpleQueue.test_empty (bpo-30301: empty() in a spawned
    child). The child sees the queue empty, then not."""
    q = make_queue()
    can_start, can_continue = ctx.Event(), ctx.Event()
    with child(ctx, _put_emptiness_twice, q, can_start, can_continue):
        assert q.empty()
        can_start.set()
        assert can_continue.wait(TIMEOUT_S)
        assert not q.empty()
        assert q.get(timeout=TIMEOUT_S) is True
        assert q.get(timeout=TIMEOUT_S) is False
        assert q.empty()


def test_close_twice(make_queue):
    """CPython: TestSimpleQueue.test_close: closing twice is fine."""
    q = make_queue()
    q.close()
    q.close()


def test_queue_state_seen_by_child(make_queue, ctx):
    """CPython: TestSyncManagerTypes.test_queue. A child sees the size and
    fullness the parent left, and takes what the parent put."""
    q = make_queue(maxsize=2)
    q.put(5)
    q.put(6)
    with child(ctx, _check_two_queued, q):
        pass
    assert q.empty()
    assert not q.full()


def test_empty_exception_is_not_in_a_cycle(make_queue):
    """CPython: TestManagerExceptions.test_queue_get. The queue.Empty that
    get_nowait raises is freed as soon as it is dropped (no reference cycle
    through its traceback), so a failed get costs no garbage collection."""
    q = make_queue()
    enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            q.get_nowait()
        except stdqueue.Empty as error:
            ref = weakref.ref(error)
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


def test_queue_made_in_child(daemon, ctx):
    """CPython: TestStdinBadfiledescriptor.test_queue_in_process. A child makes
    a queue and hands it to a grandchild of its own, which puts."""
    method = ctx.get_start_method()
    with child(
        ctx, _make_queue_and_grandchild, daemon.name, daemon.run_dir, method, daemonic=False
    ):
        pass


# -- not in CPython: pools, executors, numpy, many large messages ------------


def test_pool_initargs(make_queue, ctx):
    """A queue in `multiprocessing.Pool` initargs: every worker puts its
    results, and the parent gets them all."""
    q = make_queue()
    pool = ctx.Pool(2, initializer=_keep_queue, initargs=(q,))
    try:
        assert pool.map_async(_square_onto_queue, range(20)).get(TIMEOUT_S) == list(range(20))
        pool.close()
        pool.join()
    finally:
        pool.terminate()
    got = sorted(q.get(timeout=TIMEOUT_S) for _ in range(20))
    assert [(x, sq) for x, sq, _ in got] == [(x, x * x) for x in range(20)]
    assert os.getpid() not in {pid for _, _, pid in got}
    with pytest.raises(stdqueue.Empty):
        q.get_nowait()


def test_process_pool_executor_initargs(make_queue):
    """A queue in `ProcessPoolExecutor` initargs (spawn): every worker puts
    its results, and the parent gets them all."""
    q = make_queue()
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        2, mp_context=spawn, initializer=_keep_queue, initargs=(q,)
    ) as executor:
        futures = [executor.submit(_square_onto_queue, x) for x in range(20)]
        try:
            assert [f.result(timeout=TIMEOUT_S) for f in futures] == list(range(20))
        except BaseException:
            executor.shutdown(wait=True, cancel_futures=True)
            raise
    got = sorted(q.get(timeout=TIMEOUT_S) for _ in range(20))
    assert [(x, sq) for x, sq, _ in got] == [(x, x * x) for x in range(20)]
    with pytest.raises(stdqueue.Empty):
        q.get_nowait()


def test_numpy_round_trip_stays_in_arena(make_queue, ctx):
    """A numpy array sent to a child arrives equal and viewing the arena (the
    child checks and says so); sent back, it arrives equal, in the arena, and
    read-only, because the child sent its block by name, not a copy."""
    inbox, outbox = make_queue(), make_queue()
    sent = np.arange(1 << 17, dtype=np.float64).reshape(256, 512)  # 1 MiB
    with child(ctx, _numpy_echo, inbox, outbox):
        inbox.put(sent)
        equal, in_arena, back = outbox.get(timeout=TIMEOUT_S)
    assert equal is True
    assert in_arena is True
    assert np.array_equal(back, sent)
    assert _in_arena(back)
    assert not back.flags.writeable


def test_many_large_messages_in_flight(make_queue):
    """Large messages queued before any is taken each keep their own bytes,
    even from a client with a block cache (a freed block must not be handed
    out again while the queue still holds it)."""
    q = make_queue()
    payloads = [bytes([i]) * (256 << 10) for i in range(8)]
    for p in payloads:
        q.put(p)
    assert [q.get(timeout=TIMEOUT_S) for _ in payloads] == payloads


def test_queue_pickles_by_name(make_queue, daemon):
    """What a child gets: a copy of the same queue (same name), not a snapshot
    of its contents."""
    from shmarena.client.default import default_client

    q = make_queue()
    q.put("shared")
    copy = pickle.loads(pickle.dumps(q))
    try:
        assert copy.name == q.name
        assert copy.get(timeout=TIMEOUT_S) == "shared"
        assert q.empty()
    finally:
        copy.close()
        default_client(daemon.name, daemon.run_dir).close()  # the copy's, made for it


def test_threads_share_a_queue(make_queue):
    """Threads of one process put and get on one queue at once (the
    "threads" flavour of CPython's _TestQueue, for one process): every item
    arrives exactly once."""
    q = make_queue(maxsize=8)  # small, so puts wait for room too
    got: list[Any] = []
    errors: list[BaseException] = []

    def produce(tag: int) -> None:
        try:
            for i in range(100):
                q.put((tag, i), timeout=TIMEOUT_S)
        except BaseException as error:
            errors.append(error)

    def consume() -> None:
        try:
            for _ in range(100):
                got.append(q.get(timeout=TIMEOUT_S))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(3)]
    threads += [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(got) == sorted((t, i) for t in range(3) for i in range(100))


def test_received_array_outlives_close(make_queue):
    """Objects got from a queue stay valid after close() (Queue.close says so):
    the array's block is this process's until the array goes."""
    q = make_queue()
    sent = np.arange(1 << 16, dtype=np.int64)  # 512 KiB: in a block of its own
    q.put(sent)
    got = q.get(timeout=TIMEOUT_S)
    q.close()
    assert _in_arena(got)
    assert np.array_equal(got, sent)
