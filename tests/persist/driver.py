"""A client process that runs a seeded random workload against a daemon and
says on stdout, one JSON line each, when it starts an operation and when the
daemon acknowledged it. The tests kill and restart the daemon underneath it
and compare the daemon's table with what was acknowledged (see model.py).

It survives daemon restarts: its requests wait (timeout_s) for the restarted
daemon, which knows its session again. Blocks of the model belong to detached
owners m-0 .. m-7; each starts with 16 bytes naming it (generation, offset),
so the tests can check that its bytes survived and that no two blocks share
memory. Small session-scoped allocations from the cache run alongside.

    python driver.py SEED OPS [STOP_FILE]

It stops early once STOP_FILE exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import sys

import shmarena

OWNERS = 8
STAMP = struct.Struct("<QQ")


def stamp(buf: shmarena.Buffer) -> None:
    """The block's first 16 bytes name it (blocks under 16 bytes go unstamped)."""
    handle = buf.handle
    if handle.size >= STAMP.size:
        buf.view[: STAMP.size] = STAMP.pack(handle.generation, handle.offset)


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> None:
    seed, ops = int(sys.argv[1]), int(sys.argv[2])
    stop_file = sys.argv[3] if len(sys.argv) > 3 else ""
    rng = random.Random(seed)
    client = shmarena.connect(timeout_s=120, retry_s=0.05)
    held: dict[int, list[shmarena.Buffer]] = {k: [] for k in range(OWNERS)}
    owners = {k: client.owner(f"m-{k}", detached=True) for k in range(OWNERS)}
    scratch: list[shmarena.Buffer] = []
    say(ready=client.session, epoch=client.epoch)
    done = 0
    for i in range(ops):
        if stop_file and os.path.exists(stop_file):
            break
        done = i + 1
        k = rng.randrange(OWNERS)
        roll = rng.random()
        if roll < 0.5:
            if roll < 0.35:
                sizes = [rng.choice([rng.randint(1, 64 << 10), rng.randint(1, 1 << 20), 3 << 20])]
            else:
                sizes = [rng.randint(1, 256 << 10) for _ in range(rng.randint(2, 5))]
            say(begin=i, op="alloc", owner=k, sizes=sizes)
            try:
                bufs = (
                    owners[k].alloc_many(sizes) if len(sizes) > 1 else [owners[k].alloc(sizes[0])]
                )
            except shmarena.OutOfMemory:  # refused: nothing changed
                say(done=i, op="alloc", owner=k, handles=[])
                continue
        elif roll < 0.75 and held[k]:
            picked = rng.sample(held[k], min(len(held[k]), rng.randint(1, 3)))
            handles = [list(b.handle) for b in picked]
            say(begin=i, op="free", owner=k, handles=handles)
            client.free(picked)
            client.sync()  # frees go without waiting: this is their acknowledgement
            for b in picked:
                held[k].remove(b)
            say(done=i, op="free", owner=k, handles=handles)
            continue
        elif roll < 0.8:
            say(begin=i, op="recycle", owner=k)
            client.recycle(f"m-{k}")
            held[k].clear()
            owners[k] = client.owner(f"m-{k}", detached=True)
            say(done=i, op="recycle", owner=k)
            continue
        else:  # session-scoped churn through the cache; not part of the model
            if scratch and (rng.random() < 0.5 or len(scratch) > 64):
                scratch.pop(rng.randrange(len(scratch))).free()
            else:
                with contextlib.suppress(shmarena.OutOfMemory):
                    scratch.append(client.alloc(rng.randint(1, 32 << 10)))
            continue
        for b in bufs:
            stamp(b)
        held[k].extend(bufs)
        say(done=i, op="alloc", owner=k, handles=[list(b.handle) for b in bufs])
    client.sync()
    say(end=done, problems=client.check())
    # Told to, recycle everything and leave.
    if sys.stdin.readline().strip() == "recycle":
        for k in range(OWNERS):
            client.recycle(f"m-{k}")
    client.close()
    say(closed=True)


if __name__ == "__main__":
    main()
