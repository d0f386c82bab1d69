"""`shmarena daemon --metrics-port`: the daemon's figures as Prometheus text.

This module owns the metrics endpoint: an HTTP server (prometheus_client's
WSGI app on the standard library's server) in a daemon thread of the daemon
process, the collector it calls on each scrape, and the request latency
histogram. The service's state is only ever read by the server loop's thread:
a scrape writes a byte to a pipe the loop polls and waits; the loop takes
`Service.stats` and a copy of the histogram at that instant and hands them
over. So every number of one scrape is of the same moment (the histogram's
count equals the ops counted), and a scrape costs the loop one `stats`.

The endpoint is plain HTTP without authentication: on the default loopback
address any local user can read it (bind it elsewhere, or put it behind a
proxy or firewall rule, when the figures are private). No scraper can tie it
up: at most METRICS_MAX_CONNECTIONS at once (those descriptors are part of the
daemon's reserve), METRICS_IO_TIMEOUT_S per read or write, and
METRICS_CONNECTION_MAX_S for a whole connection.

prometheus_client is optional (`pip install 'shmarena[metrics]'`): it is
imported only when the endpoint starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from shmarena.errors import DaemonStartError

# Daemon service times run from microseconds (an alloc) to milliseconds (a
# large stats): the default buckets of prometheus_client start at 5 ms.
LATENCY_BUCKETS_S = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip
# A scrape waits this long for the loop; then it reports shmarena_up 0.
SNAPSHOT_TIMEOUT_S = 5.0
# Scrapers served at once; a connection over this is answered 503 and closed.
# The daemon keeps this many descriptors in its reserve (see server.py).
METRICS_MAX_CONNECTIONS = 8
# A scraper's socket may block (reading the request, writing the answer) this
# long at a time; no connection lives longer than METRICS_CONNECTION_MAX_S.
METRICS_IO_TIMEOUT_S = 5.0
METRICS_CONNECTION_MAX_S = 3 * SNAPSHOT_TIMEOUT_S
INSTALL_HINT = "pip install 'shmarena[metrics]'"


def missing_package() -> str:
    """Why --metrics-port cannot work here ("" when prometheus_client imports)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        return (
            f"--metrics-port needs the prometheus_client package, which cannot be imported "
            f"here ({exc}); install it with `{INSTALL_HINT}`, or leave --metrics-port out"
        )
    return ""


class Latency:
    """Per op: how many requests took at most each bucket's bound, and the sum
    of their durations. Touched only by the loop's thread (no lock)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts: dict[str, list[int]] = {}  # op -> per bucket, the last is +Inf
        self.sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        counts = self.counts.get(op)
        if counts is None:
            counts = self.counts[op] = [0] * (len(self.bounds) + 1)
            self.sums[op] = 0.0
        counts[bisect_left(self.bounds, seconds)] += 1  # le: a bound is in its bucket
        self.sums[op] += seconds

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """op -> (cumulative counts per bound, then +Inf; sum of seconds)."""
        out = {}
        for op, counts in self.counts.items():
            total, cumulative = 0, []
            for count in counts:
                total += count
                cumulative.append(total)
            out[op] = (cumulative, self.sums[op])
        return out


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_IO_TIMEOUT_S  # per read or write of the socket

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the daemon's log


class Exporter:
    """The endpoint of one daemon. The server calls `start`, registers `fd`
    in its poller, calls `answer` when `fd` is readable, handles requests
    through `timed(service)`, and `close` at the end."""

    def __init__(self, bind: str, port: int) -> None:
        self.bind = bind
        self.requested_port = port
        self.port = port
        self.latency = Latency()
        self._cond = threading.Condition()
        self._asked = 0  # scrapes that asked for a snapshot
        self._done = 0  # the last of them the loop answered
        self._snapshot: tuple[dict[str, Any], dict[str, tuple[list[int], float]]] | None = None
        self._closing = False
        self._wake_r = self._wake_w = -1
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def fd(self) -> int:
        return self._wake_r

    @property
    def where(self) -> dict[str, Any]:
        return {"bind": self.bind, "port": self.port}

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        """Listen and serve in a daemon thread; DaemonStartError when the
        package is missing or the address cannot be had."""
        missing = missing_package()
        if missing:
            raise DaemonStartError(missing)
        from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

        # auto_describe off: registering must not scrape (the loop is not running yet)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        ProcessCollector(registry=registry)  # the daemon's own CPU, memory, descriptors
        try:
            family = socket.getaddrinfo(self.bind, self.requested_port, type=socket.SOCK_STREAM)
            server_class = type(
                "MetricsServer", (_ThreadingWSGIServer,), {"address_family": family[0][0]}
            )
            self._httpd = make_server(
                self.bind, self.requested_port, make_wsgi_app(registry), server_class,
                handler_class=_QuietHandler,
            )  # fmt: skip
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise DaemonStartError(
                f"--metrics-bind {self.bind} --metrics-port {self.requested_port}: cannot "
                f"listen there ({reason}); pick another port (0 picks a free one) or address"
            ) from None
        self.port = int(self._httpd.server_address[1])
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="shmarena-metrics",
            daemon=True,
        )
        self._thread.start()

    # -- the loop's side -------------------------------------------------

    def answer(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Called by the loop when `fd` is readable: publish a snapshot taken
        now for every scrape that asked so far."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
        with self._cond:
            asked = self._asked
        if asked == self._done:
            return
        snapshot = (stats(), self.latency.snapshot())
        with self._cond:
            self._snapshot, self._done = snapshot, asked
            self._cond.notify_all()

    # -- the scrape's side (the HTTP thread) -----------------------------

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol: the families of one scrape."""
        from prometheus_client.core import GaugeMetricFamily

        with self._cond:
            self._asked += 1
            mine = self._asked
            # the pipe is full of wake-ups: the loop is coming anyway
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"m")
            got = self._cond.wait_for(
                lambda: self._done >= mine or self._closing, timeout=SNAPSHOT_TIMEOUT_S
            )
            snapshot = self._snapshot if got and not self._closing else None
        up = GaugeMetricFamily(
            "shmarena_up", "1 when the daemon's loop answered this scrape in time, else 0"
        )
        up.add_metric([], 0 if snapshot is None else 1)
        yield up
        if snapshot is not None:
            yield from families(*snapshot, bounds=self.latency.bounds)

    def close(self) -> None:
        """Stop serving (waits for the HTTP thread) and close the pipe."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._httpd is not None:
            if self._thread is not None:
                self._httpd.shutdown()
                self._thread.join(timeout=5)
            self._httpd.server_close()
            self._httpd = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, none outliving the process, at most
    METRICS_MAX_CONNECTIONS at once (more are answered 503 and closed), and
    none kept longer than METRICS_CONNECTION_MAX_S (a scraper that sends its
    request or reads the answer a byte at a time is cut off)."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: dict[socket.socket, float] = {}  # connection -> when accepted
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = len(self._open) >= METRICS_MAX_CONNECTIONS
            if not full:
                self._open[request] = time.monotonic()
        if full:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(OVER_CAP_REPLY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it: it is not open either
            with self._open_lock:
                self._open.pop(request, None)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)

    def service_actions(self) -> None:
        """Between polls of the listening socket: cut off overdue connections
        (their thread then sees the socket closed and ends)."""
        now = time.monotonic()
        with self._open_lock:
            overdue = [c for c, t in self._open.items() if now - t > METRICS_CONNECTION_MAX_S]
        for connection in overdue:
            with contextlib.suppress(OSError):  # closed already
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # timed out, cut off or went away: the scraper's business
        super().handle_error(request, client_address)


OVER_CAP_REPLY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    + (
        f"shmarena metrics: {METRICS_MAX_CONNECTIONS} connections are open at once already, "
        "the most this endpoint serves; close idle ones or scrape less often\n"
    ).encode()
)


# (metric, stats key, help) of the gauges read straight from `stats`
GAUGES = (
    ("shmarena_arena_size_bytes", "size_bytes", "Arena size now, all segments"),
    ("shmarena_arena_max_size_bytes", "max_size_bytes", "Cap of --max-size (= size if fixed)"),
    ("shmarena_used_bytes", "used_bytes", "Bytes of blocks held by owners"),
    ("shmarena_peak_used_bytes", "peak_used_bytes",
     "The most shmarena_used_bytes was since start or `stats --reset-peak`"),
    ("shmarena_peak_used_timestamp_seconds", "peak_at", "When that peak was reached, Unix time"),
    ("shmarena_used_warning", "used_warning",
     "1 while used bytes are over --warn-used (until they fall 5 points below it), else 0"),
    ("shmarena_requested_bytes", "requested_bytes", "Bytes those blocks were asked for"),
    ("shmarena_free_bytes", "free_bytes", "Free bytes in total"),
    ("shmarena_largest_free_bytes", "largest_free_bytes", "The largest free block"),
    ("shmarena_cached_bytes", "cached_bytes", "Free blocks sitting in client caches"),
    ("shmarena_cached_blocks", "cached_blocks", "Blocks sitting in client caches"),
    ("shmarena_retained_only_bytes", "retained_only_bytes",
     "Blocks freed by their owner, kept alive by a reader's retain"),
    ("shmarena_retained_only_blocks", "retained_only_blocks", "Count of those blocks"),
    ("shmarena_pinned_bytes", "pinned_bytes",
     "Blocks freed by their owner, kept out of reuse while a process still views them"),
    ("shmarena_pinned_blocks", "pinned_blocks", "Count of those blocks"),
    ("shmarena_queued_bytes", "queued_bytes", "Bytes of blocks held by queued messages"),
    ("shmarena_fragmentation_ratio", "fragmentation", "1 - largest free / free"),
    ("shmarena_live_blocks", "live_blocks", "Blocks held by owners"),
    ("shmarena_owners", "owners", "Owners"),
    ("shmarena_sessions", "sessions", "Client sessions"),
    ("shmarena_recovering_sessions", "recovering_sessions",
     "Recovered sessions still waiting for their client"),
    ("shmarena_waiting_requests", "waiting_requests", "Requests kept until met or timed out"),
    ("shmarena_names", "names", "Published names"),
    ("shmarena_start_time_seconds", "started_at", "When the daemon started, Unix time"),
)  # fmt: skip
# (metric without _total, counters key, help) of the plain counters
COUNTERS = (
    ("shmarena_reclaimed_bytes", "reclaimed_bytes", "Bytes reclaimed from dead/expired clients"),
    ("shmarena_sessions_reclaimed", "sessions_reclaimed", "Sessions reclaimed (died, expired)"),
    ("shmarena_sessions_opened", "sessions_opened", "Sessions opened"),
    ("shmarena_allocated_blocks", "allocs", "Blocks allocated by the daemon"),
    ("shmarena_freed_blocks", "frees", "Blocks freed by FREE requests"),
    ("shmarena_internal_errors", "internal_errors",
     "Bugs of the daemon caught while handling a request or timer (logged, answered)"),
    ("shmarena_quarantined_sessions", "quarantined_sessions",
     "Sessions ended because the state failed its check after an internal error"),
    ("shmarena_used_warnings", "used_warnings", "Times used bytes rose to --warn-used"),
)  # fmt: skip


def families(
    stats: dict[str, Any],
    latency: dict[str, tuple[list[int], float]],
    bounds: tuple[float, ...] = LATENCY_BUCKETS_S,
) -> Iterator[Any]:
    """The metric families of one snapshot (`Service.stats` and `Latency.snapshot`)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )
    from prometheus_client.utils import floatToGoString

    info = InfoMetricFamily("shmarena", "The daemon")
    info.add_metric(
        [],
        {
            "name": str(stats["name"]),
            "version": str(stats["version"]),
            "allocator": str(stats["allocator"]),
            "epoch": str(stats["epoch"]),
        },
    )
    yield info
    for metric, key, text in GAUGES:
        yield GaugeMetricFamily(metric, text, value=float(stats[key]))
    yield GaugeMetricFamily("shmarena_segments", "Arena segments", value=len(stats["segments"]))
    if stats.get("warn_used_bytes") is not None:  # only with --warn-used
        yield GaugeMetricFamily(
            "shmarena_used_warning_threshold_bytes",
            "Used bytes at which --warn-used warns (shmarena_used_warning goes to 1)",
            value=stats["warn_used_bytes"],
        )
    yield GaugeMetricFamily("shmarena_queues", "Open queues", value=len(stats["queues"]))
    by_order = GaugeMetricFamily(
        "shmarena_free_blocks",
        "Free blocks of min_block << order bytes (extents: free runs of at least that, "
        "under twice it), like /proc/buddyinfo",
        labels=["order"],
    )
    for order, count in sorted(stats["free_blocks_by_order"].items(), key=lambda i: int(i[0])):
        by_order.add_metric([order], count)
    yield by_order
    counters = stats["counters"]
    for metric, key, text in COUNTERS:
        yield CounterMetricFamily(metric, text, value=counters[key])
    replies = stats.get("replies")  # the server's figures (absent from a bare Service)
    if replies is not None:
        yield CounterMetricFamily(
            "shmarena_replies_dropped_unread",
            "Replies dropped because their client left as many unread as the daemon holds",
            value=replies["dropped_unread"],
        )
        yield CounterMetricFamily(
            "shmarena_replies_undeliverable",
            "Replies dropped because their client was gone",
            value=replies["undeliverable"],
        )
    requests = CounterMetricFamily(
        "shmarena_requests", "Requests the daemon parsed, by op", labels=["op"]
    )
    for op, count in sorted(counters["ops"].items()):
        requests.add_metric([op], count)
    yield requests
    errors = CounterMetricFamily("shmarena_errors", "Error replies, by code", labels=["code"])
    for code, count in sorted(counters["errors_by_code"].items()):
        errors.add_metric([code], count)
    yield errors
    duration = HistogramMetricFamily(
        "shmarena_request_duration_seconds",
        "Time the daemon's loop spent on a request (not the time a kept request waited)",
        labels=["op"],
    )
    go_float = cast(Callable[[float], str], floatToGoString)  # untyped upstream
    labels = [go_float(b) for b in bounds] + ["+Inf"]
    for op, (cumulative, total_s) in sorted(latency.items()):
        duration.add_metric([op], list(zip(labels, cumulative, strict=True)), sum_value=total_s)
    yield duration
