"""Every error a user meets after a lifetime mistake names the rule that was
broken and what to do, besides what was asked and what was found (issue 20,
item 3). Real daemon, real second processes where the mistake crosses one.

Each test asserts the error's class, its `details["rule"]` (the key of
shmarena.errors.LIFETIME_RULES) and the words a user searches for."""

from __future__ import annotations

import gc
import subprocess

import numpy as np
import pytest

import shmarena
from tests.conftest import Daemon, wait_for

# One daemon for the whole module (tests/conftest.py: shared_daemon).
pytestmark = pytest.mark.shared_daemon

SMALL = 16000  # served from the client's cache
LARGE = 4 << 20  # above any cache's limit: the daemon carves it
CACHES = [pytest.param(True, id="cache"), pytest.param(False, id="nocache")]
SIZES = [pytest.param(SMALL, id="small"), pytest.param(LARGE, id="large")]


def refusal(client: shmarena.Client, action: object) -> shmarena.ShmArenaError:
    """The error of `action`, raised at once or by the `sync()` after it (a
    free sent without waiting is refused by the next call)."""
    with pytest.raises(shmarena.ShmArenaError) as info:
        action()  # type: ignore[operator]
        client.sync()
    return info.value


def assert_rule(error: BaseException, cls: type[Exception], rule: str, *words: str) -> None:
    assert type(error) is cls, f"expected {cls.__name__}, got {type(error).__name__}: {error}"
    assert isinstance(error, shmarena.ShmArenaError)
    assert error.details.get("rule") == rule, f"rule {rule!r} is not the one named: {error}"
    text = str(error)
    assert "Rule: " in text and "What to do: " in text, text
    for word in words:
        assert word in text, f"{word!r} is not said in: {text}"


def used(client: shmarena.Client) -> int:
    return int(client.stats()["used_bytes"])


def settled(client: shmarena.Client) -> bool:
    stats = client.stats()
    return stats["used_bytes"] == 0 and stats["retained_only_bytes"] == 0


# -- double free -------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cache", CACHES)
def test_a_buffer_freed_twice_is_a_double_free(daemon: Daemon, cache: bool, size: int) -> None:
    client = daemon.client(cache=cache)
    buf = client.alloc(size)
    buf.free()
    for again in (buf.free, lambda: client.free(buf)):
        error = refusal(client, again)
        assert_rule(
            error, shmarena.StaleHandle, "double_free", "double free", "free each buffer once"
        )
        assert f"{buf.offset:#x}" in str(error)


@pytest.mark.parametrize("size", SIZES)
def test_a_handle_freed_twice_after_its_block_was_reused_says_so(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    buf = client.alloc(size)
    handle = buf.handle
    client.free(handle)
    client.sync()
    again = client.alloc(size)
    again.handle  # noqa: B018 - the daemon hears of the new hand-out
    client.sync()
    error = refusal(client, lambda: client.free(handle))
    assert_rule(error, shmarena.StaleHandle, "double_free", "double free", "nothing was freed")
    if (again.segment, again.offset) == (handle.segment, handle.offset):
        assert "handed out again" in str(error)
    again.free()


@pytest.mark.parametrize("size", SIZES)
def test_a_free_after_the_owner_was_recycled_names_the_recycle(daemon: Daemon, size: int) -> None:
    client = daemon.client()
    with client.owner("batch") as batch:
        buf = batch.alloc(size)
        buf.handle  # noqa: B018 - known to the daemon (a large one is anyway)
    error = refusal(client, buf.free)
    assert_rule(error, shmarena.StaleHandle, "owner_recycled", "recycled", "double free")


def test_the_same_buffer_twice_in_one_free(daemon: Daemon) -> None:
    client = daemon.client()
    buf = client.alloc(SMALL)
    error = refusal(client, lambda: client.free([buf, buf]))
    assert_rule(error, shmarena.StaleHandle, "double_free", "appears twice", "double free")
    buf.free()


# -- the daemon knows why a block is gone ------------------------------------


def test_retain_of_a_freed_block_says_its_owner_freed_it(daemon: Daemon) -> None:
    producer = daemon.client(cache=False)
    consumer = daemon.client()
    buf = producer.alloc(LARGE)
    handle = buf.handle
    buf.free()
    producer.sync()
    error = refusal(consumer, lambda: consumer.attach(handle, retain=True))
    assert_rule(error, shmarena.StaleHandle, "use_after_free", "freed by its owner", "retain")
    assert error.details["reason"] == "freed"


def test_retain_of_a_recycled_block_names_the_owner(daemon: Daemon) -> None:
    producer = daemon.client()
    consumer = daemon.client()
    with producer.owner("frames-7") as frames:
        handle = frames.alloc(SMALL).handle
    error = refusal(consumer, lambda: consumer.attach(handle, retain=True))
    assert_rule(error, shmarena.StaleHandle, "owner_recycled", "'frames-7' was recycled")


PRODUCER = r"""
import sys
import shmarena
client = shmarena.connect()
array = client.ndarray((1 << 18,), "float64")
array[:] = 1.5
buf = client.alloc(int(sys.argv[1]))
print(shmarena.dumps(array, client=client).hex(), flush=True)
print(" ".join(map(str, buf.handle)), flush=True)
print(shmarena.share(array), flush=True)
sys.stdin.readline()  # exits when told, holding all of it
"""


def test_a_consumer_whose_producer_exited_is_told_so(daemon: Daemon) -> None:
    """A real second process dumps an arena array (named in place, not
    copied), hands out a handle and a share token, and exits."""
    consumer = daemon.client()
    child = daemon.python(PRODUCER, str(SMALL), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    message = bytes.fromhex(child.stdout.readline().strip())
    handle = shmarena.Handle(*map(int, child.stdout.readline().split()))
    token = child.stdout.readline().strip()
    pid = child.pid
    child.communicate("exit\n", timeout=60)
    wait_for(lambda: used(consumer) == 0, what="the daemon to reclaim the producer's blocks")

    error = refusal(consumer, lambda: shmarena.loads(message, client=consumer))
    assert_rule(error, shmarena.StaleHandle, "producer_exited", "producer", "exited", str(pid))
    error = refusal(consumer, lambda: consumer.attach(handle, retain=True))
    assert_rule(error, shmarena.StaleHandle, "producer_exited", "exited", "detached=True")
    assert error.details["reason"] == "session_ended" and error.details["pid"] == pid
    error = refusal(consumer, lambda: shmarena.attach_array(token, client=consumer))
    assert_rule(error, shmarena.StaleHandle, "token_outlived", "keep its array alive", "exited")


# -- pickling ---------------------------------------------------------------


def test_a_message_loaded_twice_says_keep_true(daemon: Daemon) -> None:
    client = daemon.client()
    data = shmarena.dumps(np.arange(1 << 16, dtype=np.int64), client=client)
    first = shmarena.loads(data, client=client)
    error = refusal(client, lambda: shmarena.loads(data, client=client))
    assert_rule(error, shmarena.StaleHandle, "loaded_twice", "keep=True", "loaded")
    # The same once the first load's objects are gone and the block with them.
    del first
    gc.collect()
    wait_for(lambda: settled(client), what="the loaded block to go with its last view")
    error = refusal(client, lambda: shmarena.loads(data, client=client))
    assert_rule(error, shmarena.StaleHandle, "loaded_twice", "keep=True")


def test_loads_of_an_array_its_producer_freed_names_the_producer(daemon: Daemon) -> None:
    """`dumps` names an arena array in place (as a Dask task's result is
    sent); the producer drops it before the consumer loads."""
    producer = daemon.client()
    consumer = daemon.client()
    array = producer.ndarray((1 << 17,), "float64")
    array[:] = 3.0
    data = shmarena.dumps(array, client=producer)
    # The daemon must know the block is handed out before "used is 0" can mean
    # "freed": a cache hand-out is reported a few ms later, on its own.
    producer.sync()
    assert used(consumer) > 0
    del array
    gc.collect()
    wait_for(lambda: used(consumer) == 0, what="the dropped array's block to be freed")
    error = refusal(consumer, lambda: shmarena.loads(data, client=consumer))
    assert_rule(
        error, shmarena.StaleHandle, "freed_before_load", "producer", "freed", "keep the array"
    )


# -- queues, retains and tokens -------------------------------------------------

FREEING_PRODUCER = r"""
import sys
import shmarena
client = shmarena.connect()
buf = client.alloc(int(sys.argv[1]))
print(" ".join(map(str, buf.handle)), flush=True)
sys.stdin.readline()
buf.free()
client.sync()
print("freed", flush=True)
sys.stdin.readline()
"""


def test_a_queue_put_of_a_block_its_owner_freed_names_the_rule(daemon: Daemon) -> None:
    """A reader attaches without a reference (plain attach), the producer in
    another process frees the block, the reader puts an array over it on a
    queue: the put is refused, saying the block was freed and how to keep it."""
    client = daemon.client()
    child = daemon.python(
        FREEING_PRODUCER, str(LARGE), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    handle = shmarena.Handle(*map(int, child.stdout.readline().split()))
    reader = client.attach(handle)  # kept: the queue finds the array's block through it
    array = reader.ndarray(dtype="uint8")
    child.stdin.write("free\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "freed"
    queue = shmarena.Queue(client=client)
    try:
        error = refusal(client, lambda: queue.put(array))
        assert_rule(
            error,
            shmarena.StaleHandle,
            "use_after_free",
            "queue put",
            "freed by its owner",
            "retain=True",
        )
        assert queue.qsize() == 0
    finally:
        queue.close()
        child.communicate("exit\n", timeout=60)


def test_a_release_without_a_retain_names_the_rule(daemon: Daemon) -> None:
    producer = daemon.client()
    consumer = daemon.client()
    buf = producer.alloc(SMALL)
    attached = consumer.attach(buf.handle)  # plain: no reference taken
    error = refusal(consumer, attached.release)
    assert_rule(error, shmarena.InvalidRequest, "release_unretained", "retain=True")
    buf.free()


def test_attach_array_of_a_token_whose_array_was_dropped(daemon: Daemon) -> None:
    sharer = daemon.client()
    receiver = daemon.client()
    array = sharer.ndarray((1 << 17,), "float32")
    token = shmarena.share(array)
    del array
    gc.collect()
    wait_for(lambda: used(receiver) == 0, what="the dropped array's block to be freed")
    error = refusal(receiver, lambda: shmarena.attach_array(token, client=receiver))
    assert_rule(error, shmarena.StaleHandle, "token_outlived", "keep its array alive", "freed")
