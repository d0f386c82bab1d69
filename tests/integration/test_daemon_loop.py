"""The daemon's loop under bursts: many requests queued on its socket at once,
from one client and from several, malformed frames among them. Each is
answered, in the order sent, and nothing is left unread: the loop waits on
one epoll set (daemon/poller.py) and drains the socket before it waits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from shmarena.daemon.liveness import process_start_ticks
from shmarena.limits import MAX_FRAMES
from shmarena.protocol import ERR, FREE_ID_BIT, OK, PROTOCOL_VERSION, Op
from tests.conftest import Daemon

BURST = 300  # well over the messages handled per wake-up and the reply pipe's 16


class Peer:
    """A bare DEALER with a session, speaking the protocol by hand."""

    def __init__(self, context: zmq.Context[Any], daemon: Daemon) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{daemon.socket_path}")
        self.next_id = FREE_ID_BIT
        pid = os.getpid()
        hello = [int(Op.HELLO), self.rid(), PROTOCOL_VERSION, pid, process_start_ticks(pid), "b"]
        self.socket.send(msgpack.packb(hello))
        assert self.reply()[0] == OK

    def rid(self) -> int:
        self.next_id += 1
        return self.next_id

    def reply(self) -> list[Any]:
        assert self.socket.poll(10_000), "no reply within 10 s"
        return list(msgpack.unpackb(self.socket.recv(), raw=False, strict_map_key=False))


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_a_burst_with_bad_frames_inside_is_answered_in_order(
    daemon: Daemon, context: zmq.Context[Any]
) -> None:
    peer = Peer(context, daemon)
    sent: list[int | None] = []
    for i in range(BURST):
        if i % 50 == 25:  # a frame that is not msgpack: an error without an id
            peer.socket.send(b"\xc1")
            sent.append(None)
        else:
            rid = peer.rid()
            peer.socket.send(msgpack.packb([int(Op.PING), rid]))
            sent.append(rid)
    replies = [peer.reply() for _ in sent]
    assert [r[1] for r in replies] == sent
    assert [r[0] for r in replies] == [OK if rid is not None else ERR for rid in sent]
    assert daemon.client().ping() > 0  # and it goes on serving


def test_one_message_of_many_frames_among_a_burst(
    daemon: Daemon, context: zmq.Context[Any]
) -> None:
    """Frames of one message are requests handled in order; a message of too
    many frames is refused whole, and the next messages are answered."""
    peer = Peer(context, daemon)
    ids = [peer.rid() for _ in range(MAX_FRAMES)]
    peer.socket.send_multipart([msgpack.packb([int(Op.PING), rid]) for rid in ids])
    too_many = [msgpack.packb([int(Op.PING), peer.rid()]) for _ in range(MAX_FRAMES + 1)]
    peer.socket.send_multipart(too_many)
    last = peer.rid()
    peer.socket.send(msgpack.packb([int(Op.PING), last]))
    assert [peer.reply()[1] for _ in ids] == ids
    refused = peer.reply()
    assert refused[0] == ERR
    assert peer.reply()[1] == last


def test_peers_bursting_at_once_are_all_answered(daemon: Daemon, context: zmq.Context[Any]) -> None:
    peers = [Peer(context, daemon) for _ in range(4)]
    sent: dict[int, list[int]] = {i: [] for i in range(len(peers))}
    for _ in range(BURST // 4):
        for i, peer in enumerate(peers):
            rid = peer.rid()
            peer.socket.send(msgpack.packb([int(Op.PING), rid]))
            sent[i].append(rid)
    for i, peer in enumerate(peers):
        assert [peer.reply()[1] for _ in sent[i]] == sent[i]
    result = daemon.cli("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_more_connections_than_the_monitor_pipe_holds(
    daemon: Daemon, context: zmq.Context[Any]
) -> None:
    """Each connection and disconnection is an event on the ROUTER's monitor
    socket, whose inproc pipe holds 2000 (both ends' high-water marks of
    1000): unread, they would stall ZeroMQ's I/O thread and with it the
    daemon. The loop reads them as they come."""
    for _ in range(1100):  # 2200 events
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"ipc://{daemon.socket_path}")
        socket.send(msgpack.packb([int(Op.PING), FREE_ID_BIT + 1]))  # no session: refused
        assert socket.poll(10_000), "no reply within 10 s"
        assert msgpack.unpackb(socket.recv())[0] == ERR
        socket.close(0)
    assert daemon.client().ping() > 0
