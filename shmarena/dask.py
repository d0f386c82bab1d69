"""Dask (`distributed`) on shmarena: handles instead of copies between the
workers of one host, Dask's own bytes path between hosts.

    from distributed import Client
    import shmarena.dask

    client = Client(scheduler_address)
    client.register_plugin(shmarena.dask.ShmarenaPlugin(size="8G"))

What the plugin does in each worker process (see docs/dask.md):

- connects to the host's shmarena daemon, starting one (detached, sized from
  the plugin's options) when none answers;
- registers the worker in that daemon under `dask-worker:ADDRESS`, a name that
  vanishes with the worker's session;
- wraps the worker's `get_data` handler. When the worker asking for data is
  registered in the *same* daemon, numpy arrays, pandas frames and series
  and Arrow tables and arrays (of `threshold` bytes or more), and shmarena
  Buffers travel as handles in the `shmarena` serialization family: the
  receiver retains the blocks and gets objects whose buffers view the arena.
  Any other requester (another host, a worker without the plugin, the Dask
  client, the scheduler) gets Dask's normal serialization.

Lifetimes: an array that views the arena keeps its block; a receiver's
reference is dropped when its last view is gone (when Dask forgets the key on
that worker and nothing else views it). A block is therefore freed once no
worker of the host holds the data. An array the sender had outside the arena
is copied into a block for the transfer; the sender frees that block when the
transfer is over, so the receiver's reference is the only one left. A worker
that dies takes its session with it: the daemon reclaims its blocks, except
those another worker still holds.

Tasks make arrays in the arena with `shmarena.dask.ndarray(shape, dtype)` or
`shmarena.dask.to_arena(array)`: then not even the first transfer copies.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import register_serialization_family

from shmarena.client import registry
from shmarena.client.buffer import Buffer
from shmarena.client.client import Client, connect
from shmarena.config import resolve_name
from shmarena.config import runtime_dir as default_runtime_dir
from shmarena.errors import DaemonUnavailable, InvalidRequest, ShmArenaError
from shmarena.pickling import DEFAULT_THRESHOLD, free_all, pack, retain_all, unpack
from shmarena.protocol import Handle
from shmarena.spawn import shmarena_command

__all__ = [
    "FAMILY",
    "ShmarenaPlugin",
    "dask_setup",
    "get_client",
    "ndarray",
    "shares_arena",
    "to_arena",
]

FAMILY = "shmarena"
_REGISTERED = "dask-worker:"
# How long a "not in my daemon" answer about a peer is believed (a worker of
# this host may register a moment after it first asks for data).
_NEGATIVE_TTL_S = 2.0
_POSITIVE_TTL_S = 30.0
_DASK_DEFAULT = ("dask", "pickle")

logger = logging.getLogger("shmarena.dask")

# The blocks a same-arena transfer made (copies of arrays outside the arena):
# set by the get_data wrapper, filled by the serializer (which may run on
# Dask's offload thread: contextvars travel there), freed after the transfer.
_TRANSFER: contextvars.ContextVar[list[Buffer] | None] = contextvars.ContextVar(
    "shmarena_dask_transfer", default=None
)


@dataclass
class _State:
    """What the plugin set up in this process: one client of one daemon, and
    the workers registered in it (more than one only when workers share a
    process, as in LocalCluster(processes=False))."""

    client: Client
    daemon: tuple[str, str]  # (name, runtime dir)
    threshold: int
    registrations: dict[str, Buffer] = field(default_factory=dict)
    peers: dict[str, tuple[bool, float]] = field(default_factory=dict)  # the event loop's

    def shares_arena(self, address: str | None) -> bool:
        """Whether the worker at `address` is registered in our daemon."""
        if not address:
            return False
        if address in self.registrations:
            return True
        now = time.monotonic()
        known = self.peers.get(address)
        if known is not None and now < known[1]:
            return known[0]
        name = _REGISTERED + address
        try:
            found = any(row["name"] == name for row in self.client.names(name))
        except ShmArenaError as exc:
            logger.warning(
                "shmarena: cannot ask the daemon about %s (%s); using Dask's path", address, exc
            )
            found = False
        self.peers[address] = (found, now + (_POSITIVE_TTL_S if found else _NEGATIVE_TTL_S))
        return found


_STATE: _State | None = None


def get_client() -> Client:
    """The shmarena client of this Dask worker process (for tasks)."""
    if _STATE is None:
        raise RuntimeError(
            "shmarena.dask.get_client(): this process has no shmarena plugin; register it "
            "with dask_client.register_plugin(shmarena.dask.ShmarenaPlugin()) or start the "
            "worker with --preload shmarena.dask"
        )
    return _STATE.client


def shares_arena(address: str) -> bool:
    """Whether the worker at `address` uses this worker's daemon (so data sent
    to it goes as handles)."""
    return _STATE is not None and _STATE.shares_arena(address)


def ndarray(shape: Any, dtype: Any = "float64", order: str = "C") -> Any:
    """A new, uninitialised numpy array: in the arena on a worker with the
    plugin (freed when it and every view of it are gone), a plain
    `numpy.empty` elsewhere, so the same task runs on any worker."""
    import numpy as np

    if _STATE is None:
        return np.empty(shape, dtype=dtype, order=order)  # type: ignore[call-overload]
    return _STATE.client.ndarray(shape, dtype, order, site=_task_site())


def _task_site() -> str | None:
    """'dask KEY' inside a task (the block's site in `shmarena owners`)."""
    # The task's thread state (distributed.worker re-exports this same object).
    from dask.context import thread_state

    key = getattr(thread_state, "key", None)
    return f"dask {key}" if key is not None else None


def to_arena(array: Any) -> Any:
    """`array` itself if its data lies in the arena already (or this worker has
    no plugin), else a copy of it in the arena."""
    import numpy as np

    if _STATE is None or not isinstance(array, np.ndarray) or _in_arena(array):
        return array
    return _STATE.client.ndarray_like(array, site=_task_site())


def _in_arena(array: Any) -> bool:
    data = array.__array_interface__["data"][0]
    return registry.find(data, max(array.nbytes, 1), registry.LIVE_STATES) is not None


# -- the serialization family ------------------------------------------------


def _sendable(x: Any, threshold: int) -> bool:
    """Whether `x` goes as handles: a live Buffer, or a numpy array, pandas
    frame or series, or Arrow table or array of at least `threshold` bytes."""
    if isinstance(x, Buffer):
        return x._state in registry.LIVE_STATES
    kind = type(x)
    package = kind.__module__.partition(".")[0]
    if package == "numpy":
        return kind.__name__ == "ndarray" and not x.dtype.hasobject and x.nbytes >= threshold
    if package == "pandas" and kind.__name__ in ("DataFrame", "Series"):
        return int(x.memory_usage(index=True, deep=False).sum()) >= threshold
    if package == "pyarrow":
        pa = sys.modules["pyarrow"]
        arrow = (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)
        return isinstance(x, arrow) and int(x.nbytes) >= threshold
    return False


def _dumps(x: Any) -> tuple[dict[str, Any], list[bytes]]:
    made = _TRANSFER.get()
    state = _STATE
    if made is None or state is None or not _sendable(x, state.threshold):
        raise NotImplementedError  # Dask's next family serializes it
    client = state.client
    if isinstance(x, Buffer):
        return {"epoch": client.epoch, "buffer": list(x.handle)}, []
    packed = pack(x, client, state.threshold)
    made.extend(packed.made)
    header = {"epoch": client.epoch, "handles": [list(h) for h in packed.handles]}
    return header, [packed.payload]


def _loads(header: dict[str, Any], frames: list[Any]) -> Any:
    state = _STATE
    if state is None:
        raise InvalidRequest(
            "received shmarena handles but this process has no shmarena plugin: the sender "
            "should only send them to a worker registered in its daemon"
        )
    client = state.client
    if header.get("epoch") != client.epoch:
        raise InvalidRequest(
            f"received handles of arena epoch {header.get('epoch')} but this worker's daemon "
            f"{client.name!r} has epoch {client.epoch}: sender and receiver use different daemons"
        )
    if "buffer" in header:
        buf = client.attach(Handle(*header["buffer"]), retain=True)
        weakref.finalize(buf, _release_quietly, client, buf.handle)
        return buf
    handles = [Handle(*h) for h in header["handles"]]
    buffers = retain_all(client, handles, "loading a Dask result in this worker")
    return unpack(bytes(frames[0]), buffers)


def _release_quietly(client: Client, handle: Handle) -> None:
    with contextlib.suppress(ShmArenaError):  # the session or the block is gone already
        client.release(handle)


# `register_serialization_family` has no annotations upstream: typed here.
_register_family = cast(
    Callable[[str, Callable[..., Any], Callable[..., Any]], None], register_serialization_family
)
_register_family(FAMILY, _dumps, _loads)


# -- the plugin ----------------------------------------------------------------


class ShmarenaPlugin(WorkerPlugin):
    """Connects each Dask worker to its host's shmarena daemon and sends data
    to workers of the same daemon as handles.

    `daemon`, `runtime_dir`: which daemon (default as for `shmarena.connect`:
    $SHMARENA_NAME / $SHMARENA_RUNTIME_DIR, else "default"). `start`: start it
    (detached, so it outlives this worker) when none answers, with `size`
    bytes ("4G"; default: the daemon's) and `daemon_args` (more
    `shmarena daemon` flags). `threshold`: smaller arrays go Dask's way (a
    handle costs a daemon round trip; a small copy costs less).

    A WorkerPlugin, not a NannyPlugin: the client, the serialization family
    and the get_data handler all live in the worker process, and workers
    started with --no-nanny have no nanny to run one.
    """

    name = "shmarena"

    def __init__(
        self,
        daemon: str | None = None,
        *,
        runtime_dir: str | None = None,
        start: bool = True,
        size: str | int | None = None,
        daemon_args: tuple[str, ...] | list[str] = (),
        threshold: int = DEFAULT_THRESHOLD,
        timeout_s: float = 30.0,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"ShmarenaPlugin: threshold must be at least 1 byte, got {threshold}")
        self.daemon = daemon
        self.runtime_dir = runtime_dir
        self.start = start
        self.size = size
        self.daemon_args = list(daemon_args)
        self.threshold = threshold
        self.timeout_s = timeout_s

    def setup(self, worker: Any) -> None:
        global _STATE
        daemon = (
            resolve_name(self.daemon, os.environ),
            self.runtime_dir or default_runtime_dir(os.environ, os.getuid()),
        )
        state = _STATE
        if state is not None and state.daemon != daemon:
            raise RuntimeError(
                f"ShmarenaPlugin: worker {worker.address} asks for daemon {daemon[0]!r} in "
                f"{daemon[1]}, but this process's workers use {state.daemon[0]!r} in "
                f"{state.daemon[1]}; workers that share a process share one daemon"
            )
        if state is None:
            client = self._connect(daemon, worker.address)
            state = _State(client=client, daemon=daemon, threshold=self.threshold)
        state.registrations[worker.address] = _register(state.client, worker.address)
        _wrap_get_data(worker)
        deserializers = getattr(worker.rpc, "deserializers", None)
        if deserializers is not None and FAMILY not in deserializers:
            worker.rpc.deserializers = [FAMILY, *deserializers]
        _STATE = state
        logger.info(
            "shmarena: worker %s uses daemon %r (epoch %d)",
            worker.address,
            state.client.name,
            state.client.epoch,
        )

    def teardown(self, worker: Any) -> None:
        """Stop sending handles and drop the registration. The client stays
        open: arrays in the worker's memory may still view its blocks; its
        session ends with the process."""
        global _STATE
        _unwrap_get_data(worker)
        state = _STATE
        if state is None:
            return
        registration = state.registrations.pop(worker.address, None)
        if registration is not None:
            free_all([registration])
        if not state.registrations:
            _STATE = None

    def _connect(self, daemon: tuple[str, str], address: str) -> Client:
        name, run_dir = daemon
        label = f"dask-worker {address}"
        started = False
        deadline = 0.0
        while True:
            try:
                return connect(name, runtime_dir=run_dir, cache=False, label=label, timeout_s=2.0)
            except DaemonUnavailable:
                if not self.start or (started and time.monotonic() > deadline):
                    raise
            if not started:
                _start_daemon(name, run_dir, self.size, self.daemon_args, self.timeout_s)
                started, deadline = True, time.monotonic() + self.timeout_s
            else:
                time.sleep(0.05)  # the daemon a racing worker started may not answer yet


def _start_daemon(
    name: str, run_dir: str, size: str | int | None, extra: list[str], timeout_s: float
) -> None:
    """`shmarena daemon --detach`: it runs in a session of its own and outlives
    the worker. Two workers racing to start it are fine: the daemon's lock lets
    one win, and both connect to the winner."""
    command = shmarena_command("daemon", "--detach", "--name", name)
    command += [
        "--runtime-dir",
        run_dir,
        *(["--size", str(size)] if size is not None else []),
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 10)
    if result.returncode != 0:
        logger.info(
            "shmarena: starting daemon %r exited %d (another worker may have started it): %s",
            name,
            result.returncode,
            result.stderr.strip()[-500:],
        )


def _register(client: Client, address: str) -> Buffer:
    """Publish `dask-worker:ADDRESS` in the daemon: a peer finds us there, and
    the name vanishes when our session ends (its block goes with it)."""
    buf = client.alloc(len(address.encode()) or 1)
    buf.view[: len(address.encode())] = address.encode()
    name = _REGISTERED + address
    with contextlib.suppress(ShmArenaError):
        client.unpublish(name)  # a worker that was here before us, at this address
    client.publish(name, buf)
    return buf


def _wrap_get_data(worker: Any) -> None:
    original = worker.handlers["get_data"]
    original = getattr(original, "__shmarena_original__", original)

    async def get_data(
        comm: Any, keys: Any, who: str | None = None, serializers: list[str] | None = None
    ) -> Any:
        state = _STATE
        if state is None or not state.shares_arena(who):
            return await original(comm, keys=keys, who=who, serializers=serializers)
        made: list[Buffer] = []
        token = _TRANSFER.set(made)
        try:
            listed = list(serializers) if serializers is not None else list(_DASK_DEFAULT)
            return await original(comm, keys=keys, who=who, serializers=[FAMILY, *listed])
        finally:
            _TRANSFER.reset(token)
            free_all(made)  # the receiver holds its own references by now

    get_data.__shmarena_original__ = original  # type: ignore[attr-defined]
    worker.handlers["get_data"] = get_data


def _unwrap_get_data(worker: Any) -> None:
    handler = worker.handlers.get("get_data")
    original = getattr(handler, "__shmarena_original__", None)
    if original is not None:
        worker.handlers["get_data"] = original


async def dask_setup(worker: Any) -> None:
    """`dask worker ... --preload shmarena.dask`: the plugin with its defaults
    (the daemon named by $SHMARENA_NAME / $SHMARENA_RUNTIME_DIR)."""
    await worker.plugin_add(ShmarenaPlugin(), catch_errors=False)
