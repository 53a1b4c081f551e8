r"""One recurrent step, forward and hand-written backward, for every cell.

Shared by the fused backends (:mod:`jaxrnn.kernels.xla`,
:mod:`jaxrnn.kernels.pallas`). Everything here is pure ``jnp`` on arrays:
elementwise ops, 2-D matmuls, static slices and (in the LSTM and GRU
backward) a ``concatenate`` of gate blocks, so the functions can run inside a
``lax.scan`` body or a Pallas kernel body alike. The API::

    weights = prepare(cell, params, dtype)        # optional, once before the loop
    new_carry, h, res = forward(cell, params, carry, xp)
    dxp, dcarry_prev, dmm = backward(cell, params, carry_prev, res, dcarry)
    lhs, dmm = matmul_operands(cell, carry_prev, res, dxp)     # any leading shape
    dw_hh, db_hn = weight_grads(cell, lhs, dmm)                # one matmul over all rows

* ``params`` is the cell's parameter NamedTuple or the :class:`Weights` of
  :func:`prepare` (weights cast to the compute dtype, split into the blocks
  that are multiplied separately, and transposed for the backward).
* :func:`forward` is ``cell.step_projected`` plus ``res``, a tuple of float32
  ``(B, ·)`` residuals that :func:`backward` needs (gate activations). The
  equations are the cell's own, :meth:`jaxrnn.cells.Cell.gate_step`: every
  forward here computes through it, and the backward uses the derivatives of
  the cell's ``gate_activations``. Matmuls are the cell's :meth:`~jaxrnn.cells.Cell.dot`
  and :meth:`~jaxrnn.cells.Cell.dot_t`.
* :func:`backward` takes the total cotangent ``dcarry`` of the *new* carry
  (for an LSTM ``(dh, dc)``; the cotangent of the output ``h`` must already be
  added to ``dcarry.h``) and returns the cotangents of the projected input,
  of the previous carry (the recurrent matmul's transpose
  ``dmm @ W_hhᵀ`` included) and ``dmm``, the cotangent of the recurrent
  matmul's output(s). It leaves out ``dW_hh``: summed over time, that is one
  large matmul, done after the time loop by :func:`weight_grads`.
* ``dmm`` is a cheap function of ``(res, dxp)``, so a backend only needs to
  stack ``dxp`` over time (it needs that anyway, for the input projection's
  gradient) and rebuild the operands of the weight gradient with
  :func:`matmul_operands`, which works on stacked ``(T, B, ·)`` arrays.

Per cell (``φ`` the activation, ``σ`` the logistic function):

* Elman: ``res = (h,)``; ``dz = dh ⊙ φ'(z)``; ``dxp = dmm = dz``.
* LSTM: ``res = (a,)`` with ``a = [i, f, g, o]`` (``(B, 4H)``, after the
  nonlinearities); the backward recomputes ``c_t = f ⊙ c_{t-1} + i ⊙ g``;
  ``dxp = dmm = dz`` (``(B, 4H)``).
* GRU, ``reset="after"``: ``res = (run, m)`` with ``run = [r, u, n]``
  (``(B, 3H)``, ``xp``'s shape, so a time loop can store it over ``xp``)
  and ``m = h_{t-1} W_hn + b_hn`` (``(B, H)``). ``reset="before"``:
  ``res = (ru, n)`` with ``ru = [r, u]`` (``(B, 2H)``) and ``n`` (``(B, H)``).
  ``reset="before"``: two matmuls, ``lhs = (h_{t-1}, r ⊙ h_{t-1})`` and
  ``dmm = (dz_{ru}, dz_n)``. ``reset="after"``: ``lhs = (h_{t-1},)``,
  ``dmm = ([dz_r, dz_u, r ⊙ dz_n],)`` and ``db_hn = Σ r ⊙ dz_n``.

Dtypes: as in :mod:`jaxrnn.cells`, matmul operands are cast to
``cell.compute_dtype`` (``None``: the operand's own dtype) and accumulate in
float32 (float64 for float64 operands); carries, residuals and cotangents stay
in that accumulation dtype.

Example:
  >>> cell = jaxrnn.LSTM(8, compute_dtype=jnp.float32)
  >>> params = cell.init(jax.random.key(0), 4)
  >>> carry = cell.zero_carry(2)
  >>> xp = cell.input_projection(params, jnp.ones((2, 4)))
  >>> new, h, res = forward(cell, params, carry, xp)
  >>> dxp, dcarry, dmm = backward(cell, params, carry, res, jax.tree.map(jnp.ones_like, new))
  >>> dw_hh, _ = weight_grads(cell, *matmul_operands(cell, carry, res, dxp))
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn.cells import GRU, LSTM, SIGMOID, TANH, Carry, LSTMCarry, check_cell, expand_bias

__all__ = [
    "Weights",
    "backward",
    "backward_gates",
    "backward_gates_local",
    "flat_residuals",
    "forward",
    "forward_gates",
    "fused_activations",
    "matmul_operands",
    "prepare",
    "recurrent_vjp",
    "split_gates",
    "weight_grads",
]


# --------------------------------------------------------------------------
# Weights and matmuls
# --------------------------------------------------------------------------
class Weights(NamedTuple):
    """The recurrent weights prepared for a time loop (see :func:`prepare`).

    Attributes:
      blocks: the column blocks of ``w_hh`` that are multiplied separately
        (``cell.weight_blocks``), in the compute dtype: ``(w_hh,)``, or
        ``(w_hh[:, :2H], w_hh[:, 2H:])`` for GRU with ``reset="before"``.
      blocks_t: their transposes, stored row-major.
      b_hn: GRU ``reset="after"`` recurrent candidate bias ``(H,)``, else ``None``.
    """

    blocks: Tuple[jax.Array, ...]
    blocks_t: Tuple[jax.Array, ...]
    b_hn: Optional[jax.Array]


def prepare(cell, params, dtype):
    """Cast, split and transpose ``w_hh`` once, before a time loop.

    :func:`forward` and :func:`backward` accept the cell's parameters or these
    :class:`Weights`. Prepared, the loop body neither casts nor slices the
    weights, and the backward's ``dz @ W_hhᵀ`` reads a row-major transpose: on
    CPU that matmul runs about twice as fast as with a transposed operand.
    The ``optimization_barrier`` keeps XLA from folding the transposes and
    slices back into the loop.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters (``w_hh`` ``(H, G)``, ``b_hn`` ``(H,)`` or ``None``).
      dtype: dtype of the activations, the compute dtype when
        ``cell.compute_dtype`` is ``None``.

    Returns:
      :class:`Weights`.
    """
    cd = dtype if cell.compute_dtype is None else cell.compute_dtype
    blocks = cell.weight_blocks(params.w_hh.astype(cd))
    blocks, blocks_t = lax.optimization_barrier((blocks, tuple(b.T for b in blocks)))
    return Weights(blocks, blocks_t, getattr(params, "b_hn", None))


def _blocks(cell, params):
    """The matmul blocks of ``w_hh``: prepared, or sliced from the parameters."""
    return params.blocks if isinstance(params, Weights) else cell.weight_blocks(params.w_hh)


def _block_vjp(cell, params):
    """``mm_t(ds, k) = [ds…] @ block_kᵀ``: the transpose of matmul ``k`` of :meth:`~jaxrnn.cells.Cell.recurrent_matmul`
    for the per-gate cotangents ``ds`` of its outputs; from the stored transpose when :func:`prepare` made one."""

    def mm_t(ds, k):
        d = ds[0] if len(ds) == 1 else jnp.concatenate(ds, axis=-1)
        if isinstance(params, Weights):
            return cell.dot(d, params.blocks_t[k])
        return cell.dot_t(d, _blocks(cell, params)[k])

    return mm_t


def _per_gate_vjp(cell, w):
    """``mm_t`` of :func:`_block_vjp` for per-gate weight blocks ``w``."""
    return lambda ds, k: recurrent_vjp(cell, w[slice(*cell.matmul_groups[k])], ds)


def _cat(parts):
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


#: ``s`` per activation that has the form ``φ(z) = s·tanh(s·z) + (1 - s)``:
#: ``tanh`` (``s = 1``) and ``σ(z) = (1 + tanh(z/2)) / 2`` (``s = 1/2``).
_TANH_FORM = {TANH: 1.0, SIGMOID: 0.5}


def fused_activations(cell, z):
    """The gate activations of :meth:`~jaxrnn.cells.Cell.gate_step`, concatenated, with a single ``tanh``.

    A faster form (about 5% of an LSTM step on CPU) of applying
    ``cell.gate_activations`` gate by gate to the pre-activations ``z``
    (``(..., G)``): every gate's activation (``σ`` or ``tanh``) written as
    ``s ⊙ tanh(s ⊙ z) + (1 - s)``, one ``tanh`` over all gates and no slices
    or concatenation. Equal to the per-gate activations to rounding.
    """
    H = z.shape[-1] // cell.num_gates
    s = expand_bias(np.repeat(np.asarray([_TANH_FORM[act] for act in cell.gate_activations]), H), z)
    return s * jnp.tanh(s * z) + (1.0 - s)


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------
def forward(cell, params, carry, xp):
    """One step: ``cell.step_projected`` plus the residuals for :func:`backward`.

    The cell's :meth:`~jaxrnn.cells.Cell.gate_step` with one matmul per block
    of ``w_hh``; for an LSTM the gate activations are computed in one pass
    over ``(B, 4H)`` (:func:`fused_activations`) and fed to the cell's own
    :meth:`~jaxrnn.LSTM.state_update`.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters (only ``w_hh`` ``(H, G)`` and, for GRU with
        ``reset="after"``, ``b_hn`` ``(H,)`` are read) or the :class:`Weights`
        of :func:`prepare`.
      carry: carry with float32 leaves ``(B, H)``.
      xp: ``(B, G)`` float32 projected input.

    Returns:
      ``(new_carry, h, res)``: the carry and output as ``cell.step_projected``
      computes them (float32 ``(B, H)``) and ``res``, a tuple of float32
      ``(B, ·)`` arrays (see the module docstring).
    """
    check_cell(cell)
    if isinstance(cell, LSTM):
        (w,) = _blocks(cell, params)
        a = fused_activations(cell, xp + cell.dot(carry.h, w))
        new = cell.state_update(carry, *cell.split_gates(a))
        return new, new.h, (a,)
    mm = cell.recurrent_matmul(_blocks(cell, params))
    new, h, acts = cell.gate_step(carry, cell.split_gates(xp), mm, getattr(params, "b_hn", None))
    return new, h, flat_residuals(cell, acts)


def forward_gates(cell, w, b_hn, carry, xp, h_tile=None):
    """:func:`forward` with every gate in its own array: no slices, no concatenation.

    The form for kernels whose compilers cannot slice or concatenate values
    (Triton), and whose per-gate tiles are then each a power of two wide:
    the cell's :meth:`~jaxrnn.cells.Cell.gate_step` with one matmul per gate.

    It also computes a column tile of the step: with ``w`` holding only the
    columns ``J`` of each gate's block, every output is the ``J`` columns of
    the full step's. ``carry.h`` stays the whole ``h_{t-1}`` (the matmul's
    left operand); the other carry leaves, ``xp``, ``b_hn`` and ``h_tile``
    are the ``J`` columns. A GRU with ``reset="before"`` cannot be tiled:
    its candidate multiplies ``r ⊙ h_{t-1}``, which needs ``r`` for every unit.

    Args:
      cell: an Elman, LSTM or GRU cell.
      w: tuple of the ``num_gates`` column blocks of ``w_hh``, each ``(H, H)``
        (``split_gates(cell, w_hh)``; a tile: ``(H, |J|)``), in the compute dtype.
      b_hn: ``(H,)`` (a tile: ``(|J|,)``) for GRU with ``reset="after"``, else ``None``.
      carry: carry with float32 leaves ``(B, H)`` (a tile: ``h`` ``(B, H)``,
        the others ``(B, |J|)``).
      xp: tuple of ``num_gates`` float32 ``(B, H)`` (a tile: ``(B, |J|)``)
        projected inputs.
      h_tile: ``None``, or the ``J`` columns of ``carry.h``, ``(B, |J|)``,
        where a tile's gates read ``h_{t-1}`` elementwise (the GRU update).

    Returns:
      ``(new_carry, h, res)`` with ``res`` a tuple of float32 ``(B, H)``
      (a tile: ``(B, |J|)``) arrays: Elman ``(h,)``; LSTM ``(i, f, g, o)``;
      GRU ``(r, u, n)``, plus ``m = h_{t-1} W_hn + b_hn`` for
      ``reset="after"``. Concatenated (:func:`flat_residuals`) they are
      :func:`forward`'s ``res``.
    """
    check_cell(cell)
    return cell.gate_step(carry, xp, cell.recurrent_matmul(w, per_gate=True), b_hn, h_tile)


def split_gates(cell, a):
    """``a``'s last axis ``(..., n·H)`` as a tuple of ``n`` per-gate ``(..., H)`` arrays."""
    return cell.split_gates(a)


def flat_residuals(cell, res):
    """:func:`forward_gates`' per-gate residuals in :func:`forward`'s layout (any leading shape)."""
    if isinstance(cell, LSTM):
        return (_cat(res),)
    if isinstance(cell, GRU):
        k = 3 if cell.reset == "after" else 2
        return (_cat(res[:k]),) + tuple(res[k:])
    return tuple(res)


def _gate_residuals(cell, res):
    """:func:`forward`'s residuals split per gate, as :func:`forward_gates` returns them."""
    if isinstance(cell, LSTM):
        return cell.split_gates(res[0])
    if isinstance(cell, GRU):
        return cell.split_gates(res[0], 3 if cell.reset == "after" else 2) + tuple(res[1:])
    return tuple(res)


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------
def backward(cell, params, carry_prev, res, dcarry):
    r"""The VJP of one step, without the recurrent weight's gradient.

    For an LSTM, with ``c_t = f ⊙ c_{t-1} + i ⊙ g`` and ``h_t = o ⊙ tanh(c_t)``:

    .. math::
        \bar c &= \bar c_t + \bar h_t \odot o \odot (1 - \tanh^2 c_t) \\
        \bar z &= [\bar c g\, i(1-i),\ \bar c c_{t-1} f(1-f),\
                  \bar c i (1-g^2),\ \bar h_t \tanh(c_t)\, o(1-o)] \\
        \bar c_{t-1} &= \bar c \odot f, \qquad \bar h_{t-1} = \bar z W_{hh}^\top

    :func:`backward_gates` on the concatenated layout, with one transposed
    matmul per block of ``w_hh``.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters (``w_hh`` ``(H, G)``; ``b_hn`` is not needed) or
        the :class:`Weights` of :func:`prepare`.
      carry_prev: the carry the step started from, float32 leaves ``(B, H)``.
      res: the residuals :func:`forward` returned for this step.
      dcarry: cotangent of the new carry, float32 leaves ``(B, H)``, with the
        cotangent of the step's output ``h`` already added to ``dcarry.h``.

    Returns:
      ``(dxp, dcarry_prev, dmm)``: ``dxp`` ``(B, G)``, the previous carry's
      cotangent (leaves ``(B, H)``) and ``dmm``, a tuple with the cotangent of
      each recurrent matmul's output (see :func:`matmul_operands`).
    """
    check_cell(cell)
    dxp, dprev, dmm = _backward(cell, _block_vjp(cell, params), carry_prev, _gate_residuals(cell, res), dcarry)
    return _cat(dxp), dprev, tuple(map(_cat, dmm))


def backward_gates(cell, w, carry_prev, res, dcarry):
    """:func:`backward` with every gate in its own array (see :func:`forward_gates`).

    Args:
      cell: an Elman, LSTM or GRU cell.
      w: the per-gate blocks of ``w_hh`` as for :func:`forward_gates`.
      carry_prev: the carry the step started from, float32 leaves ``(B, H)``.
      res: the residuals :func:`forward_gates` returned for this step.
      dcarry: cotangent of the new carry, the output's already in ``dcarry.h``.

    Returns:
      ``(dxp, dcarry_prev)``: a tuple of ``num_gates`` float32 ``(B, H)``
      cotangents of the projected inputs, and of the previous carry.
    """
    check_cell(cell)
    dxp, dprev, _ = _backward(cell, _per_gate_vjp(cell, w), carry_prev, res, dcarry)
    return dxp, dprev


def _backward(cell, mm_t, carry_prev, res, dcarry):
    """The step's VJP from per-gate residuals; ``mm_t(ds, k)`` is the transpose of recurrent matmul ``k``.

    Returns:
      ``(dxp, dprev, dmm)``: per-gate ``dxp``, the previous carry's
      cotangent, and per recurrent matmul the per-gate cotangents of its outputs.
    """
    if isinstance(cell, GRU) and cell.reset == "before":
        h_prev, dh = carry_prev.h, dcarry.h
        r, u, n = res
        dn, du = _gru_update_vjp(cell, h_prev, dh, u, n)
        drh = mm_t((dn,), 1)
        dr = cell.gate_activations[0].deriv(r) * (drh * h_prev)
        dh_prev = dh * (1.0 - u) + drh * r + mm_t((dr, du), 0)
        return (dr, du, dn), Carry(dh_prev), ((dr, du), (dn,))
    dxp, dmm, dprev = backward_gates_local(cell, carry_prev, res, dcarry)
    return dxp, dprev._replace(h=dprev.h + mm_t(dmm, 0)), (dmm,)


def _gru_update_vjp(cell, h_prev, dh, u, n):
    """``(dz_n, dz_u)`` of ``h = h_prev + u ⊙ (n - h_prev)``, through the gates' activations."""
    _, sig_u, tanh_n = cell.gate_activations
    return tanh_n.deriv(n) * (dh * u), sig_u.deriv(u) * (dh * (n - h_prev))


def backward_gates_local(cell, carry_prev, res, dcarry):
    """:func:`backward_gates` without the recurrent matmul's transpose.

    Everything here is elementwise, so it also runs on a column tile of the
    step (as :func:`forward_gates` does). The previous carry's full cotangent
    is ``dprev`` plus, for ``h``, ``recurrent_vjp(cell, w, dmm)``: a matmul
    that needs ``dmm`` for every hidden unit. Not for a GRU with
    ``reset="before"`` (its candidate's input ``r ⊙ h_{t-1}`` puts a matmul
    inside the step's backward).

    Args:
      cell: an Elman, LSTM or GRU (``reset="after"``) cell.
      carry_prev: the carry the step started from, float32 leaves ``(B, H)``
        (or ``(B, |J|)``, a tile).
      res: the residuals :func:`forward_gates` returned for this step.
      dcarry: cotangent of the new carry, the output's already in ``dcarry.h``.

    Returns:
      ``(dxp, dmm, dprev)``: tuples of ``num_gates`` float32 arrays, the
      cotangents of the projected inputs and of the recurrent matmul's
      outputs (the same arrays, except a GRU's candidate: ``r ⊙ dz_n``), and
      the previous carry's cotangent without the matmul's part.
    """
    check_cell(cell)
    dh = dcarry.h
    if isinstance(cell, LSTM):
        i, f, g, o = res
        tc = TANH.value(cell.state_update(carry_prev, i, f, g, o).c)
        dc = dcarry.c + dh * o * TANH.deriv(tc)
        da = (dc * g, dc * carry_prev.c, dc * i, dh * tc)
        dz = tuple(act.deriv(a) * d for act, a, d in zip(cell.gate_activations, res, da))
        return dz, dz, LSTMCarry(jnp.zeros_like(dh), dc * f)
    if isinstance(cell, GRU):
        if cell.reset == "before":
            raise ValueError("cell: backward_gates_local needs a GRU with reset='after' (see backward_gates)")
        r, u, n, m = res
        dn, du = _gru_update_vjp(cell, carry_prev.h, dh, u, n)
        dr = cell.gate_activations[0].deriv(r) * (dn * m)
        return (dr, du, dn), (dr, du, dn * r), Carry(dh * (1.0 - u))
    (h,) = res
    dz = cell.gate_activations[0].deriv(h) * dh
    return (dz,), (dz,), Carry(jnp.zeros_like(dh))


def recurrent_vjp(cell, w, dmm):
    """``Σ_k dmm_k @ w_kᵀ``: the recurrent matmul's transpose, gate by gate.

    Args:
      cell: the cell (its ``compute_dtype`` is the operand dtype).
      w: the per-gate blocks of ``w_hh``, each ``(H, H)``, or a row tile of
        each, ``(|J|, H)``, for the ``J`` columns of the result.
      dmm: the ``dmm`` of :func:`backward_gates_local`, ``num_gates`` arrays ``(B, H)``.

    Returns:
      float32 ``(B, H)`` (a tile: ``(B, |J|)``).
    """
    return sum(cell.dot_t(d, wk) for d, wk in zip(dmm, w))


# --------------------------------------------------------------------------
# The recurrent weight's gradient, after the time loop
# --------------------------------------------------------------------------
def matmul_operands(cell, carry_prev, res, dxp):
    """Left operands and output cotangents of the recurrent matmul(s).

    All arguments may carry any leading shape (one step ``(B, ·)`` or a whole
    sequence ``(T, B, ·)``): everything here is elementwise.

    Args:
      cell: an Elman, LSTM or GRU cell.
      carry_prev: carries each step started from, leaves ``(..., H)``.
      res: the residuals of :func:`forward`, stacked the same way.
      dxp: the ``dxp`` of :func:`backward`, ``(..., G)``.

    Returns:
      ``(lhs, dmm)``, two equally long tuples: the recurrent weight's
      gradient is ``Σ lhs[k]ᵀ dmm[k]`` over all rows, the blocks ``k``
      concatenated along the gate axis.
    """
    H = cell.hidden_size
    h_prev = carry_prev.h
    if isinstance(cell, GRU):
        r = res[0][..., :H]
        if cell.reset == "after":
            scale = jnp.concatenate([jnp.ones_like(res[0][..., : 2 * H]), r], axis=-1)
            return (h_prev,), (dxp * scale,)
        return (h_prev, r * h_prev), (dxp[..., : 2 * H], dxp[..., 2 * H :])
    return (h_prev,), (dxp,)


def weight_grads(cell, lhs, dmm):
    """``dW_hh = Σ_rows lhs[k]ᵀ dmm[k]`` (one matmul per block over all rows), and ``db_hn``.

    Args:
      cell: an Elman, LSTM or GRU cell.
      lhs: tuple of ``(..., H)`` arrays from :func:`matmul_operands`.
      dmm: tuple of ``(..., ·)`` arrays from :func:`matmul_operands`.

    Returns:
      ``(dw_hh, db_hn)``: float32 ``(H, G)`` and, for GRU with
      ``reset="after"``, float32 ``(H,)`` (``None`` otherwise).
    """

    def block(x, d):
        return cell.dot(x.reshape(-1, x.shape[-1]).T, d.reshape(-1, d.shape[-1]))

    dw_hh = _cat([block(x, d) for x, d in zip(lhs, dmm)])
    db_hn = None
    if isinstance(cell, GRU) and cell.reset == "after":
        H = cell.hidden_size
        db_hn = jnp.sum(dmm[-1][..., -H:].reshape(-1, H), axis=0)  # the candidate's block comes last
    return dw_hh, db_hn
