"""An image-batch pipeline over shmarena.Queue: batches travel between processes uncopied.

A producer process makes batches of uint8 "images" and puts them on a
shmarena.Queue; worker processes (started with spawn) take batches, compute each
image's mean and a normalised float32 copy written straight into an arena block
(`Buffer.ndarray`), and put both on a results queue. The main process collects
the results, checks them against batches it makes again from the same seeds, and
prints the throughput and how many of the arrays it and the workers received lie
in the arena (that is: were not copied on the way).

Needs numpy. Run a daemon first (`shmarena daemon`; `$SHMARENA_NAME` picks which):

    python examples/image_pipeline.py --batches 24 --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from typing import Any

import numpy as np

import shmarena
from shmarena.client import registry
from shmarena.pickling import DEFAULT_THRESHOLD as SMALL_BYTES  # smaller buffers are copied


def connect_or_exit() -> shmarena.Client:
    try:
        return shmarena.connect(cache=False)
    except shmarena.DaemonUnavailable as error:
        print(
            f"{error}\nThis example needs a running daemon: start one with `shmarena daemon`.",
            file=sys.stderr,
        )
        sys.exit(3)


def in_arena(array: Any) -> bool:
    """Whether the array's bytes lie in this process's mapping of the arena."""
    address = array.__array_interface__["data"][0]
    return any(start <= address < end for start, end in registry.mapping_ranges())


def make_batch(seed: int, shape: tuple[int, ...]) -> Any:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def produce(batches: shmarena.Queue, count: int, shape: tuple[int, ...], workers: int) -> None:
    for index in range(count):
        batches.put((index, make_batch(index, shape)))  # the queue holds the bytes now
    for _ in range(workers):
        batches.put(None)  # one stop sign per worker
    batches.close()


def work(batches: shmarena.Queue, results: shmarena.Queue) -> None:
    client = connect_or_exit()
    while (item := batches.get()) is not None:
        index, images = item
        means = images.mean(axis=(1, 2, 3), dtype=np.float64).astype(np.float32)
        # The output goes straight into an arena block: the put names the block
        # (the results queue takes a reference on it) instead of copying it.
        buf = client.alloc(images.size * 4)
        normalised = buf.ndarray(images.shape, np.float32)
        np.subtract(images, means[:, None, None, None], out=normalised, dtype=np.float32)
        normalised /= 255.0
        results.put((index, means, normalised, in_arena(images)))
        del normalised, images, item
        buf.free()  # ours is gone; the queue's reference keeps the block for the reader
    results.put(None)
    client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=16, help="images per batch")
    parser.add_argument("--side", type=int, default=256, help="image height and width")
    args = parser.parse_args(argv)
    shape = (args.images, args.side, args.side, 3)
    if int(np.prod(shape)) < SMALL_BYTES:
        parser.error(
            f"a batch of {shape} is under {SMALL_BYTES >> 10} KiB: the queue copies "
            "so small a buffer into the message; use more --images or a larger --side"
        )
    connect_or_exit().close()  # fail early, with the message, if no daemon runs

    spawn = mp.get_context("spawn")
    batches, results = shmarena.Queue(maxsize=4), shmarena.Queue(maxsize=4)
    procs = [spawn.Process(target=produce, args=(batches, args.batches, shape, args.workers))]
    procs += [spawn.Process(target=work, args=(batches, results)) for _ in range(args.workers)]
    started = time.perf_counter()
    for proc in procs:
        proc.start()

    seen, bad, in_arena_main, in_arena_workers, stopped = set(), 0, 0, 0, 0
    first = 0.0
    while stopped < args.workers:
        item = results.get(timeout=60)
        first = first or time.perf_counter()  # processes have started by now
        if item is None:
            stopped += 1
            continue
        index, means, normalised, worker_saw_arena = item
        expected = make_batch(index, shape)
        ok = np.allclose(means, expected.mean(axis=(1, 2, 3)), atol=1e-3) and np.allclose(
            normalised[:, ::17, ::17], (expected[:, ::17, ::17] - means[:, None, None, None]) / 255
        )
        bad += not ok
        seen.add(index)
        in_arena_main += in_arena(normalised)
        in_arena_workers += worker_saw_arena
        del normalised, item  # the last view of the block: it goes back to the arena
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join(timeout=30)
    batches.close()
    results.close()

    count, batch_mb = len(seen), int(np.prod(shape)) / 1e6
    steady = max(count - 1, 0) * batch_mb / max(started + elapsed - first, 1e-9)
    print(
        f"{count} batches of {shape} uint8 in {elapsed:.2f} s: {count * batch_mb / elapsed:.0f} "
        f"MB/s, {steady:.0f} MB/s after the first result (without process start-up)"
    )
    print(
        f"received in the arena (not copied): workers {in_arena_workers}/{count} batches, "
        f"main {in_arena_main}/{count} results"
    )
    failed = [p.name for p in procs if p.exitcode != 0]
    ok = not bad and not failed and seen == set(range(args.batches))
    ok = ok and in_arena_main == in_arena_workers == count
    print(
        f"image_pipeline: {'ok' if ok else 'FAILED'}: {count}/{args.batches} batches, "
        f"{bad} wrong, {len(failed)} processes failed"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
