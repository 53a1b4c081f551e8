r"""``tanh`` saturation, the lectures' second cause of vanishing gradients.

``tanh'(z) = 1 - tanh(z)²`` is 0.19 at ``tanh = ±0.9`` and 0.02 at ``±0.99``:
a saturated unit passes almost none of its gradient back.
:func:`tanh_saturation` counts such units at every ``tanh`` of the cell
(:meth:`jaxrnn.Cell.tanh_sites`) along the trajectory the inputs drive.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn.analysis.common import check_cell_run, initial_state
from jaxrnn.cells import Elman

Array = jax.Array

__all__ = ["SATURATION_THRESHOLDS", "Saturation", "tanh_saturation"]

#: The lectures' saturation table: ``tanh'`` is 0.19 at ``±0.9`` and 0.02 at ``±0.99``.
SATURATION_THRESHOLDS = (0.19, 0.02)


@functools.partial(jax.jit, static_argnums=(0,))
def _tanh_values(cell, params, xs, carry0):
    cell = cell.resolve(xs.dtype)
    xp = cell.input_projection(params, jnp.swapaxes(xs, 0, 1))

    def body(carry, xp_t):
        new, _ = cell.step_projected(params, carry, xp_t)
        return new, cell.tanh_sites(params, carry, xp_t)

    return lax.scan(body, carry0, xp)[1]  # leaves (T, B, H)


class Saturation(NamedTuple):
    """Output of :func:`tanh_saturation`.

    Attributes:
      thresholds: the ``tanh'`` thresholds ``(K,)``.
      per_step: site name -> ``(T, K)``: fraction of units (over batch and
        hidden units) at step ``t`` with ``tanh' = 1 - a² < thresholds[k]``.
      overall: site name -> ``(K,)``: the same over all steps.
    """

    thresholds: tuple
    per_step: dict
    overall: dict


def tanh_saturation(
    cell, params, xs: Array, *, thresholds: Sequence[float] = SATURATION_THRESHOLDS, initial_carry: Any = None
) -> Saturation:
    r"""Fraction of saturated ``tanh`` units, the lectures' second cause of vanishing.

    ``tanh'(z) = 1 - tanh(z)²``: 0.19 at ``tanh = ±0.9`` and 0.02 at ``±0.99``
    (the lecture's table; default thresholds), i.e. a unit below 0.02 passes
    less than 2% of its gradient per step. Sites (:meth:`jaxrnn.Cell.tanh_sites`):
    Elman ``"h"`` (needs ``activation="tanh"``); LSTM ``"g"`` (the candidate)
    and ``"c"`` (``tanh(c_t)`` in ``h_t = o_t ⊙ tanh(c_t)``); GRU ``"n"`` (the
    candidate).

    Args:
      cell: an Elman (tanh), LSTM or GRU cell.
      params: its parameters.
      xs: ``(B, T, I)`` or ``(T, I)`` inputs.
      thresholds: ``tanh'`` thresholds in ``(0, 1]``.
      initial_carry: as for :func:`jaxrnn.rnn`.

    Returns:
      :class:`Saturation`.

    Example:
      >>> cell = jaxrnn.Elman(32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> sat = tanh_saturation(cell, params, 3 * jnp.ones((4, 20, 8)))
      >>> sat.overall["h"]  # fractions below 0.19 and 0.02
    """
    if isinstance(cell, Elman) and cell.activation != "tanh":
        raise ValueError(f"cell: tanh_saturation needs tanh units, got Elman(activation={cell.activation!r})")
    thresholds = tuple(float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=np.float64)))
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"thresholds: expected values in (0, 1], got {thresholds}")
    check_cell_run(cell, params, xs, initial_carry)
    xs_b, carry0, _ = initial_state(cell, xs, initial_carry)
    values = _tanh_values(cell, params, xs_b, carry0)
    thr = jnp.asarray(thresholds, jnp.float32)
    per_step, overall = {}, {}
    for name, a in values.items():
        slope = 1.0 - jnp.square(a.astype(jnp.float32))  # (T, B, H)
        below = slope[..., None] < thr.reshape(1, 1, 1, -1)  # (T, B, H, K)
        per_step[name] = jnp.mean(below, axis=(1, 2))
        overall[name] = jnp.mean(below, axis=(0, 1, 2))
    return Saturation(thresholds, per_step, overall)
