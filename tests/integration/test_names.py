"""Named buffers across real processes: publish, lookup that waits, subscribe."""

from __future__ import annotations

import subprocess

import pytest

import shmarena
from tests.conftest import wait_for


def test_lookup_returns_when_another_process_publishes(daemon):
    c = daemon.client()
    child = daemon.python(
        "import shmarena\n"
        "c = shmarena.connect()\n"
        "buf = c.lookup('late/1', timeout=30)\n"
        "print(bytes(buf.view[:5]).decode(), buf.view.readonly, flush=True)\n",
        stdout=subprocess.PIPE,
    )
    wait_for(lambda: c.stats()["waiting_requests"] == 1, what="child waiting")
    buf = c.alloc(4096)
    buf.view[:5] = b"hello"
    c.publish("late/1", buf)
    out, _ = child.communicate(timeout=30)
    assert out.split() == ["hello", "True"]
    assert buf.view.readonly


def test_subscriber_sees_publish_and_recycle_in_order(daemon):
    c = daemon.client()
    with c.subscribe("s/") as sub:
        with c.owner("o") as o:
            bufs = [o.alloc(4096) for _ in range(3)]
            for i, b in enumerate(bufs):
                c.publish(f"s/{i}", b)
        events = [sub.get(timeout=10) for _ in range(6)]
    assert [e.kind for e in events] == ["publish"] * 3 + ["recycle"] * 3
    assert [e.name for e in events[:3]] == ["s/0", "s/1", "s/2"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)


def test_lookup_timeout(daemon):
    c = daemon.client()
    with pytest.raises(shmarena.UnknownName, match="nope"):
        c.lookup("nope", timeout=0.3)
