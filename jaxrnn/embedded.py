"""Inputs given as token ids into an embedding table: ``xs = table[ids]`` without forming ``xs``.

Bottom layer, like :mod:`jaxrnn.checks`. :func:`jaxrnn.rnn` and
:meth:`jaxrnn.Stack.apply` accept an :class:`Embedded` wherever they accept
inputs ``xs``, with the same results and gradients as ``xs = lookup(table,
ids)``. A backend that knows the form may use it: the C++ LSTM of
``impl="ffi"`` projects the table once, ``table @ w_ih + b`` (``V`` rows
instead of ``B·T``), and each step adds its token's row; the gradient reaches
the table through a sum of the gate gradients per token, and no ``(T, B, I)``
input, its projection or its gradient exists. Every other backend looks the
rows up first.

An id outside ``[0, V)`` gets a row of NaN (a plain gather would clamp it to
a real row), so a bad id under ``jit`` shows as NaN outputs, never as a
silently wrong one.

Example:
  >>> table = jax.random.normal(jax.random.key(0), (65, 32))       # (V, E)
  >>> ids = jnp.zeros((8, 100), jnp.int32)                         # (B, T)
  >>> ys, carry = jaxrnn.rnn(jaxrnn.LSTM(64), params, Embedded(table, ids))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.checks import shape_of

Array = jax.Array

__all__ = ["Embedded", "in_range", "lookup"]


class Embedded(NamedTuple):
    """Inputs ``xs = lookup(table, ids)``, kept as a table and ids.

    Attributes:
      table: ``(V, I)`` floating-point rows; ``I`` is the input size.
      ids: integer ids, ``(B, T)`` batch-major, ``(T, B)`` time-major or
        ``(T,)`` unbatched: the shape of the inputs without their last axis.
    """

    table: Array
    ids: Array

    def lookup(self) -> Array:
        """The inputs this stands for, ``(*ids.shape, I)``."""
        return lookup(self.table, self.ids)


def in_range(ids, rows):
    """Boolean array: ``0 <= ids < rows``."""
    return (ids >= 0) & (ids < rows)


def lookup(table: Array, ids: Array) -> Array:
    """Rows ``table[ids]``, ``(*ids.shape, I)``; an id outside ``[0, V)`` gets a NaN row.

    Args:
      table: ``(V, I)`` rows.
      ids: integer ids, any shape.

    Example:
      >>> lookup(jnp.eye(3), jnp.array([2, 5]))  # the second id is out of range
      Array([[ 0.,  0.,  1.],
             [nan, nan, nan]], dtype=float32)
    """
    valid = in_range(ids, table.shape[0])
    rows = jnp.take(table, jnp.where(valid, ids, 0), axis=0)
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, table.dtype))


def check_embedded(xs: Embedded, name: str = "xs", ranks=(1, 2)) -> None:
    """Check an :class:`Embedded`: a floating ``(V, I)`` table and integer ids of rank 1 or 2."""
    table, ids = xs
    dtype = getattr(table, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or np.ndim(table) != 2:
        raise TypeError(
            f"{name}.table: expected a floating-point array (vocab_size, input_size), "
            f"got {type(table).__name__} of dtype {dtype} and shape {shape_of(table)}"
        )
    dtype = getattr(ids, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}.ids: expected an integer array of ids, got {type(ids).__name__} of dtype {dtype}")
    if np.ndim(ids) not in ranks:
        raise ValueError(f"{name}.ids: expected shape (B, T) or (T,), got {shape_of(ids)}")
