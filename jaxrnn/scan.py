"""The reference recurrence: a masked ``lax.scan``, shared by the runner, the kernels and the analysis.

Bottom layer, like :mod:`jaxrnn.checks`: it imports nothing of jaxrnn and
takes the cell as an argument (anything with ``step_projected`` and
``hidden``). The padding rule every backend follows is written here once:

* a step ``t >= lengths[b]`` leaves sequence ``b``'s carry unchanged and
  outputs zeros;
* scanning in reverse therefore first walks the padding (the carry stays at
  ``carry0``) and then the valid steps ``lengths[b]-1, ..., 0``: only the
  valid part is reversed, and each output stays aligned with its input;
* nothing computed at a padded step reaches an output, a carry or a
  gradient: the padded step's inputs are replaced by zeros *before* the step
  (:func:`where_valid`), so even NaN or inf in padding cannot leak through
  the backward pass (``0 * nan`` is ``nan``; a ``where`` after the step alone
  would not stop it).

Example:
  >>> hs, final = scan_reference(cell, params, cell.input_projection(params, xs_tm), carry0, lengths, False)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["mask_step", "rnn_reference", "scan_reference", "sequence_mask", "vary_like", "where_valid"]


def sequence_mask(seq_lengths, T: int, time_major: bool = False):
    """Boolean validity mask: ``mask[b, t] = t < seq_lengths[b]``.

    Args:
      seq_lengths: ``(B,)`` integer lengths (a scalar for one sequence).
      T: the padded length.
      time_major: return ``(T, B)`` instead of ``(B, T)``.

    Returns:
      ``(B, T)`` (or ``(T, B)``; ``(T,)`` for scalar lengths) bool.

    Example:
      >>> sequence_mask(jnp.array([2, 0]), 3)
      Array([[ True,  True, False],
             [False, False, False]], dtype=bool)
    """
    lengths = jnp.asarray(seq_lengths)
    t = jnp.arange(T)
    if lengths.ndim == 0:
        return t < lengths
    if time_major:
        return t[:, None] < lengths[None, :]
    return t[None, :] < lengths[:, None]


def where_valid(valid, x, fill=0.0):
    """``x`` where ``valid`` (broadcast over trailing axes), ``fill`` elsewhere, leaf by leaf.

    Args:
      valid: bool array whose shape is a prefix of every leaf's shape (e.g.
        ``(B,)`` for ``(B, H)`` leaves, ``(T, B)`` for ``(T, B, D)`` leaves).
      x: a pytree of arrays.
      fill: the value at invalid positions.
    """

    def one(leaf):
        v = jnp.reshape(valid, jnp.shape(valid) + (1,) * (jnp.ndim(leaf) - jnp.ndim(valid)))
        return jnp.where(v, leaf, jnp.asarray(fill, leaf.dtype))

    return jax.tree_util.tree_map(one, x)


def mask_step(valid, new, old):
    """Keep ``old`` where ``valid`` (``(B,)`` bool) is False, leaf by leaf."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(valid[:, None], n, o), new, old)


def scan_reference(cell, params, xp, carry0, lengths, reverse, perturbation: Optional[Any] = None):
    """Ground truth: ``lax.scan`` over ``cell.step_projected``; autodiff gives the VJP.

    Args:
      cell: a jaxrnn cell (resolved for the input dtype).
      params: its parameters.
      xp: ``(T, B, G)`` projected inputs (``cell.input_projection``).
      carry0: the initial carry, leaves ``(B, H)``.
      lengths: ``(B,)`` int32 in ``[0, T]``, or ``None``.
      reverse: Python bool; see the module docstring.
      perturbation: the analysis hook. ``None``, or a pytree shaped like the
        carry with leaves ``(T, B, H)``, added to the carry after step ``t``
        at valid steps (the output ``h_t`` is the perturbed carry's ``h``).
        At zero it changes nothing; its gradient is ``∂J/∂carry_t`` for every
        ``t`` in one backward pass.

    Returns:
      ``(hs, final)``: ``(T, B, H)`` outputs, zero at padded steps, and the
      final carry (each sequence's carry after its last valid step).
    """
    T = xp.shape[0]

    def body(carry, inputs):
        xp_t, p_t, t = inputs
        if lengths is not None:
            valid = t < lengths
            xp_t = where_valid(valid, xp_t)  # padded inputs never enter the step
        new_carry, h = cell.step_projected(params, carry, xp_t)
        if p_t is not None:
            new_carry = jax.tree_util.tree_map(jnp.add, new_carry, p_t)
            h = cell.hidden(new_carry)
        if lengths is not None:
            new_carry = mask_step(valid, new_carry, carry)
            h = jnp.where(valid[:, None], h, jnp.zeros((), h.dtype))
        return new_carry, h

    steps = jnp.arange(T, dtype=jnp.int32)
    final, hs = lax.scan(body, carry0, (xp, perturbation, steps), reverse=reverse)
    return hs, final


def rnn_reference(cell, params, xs, carry0, lengths, reverse):
    """The ``impl="reference"`` backend: ``cell.input_projection``, then :func:`scan_reference`.

    Args and returns as :func:`scan_reference`, with ``xs`` ``(T, B, I)``
    time-major inputs in place of ``xp``.
    """
    return scan_reference(cell, params, cell.input_projection(params, xs), carry0, lengths, reverse)


def vary_like(tree, ref):
    """``tree`` marked as varying over every manual mesh axis ``ref`` varies over (inside ``shard_map``).

    Replicated parameters enter a ``shard_map`` over the batch as invariant
    values; a backend with a custom VJP returns their cotangents per device
    (varying), which JAX rejects. Casting them to varying *before* the
    backend (``lax.pcast(..., to="varying")``) makes autodiff insert the
    ``psum`` of the cotangents itself. Outside ``shard_map`` this is the identity.
    """
    want = _varying_axes(ref)
    if not want:
        return tree

    def one(x):
        missing = tuple(sorted(want - _varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(one, tree)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over (JAX >= 0.10: ``aval.manual_axis_type.varying``; older: ``aval.vma``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))
