"""Handlers of named buffers, queues and events: PUBLISH, UNPUBLISH, NAMES,
LOOKUP, EVENTS, QOPEN, QPUT, QGET, QSTAT, QCLOSE, QPUTS, QRESERVE, QTAKE, QACK,
QUNTAKE. Pure.

LOOKUP, EVENTS, QPUT, QGET, QRESERVE and QTAKE may wait (`wait_s`): the exchange keeps them
and `deliver_met` answers them when something another session did meets
them or their time runs out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmarena.daemon.exchange import Waiter
from shmarena.daemon.handlers.base import Call, Result
from shmarena.daemon.handlers.paging import page, paged
from shmarena.daemon.model import OP_NAMES
from shmarena.errors import OutOfMemory, ShmArenaError
from shmarena.protocol import Op

if TYPE_CHECKING:
    from shmarena.daemon.service import Service


def _shape(op: Op, result: list[Any]) -> tuple[Any, ...]:
    # LOOKUP and QGET answer one item (a pair); EVENTS three; QPUT one
    return (result,) if op in (Op.LOOKUP, Op.QGET) else tuple(result)


def waitable(c: Call) -> Result:
    """Meet a request that may wait now, or keep it until `wait_s` runs out."""
    svc, request = c.svc, c.request
    if (c.session, request.request_id) in svc.admission.waiting:
        return None  # a retry of an EVENTS request that is kept already
    wait_s = request.args[-1]
    waiter = Waiter(request.op, c.session, request.request_id, c.now + wait_s, request.args)
    result = svc.exchange.try_now(waiter)
    if result is None:
        if wait_s <= 0:
            result = svc.exchange.timed_out(waiter, c.now)
        else:
            svc.may_keep(c.session, request)
            svc.exchange.wait(waiter)
            svc.admission.wait_kept(c.session, request.op, request.request_id, waiter.deadline)
            return None
    if isinstance(result, Exception):
        raise result
    return _shape(request.op, result)


def _met_answer(svc: Service, waiter: Waiter, result: Any, now: float) -> Any:
    """What a kept request met (or timed out) is answered with: its values,
    or its refusal (a bug met on the way: an internal error)."""
    if "wake" in svc.faults:
        result = RuntimeError("fault injected by --debug-fail wake")
    if isinstance(result, ShmArenaError):
        if isinstance(result, OutOfMemory):
            svc.log_oom(waiter.session_id, result, None)
        return result
    where = f"a waiting {OP_NAMES[waiter.op]}"
    if isinstance(result, Exception):  # a bug, met while answering this one
        return svc.internal_error(where, result, waiter.session_id, now)
    try:
        return _shape(waiter.op, result)
    except Exception as error:  # noqa: BLE001 - a bug of ours: this request's internal error
        return svc.internal_error(where, error, waiter.session_id, now)


def deliver_met(svc: Service, now: float) -> None:
    """Answer the kept requests the exchange found met or timed out."""
    for waiter, result in svc.exchange.take_met():
        answer = _met_answer(svc, waiter, result, now)
        svc.answer_kept(waiter.session_id, waiter.request_id, waiter.op, answer)


def publish(c: Call) -> Result:
    """PUBLISH: give a block a name others can look up."""
    name, handle, sealed = c.args
    c.svc.exchange.publish(c.session, name, handle, sealed, c.now)
    return (None,)


def unpublish(c: Call) -> Result:
    """UNPUBLISH: drop a name (its owner's user, or an administrator)."""
    svc = c.svc
    entry = svc.exchange.names.get(c.args[0])
    holder = entry.block.owner if entry is not None else None
    found = svc.ledger.owners.get(holder) if holder is not None else None
    if found is not None:
        svc.require_owner_access(c.session, found, "unpublish")
    svc.exchange.unpublish(c.args[0])
    return (None,)


def names(c: Call) -> Result:
    """NAMES: a page of the names under a prefix."""
    prefix, cursor, _ = c.args
    exchange = c.svc.exchange
    keyed = ((e.name, e) for e in exchange.names.values() if e.name.startswith(prefix))
    entries, more = page(c, keyed, cursor or None)
    return paged(c, exchange.name_rows(entries, c.now), more)


def qopen(c: Call) -> Result:
    """QOPEN: open (or create) a queue."""
    name, maxsize = c.args
    return (c.svc.exchange.open_queue(c.session, name, maxsize, c.now),)


def qstat(c: Call) -> Result:
    """QSTAT: a queue's figures."""
    return (c.svc.exchange.queue_stat(c.session, c.args[0]),)


def qclose(c: Call) -> Result:
    """QCLOSE: this session stops using a queue."""
    c.svc.exchange.close_queue(c.session, c.args[0])
    return (None,)


def qputs(c: Call) -> Result:
    """QPUTS (one-way): several messages, in order, into reserved or free room."""
    name, messages = c.args
    try:
        c.svc.exchange.book.put_many(c.session, name, messages, c.now)
    finally:
        # A one-way request that succeeds gets no reply, and the service
        # answers the waiters it met only along with a reply: answer them here.
        deliver_met(c.svc, c.now)
    return (None,)


def qack(c: Call) -> Result:
    """QACK (one-way): messages taken ahead were delivered."""
    c.svc.exchange.book.ack(c.session, c.args[0], c.args[1])
    deliver_met(c.svc, c.now)  # the puts it made room for (see qputs)
    return (None,)


def quntake(c: Call) -> Result:
    """QUNTAKE: messages taken ahead go back to the front of the queue."""
    c.svc.exchange.book.untake(c.session, c.args[0], c.args[1])
    return (None,)
