"""The error table: every error crosses the wire as (code, message, details)
and comes back as its class; queue errors come back as the stdlib's too."""

from __future__ import annotations

import pickle
import queue

import pytest

from shmarena import errors


def test_every_error_comes_back_as_its_class() -> None:
    error = errors.UnknownOwner("no owner 'x'", owner="x")
    back = errors.from_wire(*errors.to_wire(error))
    assert type(back) is errors.UnknownOwner
    assert (back.message, back.details) == ("no owner 'x'", {"owner": "x"})


def test_unknown_code_becomes_the_base_class() -> None:
    back = errors.from_wire("from_a_newer_daemon", "what happened", {})
    assert type(back) is errors.ShmArenaError and back.message == "what happened"


@pytest.mark.parametrize(
    ("cls", "stdlib"), [(errors.QueueEmpty, queue.Empty), (errors.QueueFull, queue.Full)]
)
def test_a_clients_queue_error_is_also_the_stdlibs(cls: type, stdlib: type) -> None:
    back = errors.from_wire(*errors.to_wire(cls("queue 'q'", queue="q")))
    assert isinstance(back, cls) and isinstance(back, stdlib)
    assert type(back).__name__ == cls.__name__ and back.details == {"queue": "q"}
    with pytest.raises(stdlib):
        raise back


@pytest.mark.parametrize("cls", [errors.QueueEmpty, errors.QueueFull])
def test_queue_errors_pickle_as_the_clients_class(cls: type[errors.QueueError]) -> None:
    for error in (cls("q", queue="q"), errors.from_wire(cls.code, "q", {"queue": "q"})):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is errors.client_class(cls)
        assert (back.message, back.details) == ("q", {"queue": "q"})
