"""Cost of the pure-Python arena allocators: one alloc + one free per step.

Measures the steady state with 1 000 and with 1 000 000 live blocks, for
"mixed" sizes (4 KiB .. 1 MiB log-uniform, so most requests take the exact-fit
path) and "pow2" sizes (whole buddy blocks), fixed seed, and prints median and p99 ns per
alloc+free pair, the ratio between the two, and the RSS the 1 000 000-block
state costs. The arena is only integers here: nothing is mapped, so a 64 TiB
arena of address space is fine.

    python scripts/bench_buddy.py            # full run
    python scripts/bench_buddy.py --quick    # fewer steps
    python scripts/bench_buddy.py --json out.json
    python scripts/bench_buddy.py --allocator buddy    # the buddy instead of extents
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shmarena.daemon.service import ALLOCATORS  # noqa: E402

BATCH = 100  # steps timed together, so the timer's own cost stays small


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def sizes(rng: random.Random, count: int, kind: str) -> list[int]:
    if kind == "pow2":  # whole buddy blocks: no exact-fit tails
        return [4096 << rng.randint(0, 8) for _ in range(count)]
    return [int(2 ** rng.uniform(12, 20)) for _ in range(count)]


def measure(live_blocks: int, steps: int, seed: int, kind: str, allocator: str) -> dict[str, Any]:
    rng = random.Random(seed)
    buddy = ALLOCATORS[allocator](1 << 46)  # 64 TiB of offsets
    rss_before = rss_bytes()
    live = [buddy.alloc(size) for size in sizes(rng, live_blocks, kind)]
    rss_after = rss_bytes()
    plan = sizes(rng, steps, kind)
    victims = [rng.randrange(live_blocks) for _ in range(steps)]
    alloc, free = buddy.alloc, buddy.free
    per_pair: list[float] = []
    clock = time.perf_counter_ns
    for start in range(0, steps, BATCH):
        t0 = clock()
        for i in range(start, start + BATCH):
            new = alloc(plan[i])
            j = victims[i]
            free(live[j])  # type: ignore[arg-type]
            live[j] = new
        per_pair.append((clock() - t0) / BATCH)
    problems = buddy.check() if live_blocks <= 10_000 else []
    assert not problems, problems
    per_pair.sort()
    return {
        "sizes": kind,
        "live_blocks": live_blocks,
        "steps": steps,
        "median_ns": statistics.median(per_pair),
        "p99_ns": per_pair[int(len(per_pair) * 0.99) - 1],
        "rss_delta_bytes": rss_after - rss_before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--allocator", choices=sorted(ALLOCATORS), default="extents")
    args = parser.parse_args()
    steps = 50_000 if args.quick else 500_000
    print(f"allocator: {args.allocator}")
    results = [
        measure(live, steps, args.seed, kind, args.allocator)
        for kind in ("mixed", "pow2")
        for live in (1_000, 1_000_000)
    ]
    print(
        f"{'sizes':>6} {'live blocks':>12} {'median ns/pair':>15} {'p99 ns/pair':>12} "
        f"{'RSS of live set':>16}"
    )
    for r in results:
        print(
            f"{r['sizes']:>6} {r['live_blocks']:>12,} {r['median_ns']:>15.0f} "
            f"{r['p99_ns']:>12.0f} {r['rss_delta_bytes'] / 2**20:>12.1f} MiB"
        )
    ratios = {
        kind: by_kind[1]["median_ns"] / by_kind[0]["median_ns"]
        for kind in ("mixed", "pow2")
        for by_kind in [[r for r in results if r["sizes"] == kind]]
    }
    for kind, ratio in ratios.items():
        print(f"ratio 1M / 1k live blocks, {kind} sizes (median): {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"allocator": args.allocator, "results": results, "ratio_1m_over_1k": ratios},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
