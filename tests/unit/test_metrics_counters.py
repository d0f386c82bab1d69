"""The figures `--metrics-port` exports, as the pure service counts them: per op,
per error code, and which op the server times (`last_op`); and the latency
histogram's buckets (shmarena/daemon/metrics.py `Latency`)."""

from __future__ import annotations

from shmarena.daemon.metrics import Latency
from shmarena.protocol import Op, encode
from tests.unit.test_service import MIN, Peer, make_service


def test_ops_and_errors_are_counted_by_name_and_code() -> None:
    service = make_service(size=64 * MIN)
    peer = Peer(service, b"a")
    assert service.last_op == "hello"
    handle = peer.ok(Op.ALLOC, MIN, "o", False)[0]
    assert service.last_op == "alloc"
    assert peer.err(Op.ALLOC, 65 * MIN, "o", False)[0] == "out_of_memory"
    assert peer.err(Op.RECYCLE, "nobody")[0] == "unknown_owner"
    peer.ok(Op.FREE, [handle])
    assert peer.err(Op.FREE, [handle])[0] == "stale_handle"
    counters = peer.ok(Op.STATS)[0]["counters"]  # the STATS request counts itself
    assert counters["ops"] == {"hello": 1, "alloc": 2, "recycle": 1, "free": 2, "stats": 1}
    assert counters["errors_by_code"] == {
        "out_of_memory": 1,
        "unknown_owner": 1,
        "stale_handle": 1,
    }
    assert counters["errors"] == sum(counters["errors_by_code"].values())
    # stats hands out copies: a caller changing them changes nothing in the service
    counters["ops"]["alloc"] = 99
    assert service.counters.ops["alloc"] == 2


def test_a_frame_that_does_not_parse_counts_an_error_but_no_op() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    before = dict(service.counters.ops)
    service.handle(peer.ident, b"\xc1", 100.0)
    assert service.last_op is None
    assert service.counters.ops == before
    assert service.counters.errors_by_code == {"protocol": 1}


def test_a_repeat_answered_from_the_reply_cache_is_not_an_op_again() -> None:
    service = make_service()
    peer = Peer(service, b"a")
    frame = encode([int(Op.ALLOC), peer.rid + 1, MIN, "o", False])
    first = service.handle(peer.ident, frame, 100.0)
    assert service.handle(peer.ident, frame, 100.0) == first
    assert service.last_op is None
    assert service.counters.ops["alloc"] == 1


def test_latency_buckets_are_cumulative_and_a_bound_is_in_its_bucket() -> None:
    latency = Latency((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 5.0):
        latency.observe("alloc", seconds)
    latency.observe("free", 0.02)
    snapshot = latency.snapshot()
    assert snapshot["alloc"][0] == [2, 3, 4]  # le 1 ms, le 10 ms, +Inf
    assert snapshot["alloc"][1] == 0.0005 + 0.001 + 0.002 + 5.0
    assert snapshot["free"][0] == [0, 0, 1]
