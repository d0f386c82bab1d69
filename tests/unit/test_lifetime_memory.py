"""The ledger remembers why the last blocks left their owners (freed, owner
recycled, session ended and how), bounded, so a stale handle's refusal names
the lifetime rule that was broken. Pure: the service driven directly."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from shmarena.daemon.gone import FREED, Gone, remember
from shmarena.protocol import ERR, Op
from tests.unit.test_service import Peer, make_service


def refused(peer: Peer, op: Op, *args: object) -> tuple[str, str, dict[str, Any]]:
    reply = peer.raw(op, *args)
    assert reply[0] == ERR, reply
    return reply[2], reply[3], reply[4]


def test_a_retain_after_a_free_says_freed_by_its_owner() -> None:
    service = make_service()
    producer, consumer = Peer(service, b"p"), Peer(service, b"c")
    (handle,) = producer.ok(Op.ALLOC, 100)
    producer.ok(Op.FREE, [handle])
    code, message, details = refused(consumer, Op.RETAIN, [handle])
    assert code == "stale_handle"
    assert (details["rule"], details["reason"]) == ("use_after_free", "freed")
    assert details["owner"] == f"session-{producer.session}"
    assert "freed by its owner" in message and "Rule: " in message
    assert service.check() == []


def test_a_retain_after_a_recycle_names_the_owner() -> None:
    service = make_service()
    producer, consumer = Peer(service, b"p"), Peer(service, b"c")
    (handle,) = producer.ok(Op.ALLOC, 100, "batch-3", False)
    producer.ok(Op.RECYCLE, "batch-3")
    _, message, details = refused(consumer, Op.RETAIN, [handle])
    assert (details["rule"], details["reason"], details["owner"]) == (
        "owner_recycled",
        "recycled",
        "batch-3",
    )
    assert "'batch-3' was recycled" in message


def test_a_retain_after_the_producer_exited_says_so() -> None:
    service = make_service()
    producer, consumer = Peer(service, b"p", pid=4321), Peer(service, b"c")
    (handle,) = producer.ok(Op.ALLOC, 100)
    service.reclaim(producer.session, "exited", 1.0)
    _, message, details = refused(consumer, Op.RETAIN, [handle])
    assert (details["rule"], details["reason"], details["ended"]) == (
        "producer_exited",
        "session_ended",
        "exited",
    )
    assert details["pid"] == 4321 and "process 4321 exited" in message


def test_a_double_free_after_reuse_says_handed_out_again() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    (handle,) = peer.ok(Op.ALLOC, 100)
    peer.ok(Op.FREE, [handle])
    (again,) = peer.ok(Op.ALLOC, 100)
    assert again[1:4] == handle[1:4]  # the same block, a newer generation
    _, message, details = refused(peer, Op.FREE, [handle])
    assert details["rule"] == "double_free"
    assert "double free" in message and "handed out again" in message
    peer.ok(Op.FREE, [again])


def test_the_memory_is_bounded_and_forgets_the_oldest_first() -> None:
    service = make_service()
    service.ledger.max_remembered_frees = 3
    assert service.stats(0.0)["limits"]["remembered_frees"] == 3
    peer = Peer(service, b"a")
    handles = [peer.ok(Op.ALLOC, 100)[0] for _ in range(5)]
    for handle in handles:
        peer.ok(Op.FREE, [handle])
    assert len(service.ledger.gone) == 3
    _, message, details = refused(peer, Op.RETAIN, [handles[0]])  # forgotten
    assert (details["rule"], details["reason"]) == ("use_after_free", "")
    assert "freed, or its owner recycled or its process ended" in message
    _, _, details = refused(peer, Op.RETAIN, [handles[-1]])  # remembered
    assert details["reason"] == "freed"
    assert service.check() == []


def test_remember_keeps_the_newest_last_and_forgets_beyond_its_bound() -> None:
    memory: OrderedDict[int, Gone] = OrderedDict()
    for address in (0x1000, 0x2000, 0x3000, 0x1000):  # 0x1000 again: now the newest
        remember(memory, address, Gone(address, FREED, "", "o", 1), limit=2)
    assert list(memory) == [0x3000, 0x1000]
