"""A daemon on a backing file dies at every point of its persistence path, and
at random moments under a random workload; each time, the table it left must
hold exactly the operations that were acknowledged (the one in flight may or
may not have happened), with their bytes, and nothing twice.

The workload runs in driver.py, a client process that lives through all the
restarts: its requests wait for the next daemon, which knows its session
again, answers a request it had already applied from the reply it kept, and
asks for requests it lost.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmarena
from shmarena.shm.journal import CRASH_POINTS
from tests.conftest import unique_name, wait_for
from tests.persist.model import GRACE_S, Arena, Driver, Model


@pytest.fixture
def arena(run_dir: str, tmp_path: Path) -> Iterator[Arena]:
    found = Arena(unique_name(), run_dir, str(tmp_path / "arena"))
    try:
        yield found
    finally:
        if found.proc is not None and found.proc.poll() is None:
            found.proc.kill()
            found.proc.wait()


def after_death(arena: Arena, driver: Driver, model: Model) -> list[str]:
    """Compare the table the dead daemon left with the model; the problems.
    The driver is stopped meanwhile, so that the model holds every operation
    it saw acknowledged."""
    driver.freeze()
    try:
        model.feed(driver.take())
        report = arena.inspect()
        problems = model.compare(report)
        table = {(b["offset"], b["size"], b["generation"]) for b in report.get("blocks", [])}
        problems += arena.stamps_ok(model.blocks() & table, report["header"]["data_offset"])
    finally:
        driver.thaw()
    return problems


def finish(arena: Arena, driver: Driver, model: Model) -> None:
    """End the workload on a running daemon: the table equals the model
    exactly; then everything is recycled and the arena is one free extent."""
    end = driver.finish()
    assert end["problems"] == []
    model.feed(driver.take())
    assert model.pending is None
    report = arena.inspect()
    assert model.compare(report) == []
    assert driver.proc.stdin is not None
    driver.proc.stdin.write(b"recycle\n")
    driver.proc.stdin.flush()
    driver.wait_line("closed")
    assert driver.proc.wait(timeout=30) == 0
    with shmarena.connect(arena.name, runtime_dir=arena.run_dir) as c:
        wait_for(
            lambda: c.stats()["sessions"] == 1,
            timeout_s=GRACE_S + 10,
            what="the driver's session (and any recovered one) to end",
        )
        stats = c.stats()
        assert (stats["used_bytes"], stats["cached_bytes"]) == (0, 0), stats
        assert stats["largest_free_bytes"] == stats["size_bytes"], "not coalesced"
        assert c.check() == []
    arena.stop()
    assert arena.inspect()["problems"] == []


def start_driver(arena: Arena, seed: int, ops: int) -> tuple[Driver, Model]:
    driver = Driver(arena, seed, ops)
    driver.wait_line("ready", timeout_s=30)
    return driver, Model()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_every_crash_point_leaves_the_acknowledged_table(arena: Arena, point: str) -> None:
    crash_point_cycles(arena, point, reps=2)


@pytest.mark.slow
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_every_crash_point_many_times(arena: Arena, point: str) -> None:
    crash_point_cycles(arena, point, reps=10)


def crash_point_cycles(arena: Arena, point: str, reps: int) -> None:
    """`reps` times: a SIGKILL at a random moment, then a start that dies at
    `point`; the table checked after each death."""
    rng = random.Random(f"{point}/{reps}")
    arena.start()
    driver, model = start_driver(arena, rng.randrange(1 << 30), 1_000_000)
    deaths = violations = crashed_at_start = 0
    try:
        for rep in range(reps):
            # A kill at a random moment first, then a start told to die at the point.
            if rep:
                arena.start()
            target = driver.done_count() + rng.randint(5, 40)
            wait_for(lambda t=target: driver.done_count() >= t, timeout_s=60, what="ops")
            arena.kill()
            problems = after_death(arena, driver, model)
            deaths += 1
            nth = rng.randint(1, 3) if point.startswith("snapshot") else rng.randint(1, 30)
            up = arena.start(
                "--debug-crash-at", f"{point}#{nth}", "--debug-compact-bytes", "16K",
                expect_up=False,
            )  # fmt: skip
            crashed_at_start += not up
            # Read the driver's lines meanwhile: a full pipe would stop it.
            assert arena.proc is not None
            proc = arena.proc
            wait_for(
                lambda proc=proc: driver.pump(0.05) or proc.poll() is not None,
                timeout_s=180,
                what=f"the daemon to reach {point}#{nth}",
            )
            assert proc.returncode == -signal.SIGKILL, arena.log()  # by its own hand
            problems += after_death(arena, driver, model)
            deaths += 1
            violations += len(problems)
            assert problems == [], problems
        arena.start()
        finish(arena, driver, model)
    finally:
        driver.close()
    print(
        f"\nFIGURE: crash point {point}: {deaths} deaths ({crashed_at_start} while starting), "
        f"{model.acknowledged} acknowledged ops, violations {violations}"
    )


def random_kills(arena: Arena, ops: int, seed: int) -> None:
    rng = random.Random(seed)
    arena.start()
    driver, model = start_driver(arena, seed, ops)
    kills = violations = 0
    try:
        while True:
            target = driver.done_count() + rng.randint(20, 500)

            def progressed(target: int = target) -> bool:
                return driver.done_count() >= target or driver.ends > 0

            wait_for(progressed, timeout_s=120, what="the driver to get on")
            if driver.ends:
                break
            arena.kill()
            kills += 1
            problems = after_death(arena, driver, model)
            violations += len(problems)
            assert problems == [], problems
            arena.start()
        finish(arena, driver, model)
    finally:
        driver.close()
    print(
        f"\nFIGURE: {ops} random operations, {kills} SIGKILLs of the daemon at random "
        f"moments, {model.acknowledged} acknowledged, recovered table != model: {violations}"
    )


def test_random_kills_recover_exactly_the_acknowledged_operations(arena: Arena) -> None:
    random_kills(arena, 10_000, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_kills_more_seeds(arena: Arena, seed: int) -> None:
    random_kills(arena, 10_000, seed)
