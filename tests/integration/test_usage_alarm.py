"""How full the arena has been, on a real daemon: `--warn-used` logs one
`used_high` when used bytes reach the threshold and one `used_normal` when
they fall back below it less the hysteresis (never a line per request in
between), counts each rise in `stats` and in the metrics; `peak_used_bytes`
is the high-water mark of used bytes, and `shmarena stats --reset-peak` (the
daemon's own user only) sets it to the used bytes now."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable

import pytest

import shmarena
from shmarena.config import format_size
from tests.conftest import Daemon, wait_for
from tests.faults.test_access import GROUP, NOBODY, needs_root
from tests.integration.test_logs import parse_lines
from tests.integration.test_metrics import one, scrape

MiB = 1 << 20
PAGE = 4096
# Sizes the test allocates, some not whole pages: the daemon carves each to
# whole pages, and used bytes are the sum of what it carved.
SIZES = [5 * MiB + 1000, 3 * MiB, 7 * MiB + 12345, 3 * PAGE, 6 * MiB, 9 * MiB + 1, 2 * MiB + 77]


def carved(size: int) -> int:
    return -(-size // PAGE) * PAGE


def events(records: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [r for r in records if r["event"] == name]


def test_warn_used_logs_each_crossing_once_and_the_peak_is_the_high_water_mark(
    make_daemon: Callable[..., Daemon],
) -> None:
    daemon = make_daemon(
        "64M", extra=["--warn-used", "50%", "--metrics-port", "0", "--log-format", "json"]
    )
    client = daemon.client(cache=False)  # each alloc a round trip: used bytes exact
    stats = client.stats()
    port, size = stats["metrics"]["port"], stats["size_bytes"]
    assert size == 64 * MiB and stats["warn_used"] == 0.5 and stats["used_warning"] is False
    high, low = stats["warn_used_bytes"], stats["warn_clear_bytes"]
    assert (high, low) == (32 * MiB, 32 * MiB - size // 20)  # back at 45 % or under

    held: list[shmarena.Buffer] = []
    mark = crossed_at = 0
    for request in SIZES:  # 32 MiB + 40 KiB in all: over the threshold at the last
        held.append(client.alloc(request))
        used = client.stats()["used_bytes"]
        assert used == sum(carved(b.view.nbytes) for b in held)
        if used >= high and not crossed_at:
            crossed_at = used
        mark = max(mark, used)
    assert crossed_at and mark == sum(map(carved, SIZES)) > high
    up = client.stats()
    assert up["used_warning"] is True and up["counters"]["used_warnings"] == 1
    samples = scrape(port)
    assert one(samples, "shmarena_used_warning") == 1
    assert one(samples, "shmarena_used_warnings_total") == 1
    assert one(samples, "shmarena_used_warning_threshold_bytes") == high

    # Hovering around the threshold: under it, over it again, no new event
    held.pop(1).free()  # 3 MiB: under the threshold, above the low mark
    assert low < client.stats()["used_bytes"] < high
    held.append(client.alloc(7 * MiB))
    mark = max(mark, client.stats()["used_bytes"])
    assert client.stats()["counters"]["used_warnings"] == 1
    # Falling back below the low mark, then hovering under the threshold
    while client.stats()["used_bytes"] > low:
        held.pop(0).free()
    back = client.stats()
    assert back["used_warning"] is False and back["counters"]["used_warnings"] == 1
    held.append(client.alloc(high - back["used_bytes"] - PAGE))  # just under the threshold
    assert low < client.stats()["used_bytes"] < high

    wait_for(lambda: '"event":"used_normal"' in daemon.output(), what="the used_normal event")
    stats = client.stats()
    assert stats["peak_used_bytes"] == mark and stats["used_warning"] is False
    assert stats["started_at"] < stats["peak_at"] <= client.ping()
    samples = scrape(port)
    assert one(samples, "shmarena_used_warnings_total") == 1
    assert one(samples, "shmarena_used_warning") == 0
    assert one(samples, "shmarena_peak_used_bytes") == mark
    assert one(samples, "shmarena_peak_used_timestamp_seconds") == stats["peak_at"]

    # The peak reset by the command line: it becomes the used bytes now
    now_used = stats["used_bytes"]
    result = daemon.cli("stats", "--reset-peak", check=True)
    assert "peak_used_bytes reset: was " in result.stdout, result.stdout
    assert format_size(mark) in result.stdout
    assert f"now {format_size(now_used)}" in result.stdout
    after = client.stats()
    assert after["peak_used_bytes"] == after["used_bytes"] == now_used
    assert after["peak_at"] > stats["peak_at"]
    reset = json.loads(daemon.cli("stats", "--reset-peak", "--json", check=True).stdout)
    assert reset["previous_peak_used_bytes"] == reset["peak_used_bytes"] == now_used
    assert one(scrape(port), "shmarena_peak_used_bytes") == now_used

    for buf in held:
        buf.free()
    client.close()
    records = parse_lines(daemon.stop())
    assert events(records, "start")[0]["warn_used"] == "50%"
    (rose,) = events(records, "used_high")
    (fell,) = events(records, "used_normal")
    assert rose["level"] == "warning" and fell["level"] == "info"
    assert rose["used_bytes"] == crossed_at and rose["size_bytes"] == size
    assert rose["threshold_bytes"] == high and rose["threshold"] == 0.5
    assert rose["percent"] == round(100 * crossed_at / size, 1)
    assert fell["used_bytes"] <= low and fell["clear_bytes"] == low
    assert records.index(rose) < records.index(fell)
    assert len(events(records, "peak_reset")) == 2


@needs_root
def test_a_group_member_may_not_reset_the_peak(
    make_daemon: Callable[..., Daemon], run_dir: str
) -> None:
    os.chown(run_dir, -1, GROUP)
    os.chmod(run_dir, 0o750)
    daemon = make_daemon(size="32M", extra=["--group", str(GROUP), "--warn-used", "1M"])
    client = daemon.client(cache=False)
    kept = client.alloc(MiB)  # reaches the absolute threshold: a text line says so
    wait_for(lambda: "at or over --warn-used 1 MiB" in daemon.output(), what="the used_high line")
    member = daemon.python(
        AS_MEMBER, str(NOBODY), str(GROUP), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = member.communicate(timeout=60)
    assert member.returncode == 0, err
    peak, refusal = out.splitlines()
    assert peak == f"peak {MiB}"  # a member reads the peak
    assert refusal.startswith("refused: ") and f"uid {NOBODY}" in refusal, refusal
    assert "reset the peak of used bytes" in refusal and "nothing was changed" in refusal
    kept.free()
    assert client.stats()["peak_used_bytes"] == MiB  # unchanged
    assert client.reset_peak()["peak_used_bytes"] == 0  # the daemon's own user may


# Joins the daemon's group as another uid, reads the peak, tries to reset it.
AS_MEMBER = r"""
import os, sys
import shmarena
for _name in shmarena.__all__:  # load it all while still root (see test_access.py)
    getattr(shmarena, _name)
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([gid])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
with shmarena.connect(timeout_s=5.0, cache=False) as client:
    print("peak", client.stats()["peak_used_bytes"], flush=True)
    try:
        client.reset_peak()
        print("reset: ok", flush=True)
    except shmarena.AccessDenied as error:
        print(f"refused: {error}", flush=True)
"""


@pytest.mark.parametrize(
    ("level", "exit_code", "says"),
    [
        ("120%", 2, "a percentage must be over 0 and at most 100"),
        ("lots", 2, "is not a threshold"),
        ("128M", 1, "could never fire"),
    ],
)
def test_a_warn_used_that_cannot_work_is_refused(
    daemon: Daemon, level: str, exit_code: int, says: str
) -> None:
    result = daemon.cli("daemon", "--name", "other", "--size", "64M", "--warn-used", level)
    assert result.returncode == exit_code, result.stderr
    assert says in result.stderr and level in result.stderr
