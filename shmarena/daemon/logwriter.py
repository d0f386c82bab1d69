"""Writing the daemon's log lines without ever stalling the serving loop.

A log line goes to stderr, and stderr may be a pipe that nobody drains fast
enough (a supervisor that reads only at exit, a stuck journald): a blocking
write there would stop every client. So lines go into a bounded queue that a
thread writes out in order; when the queue is full, lines are dropped and
counted, and a note says how many once there is room again.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

# Lines held while the reader of stderr lags (a few MiB at most).
QUEUED_LINES = 20_000


class QueuedWriter:
    """`write(line)` from the loop returns at once; a thread hands each line to
    `sink` in order. `note(n)` renders the line that reports `n` dropped lines."""

    def __init__(
        self,
        sink: Callable[[str], None],
        note: Callable[[int], str],
        capacity: int = QUEUED_LINES,
    ) -> None:
        self.sink = sink
        self.note = note
        self.dropped = 0
        self._queue: queue.Queue[str | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="shmarena-log", daemon=True)
        self._thread.start()

    def __call__(self, line: str) -> None:
        if self.dropped:
            try:
                self._queue.put_nowait(self.note(self.dropped))
            except queue.Full:
                self.dropped += 1
                return
            self.dropped = 0
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing left to tell
                self.sink(line)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (waiting at most `timeout_s` for a slow
        reader), then stop the thread. Idempotent."""
        if not self._thread.is_alive():
            return
        if self.dropped:
            with contextlib.suppress(queue.Full):
                self._queue.put(self.note(self.dropped), timeout=timeout_s)
                self.dropped = 0
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return  # the reader is stuck: the process exits without the rest
        self._thread.join(timeout_s)
