r"""Fused-gate step kernels in Pallas: the recurrent weight split across programs.

:mod:`jaxrnn.kernels.pallas` keeps the whole recurrent weight in one program
and loops over time inside one kernel. When the weight is too large for one
program (on a GPU, more than :data:`~jaxrnn.kernels.pallas.GPU_RESIDENT_BYTES`:
a bf16 LSTM with ``H = 768`` has 4.5 MiB), ``BlockSizes(hidden=J)`` splits it
instead. Program ``(b, j)`` owns a batch tile and the tile ``J`` of
``block.hidden`` hidden units, holds the columns ``J`` of every gate's block
of ``W_hh`` and computes the whole step for its units:

.. math::
    z^{(k)}_{t,J} = x^p_{t,k,J} + h_{t-1} W^{(k)}_{hh}[:, J], \qquad
    (h_{t,J}, c_{t,J}) = \mathrm{cell}(z_{t,J}, c_{t-1,J})

(:func:`~jaxrnn.kernels.gates.forward_gates` on a column tile). A unit's gates
combine only that unit's columns, so the programs of a step are independent;
but step ``t + 1`` needs every program's ``h_t``. So each step is one
``pallas_call`` (grid ``(batch tiles, hidden tiles)``) and the time loop is a
``lax.scan`` around it: the kernel boundary is the grid-wide barrier. Per
step, one launch fuses the recurrent matmul, the gate nonlinearities and the
state update, and only ``h_t``, the carry and the residuals reach memory.
The price: every step re-reads the weight slice from cache, and a launch per
step.

The backward pass is one kernel per step too, walking time the other way.
The program for units ``J`` of step ``t`` first finishes the carry's
cotangent with step ``t + 1``'s recurrent-matmul cotangents ``m̄`` of every
unit (:func:`~jaxrnn.kernels.gates.recurrent_vjp` on rows ``J`` of ``W_hh``):

.. math::
    \bar h_{t,J} = \bar h^{\mathrm{out}}_{t,J} + \bar h^{\mathrm{loc}}_{t,J}
        + \sum_k \bar m^{(k)}_{t+1} \big(W^{(k)}_{hh}[J, :]\big)^\top

then computes its units' gate cotangents elementwise
(:func:`~jaxrnn.kernels.gates.backward_gates_local`) and writes ``dxp_{t,J}``
and ``m̄_{t,J}`` for the next call.

This module is the time loops and their kernels only. The block sizes,
padding, configuration and residual layout come from
:mod:`jaxrnn.kernels.common`, the only module of the family imported here.
:mod:`jaxrnn.kernels.pallas` imports this one: its wrapper pads the problem
and its custom VJP calls :func:`forward_scan` and :func:`backward_scan` in
place of its single-kernel loops when ``cfg.hidden`` is set, then computes the
weight gradient ``Σ_t h_{t-1}ᵀ m̄_t`` and the input gradients as large
matmuls after the loop. Read top to bottom: the time loops, one step's
``pallas_call``, the kernel bodies.

Not for a GRU with ``reset="before"``: its candidate multiplies
``r ⊙ h_{t-1}``, and ``r`` needs every unit's matmul first (a second barrier
per step). ``reset="after"`` (cuDNN's and PyTorch's form) splits.

Example:
  >>> from jaxrnn.kernels import Pallas
  >>> from jaxrnn.kernels.pallas import BlockSizes
  >>> cell = jaxrnn.LSTM(32)
  >>> params = cell.init(jax.random.key(0), 16)
  >>> ys, carry = jaxrnn.rnn(cell, params, jnp.ones((4, 10, 16)),
  ...                        impl=Pallas(block=BlockSizes(batch=4, hidden=8)))
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrnn.kernels import common, gates
from jaxrnn.scan import sequence_mask, where_valid

__all__ = ["backward_scan", "forward_scan"]

#: Both grid axes (batch tiles, hidden tiles) are independent within a step.
_GRID_AXES = ("parallel", "parallel")


# --------------------------------------------------------------------------
# The time loops: the contracts of the resident loops of jaxrnn.kernels.pallas
# --------------------------------------------------------------------------
def forward_scan(cfg, rec, xp, carry0, lens, save_residuals):
    """The forward recurrence, one :func:`_forward_kernel` call per step.

    Same contract as the resident forward loop of :mod:`jaxrnn.kernels.pallas`:
    ``(hs, carry_seq, res_seq, final_carry)``, with ``carry_seq`` the stacked
    carry leaves after ``h`` and ``res_seq`` every residual (``hs`` where the
    residual is the output); both empty without ``save_residuals``.

    Args:
      cfg: the padded problem's :class:`~jaxrnn.kernels.common.Config`
        (``cfg.hidden`` units per program).
      rec: :class:`~jaxrnn.kernels.common.Recurrent`: ``w_hh`` ``(Hp, Gp)``
        in the compute dtype, ``b_hn``.
      xp: ``(Tp, Bp, Gp)`` acc projected inputs.
      carry0: leaves ``(Bp, Hp)`` acc.
      lens: ``(Bp, 1)`` int32 valid lengths (read when ``cfg.masked``).
      save_residuals: also return what the backward pass needs.
    """
    Tp = xp.shape[0]
    keep_res = common.residual_layout(cfg.cell, cfg.batch, xp.dtype)[1] if save_residuals else ()

    def step(carry, inputs):
        xp_t, valid_t = inputs
        new, h, res = _forward_step(cfg, rec, carry, xp_t, valid_t, keep_res)
        return new, (h, tuple(new[1:]) if save_residuals else (), res)

    final, (hs, carry_seq, res_kept) = lax.scan(step, carry0, (xp, _valid(cfg, lens, Tp)), reverse=cfg.reverse)
    if not save_residuals:
        return hs, (), (), final
    return hs, carry_seq, common.unselect(res_kept, keep_res, itertools.repeat(hs)), final


def backward_scan(cfg, w, dhs, prev, res_seq, dcarry_t, lens):
    """The backward recurrence, one :func:`_backward_kernel` call per step.

    Same contract as the resident backward loop of
    :mod:`jaxrnn.kernels.pallas`: ``(dxp, dcarry0)``.

    Args:
      cfg: the padded problem's :class:`~jaxrnn.kernels.common.Config`.
      w: ``(Hp, Gp)`` recurrent weight in the compute dtype.
      dhs: ``(Tp, Bp, Hp)`` acc cotangents of the outputs.
      prev: the carry each step started from, leaves ``(Tp, Bp, Hp)``.
      res_seq: the residuals of :func:`forward_scan`, each ``(Tp, Bp, Hp)``.
      dcarry_t: cotangent of the final carry, leaves ``(Bp, Hp)``.
      lens: ``(Bp, 1)`` int32 valid lengths (read when ``cfg.masked``).

    Returns:
      ``dxp`` ``(Tp, Bp, Gp)`` and the initial carry's cotangent.
    """
    Tp, Bp, Hp = dhs.shape
    cell = cfg.cell
    distinct = _distinct_dmm(cell, cfg.batch, dhs.dtype)

    def step(state, inputs):
        dcarry, dmm_next = state
        dh_t, prev_t, res_t, valid_t = inputs
        dxp, dmm, dprev = _backward_step(cfg, w, dmm_next, dh_t, dcarry, prev_t, res_t, valid_t, distinct)
        return (dprev, dmm), dxp

    zeros = tuple(jnp.zeros((Bp, Hp), dhs.dtype) for _ in range(cell.num_gates))
    inputs = (dhs, prev, tuple(res_seq), _valid(cfg, lens, Tp))
    (dcarry, dmm), dxp = lax.scan(step, (dcarry_t, zeros), inputs, reverse=not cfg.reverse)
    # The first step's matmul cotangents reach the initial carry: one matmul here.
    dcarry0 = dcarry._replace(h=dcarry.h + gates.recurrent_vjp(cell, gates.split_gates(cell, w), dmm))
    return common.join_gates(dxp), dcarry0


def _valid(cfg, lens, Tp):
    """``(Tp, Bp, 1)`` int32 step masks (``None`` when nothing is masked)."""
    if not cfg.masked:
        return None
    return sequence_mask(lens[:, 0], Tp, time_major=True)[..., None].astype(jnp.int32)


def _distinct_dmm(cell, rows, acc):
    """Per gate, whether :func:`gates.backward_gates_local` returns a matmul
    cotangent other than the gate's ``dxp`` (stored separately)."""
    res_shapes, _ = common.residual_layout(cell, rows, acc)
    distinct = []

    def step(prev, res, dcarry):
        dxp, dmm, _ = gates.backward_gates_local(cell, prev, res, dcarry)
        distinct.extend(a is not b for a, b in zip(dxp, dmm))

    carry = cell.zero_carry((rows,), acc)
    jax.eval_shape(step, carry, tuple(jax.ShapeDtypeStruct(r.shape, r.dtype) for r in res_shapes), carry)
    return tuple(distinct)


# --------------------------------------------------------------------------
# One step's pallas_call (on padded arrays: rows Bp, lanes Hp, Gp = gates·Hp)
# --------------------------------------------------------------------------
def _specs(cfg, Hp):
    """BlockSpec makers for the grid ``(batch tile b, hidden tile j)``.

    A gate-stacked ``(·, Gp)`` array is passed once per gate ``k``: its
    column block ``k·nJ + j`` is gate ``k``'s units ``J``.
    """
    bB, hT = cfg.batch, cfg.hidden
    nJ = Hp // hT

    def rows(width, k=0):  # (bB, width): every column of block k
        return pl.BlockSpec((bB, width), lambda b, j: (b, k))

    def tile(k=0):  # (bB, hT): gate k's units J
        return pl.BlockSpec((bB, hT), lambda b, j: (b, k * nJ + j))

    def w_cols(k):  # (Hp, hT): columns J of gate k's block of W_hh
        return pl.BlockSpec((Hp, hT), lambda b, j: (0, k * nJ + j))

    def w_rows(k):  # (hT, Hp): rows J of gate k's block of W_hh
        return pl.BlockSpec((hT, Hp), lambda b, j: (j, k))

    return rows, tile, w_cols, w_rows


def _forward_step(cfg, rec, carry, xp_t, valid_t, keep_res):
    """``(new_carry, h, kept residuals)`` of one step, leaves ``(Bp, Hp)``."""
    Bp, Hp = carry.h.shape
    acc, n_gates = carry.h.dtype, cfg.cell.num_gates
    rows, tile, w_cols, _ = _specs(cfg, Hp)
    kernel = functools.partial(_forward_kernel, cell=cfg.cell, masked=cfg.masked, keep_res=keep_res)
    out = jax.ShapeDtypeStruct((Bp, Hp), acc)
    n_out, n_res = int(cfg.masked), sum(keep_res)
    bhn = rec.b_hn_row()
    new, h, res = pl.pallas_call(
        kernel,
        out_shape=((out,) * len(carry), (out,) * n_out, (out,) * n_res),
        grid=(Bp // cfg.batch, Hp // cfg.hidden),
        in_specs=(
            None if valid_t is None else rows(1),
            rows(Hp),
            tuple(tile() for _ in carry),
            tuple(tile(k) for k in range(n_gates)),
            tuple(w_cols(k) for k in range(n_gates)),
            None if bhn is None else pl.BlockSpec((1, cfg.hidden), lambda b, j: (0, j)),
        ),
        out_specs=(tuple(tile() for _ in carry), (tile(),) * n_out, (tile(),) * n_res),
        interpret=cfg.interpret,
        compiler_params=common.compiler_params(cfg, _GRID_AXES),
        name="rnn_forward_step",
    )(valid_t, carry.h, tuple(carry), (xp_t,) * n_gates, (rec.w_hh,) * n_gates, bhn)
    new = cfg.cell.carry_type(*new)
    return new, (h[0] if h else new.h), res


def _backward_step(cfg, w, dmm_next, dh_t, dcarry, prev_t, res_t, valid_t, distinct):
    """``(dxp per gate, dmm per gate, dprev)`` of one backward step, leaves ``(Bp, Hp)``."""
    Bp, Hp = dh_t.shape
    n_gates = cfg.cell.num_gates
    rows, tile, _, w_rows = _specs(cfg, Hp)
    kernel = functools.partial(_backward_kernel, cell=cfg.cell, masked=cfg.masked, distinct=distinct)
    out = jax.ShapeDtypeStruct((Bp, Hp), dh_t.dtype)
    dxp, dmm_new, dprev = pl.pallas_call(
        kernel,
        out_shape=((out,) * n_gates, (out,) * sum(distinct), (out,) * len(dcarry)),
        grid=(Bp // cfg.batch, Hp // cfg.hidden),
        in_specs=(
            None if valid_t is None else rows(1),
            tuple(rows(Hp) for _ in dmm_next),
            tuple(w_rows(k) for k in range(n_gates)),
            tile(),
            tuple(tile() for _ in dcarry),
            tuple(tile() for _ in prev_t),
            tuple(tile() for _ in res_t),
        ),
        out_specs=((tile(),) * n_gates, (tile(),) * sum(distinct), tuple(tile() for _ in dcarry)),
        interpret=cfg.interpret,
        compiler_params=common.compiler_params(cfg, _GRID_AXES),
        name="rnn_backward_step",
    )(valid_t, tuple(dmm_next), (w,) * n_gates, dh_t, tuple(dcarry), tuple(prev_t), tuple(res_t))
    return dxp, common.unselect(dmm_new, distinct, dxp), cfg.cell.carry_type(*dprev)


# --------------------------------------------------------------------------
# Kernel bodies: program (b, j) of one step, units J = column tile j
# --------------------------------------------------------------------------
def _forward_kernel(
    valid_ref, h_ref, tile_refs, xp_refs, w_refs, bhn_ref, new_refs, out_refs, res_refs,
    *, cell, masked, keep_res,
):
    """One step for one batch tile and the hidden units ``J``.

    Refs (``bB`` rows, ``hT = |J|``, ``Hp`` all units; acc float32):
      valid_ref: ``(bB, 1)`` int32, nonzero where the step is valid (read
        only when ``masked``).
      h_ref: ``(bB, Hp)`` acc, ``h_{t-1}`` of every unit (the matmul's operand).
      tile_refs: ``(bB, hT)`` acc per carry leaf, the carry's columns ``J``.
      xp_refs: ``(bB, hT)`` acc per gate, projected inputs.
      w_refs: ``(Hp, hT)`` compute dtype per gate: columns ``J`` of its block of ``W_hh``.
      bhn_ref: ``(1, hT)`` acc ``b_hn`` (GRU ``reset="after"``), else ``None``.
      new_refs: out ``(bB, hT)`` per carry leaf, the new carry (held at padded steps).
      out_refs: out, with ``masked``, the output ``h`` ``(bB, hT)`` (zeros at
        padded steps); else empty (the output is the new carry's ``h``).
      res_refs: out ``(bB, hT)`` per residual of ``gates.forward_gates`` with ``keep_res``.
    """
    old = common.read_carry(cell, tile_refs)
    w, b_hn, xp = common.read(w_refs), common.read_b_hn(bhn_ref), common.read(xp_refs)
    new, h, res = gates.forward_gates(cell, w, b_hn, old._replace(h=h_ref[...]), xp, h_tile=old.h)
    if masked:
        valid = valid_ref[...] != 0
        new = common.select_carry(valid, new, old)
        out_refs[0][...] = where_valid(valid, h)
    common.write(new_refs, new)
    common.write(res_refs, itertools.compress(res, keep_res))


def _backward_kernel(
    valid_ref, dmm_refs, w_refs, dhs_ref, dcarry_refs, prev_refs, res_refs, dxp_refs, dmm_out_refs, dprev_refs,
    *, cell, masked, distinct,
):
    """One backward step for one batch tile and the hidden units ``J``.

    Refs (as in :func:`_forward_kernel`):
      valid_ref: ``(bB, 1)`` int32 (read only when ``masked``).
      dmm_refs: ``(bB, Hp)`` acc per gate: step ``t + 1``'s recurrent-matmul
        cotangents of every unit (zeros after the last step).
      w_refs: ``(hT, Hp)`` compute dtype per gate: rows ``J`` of its block of ``W_hh``.
      dhs_ref: ``(bB, hT)`` acc, the output's cotangent.
      dcarry_refs: ``(bB, hT)`` acc per carry leaf: the new carry's
        cotangent, for ``h`` without the matmul's part.
      prev_refs: ``(bB, hT)`` acc per carry leaf, the carry the step started from.
      res_refs: ``(bB, hT)`` acc per residual of ``gates.forward_gates``.
      dxp_refs: out ``(bB, hT)`` acc per gate, cotangents of the projected inputs.
      dmm_out_refs: out ``(bB, hT)`` acc per gate whose matmul cotangent is not
        its ``dxp`` (``distinct``; a GRU's candidate ``r ⊙ dz_n``).
      dprev_refs: out ``(bB, hT)`` acc per carry leaf: the previous carry's
        cotangent, for ``h`` without the matmul's part.
    """
    partial = common.read_carry(cell, dcarry_refs)
    dcarry = partial._replace(h=partial.h + gates.recurrent_vjp(cell, common.read(w_refs), common.read(dmm_refs)))
    prev, res = common.read_carry(cell, prev_refs), common.read(res_refs)
    dxp, dmm, dprev = gates.backward_gates_local(cell, prev, res, dcarry._replace(h=dcarry.h + dhs_ref[...]))
    if masked:  # a padded step passes the carry's cotangent through
        valid = valid_ref[...] != 0
        dprev = common.select_carry(valid, dprev, dcarry)
        dxp, dmm = where_valid(valid, (dxp, dmm))
    common.write(dxp_refs, dxp)
    common.write(dmm_out_refs, itertools.compress(dmm, distinct))
    common.write(dprev_refs, dprev)
