"""The loop skips looking at the router again before it waits when the last
look, after its replies, found nothing and nothing was sent since
(daemon/server.py, `quiet`). One-way messages send nothing: whatever comes
after them, from the same client or another, is still answered."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from shmarena.protocol import OK, Op
from tests.conftest import Daemon
from tests.integration.test_daemon_loop import Peer

ROUNDS = 150


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_requests_after_one_way_posts_are_answered(
    daemon: Daemon, context: zmq.Context[Any]
) -> None:
    poster, other = Peer(context, daemon), Peer(context, daemon)
    for sequence in range(1, ROUNDS + 1):
        # a one-way POST (no reply), then round trips of another client and its own
        poster.socket.send(msgpack.packb([int(Op.POST), sequence, []]))
        for peer in (other, poster):
            rid = peer.rid()
            peer.socket.send(msgpack.packb([int(Op.PING), rid]))
            reply = peer.reply()
            assert reply[:2] == [OK, rid]
    assert not poster.socket.poll(0)  # the posts were accepted: no late errors
    stats = daemon.client().stats()
    assert stats["counters"]["ops"]["post"] >= ROUNDS
    result = daemon.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
