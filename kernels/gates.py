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
  ``(B, ·)`` residuals that :func:`backward` needs (gate activations).
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
* GRU: ``res = (ru, n)`` with ``ru = [r, u]`` (``(B, 2H)``) and ``n``
  (``(B, H)``); for ``reset="after"`` also ``m = h_{t-1} W_hn + b_hn``
  (``(B, H)``).
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
from jax import lax

from jaxrnn.cells import GRU, LSTM, Carry, Elman, LSTMCarry, acc_dtype, check_cell

__all__ = [
    "Weights",
    "backward",
    "backward_gates",
    "backward_gates_local",
    "flat_residuals",
    "forward",
    "forward_gates",
    "matmul_operands",
    "prepare",
    "recurrent_vjp",
    "split_gates",
    "weight_grads",
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _cd(cell, a):
    """Matmul operand dtype: the cell's ``compute_dtype``, else the dtype of ``a``."""
    return a.dtype if cell.compute_dtype is None else cell.compute_dtype


def _dot(cell, a, w):
    """``a @ w`` (``(..., K) @ (K, N)``), operands in the compute dtype, accumulated in
    float32 (float64 for float64 operands)."""
    cd = _cd(cell, a)
    return jnp.matmul(a.astype(cd), w.astype(cd), preferred_element_type=acc_dtype(cd))


def _splits(cell):
    """Column blocks of ``w_hh`` that are multiplied separately: GRU ``reset="before"``
    multiplies ``h`` by ``[W_hr, W_hu]`` and ``r ⊙ h`` by ``W_hn``."""
    H, G = cell.hidden_size, cell.gate_size
    if isinstance(cell, GRU) and cell.reset == "before":
        return ((0, 2 * H), (2 * H, G))
    return ((0, G),)


def _w(cell, params, k):
    """Block ``k`` of ``w_hh`` (see :func:`_splits`), prepared or sliced."""
    if isinstance(params, Weights):
        return params.blocks[k]
    lo, hi = _splits(cell)[k]
    return params.w_hh[:, lo:hi]


def _dot_t(cell, a, params, k=0):
    """``a @ w_blockᵀ`` for block ``k``; from the stored transpose when :func:`prepare` made one.

    Operands in the compute dtype, accumulated as in :func:`_dot`.
    """
    if isinstance(params, Weights):
        return _dot(cell, a, params.blocks_t[k])
    cd = _cd(cell, a)
    dims = (((a.ndim - 1,), (1,)), ((), ()))
    return lax.dot_general(a.astype(cd), _w(cell, params, k).astype(cd), dims, preferred_element_type=acc_dtype(cd))


def _row(v, like):
    """A ``(N,)`` vector in ``like``'s dtype, shaped ``(1, ..., N)`` to broadcast against it."""
    return v.astype(like.dtype).reshape((1,) * (like.ndim - 1) + v.shape)


def _lstm_activations(z, H):
    """``[σ(z_i), σ(z_f), tanh(z_g), σ(z_o)]`` with a single ``tanh`` over ``(B, 4H)``.

    Uses ``σ(x) = (1 + tanh(x / 2)) / 2``: ``a = s ⊙ tanh(s ⊙ z) + (1 - s)``
    with ``s = 1/2`` on the sigmoid gates and ``s = 1`` on ``g``; no slices or
    concatenation.
    """
    col = lax.broadcasted_iota(jnp.int32, (1,) * (z.ndim - 1) + (4 * H,), z.ndim - 1)
    is_g = (col >= 2 * H) & (col < 3 * H)
    s = jnp.where(is_g, 1.0, 0.5).astype(z.dtype)
    return s * jnp.tanh(s * z) + (1.0 - s)


def _elman_deriv(activation, h):
    """``φ'(z)`` expressed through ``h = φ(z)``."""
    if activation == "tanh":
        return 1.0 - h * h
    if activation == "relu":
        return (h > 0).astype(h.dtype)
    return jnp.ones_like(h)


class Weights(NamedTuple):
    """The recurrent weights prepared for a time loop (see :func:`prepare`).

    Attributes:
      blocks: the column blocks of ``w_hh`` that are multiplied separately, in
        the compute dtype: ``(w_hh,)``, or ``(w_hh[:, :2H], w_hh[:, 2H:])`` for
        GRU with ``reset="before"``.
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
    w = params.w_hh.astype(cd)
    blocks = tuple(w[:, lo:hi] for lo, hi in _splits(cell))
    blocks, blocks_t = lax.optimization_barrier((blocks, tuple(b.T for b in blocks)))
    return Weights(blocks, blocks_t, getattr(params, "b_hn", None))


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------
def forward(cell, params, carry, xp):
    """One step: ``cell.step_projected`` plus the residuals for :func:`backward`.

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
    H = cell.hidden_size
    if isinstance(cell, LSTM):
        a = _lstm_activations(xp + _dot(cell, carry.h, _w(cell, params, 0)), H)
        c = a[..., H : 2 * H] * carry.c + a[..., :H] * a[..., 2 * H : 3 * H]
        h = a[..., 3 * H :] * jnp.tanh(c)
        return LSTMCarry(h, c), h, (a,)
    if isinstance(cell, GRU):
        h_prev = carry.h
        if cell.reset == "after":
            mm = _dot(cell, h_prev, _w(cell, params, 0))
            ru = jax.nn.sigmoid(xp[..., : 2 * H] + mm[..., : 2 * H])
            r, u = ru[..., :H], ru[..., H:]
            m = mm[..., 2 * H :] + _row(params.b_hn, mm)
            n = jnp.tanh(xp[..., 2 * H :] + r * m)
            res = (ru, n, m)
        else:
            ru = jax.nn.sigmoid(xp[..., : 2 * H] + _dot(cell, h_prev, _w(cell, params, 0)))
            r, u = ru[..., :H], ru[..., H:]
            n = jnp.tanh(xp[..., 2 * H :] + _dot(cell, r * h_prev, _w(cell, params, 1)))
            res = (ru, n)
        h = h_prev + u * (n - h_prev)
        return Carry(h), h, res
    if isinstance(cell, Elman):
        z = xp + _dot(cell, carry.h, _w(cell, params, 0))
        h = {"tanh": jnp.tanh, "relu": jax.nn.relu, "linear": lambda v: v}[cell.activation](z)
        return Carry(h), h, (h,)
    raise TypeError(f"cell: expected an Elman, LSTM or GRU cell, got {type(cell).__name__}")


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
    H = cell.hidden_size
    if isinstance(cell, LSTM):
        (a,) = res
        i, f, g, o = a[..., :H], a[..., H : 2 * H], a[..., 2 * H : 3 * H], a[..., 3 * H :]
        tc = jnp.tanh(f * carry_prev.c + i * g)
        dh = dcarry.h
        dc = dcarry.c + dh * o * (1.0 - tc * tc)
        di, df = dc * g * i * (1.0 - i), dc * carry_prev.c * f * (1.0 - f)
        dg, do = dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)
        dz = jnp.concatenate([di, df, dg, do], axis=-1)
        dh_prev = _dot_t(cell, dz, params)
        return dz, LSTMCarry(dh_prev, dc * f), (dz,)
    if isinstance(cell, GRU):
        h_prev, dh = carry_prev.h, dcarry.h
        ru, n = res[0], res[1]
        r, u = ru[..., :H], ru[..., H:]
        dn = dh * u * (1.0 - n * n)
        du = dh * (n - h_prev) * u * (1.0 - u)
        if cell.reset == "after":
            m = res[2]
            dr = dn * m * r * (1.0 - r)
            dmm = jnp.concatenate([dr, du, dn * r], axis=-1)
            dh_prev = dh * (1.0 - u) + _dot_t(cell, dmm, params)
            return jnp.concatenate([dr, du, dn], axis=-1), Carry(dh_prev), (dmm,)
        drh = _dot_t(cell, dn, params, 1)
        dr = drh * h_prev * r * (1.0 - r)
        dru = jnp.concatenate([dr, du], axis=-1)
        dh_prev = dh * (1.0 - u) + drh * r + _dot_t(cell, dru, params, 0)
        return jnp.concatenate([dru, dn], axis=-1), Carry(dh_prev), (dru, dn)
    if isinstance(cell, Elman):
        (h,) = res
        dz = dcarry.h * _elman_deriv(cell.activation, h)
        return dz, Carry(_dot_t(cell, dz, params)), (dz,)
    raise TypeError(f"cell: expected an Elman, LSTM or GRU cell, got {type(cell).__name__}")


# --------------------------------------------------------------------------
# The same step, gate by gate (for kernels that cannot slice values)
# --------------------------------------------------------------------------
def split_gates(cell, a):
    """``a``'s last axis ``(..., n·H)`` as a tuple of ``n`` per-gate ``(..., H)`` arrays."""
    H = a.shape[-1] // cell.num_gates
    return tuple(a[..., k * H : (k + 1) * H] for k in range(cell.num_gates))


def _dot_nt(cell, a, w):
    """``a @ wᵀ`` for a per-gate block ``w`` ``(H, H)``, accumulated as in :func:`_dot`."""
    cd = _cd(cell, a)
    dims = (((a.ndim - 1,), (1,)), ((), ()))
    return lax.dot_general(a.astype(cd), w.astype(cd), dims, preferred_element_type=acc_dtype(cd))


def forward_gates(cell, w, b_hn, carry, xp, h_tile=None):
    """:func:`forward` with every gate in its own array: no slices, no concatenation.

    The form for kernels whose compilers cannot slice or concatenate values
    (Triton), and whose per-gate tiles are then each a power of two wide.

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
    h_mm = carry.h
    h_prev = h_mm if h_tile is None else h_tile
    if isinstance(cell, LSTM):
        z = [x + _dot(cell, h_mm, wk) for x, wk in zip(xp, w)]
        i, f, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jax.nn.sigmoid(z[3])
        g = jnp.tanh(z[2])
        c = f * carry.c + i * g
        h = o * jnp.tanh(c)
        return LSTMCarry(h, c), h, (i, f, g, o)
    if isinstance(cell, GRU):
        r = jax.nn.sigmoid(xp[0] + _dot(cell, h_mm, w[0]))
        u = jax.nn.sigmoid(xp[1] + _dot(cell, h_mm, w[1]))
        if cell.reset == "after":
            m = _dot(cell, h_mm, w[2]) + _row(b_hn, h_mm)
            n = jnp.tanh(xp[2] + r * m)
            res = (r, u, n, m)
        else:
            if h_tile is not None:
                raise ValueError(
                    "h_tile: a GRU with reset='before' cannot be computed in column tiles "
                    "(its candidate's matmul reads r ⊙ h_{t-1} for every unit)"
                )
            n = jnp.tanh(xp[2] + _dot(cell, r * h_prev, w[2]))
            res = (r, u, n)
        h = h_prev + u * (n - h_prev)
        return Carry(h), h, res
    if isinstance(cell, Elman):
        z = xp[0] + _dot(cell, h_mm, w[0])
        h = {"tanh": jnp.tanh, "relu": jax.nn.relu, "linear": lambda v: v}[cell.activation](z)
        return Carry(h), h, (h,)
    raise TypeError(f"cell: expected an Elman, LSTM or GRU cell, got {type(cell).__name__}")


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
    if isinstance(cell, GRU) and cell.reset == "before":
        h_prev, dh = carry_prev.h, dcarry.h
        r, u, n = res
        dn = dh * u * (1.0 - n * n)
        du = dh * (n - h_prev) * u * (1.0 - u)
        drh = _dot_nt(cell, dn, w[2])
        dr = drh * h_prev * r * (1.0 - r)
        dh_prev = dh * (1.0 - u) + drh * r + _dot_nt(cell, dr, w[0]) + _dot_nt(cell, du, w[1])
        return (dr, du, dn), Carry(dh_prev)
    dxp, dmm, dprev = backward_gates_local(cell, carry_prev, res, dcarry)
    return dxp, dprev._replace(h=dprev.h + recurrent_vjp(cell, w, dmm))


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
        tc = jnp.tanh(f * carry_prev.c + i * g)
        dc = dcarry.c + dh * o * (1.0 - tc * tc)
        dz = (dc * g * i * (1.0 - i), dc * carry_prev.c * f * (1.0 - f), dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o))
        return dz, dz, LSTMCarry(jnp.zeros_like(dh), dc * f)
    if isinstance(cell, GRU):
        if cell.reset == "before":
            raise ValueError("cell: backward_gates_local needs a GRU with reset='after' (see backward_gates)")
        h_prev = carry_prev.h
        r, u, n, m = res
        dn = dh * u * (1.0 - n * n)
        du = dh * (n - h_prev) * u * (1.0 - u)
        dr = dn * m * r * (1.0 - r)
        return (dr, du, dn), (dr, du, dn * r), Carry(dh * (1.0 - u))
    if isinstance(cell, Elman):
        (h,) = res
        dz = dh * _elman_deriv(cell.activation, h)
        return (dz,), (dz,), Carry(jnp.zeros_like(dh))
    raise TypeError(f"cell: expected an Elman, LSTM or GRU cell, got {type(cell).__name__}")


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
    return sum(_dot_nt(cell, d, wk) for d, wk in zip(dmm, w))


def flat_residuals(cell, res):
    """:func:`forward_gates`' per-gate residuals in :func:`forward`'s layout (any leading shape)."""
    if isinstance(cell, LSTM):
        return (jnp.concatenate(res, axis=-1),)
    if isinstance(cell, GRU):
        return (jnp.concatenate(res[:2], axis=-1),) + tuple(res[2:])
    return tuple(res)


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
            scale = jnp.concatenate([jnp.ones_like(res[0]), r], axis=-1)
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
        cd = _cd(cell, x)
        x2, d2 = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
        dims = (((0,), (0,)), ((), ()))
        return lax.dot_general(x2.astype(cd), d2.astype(cd), dims, preferred_element_type=acc_dtype(cd))

    blocks = [block(x, d) for x, d in zip(lhs, dmm)]
    dw_hh = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-1)
    db_hn = None
    if isinstance(cell, GRU) and cell.reset == "after":
        H = cell.hidden_size
        db_hn = jnp.sum(dmm[0][..., 2 * H :].reshape(-1, H), axis=0)
    return dw_hh, db_hn
