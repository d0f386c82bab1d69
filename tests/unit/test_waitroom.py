"""The waiters' indexes on their own (daemon/waiters.py): filed by key and by
session in arrival order, due by deadline, dead heap entries swept. Pure."""

from __future__ import annotations

from shmarena.daemon.waiters import Waiter, WaitRoom, wait_key
from shmarena.protocol import Op


def lookup(session: int, name: str, deadline: float) -> Waiter:
    return Waiter(Op.LOOKUP, session, 0, deadline, (name, deadline))


def test_an_event_wait_waits_for_its_prefix_the_others_for_their_first_argument() -> None:
    assert wait_key(Op.EVENTS, (0, "jobs/")) == (Op.EVENTS, "jobs/")
    assert wait_key(Op.QGET, ("q", 0, 1.0)) == (Op.QGET, "q")
    assert wait_key(Op.LOOKUP, ["n", 1.0]) == (Op.LOOKUP, "n")


def test_waiters_are_numbered_in_arrival_order_and_filed_twice() -> None:
    room = WaitRoom()
    first, second, other = lookup(1, "x", 5.0), lookup(2, "x", 3.0), lookup(1, "y", 4.0)
    for waiter in (first, second, other):
        room.file(waiter)
    assert [w.seq for w in (first, second, other)] == [1, 2, 3]
    assert room.first((Op.LOOKUP, "x")) is first and room.of_key((Op.LOOKUP, "x")) == [
        first,
        second,
    ]
    assert room.kept(1) == 2 and room.kept(2) == 1 and room.kept_total == 3
    assert room.listing() == [first, second, other] and room.check() == []


def test_a_waiter_put_back_keeps_its_place_first() -> None:
    room = WaitRoom()
    first, second = lookup(1, "x", 5.0), lookup(1, "x", 5.0)
    room.file(first)
    room.file(second)
    room.unfile(first)
    assert room.first((Op.LOOKUP, "x")) is second and not room.is_kept(first)
    room.refile_first(first)
    assert room.of_key((Op.LOOKUP, "x")) == [first, second] and room.check() == []


def test_due_yields_only_the_kept_waiters_whose_time_came_earliest_first() -> None:
    room = WaitRoom()
    late, early, met = lookup(1, "a", 9.0), lookup(1, "b", 2.0), lookup(2, "c", 1.0)
    for waiter in (late, early, met):
        room.file(waiter)
    room.unfile(met)  # met before its deadline: its heap entry is dead
    assert list(room.due(5.0)) == [early]
    assert room.listing() == [late] and room.next_deadline() == 9.0
    assert room.check() == []


def test_a_session_that_goes_takes_its_waiters_with_it() -> None:
    room = WaitRoom()
    mine, theirs = lookup(1, "a", 9.0), lookup(2, "a", 9.0)
    room.file(mine)
    room.file(theirs)
    room.drop_session(1)
    assert room.listing() == [theirs] and room.kept(1) == 0
    assert room.waiting_on((Op.LOOKUP, "a")) and not room.waiting_on((Op.LOOKUP, "b"))
    assert room.check() == []


def test_dead_heap_entries_are_swept_once_they_outnumber_the_kept() -> None:
    room = WaitRoom()
    for i in range(200):
        waiter = lookup(1, f"n{i}", 100.0)
        room.file(waiter)
        room.unfile(waiter)
        room.sweep()
    assert len(room.deadlines) <= 32 and room.next_deadline() is None


def test_the_check_sees_a_waiter_filed_under_the_wrong_session() -> None:
    room = WaitRoom()
    waiter = lookup(1, "a", 9.0)
    room.file(waiter)
    room.by_session[2] = room.by_session.pop(1)
    assert any("session 2" in p for p in room.check())
