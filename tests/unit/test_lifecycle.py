"""The Buffer lifecycle table (client/lifecycle.py) and the client's pure
bookkeeping: one place moves a Buffer, and refuses what the table does not
allow with the lifetime rule it breaks."""

from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass

import pytest

from shmarena.client.cache import Cache
from shmarena.client.lifecycle import (
    ATTACHED,
    DONE,
    LIVE_STATES,
    OWNED,
    RETAINED,
    STATES,
    TRANSITIONS,
    State,
    move,
)
from shmarena.errors import StaleHandle
from shmarena.shm.segments import SEGMENT_SHIFT

CLIENT = pathlib.Path(__file__).resolve().parents[2] / "shmarena" / "client"


@dataclass
class Fake:
    """What `move` reads and writes of a Buffer."""

    _state: State | str
    _gone: str = ""
    _address: int = 3 << SEGMENT_SHIFT | 0x2000
    _size: int = 4096
    _gen: int = 7


def test_a_free_ends_an_owned_buffer_as_freed() -> None:
    buf = Fake(OWNED)
    move(buf, "free")  # type: ignore[arg-type]
    assert buf._state is DONE and buf._gone == "freed"


def test_a_second_free_is_a_double_free_naming_the_block() -> None:
    buf = Fake(OWNED)
    move(buf, "free")  # type: ignore[arg-type]
    with pytest.raises(StaleHandle) as info:
        move(buf, "free")  # type: ignore[arg-type]
    assert info.value.details["rule"] == "double_free"
    assert "offset 0x2000 of segment 3" in str(info.value)
    assert buf._state is DONE


def test_a_free_after_a_recycle_names_the_recycle() -> None:
    buf = Fake(OWNED)
    move(buf, "recycle")  # type: ignore[arg-type]
    with pytest.raises(StaleHandle) as info:
        move(buf, "free")  # type: ignore[arg-type]
    assert info.value.details["rule"] == "owner_recycled"


@pytest.mark.parametrize("event", ["free", "release", "recycle", "close"])
def test_a_done_buffer_refuses_every_use(event: str) -> None:
    buf = Fake(OWNED)
    move(buf, event)  # type: ignore[arg-type]
    with pytest.raises(StaleHandle, match=r"Buffer\.view") as info:
        move(buf, "use", "view")  # type: ignore[arg-type]
    rule = "owner_recycled" if event == "recycle" else "use_after_free"
    assert info.value.details["rule"] == rule


def test_live_buffers_may_be_used_and_keep_their_state() -> None:
    for state in LIVE_STATES:
        buf = Fake(state)
        move(buf, "use", "handle")  # type: ignore[arg-type]
        assert buf._state is state


def test_retain_and_its_undo() -> None:
    buf = Fake(ATTACHED)
    move(buf, "retain")  # type: ignore[arg-type]
    assert buf._state is RETAINED
    move(buf, "unretain")  # type: ignore[arg-type]
    assert buf._state is ATTACHED


def test_the_session_ending_ends_any_buffer_and_keeps_the_last_word() -> None:
    for state in State:
        buf = Fake(state)
        move(buf, "close")  # type: ignore[arg-type]
        assert buf._state is DONE and buf._gone == "closed"


def test_states_given_as_plain_strings_find_the_same_entries() -> None:
    # pickling.py, queue.py and names.py pass "retained"; aio.py sets "attached".
    buf = Fake("attached")
    move(buf, "retain")  # type: ignore[arg-type]
    assert buf._state is RETAINED
    assert STATES["owned"] is OWNED and OWNED == "owned" and str(DONE) == "done"


def test_every_target_state_is_a_state_and_done_is_final_but_for_its_reason() -> None:
    for (state, event), after in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(after, State)
        if state is DONE:
            assert after is DONE, event


# -- the cache is integer bookkeeping -----------------------------------------


def _runtime_imports(path: pathlib.Path) -> set[str]:
    """Modules `path` imports at runtime (anywhere but under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("cache.py", {"shmarena.client.buffer", "shmarena.client.client"}),
        ("buffer.py", {"shmarena.client.cache", "shmarena.client.client"}),
        ("mappings.py", {"shmarena.client"}),
        ("lifecycle.py", {"shmarena.client"}),
    ],
)
def test_the_client_modules_keep_their_layers(module: str, forbidden: set[str]) -> None:
    imported = _runtime_imports(CLIENT / module)
    bad = {name for name in imported for f in forbidden if name == f or name.startswith(f + ".")}
    assert not bad, f"{module} imports {sorted(bad)} at runtime"


def _cache() -> tuple[Cache, list[tuple[int, int, int]]]:
    marks: list[tuple[int, int, int]] = []
    cache = Cache(
        session=1,
        epoch=9,
        min_block=4096,
        arena_bytes=64 << 20,
        wake=lambda: None,
        mark=lambda a, g, r: marks.append((a, g, r)),
        recall=lambda *_: False,  # no Buffer of its blocks has views here
        view=memoryview(bytearray(0)),
    )
    return cache, marks


def test_the_cache_hands_out_and_takes_back_addresses_and_generations() -> None:
    cache, _ = _cache()
    cache.add(4096, [0x1000, 0x2000])
    address, gen = cache.hand_out(100, 0) or (0, 0)
    assert address == 0x2000 and cache.is_out(address, gen)
    assert cache.give_back(address, gen) == 4096
    assert not cache.is_out(address, gen)
    with pytest.raises(StaleHandle):
        cache.give_back(address, gen)
    assert cache.take_events() == []  # out and back before a flush: never reported


def test_a_block_whose_handle_left_is_marked_live_then_freed_through_the_daemon() -> None:
    cache, marks = _cache()
    cache.add(4096, [0x1000])
    address, gen = cache.hand_out(100, 0) or (0, 0)
    assert cache.escape(address, gen)
    cache.free_through_daemon(address, gen, 100)
    assert [m[:2] for m in marks] == [(address, gen), (address, gen)]
    assert cache.take_events()  # the hand-out and the free are reported
