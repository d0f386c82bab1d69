"""iceoryx2 as a peer of the benchmark: an optional import, and the few pieces
of its Python API the sections use (publish-subscribe of byte slices).

iceoryx2 (Rust, no daemon) gives every publisher a data segment of fixed
buckets made up front; a loan takes a bucket, a send hands its offset to the
subscribers' queues and a subscriber's release gives it back, all lock-free
in shared memory. It is optional (`pip install 'shmarena[bench]'`): without
it `available()` is False and the sections skip its columns, saying so."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from typing import Any

MISSING = "iceoryx2 not installed (the bench extra of shmarena has it): its columns are skipped"

try:
    import iceoryx2 as _iox  # type: ignore[import-untyped]  # it ships no type hints

    _iox.set_log_level(_iox.LogLevel.Error)  # its warnings about stale nodes are not ours
except ImportError:  # optional: the sections skip it
    _iox = None


def available() -> bool:
    return _iox is not None


def service_name(tag: str) -> str:
    """A service name of this run only (so two runs never share a service)."""
    return f"shmarena-bench-{os.getpid()}-{tag}"


class Node:
    """One iceoryx2 node of this process and the services it made; `close()`
    drops them all (iceoryx2 removes a service's segments with its last port)."""

    def __init__(self) -> None:
        assert _iox is not None, MISSING
        self._node: Any = _iox.NodeBuilder.new().create(_iox.ServiceType.Ipc)
        self._services: list[Any] = []
        self._ports: list[Any] = []  # publishers and subscribers: delete() ends them

    def _service(self, name: str, create: bool) -> Any:
        # One publisher, one subscriber, one sample in flight each way: the
        # smallest pool the pipeline's cycle needs (a publisher's data segment
        # holds every sample that can be out at once, each max_len bytes).
        assert _iox is not None
        builder = (
            self._node.service_builder(_iox.ServiceName.new(name))
            .publish_subscribe(_iox.Slice[ctypes.c_uint8])
            .max_publishers(1)
            .max_subscribers(1)
            .subscriber_max_buffer_size(1)
            .subscriber_max_borrowed_samples(1)
            .history_size(0)
        )
        service = builder.create() if create else builder.open()
        self._services.append(service)
        return service

    def publisher(self, name: str, max_len: int) -> Any:
        """A new service `name` and its publisher of byte slices up to `max_len`."""
        assert _iox is not None
        publisher = (
            self._service(name, create=True)
            .publisher_builder()
            .initial_max_slice_len(max_len)
            .max_loaned_samples(1)
            .allocation_strategy(_iox.AllocationStrategy.Static)
            .create()
        )
        self._ports.append(publisher)
        return publisher

    def subscriber(self, name: str) -> Any:
        """A subscriber of the existing service `name` (made by another process)."""
        subscriber = self._service(name, create=False).subscriber_builder().create()
        self._ports.append(subscriber)
        return subscriber

    def close(self) -> None:
        """Ports first, then services and node: services and nodes have no
        delete(), they go with their last Python reference."""
        for port in reversed(self._ports):
            with contextlib.suppress(Exception):
                port.delete()
        self._ports.clear()
        self._services.clear()
        self._node = None


def loan_release(publisher: Any, size: int) -> Callable[[int], None]:
    """iceoryx2's allocation pair: loan a `size`-byte sample and give it back
    unsent (the peer of shmarena's cached alloc+free)."""

    def run(count: int) -> None:
        loan = publisher.loan_slice_uninit
        for _ in range(count):
            loan(size).delete()

    return run


def send_frame(publisher: Any, size: int, fill: Callable[[memoryview], None]) -> None:
    """Loan a `size`-byte sample, let `fill` write it, send it."""
    sample = publisher.loan_slice_uninit(size)
    view = sample.payload().as_memory_view()
    fill(view)
    view.release()
    sample.assume_init().send()


def receive_frame(subscriber: Any, read: Callable[[memoryview], bool], tries: int) -> bool:
    """Take the next sample (sent before we were told of it), let `read` look
    at it, release it; False when none came in `tries` polls."""
    for _ in range(tries):
        sample = subscriber.receive()
        if sample is not None:
            break
    else:
        return False
    view = sample.payload().as_memory_view()
    ok = read(view)
    view.release()
    sample.delete()
    return ok
