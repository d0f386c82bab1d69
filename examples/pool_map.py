"""ProcessPoolExecutor.map over large arrays, passing shmarena.dumps bytes instead of copies.

The same map runs twice on one pool of spawned workers: once handing the numpy
arrays over as they are (the pool pickles each one, pipes its bytes to a worker
and the result's bytes back), once handing over `shmarena.dumps(array)`, a few
hundred bytes that name the array's arena block. Each worker `shmarena.loads`
the message (a view of the same block, no copy), computes, and returns its
result the same way. The inputs are made in the arena (`Buffer.ndarray`), so
dumping them copies nothing; a worker's result is copied into the arena once.
The script prints both wall times and checks that both ways give the same results.

Needs numpy. Run a daemon first (`shmarena daemon`; `$SHMARENA_NAME` picks which):

    python examples/pool_map.py --arrays 12 --side 1024 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

import shmarena


def connect_or_exit() -> shmarena.Client:
    try:
        return shmarena.connect(cache=False)
    except shmarena.DaemonUnavailable as error:
        print(
            f"{error}\nThis example needs a running daemon: start one with `shmarena daemon`.",
            file=sys.stderr,
        )
        sys.exit(3)


def compute(array: Any) -> Any:
    """The work, the same both ways: a result as large as the input."""
    return np.sqrt(array) * np.float32(2.0)


def plain_task(array: Any) -> Any:
    return compute(array)


def shm_task(message: bytes) -> bytes:
    array = shmarena.loads(message)  # views the sender's block; retained until `array` goes
    return shmarena.dumps(compute(array))


def timed_map(pool: ProcessPoolExecutor, task: Any, items: list[Any]) -> tuple[list[Any], float]:
    started = time.perf_counter()
    results = list(pool.map(task, items))
    return results, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=12)
    parser.add_argument("--side", type=int, default=1024, help="each array is side x side float32")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    client = connect_or_exit()

    shape, rng = (args.side, args.side), np.random.default_rng(7)
    bufs = [client.alloc(args.side * args.side * 4) for _ in range(args.arrays)]
    arrays = [buf.ndarray(shape, np.float32) for buf in bufs]
    for array in arrays:
        rng.random(shape, dtype=np.float32, out=array)

    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        # Start the workers and their connections before timing anything.
        timed_map(pool, plain_task, [np.zeros(1)] * args.workers)
        timed_map(pool, shm_task, [shmarena.dumps(np.zeros(1))] * args.workers)
        plain, plain_s = timed_map(pool, plain_task, arrays)
        started = time.perf_counter()
        messages = [shmarena.dumps(array) for array in arrays]  # names the blocks: no copy
        replies, _ = timed_map(pool, shm_task, messages)
        shared = [shmarena.loads(reply) for reply in replies]
        shared_s = time.perf_counter() - started

    same = all(np.array_equal(a, b) for a, b in zip(plain, shared, strict=True))
    right = np.array_equal(shared[0], compute(arrays[0]))
    megabytes = args.arrays * arrays[0].nbytes / 1e6
    print(f"{args.arrays} arrays of {shape} float32: {megabytes:.0f} MB in, {megabytes:.0f} MB out")
    print(f"  plain numpy arrays: {plain_s * 1000:8.1f} ms")
    print(
        f"  shmarena.dumps    : {shared_s * 1000:8.1f} ms "
        f"(messages of {len(messages[0])} bytes, replies of {len(replies[0])} bytes)"
    )
    del arrays, shared, plain, messages  # the inputs' blocks are ours to free once unviewed
    client.free(bufs)
    client.close()
    ok = same and right
    print(
        f"pool_map: {'ok' if ok else 'FAILED'}: plain {plain_s:.3f} s, shmarena {shared_s:.3f} s, "
        f"results {'identical' if same else 'DIFFER'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
