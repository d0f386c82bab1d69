"""asyncio producer and consumers with shmarena.aio, and what a cancelled allocation leaves.

A producer coroutine allocates arena buffers, stamps each with its number and
hands only its handle to consumer coroutines through an asyncio.Queue; each
consumer attaches the handle (the same bytes, no copy), checks the stamp and
frees the block. A handle is all another process would need, too. Then a wave
of allocations is started and all but the first to finish are cancelled while
they are in flight: the daemon's `used_bytes` shows that the cancelled ones
left nothing behind, and is back where it started once the finished ones are freed.

Run a daemon first (`shmarena daemon`; `$SHMARENA_NAME` picks which), then:

    python examples/asyncio_producer_consumer.py --buffers 64 --consumers 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import shmarena
import shmarena.aio

MiB = 1 << 20
Handles = asyncio.Queue  # of (number, shmarena.Handle), or None: no more


def stamp(number: int, size: int) -> bytes:
    return number.to_bytes(8, "little") * (size // 8)


async def used_bytes(client: shmarena.aio.AsyncClient) -> int:
    await client.sync()  # the daemon has applied every free this client made
    return int((await client.stats())["used_bytes"])


async def produce(
    client: shmarena.aio.AsyncClient, handles: Handles, count: int, size: int, consumers: int
) -> None:
    for number in range(count):
        buf = await client.alloc(size)
        buf.view[:] = stamp(number, size)
        await handles.put((number, buf.handle))  # from here on the block is the consumer's
    for _ in range(consumers):
        await handles.put(None)


async def consume(client: shmarena.aio.AsyncClient, handles: Handles, size: int) -> int:
    verified = 0
    while (item := await handles.get()) is not None:
        number, handle = item
        buf = await client.attach(handle)
        verified += buf.view.tobytes() == stamp(number, size)
        del buf
        await client.free(handle)
    return verified


async def cancel_in_flight(
    client: shmarena.aio.AsyncClient, count: int, size: int
) -> tuple[int, int, int]:
    """Start `count` allocations, cancel all but those done when the first is."""
    tasks = [asyncio.create_task(client.alloc(size)) for _ in range(count)]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    finished = [task.result() for task in tasks if not task.cancelled()]
    held = await used_bytes(client)
    await client.free(finished)
    return len(tasks) - len(finished), held, len(finished)


async def run(args: argparse.Namespace) -> int:
    try:
        client = await shmarena.aio.connect()
    except shmarena.DaemonUnavailable as error:
        print(
            f"{error}\nThis example needs a running daemon: start one with `shmarena daemon`.",
            file=sys.stderr,
        )
        sys.exit(3)
    async with client:
        size = args.size_mib * MiB
        start = await used_bytes(client)
        handles: Handles = asyncio.Queue(maxsize=4)
        consumers = [consume(client, handles, size) for _ in range(args.consumers)]
        _, *counts = await asyncio.gather(
            produce(client, handles, args.buffers, size, args.consumers), *consumers
        )
        verified, after_run = sum(counts), await used_bytes(client)
        cancelled, held, finished = await cancel_in_flight(client, args.cancel, size)
        end = await used_bytes(client)
    print(
        f"{verified}/{args.buffers} buffers of {args.size_mib} MiB verified by "
        f"{args.consumers} consumers; used bytes: start {start}, after them {after_run}"
    )
    print(
        f"cancelled {cancelled} of {args.cancel} allocations before they returned; used bytes "
        f"with the {finished} that finished held: {held}, after freeing them: {end}"
    )
    ok = verified == args.buffers and after_run == start == end and held == start + finished * size
    print(
        f"asyncio_producer_consumer: {'ok' if ok else 'FAILED'}: {verified} verified, "
        f"{cancelled} cancelled, used bytes {start} -> {end}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffers", type=int, default=64)
    parser.add_argument("--consumers", type=int, default=3)
    # Over 1 MiB an allocation goes to the daemon: there is a round trip to cancel.
    parser.add_argument("--size-mib", type=int, default=2, help="buffer size in MiB")
    parser.add_argument("--cancel", type=int, default=16, help="allocations in the cancelled wave")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
