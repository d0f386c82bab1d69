"""Sequences of requests against the pure service, as a hypothesis state
machine: several sessions interleave allocs (some waiting), frees, owners and
recycles, retains and releases (with duplicates), pins and unpins, names (waiting lookups),
queues (waiting puts and gets on full and empty queues, closes), byes,
session deaths, malformed frames, and clock jumps that expire several kept
requests in one turn. After every step the service has not raised, `check`
is clean and no internal error was counted."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shmarena.daemon.service import ArenaInfo, Service
from shmarena.protocol import (
    OK,
    PIN,
    PROTOCOL_VERSION,
    UNPIN,
    Op,
    decode,
    encode,
)
from tests.unit.receiving import RequestIds

MIN = 4096
SLOTS = 3
OWNERS = ("o1", "o2", "shared")
NAMES = ("n1", "n2")
QUEUES = ("q1", "q2")

slot = st.integers(0, SLOTS - 1)
wait = st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0])
picks = st.lists(st.integers(0, 7), min_size=1, max_size=3)  # among the latest handles


class Session(RequestIds):
    """One client: its routing id, request counters, and what it was given."""

    def __init__(self, ident: bytes) -> None:
        super().__init__()
        self.ident = ident
        self.id = 0


class Sequences(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        info = ArenaInfo("seq", 5, 16 * MIN, MIN, "/shmarena-seq", 1, 0.0)
        self.service = Service(info, watch=lambda sid, pid, ticks: True)
        self.now = 100.0
        self.sessions: dict[int, Session] = {}
        self.handles: list[list[int]] = []  # every handle any reply carried
        self.made = 0

    # -- talking ---------------------------------------------------------------

    def send(self, who: Session, op: Op, *args: Any) -> list[Any] | None:
        frame = self.service.handle(who.ident, encode([int(op), who.next_id(op), *args]), self.now)
        self.collect(frame)
        self.collect_outbox()
        return decode(frame) if frame else None

    def collect(self, frame: bytes) -> None:
        if not frame:
            return
        reply = decode(frame)
        if isinstance(reply, list) and reply and reply[0] == OK:
            self._harvest(reply[2:])

    def _harvest(self, value: Any) -> None:
        if isinstance(value, list):
            if len(value) == 5 and all(type(v) is int for v in value) and value[0] == 5:
                self.handles.append(value)
            else:
                for item in value:
                    self._harvest(item)

    def collect_outbox(self) -> None:
        for _, frame in self.service.take_outbox():
            self.collect(frame)

    def some(self, indexes: list[int]) -> list[list[int]]:
        if not self.handles:
            return [[5, 0, 0, MIN, 1]]
        recent = self.handles[-8:]
        return [recent[-1 - i % len(recent)] for i in indexes]

    def who(self, index: int) -> Session | None:
        """The session in slot `index`, else any living one (None: none is)."""
        if index in self.sessions:
            return self.sessions[index]
        living = list(self.sessions.values())
        return living[index % len(living)] if living else None

    # -- sessions --------------------------------------------------------------

    @initialize()
    def two_clients(self) -> None:
        self.hello(0)
        self.hello(1)

    @rule(index=slot)
    def hello(self, index: int) -> None:
        if index in self.sessions:
            return
        self.made += 1
        who = Session(b"peer-%d" % self.made)
        reply = self.send(who, Op.HELLO, PROTOCOL_VERSION, 1000 + index, 7, "seq")
        assert reply is not None and reply[0] == OK, reply
        who.id = reply[2]["session"]
        self.sessions[index] = who

    @rule(index=slot)
    def bye(self, index: int) -> None:
        who = self.sessions.pop(index, None)
        if who is not None:
            self.send(who, Op.BYE)

    @rule(index=slot)
    def dies(self, index: int) -> None:
        who = self.sessions.pop(index, None)
        if who is not None:
            self.service.reclaim(who.id, "exited", self.now)
            self.collect_outbox()

    @rule(seconds=st.sampled_from([0.1, 0.6, 1.2, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.service.wake(self.now)
        self.service.expire(self.now)
        self.collect_outbox()

    # -- blocks and owners -----------------------------------------------------

    @rule(index=slot, blocks=st.integers(1, 12), owner=st.sampled_from((None, *OWNERS)),
          wait_s=wait)  # fmt: skip
    def alloc(self, index: int, blocks: int, owner: str | None, wait_s: float) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.ALLOC, blocks * MIN - 100, owner, owner == "shared", wait_s, "")

    @rule(index=slot, sizes=st.lists(st.integers(1, 6 * MIN), max_size=4))
    def alloc_many(self, index: int, sizes: list[int]) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.ALLOC_MANY, sizes, None, False, "")

    @rule(index=slot, indexes=picks)
    def free(self, index: int, indexes: list[int]) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.FREE, self.some(indexes))

    @rule(index=slot, name=st.sampled_from(OWNERS))
    def owner(self, index: int, name: str) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.OWNER, name, name == "shared", -1)

    @rule(index=slot, name=st.sampled_from(OWNERS))
    def recycle(self, index: int, name: str) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.RECYCLE, name)

    @rule(index=slot, indexes=picks, twice=st.booleans())
    def retain(self, index: int, indexes: list[int], twice: bool) -> None:
        who = self.who(index)
        if who is not None:
            handles = self.some(indexes)
            self.send(who, Op.RETAIN, handles + handles[:1] if twice else handles)

    @rule(index=slot, indexes=picks, twice=st.booleans())
    def release(self, index: int, indexes: list[int], twice: bool) -> None:
        who = self.who(index)
        if who is not None:
            handles = self.some(indexes)
            self.send(who, Op.RELEASE, handles + handles[:1] if twice else handles)

    @rule(index=slot, indexes=picks, unpin=st.booleans())
    def pin(self, index: int, indexes: list[int], unpin: bool) -> None:
        who = self.who(index)
        if who is not None:
            events: list[int] = []
            for _, segment, offset, _, generation in self.some(indexes):
                events += (UNPIN if unpin else PIN, segment << 40 | offset, generation)
            self.send(who, Op.POST, events)

    # -- names and queues ------------------------------------------------------

    @rule(index=slot, name=st.sampled_from(NAMES), pick=st.integers(0, 1 << 16))
    def publish(self, index: int, name: str, pick: int) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.PUBLISH, name, self.some([pick])[0], False)

    @rule(index=slot, name=st.sampled_from(NAMES))
    def unpublish(self, index: int, name: str) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.UNPUBLISH, name)

    @rule(index=slot, name=st.sampled_from(NAMES), wait_s=wait, count=st.integers(1, 2))
    def lookup(self, index: int, name: str, wait_s: float, count: int) -> None:
        who = self.who(index)
        for _ in range(count if who is not None else 0):
            self.send(who, Op.LOOKUP, name, wait_s)

    @rule(index=slot, since=st.integers(-1, 6), wait_s=wait)
    def events(self, index: int, since: int, wait_s: float) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.EVENTS, since, "n", wait_s)

    @rule(index=slot, name=st.sampled_from(QUEUES), maxsize=st.sampled_from([1, 1, 2, 0]))
    def qopen(self, index: int, name: str, maxsize: int) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.QOPEN, name, maxsize)

    @rule(index=slot, name=st.sampled_from(QUEUES), indexes=st.lists(st.integers(0, 7),
          max_size=2), wait_s=wait, count=st.integers(1, 3), close=st.booleans())  # fmt: skip
    def qput(
        self, index: int, name: str, indexes: list[int], wait_s: float, count: int, close: bool
    ) -> None:
        """Puts, pipelined as an asynchronous producer sends them, and maybe
        the producer's close right after (its waiting puts stay kept)."""
        who = self.who(index)
        if who is None:
            return
        self.send(who, Op.QOPEN, name, 1)  # (an open queue keeps its maxsize)
        for _ in range(count):
            handles = self.some(indexes) if indexes else []
            self.send(who, Op.QPUT, name, b"msg", handles, wait_s)
        if close:
            self.send(who, Op.QCLOSE, name)

    @rule(index=slot, name=st.sampled_from(QUEUES), wait_s=wait, count=st.integers(1, 2))
    def qget(self, index: int, name: str, wait_s: float, count: int) -> None:
        who = self.who(index)
        for _ in range(count if who is not None else 0):
            self.send(who, Op.QGET, name, 0, wait_s)

    @rule(index=slot, name=st.sampled_from(QUEUES))
    def qclose(self, index: int, name: str) -> None:
        who = self.who(index)
        if who is not None:
            self.send(who, Op.QCLOSE, name)

    # -- bad input -------------------------------------------------------------

    @rule(index=slot, junk=st.binary(max_size=24))
    def junk_bytes(self, index: int, junk: bytes) -> None:
        who = self.who(index)
        ident = who.ident if who is not None else b"stranger"
        self.collect(self.service.handle(ident, junk, self.now))

    @rule(index=slot, op=st.sampled_from(list(Op)), args=st.lists(
        st.one_of(st.none(), st.integers(-3, 1 << 20), st.text(max_size=4), st.binary(max_size=4),
                  st.lists(st.integers(-1, 1 << 16), max_size=5)), max_size=4))  # fmt: skip
    def odd_request(self, index: int, op: Op, args: list[Any]) -> None:
        who = self.who(index)
        if who is not None and op not in (Op.SHUTDOWN, Op.HELLO, Op.BYE):
            self.send(who, op, *args)

    # -- what must hold after every step ---------------------------------------

    @invariant()
    def state_is_sound(self) -> None:
        assert self.service.check() == []
        assert self.service.counters.internal_errors == 0, [
            e.message for e in self.service.take_log() if e.event == "internal_error"
        ]
        assert not self.service.stopping

    @invariant()
    def every_kept_request_is_a_waiter(self) -> None:
        """`waiting` (what a retry is checked against) names exactly the kept
        requests, and those met but not yet answered."""
        service = self.service
        allocs = service.alloc_waiters
        kept = {(w.session_id, w.request_id) for w in service.exchange.waiters}
        kept |= {(w.session_id, w.request_id) for w in getattr(allocs, "values", lambda: allocs)()}
        met = {(w.session_id, w.request_id) for w, _ in service.exchange.met}
        assert kept <= service.waiting <= kept | met


Sequences.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_sequences = Sequences.TestCase
