"""What every handler is given and returns. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shmarena.protocol import Request

if TYPE_CHECKING:
    from shmarena.daemon.service import Service

# A handler's answer: the values of its ok reply, or None: kept (it waits).
Result = tuple[Any, ...] | None


@dataclass(slots=True)
class Call:
    """One request of one session, as a handler sees it: read-only by
    convention (not `frozen`: a frozen dataclass is built through
    object.__setattr__ per field, five times the cost, on every request)."""

    svc: Service
    session: int
    request: Request
    now: float

    @property
    def args(self) -> tuple[Any, ...]:
        """The request's arguments, checked against the protocol's schema."""
        return self.request.args


Handler = Callable[[Call], Result]
