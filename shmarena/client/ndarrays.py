"""New numpy arrays in blocks of their own, freed when the array and every
view of it are gone (`Client.ndarray`, `Client.ndarray_like`).

Split from client/arrays.py (which shares arrays between processes and
reaches for the process's default client) so that the Client can make
arrays without importing what imports the Client. numpy is optional: it is
imported inside the functions, never at module import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shmarena.client import registry
from shmarena.client.base import ClientBase

if TYPE_CHECKING:
    from shmarena.client.allocating import Allocating

__all__ = ["Arrays", "ndarray", "ndarray_like", "numpy_or_error", "refuse_objects"]


def numpy_or_error(what: str) -> Any:
    """numpy, or an ImportError saying how to install it for `what`."""
    try:
        import numpy
    except ImportError:
        raise ImportError(f"{what} needs numpy: pip install 'shmarena[numpy]'") from None
    return numpy


def refuse_objects(dtype: Any, what: str) -> None:
    """TypeError for a dtype holding Python objects (meaningless elsewhere)."""
    if dtype.hasobject:
        raise TypeError(
            f"{what}: dtype {dtype} holds Python object pointers, which mean nothing in "
            "another process and cannot live in shared memory; use a numeric, string "
            "(e.g. 'U16', 'S16') or structured dtype without objects"
        )


def ndarray(
    client: Allocating,
    shape: Any,
    dtype: Any = "float64",
    order: str = "C",
    site: str | None = None,
) -> Any:
    """A new, uninitialised array in a block of its own (see `Client.ndarray`)."""
    np = numpy_or_error("Client.ndarray")
    dt = np.dtype(dtype)
    refuse_objects(dt, "Client.ndarray")
    if order not in ("C", "F"):
        raise ValueError(f"Client.ndarray: order must be 'C' or 'F', not {order!r}")
    shape_t = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape_t):
        raise ValueError(f"Client.ndarray: shape {shape_t} has a negative dimension")
    count = 1
    for n in shape_t:
        count *= n
    buf = client.alloc(max(count * dt.itemsize, 1), site=site)  # an empty one needs a block too
    registry.register(buf)
    view = registry.export(buf, then="free")
    return np.ndarray(shape_t, dtype=dt, buffer=view, order=order)


def ndarray_like(client: Allocating, array: Any, site: str | None = None) -> Any:
    """A copy of `array` in a block of its own (see `Client.ndarray_like`)."""
    np = numpy_or_error("Client.ndarray_like")
    source = np.asarray(array)
    fortran = source.flags.f_contiguous and not source.flags.c_contiguous
    out = ndarray(client, source.shape, source.dtype, "F" if fortran else "C", site)
    out[...] = source
    return out


class Arrays(ClientBase):
    """The Client's numpy calls."""

    def ndarray(
        self, shape: Any, dtype: Any = "float64", order: str = "C", *, site: str | None = None
    ) -> Any:
        """A new numpy array (uninitialised) in a block of its own, freed when the
        array and every view of it are gone; `shmarena.share(array)` names it for
        other processes; `site` labels its block as for `alloc`. Needs numpy
        (`pip install 'shmarena[numpy]'`)."""
        return ndarray(self, shape, dtype, order, site)  # type: ignore[arg-type]

    def ndarray_like(self, array: Any, *, site: str | None = None) -> Any:
        """`client.ndarray` of `array`'s shape, dtype and order (Fortran for a
        Fortran-contiguous array), holding a copy of its data."""
        return ndarray_like(self, array, site)  # type: ignore[arg-type]
