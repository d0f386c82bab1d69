"""Listings in pages (protocol.py: OWNERS): one page costs a pass over the
keys, not a sort of them all. Pure."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from shmarena.daemon.handlers.base import Call, Result
from shmarena.errors import InvalidRequest
from shmarena.protocol import Op

# Where a listing request carries its page size (protocol.py, OWNERS)
PAGE_ARG = {Op.OWNERS: 1, Op.CLIENTS: 1, Op.NAMES: 2}


def page(c: Call, keyed: Iterable[tuple[Any, Any]], after: Any) -> tuple[list[Any], Any]:
    """The items of the next page of a listing: the smallest keys after
    `after` (None: from the start), at most the page size of the request;
    and the key to continue after, None when no more."""
    request = c.request
    rows = request.args[PAGE_ARG[request.op]]
    if rows < 0:
        raise InvalidRequest(
            f"{request.op.name.lower()}: page must be a number of rows (0: the "
            f"default), got {rows}",
            op=request.op.name.lower(),
        )
    most = c.svc.max_listing_rows
    size = min(rows, most) if rows else most
    if after is not None:
        keyed = (pair for pair in keyed if pair[0] > after)
    chosen = heapq.nsmallest(size + 1, keyed, key=lambda pair: pair[0])
    more = chosen[size - 1][0] if len(chosen) > size else None
    return [item for _, item in chosen[:size]], more


def paged(c: Call, rows: list[Any], cursor: str | None) -> Result:
    """A page's reply values: the rows and the cursor of the next page (a
    client from before paging, which asks no page size: the rows alone)."""
    if not c.request.args[PAGE_ARG[c.request.op]]:
        return (rows,)
    return (rows, cursor)


def bad_cursor(op: str, cursor: str) -> InvalidRequest:
    """The refusal of a cursor this daemon did not give."""
    return InvalidRequest(
        f"{op}: cursor {cursor!r:.80} is not one this daemon gives; pass the cursor of "
        'the page before, or "" for the first page',
        op=op,
    )
