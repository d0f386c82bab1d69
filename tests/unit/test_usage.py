"""How full the arena has been (daemon/usage.py): the --warn-used alarm's
two states as a table of sequences, the threshold's forms, and the peak of
used bytes and its reset as Service.handle sees them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shmarena.daemon.lifecycle import JOINING
from shmarena.daemon.service import ArenaInfo, Creds, Service
from shmarena.daemon.usage import DOWN, UP, Alarm, parse_warn_used
from shmarena.errors import DaemonStartError
from shmarena.protocol import Op
from tests.unit.test_service import EPOCH, MIN, Peer

MiB = 1 << 20

# (used bytes after each step, what the alarm says at each) with high 90, low 85
SEQUENCES = [
    ([0, 50, 89], [None, None, None]),
    ([90], [UP]),  # reaching the threshold is crossing it
    ([95, 100, 91, 89, 86, 90, 99], [UP, None, None, None, None, None, None]),  # no flood
    ([95, 85], [UP, DOWN]),  # at the low mark is back
    ([95, 86, 85, 84, 0], [UP, None, DOWN, None, None]),
    ([95, 80, 89, 90, 84, 91], [UP, DOWN, None, UP, DOWN, UP]),  # each rise once
    ([100, 0, 100, 0], [UP, DOWN, UP, DOWN]),
]


@pytest.mark.parametrize(("used", "said"), SEQUENCES)
def test_alarm_goes_up_once_and_down_once_per_crossing(
    used: list[int], said: list[str | None]
) -> None:
    alarm = Alarm(90, 85)
    assert [alarm.step(u) for u in used] == said
    assert alarm.up == (said.count(UP) > said.count(DOWN))


def test_alarm_needs_low_under_high() -> None:
    with pytest.raises(ValueError, match="low"):
        Alarm(90, 90)


@pytest.mark.parametrize(
    ("text", "fraction", "size_bytes"),
    [
        ("90%", 0.9, None),
        ("12.5%", 0.125, None),
        ("100%", 1.0, None),
        ("0.9", 0.9, None),
        ("1", 1.0, None),
        ("900M", None, 900 * MiB),
        ("65536", None, 65536),
    ],
)
def test_warn_used_takes_a_percentage_a_fraction_or_a_size(
    text: str, fraction: float | None, size_bytes: int | None
) -> None:
    level = parse_warn_used(text)
    assert level.text == text
    assert level.fraction == pytest.approx(fraction) if fraction else level.fraction is None
    assert level.size_bytes == size_bytes


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("0%", "percentage must be over 0"),
        ("120%", "at most 100"),
        ("x%", "percentage"),
        ("1.5", "fraction must be over 0 and at most 1"),
        ("0", "fraction"),
        ("lots", "not a threshold"),
        ("-3M", "not a threshold"),
    ],
)
def test_a_bad_warn_used_says_what_to_give(text: str, says: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_warn_used(text)
    assert says in str(error.value) and repr(text) in str(error.value)
    assert "90%" in str(error.value) and "900M" in str(error.value)


def service(size: int = 4 * MiB, warn_used: str = "", max_size: int = 0) -> Service:
    info = ArenaInfo(
        "unit", EPOCH, size, MIN, "/shmarena-unit", 1, 10.0,
        warn_used=warn_used, max_size_bytes=max_size,
    )  # fmt: skip
    return Service(info, watch=lambda sid, pid, ticks: True)


def usage_events(svc: Service) -> list[tuple[str, dict[str, object]]]:
    return [(e.event, e.fields) for e in svc.take_log() if e.event in (UP, DOWN)]


def test_the_service_logs_each_crossing_once_and_counts_the_rises() -> None:
    svc = service(warn_used="50%")  # 2 MiB of 4 MiB; back at 1.8 MiB (5 points) or under
    peer = Peer(svc, b"a")
    held = [peer.ok(Op.ALLOC, 512 << 10)[0] for _ in range(3)]
    assert usage_events(svc) == [] and not svc.stats(0.0)["used_warning"]
    held.append(peer.ok(Op.ALLOC, 512 << 10)[0])  # 2 MiB: up
    held.append(peer.ok(Op.ALLOC, MIN)[0])
    ((event, fields),) = usage_events(svc)
    assert event == UP
    assert fields == {
        "used_bytes": 2 * MiB,
        "size_bytes": 4 * MiB,
        "percent": 50.0,
        "threshold_bytes": 2 * MiB,
        "threshold": 0.5,
        "clear_bytes": 2 * MiB - (4 * MiB // 20),
    }
    stats = svc.stats(0.0)
    assert stats["used_warning"] and stats["counters"]["used_warnings"] == 1
    assert (stats["warn_used"], stats["warn_used_bytes"]) == (0.5, 2 * MiB)
    peer.ok(Op.FREE, [held.pop()])  # 2 MiB: still up, under the threshold is not enough
    peer.ok(Op.FREE, [held.pop()])  # 1.5 MiB: down
    ((event, fields),) = usage_events(svc)
    assert event == DOWN and fields["used_bytes"] == 1536 << 10
    held.append(peer.ok(Op.ALLOC, MiB)[0])  # 2.5 MiB: up again
    assert [e for e, _ in usage_events(svc)] == [UP]
    svc.reclaim(peer.session, "exited", 5.0)  # a death brings it down too
    assert [e for e, _ in usage_events(svc)] == [DOWN]
    stats = svc.stats(0.0)
    assert stats["counters"]["used_warnings"] == 2 and not stats["used_warning"]
    assert svc.check() == []


def test_a_growing_arena_is_measured_against_its_cap() -> None:
    svc = service(size=2 * MiB, warn_used="0.9", max_size=8 * MiB)
    stats = svc.stats(0.0)
    assert stats["warn_used_bytes"] == 8 * MiB * 9 // 10 + 1  # ceil of 0.9 of the cap
    peer = Peer(svc, b"a")
    peer.ok(Op.ALLOC, 2 * MiB)  # all of --size, a quarter of the cap: no warning
    assert usage_events(svc) == []


def test_an_absolute_threshold_over_the_arena_is_refused_at_start() -> None:
    with pytest.raises(DaemonStartError, match="could never fire"):
        service(size=4 * MiB, warn_used="8M")
    assert service(size=4 * MiB, warn_used="3M").stats(0.0)["warn_used"] == 0.75


def test_without_warn_used_nothing_is_logged_or_counted() -> None:
    svc = service()
    peer = Peer(svc, b"a")
    peer.ok(Op.ALLOC, 4 * MiB)
    stats = svc.stats(0.0)
    assert usage_events(svc) == [] and stats["warn_used"] is None
    assert stats["used_warning"] is False and stats["counters"]["used_warnings"] == 0
    assert "warn_used_bytes" not in stats and "warn_clear_bytes" not in stats


def test_the_peak_is_the_high_water_mark_of_used_bytes() -> None:
    svc = service()
    assert svc.stats(0.0)["peak_used_bytes"] == 0 and svc.stats(0.0)["peak_at"] == 10.0
    peer = Peer(svc, b"a")
    mark = 0
    held = []
    for step, size in enumerate([MIN, 3 * MIN, 100, 5 * MIN, 2 * MIN]):
        peer.now = 100.0 + step
        held.append(peer.ok(Op.ALLOC, size)[0])
        mark = max(mark, svc.stats(0.0)["used_bytes"])
    peak_at = svc.stats(0.0)["peak_at"]
    assert svc.stats(0.0)["peak_used_bytes"] == mark == 12 * MIN and peak_at == 104.0
    peer.now = 200.0
    peer.ok(Op.FREE, held[:3])
    (small,) = peer.ok(Op.ALLOC, MIN)  # under the peak: it stays, with its time
    stats = svc.stats(0.0)
    assert (stats["peak_used_bytes"], stats["peak_at"]) == (mark, 104.0)
    assert stats["used_bytes"] == 8 * MIN

    reset = peer.ok(Op.STATS, True)[0]
    assert reset["previous_peak_used_bytes"] == mark and reset["previous_peak_at"] == 104.0
    assert reset["peak_used_bytes"] == reset["used_bytes"] == 8 * MIN
    assert reset["peak_at"] == 200.0
    (event,) = [e for e in svc.take_log() if e.event == "peak_reset"]
    assert "was 48 KiB, now 32 KiB" in event.message
    peer.now = 300.0
    peer.ok(Op.ALLOC, 2 * MIN)
    stats = svc.stats(0.0)
    assert (stats["peak_used_bytes"], stats["peak_at"]) == (10 * MIN, 300.0)
    assert "previous_peak_used_bytes" not in stats
    assert svc.check() == []


def test_a_group_member_may_not_reset_the_peak() -> None:
    svc = service()
    svc.info = replace(svc.info, uid=1000, group_gid=4242)
    admin = Peer(svc, b"a", creds=Creds(1000, 1000, 10))
    member = Peer(svc, b"m", creds=Creds(2000, 4242, 20))
    member.ok(Op.ALLOC, 3 * MIN)
    assert member.ok(Op.STATS)[0]["peak_used_bytes"] == 3 * MIN  # reading is for all
    code, message = member.err(Op.STATS, True)
    assert code == "access_denied" and "uid 2000" in message
    assert "reset the peak of used bytes" in message and "nothing was changed" in message
    assert svc.stats(0.0)["peak_used_bytes"] == 3 * MIN
    assert admin.ok(Op.STATS, True)[0]["previous_peak_used_bytes"] == 3 * MIN


def test_after_a_restart_the_peak_starts_at_the_recovered_use() -> None:
    first = service(warn_used="50%")
    peer = Peer(first, b"a")
    held = [peer.ok(Op.ALLOC, MiB)[0] for _ in range(3)]
    peer.ok(Op.FREE, held[:1])
    first.take_log()
    recovered = first.ledger
    recovered.peak_bytes = 0  # as table.build makes it: the peak is not in the table
    for session in recovered.sessions.values():
        session.state = JOINING  # as table.build makes them
    again = service(warn_used="50%")
    again.adopt(recovered, first.links(), 500.0)
    stats = again.stats(500.0)
    assert (stats["peak_used_bytes"], stats["peak_at"]) == (2 * MiB, 500.0)
    assert stats["used_warning"] and [e for e, _ in usage_events(again)] == [UP]
    assert stats["counters"]["used_warnings"] == 1 and again.check() == []
