r"""The ``impl="xla"`` backend: a time loop with a hand-written VJP.

Autodiff of a scanned cell (``impl="reference"``) produces a backward loop
with many small ops per step, saves every intermediate, and accumulates the
recurrent weight's gradient step by step. This backend instead

* runs the forward recurrence as a ``fori_loop`` over :func:`gates.forward`,
  saving the new carries and the gate activations;
* runs the backward recurrence as a reverse ``fori_loop`` over
  :func:`gates.backward`: per step a few fused elementwise ops and the
  transposed recurrent matmul ``dz_t W_hhᵀ`` (against a row-major ``W_hhᵀ``,
  see :func:`gates.prepare`);
* forms the recurrent weight's gradient after the loop as one large matmul
  over all ``T·B`` rows, :math:`\bar W_{hh} = \sum_t h_{t-1}^\top \bar z_t`.

The input projection ``xp = xs @ w_ih + b`` is part of the custom VJP:

* Differentiated, ``xs @ w_ih`` is one large matmul before the loop (its VJP
  gives ``w_ih`` and ``xs`` their gradients as large matmuls from ``dxp``;
  ``b`` gets ``Σ dxp``).
* Forward only (inference) on CPU, when the stacked projection would be large
  (:data:`IN_LOOP_MIN_BYTES`) and the batch not too thin
  (:data:`IN_LOOP_MIN_BATCH`), each step projects its own input inside the
  loop instead: the ``(T, B, G)`` projection never exists, and the forward
  runs about 1.4-1.5× faster for LSTM and GRU at ``B = 32`` (a large stacked
  projection falls out of cache, and its fresh buffer must be paged in).
  Small projections stay in cache, and thin per-step matmuls are slow, so
  there the hoisted projection wins; on GPU and TPU one large matmul always
  wins. ``projection=`` overrides the choice.

CPU details that matter (XLA, measured on 2 cores; see
``benchmarks/kernels_cpu.py``):

* An elementwise fusion that reads one ``dynamic-slice`` of a stacked array
  at several offsets (the gate blocks of ``xp_t`` or of the saved
  activations) is not vectorised and runs 5-10× slower. Such inputs are
  copied out one iteration ahead and travel in the loop carry.
* For the LSTM, Elman and GRU (``reset="after"``) cells the forward writes
  the activations over ``xp`` and the backward writes ``dxp`` over the
  activations, in place: no zero-filled ``(T, B, G)`` stacks (the GRU's
  fourth residual ``m`` gets ``r ⊙ dz_n`` written over it). Both loops read
  the next step's slice of a buffer *after* writing this step's into it, so
  that XLA sees the order and updates the buffer in place; a read before the
  write makes XLA copy the whole buffer every step (the GRU's backward was
  2.4x slower that way at B=64, T=200, H=64).
* ``unroll > 1`` makes XLA copy the stacked buffers and is several times
  slower.
* The loop adds the bias to each step's projection: a separate
  ``xs @ w_ih + b`` over the whole ``(T, B, G)`` array is an extra pass that
  writes a fresh 33 MB copy at the LSTM benchmark size (28 ms of a 200 ms
  fwd+bwd, most of it page faults on the fresh buffer).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn.cells import GRU, LSTM, Elman, acc_dtype, check_cell
from jaxrnn.kernels import gates
from jaxrnn.scan import mask_step, rnn_reference, where_valid

Array = jax.Array

__all__ = ["rnn_xla"]

#: ``projection="auto"`` on CPU projects inside the loop when the stacked
#: float32 projection ``(T, B, G)`` would take at least this many bytes and
#: the batch has at least :data:`IN_LOOP_MIN_BATCH` rows. Measured forward
#: speed of in-loop over hoisted on 2 cores (I=128, H=256, T=256 unless said):
#: LSTM B=8 (8 MiB) 0.64×, B=16 (16 MiB) 1.42×, B=32 1.49×, B=64 1.50×;
#: GRU B=16 (12 MiB) 1.03×, B=32 1.42×; Elman B=32 (8 MiB) 0.90×, B=64
#: (16 MiB) 1.14×; T=2048: LSTM B=1 0.71×, B=4 0.99×, B=8 1.40×.
IN_LOOP_MIN_BYTES = 12 * 2**20
IN_LOOP_MIN_BATCH = 8

#: Accepted values of ``projection=``.
PROJECTIONS = ("auto", "hoisted", "in_loop")

#: ``unroll`` of the forward and backward time loops (on CPU, 2, 4 and 8 were
#: 4-6× slower than 1 for the LSTM benchmark: XLA then copies the stacks).
FORWARD_UNROLL = 1
BACKWARD_UNROLL = 1


class _Params(NamedTuple):
    """The parameters the recurrence reads (``w_ih`` and ``b`` stay outside the custom VJP)."""

    w_hh: Array
    b_hn: Optional[Array]


def _shape(x):
    return tuple(np.shape(x))


def _check(cell, params, xs, carry0, lengths, projection):
    check_cell(cell)
    H, G = cell.hidden_size, cell.gate_size
    if _shape(params.w_hh) != (H, G):
        raise ValueError(f"params.w_hh: expected shape {(H, G)}, got {_shape(params.w_hh)}")
    if len(_shape(params.w_ih)) != 2 or _shape(params.w_ih)[1] != G:
        raise ValueError(f"params.w_ih: expected shape (input_size, {G}), got {_shape(params.w_ih)}")
    I = _shape(params.w_ih)[0]
    if xs.ndim != 3 or xs.shape[-1] != I:
        raise ValueError(f"xs: expected shape (T, B, {I}) (time-major inputs), got {_shape(xs)}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection: expected one of {PROJECTIONS}, got {projection!r}")
    T, B = xs.shape[:2]
    for field, leaf in zip(cell.carry_type._fields, carry0):
        if _shape(leaf) != (B, H):
            raise ValueError(f"carry0.{field}: expected shape {(B, H)}, got {_shape(leaf)}")
    if lengths is not None and _shape(lengths) != (B,):
        raise ValueError(f"lengths: expected shape {(B,)}, got {_shape(lengths)}")


def rnn_xla(cell, params, xs, carry0, lengths, reverse, *, projection="auto", platform=None):
    """Run ``cell`` over a sequence; custom VJP with batched weight gradients.

    The backend contract of :mod:`jaxrnn.runner` (use it through
    ``jaxrnn.rnn(..., impl="xla")``).

    Args:
      cell: a resolved Elman, LSTM or GRU cell (``compute_dtype`` is the
        matmul operand dtype; ``None`` means the dtype of ``xs``).
      params: the cell's parameters (``w_ih`` ``(I, G)``, ``w_hh`` ``(H, G)``,
        ``b`` ``(G,)``; ``b_hn`` ``(H,)`` for GRU with ``reset="after"``).
      xs: ``(T, B, I)`` time-major inputs.
      carry0: initial carry, float32 leaves ``(B, H)``.
      lengths: ``(B,)`` int32 valid lengths in ``[0, T]``, or ``None``. Steps
        ``t >= lengths[b]`` keep the carry and output zeros.
      reverse: walk time backwards (padding first).
      projection: where the forward-only pass computes ``xs @ w_ih + b``:
        ``"hoisted"`` (one large matmul before the loop), ``"in_loop"`` (each
        step's own, inside the loop) or ``"auto"`` (in-loop on CPU for large
        projections, see :data:`IN_LOOP_MIN_BYTES`). Differentiated, the projection
        is always hoisted: the backward needs the stacked gate activations
        anyway, and then one large matmul is faster.
      platform: the platform ``"auto"`` decides for (``None``:
        ``jax.default_backend()``).

    Returns:
      ``(hs, final_carry)``: ``(T, B, H)`` float32 outputs and the float32 final
      carry.

    Example:
      >>> cell = jaxrnn.LSTM(16).resolve(jnp.float32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> hs, carry = rnn_xla(cell, params, jnp.ones((10, 4, 8)), cell.zero_carry(4), None, False)
    """
    _check(cell, params, xs, carry0, lengths, projection)
    T, B = xs.shape[:2]
    if T == 0:  # no steps: nothing to fuse
        return rnn_reference(cell, params, xs, carry0, lengths, reverse)
    if projection == "auto":
        platform = jax.default_backend() if platform is None else platform
        big = T * B * cell.gate_size * 4 >= IN_LOOP_MIN_BYTES and B >= IN_LOOP_MIN_BATCH
        projection = "in_loop" if platform == "cpu" and big else "hoisted"
    mask = None
    if lengths is not None:
        mask = jnp.arange(T, dtype=jnp.int32)[:, None] < lengths.astype(jnp.int32)[None, :]
    return _recurrence(cell, bool(reverse), projection == "in_loop", params, xs, carry0, mask)


def _walk(T, reverse):
    """``(first, step)``: the step a loop over ``T`` steps starts at and its stride (``T - 1, -1`` in reverse).

    As int32 scalars behind an optimization barrier, not constants, so that
    the loop bodies of both directions are one program: XLA's CPU compiler
    compiles each distinct fusion kernel once per executable, and with
    constants the kernels that index the stacked arrays by step differed
    between the directions. Measured (the optimized HLO of a bidirectional 2-layer GRU stack's
    fwd+bwd, B=16 T=64 H=128, padded): 51 distinct fusion kernels against 59;
    its compile time, 1.0-1.6 s on 2 cores, falls by about 0.05 s (within the
    noise of single compiles). The run time is unchanged.
    """
    first, step = (T - 1, -1) if reverse else (0, 1)
    return lax.optimization_barrier((jnp.int32(first), jnp.int32(step)))


def _index(tree, t):
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, t, keepdims=False), tree)


def _put(tree, t, values):
    return jax.tree.map(lambda b, v: lax.dynamic_update_index_in_dim(b, v.astype(b.dtype), t, 0), tree, values)


def _zero_stack(ref, like):
    """Zeros ``(T, *like.shape)`` in ``like``'s dtype (``like``: ``(B, ·)``), built from ``ref`` ``(T, B, ·)``.

    Under ``shard_map`` they then vary over the same mesh axes as ``ref``, as
    the loop's outputs written into them do.
    """
    return jnp.broadcast_to(jnp.zeros_like(ref[:, :, :1], like.dtype), (ref.shape[0], *like.shape))


def _reuses_input_buffer(cell):
    """Whether ``res[0]`` has ``xp``'s shape and is not needed after the backward loop.

    Then the forward loop writes ``res[0]`` over ``xp`` and the backward loop
    writes ``dxp`` over ``res[0]``: one ``(T, B, G)`` buffer throughout, and no
    zero-filled stack for it. A GRU with ``reset="after"`` keeps one more
    residual, ``m`` ``(T, B, H)``, and the backward writes the candidate's
    matmul cotangent ``r ⊙ dz_n`` over it (see :func:`_matmul_operands`).
    """
    return isinstance(cell, (LSTM, Elman)) or _gru_after(cell)


def _gru_after(cell):
    return isinstance(cell, GRU) and cell.reset == "after"


def _forward(cell, reverse, w_hh, b_hn, xp, bias, carry0, mask, save):
    """The forward recurrence as a ``fori_loop``.

    Returns:
      ``save=False``: ``(final, hs)``. ``save=True``: ``(final, carries, res)``
      with the stacked new carries (held through padding; leaves
      ``(T, B, H)``) and the stacked residuals of :func:`gates.forward`
      (``res[0]`` written over ``xp`` when :func:`_reuses_input_buffer`).
    """
    T = xp.shape[0]
    weights = gates.prepare(cell, _Params(w_hh, b_hn), xp.dtype)
    _, h_shape, res_shapes = jax.eval_shape(lambda c, x: gates.forward(cell, weights, c, x), carry0, xp[0])
    reuse = save and _reuses_input_buffer(cell)
    # A GRU step reads its projected input at two offsets: load it one step
    # ahead (see ``load`` in :func:`_recurrence_bwd`).
    prefetch = isinstance(cell, GRU)
    zeros = functools.partial(_zero_stack, xp)
    if save:
        outs = (tuple(map(zeros, res_shapes[int(reuse) :])), jax.tree.map(zeros, carry0))
    else:
        outs = zeros(h_shape)
    first, step = _walk(T, reverse)

    def body(i, state):
        carry, xp_t, xp_buf, outs = state
        t = first + step * i
        if not prefetch:
            xp_t = _index(xp_buf, t)
        new, h, res = gates.forward(cell, weights, carry, xp_t + bias[None, :])
        valid = None if mask is None else _index(mask, t)
        if valid is not None:
            new = mask_step(valid, new, carry)
        if save and reuse:
            xp_buf, res = _put(xp_buf, t, res[0]), res[1:]
        # Prefetch from the buffer as updated: a read ordered after the write
        # lets XLA update the buffer in place (a read before it forces a copy
        # of the whole buffer every step).
        upcoming = _index(xp_buf, jnp.clip(t + step, 0, T - 1)) if prefetch else state[1]
        if not save:
            return new, upcoming, xp_buf, _put(outs, t, h if valid is None else where_valid(valid, h))
        return new, upcoming, xp_buf, (_put(outs[0], t, tuple(res)), _put(outs[1], t, new))

    pre = _index(xp, first) if prefetch else jnp.zeros((), xp.dtype)
    final, _, xp_buf, outs = lax.fori_loop(0, T, body, (carry0, pre, xp, outs), unroll=FORWARD_UNROLL)
    if not save:
        return final, outs
    res_bufs, carries = outs
    return final, carries, ((xp_buf,) if reuse else ()) + res_bufs


def _forward_in_loop(cell, reverse, params, xs, carry0, mask):
    """The forward-only recurrence projecting each step's input inside the loop.

    Returns:
      ``(final, hs)``.
    """
    T = xs.shape[0]
    weights = gates.prepare(cell, params, acc_dtype(xs.dtype))
    _, h_shape, _ = jax.eval_shape(
        lambda c, x: gates.forward(cell, weights, c, cell.input_projection(params, x)), carry0, xs[0]
    )
    first, step = _walk(T, reverse)

    def body(i, state):
        carry, hs = state
        t = first + step * i
        new, h, _ = gates.forward(cell, weights, carry, cell.input_projection(params, _index(xs, t)))
        if mask is not None:
            valid = _index(mask, t)
            new, h = mask_step(valid, new, carry), where_valid(valid, h)
        return new, _put(hs, t, h)

    hs = _zero_stack(xs, h_shape)
    return lax.fori_loop(0, T, body, (carry0, hs), unroll=FORWARD_UNROLL)


def _previous(carries, carry0, reverse):
    """The carry each step started from: ``carries`` shifted one step, ``carry0`` first."""
    if reverse:
        return jax.tree.map(lambda s, c: jnp.concatenate([s[1:], c[None]], 0), carries, carry0)
    return jax.tree.map(lambda s, c: jnp.concatenate([c[None], s[:-1]], 0), carries, carry0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(cell, reverse, in_loop, params, xs, carry0, mask):
    if in_loop:
        final, hs = _forward_in_loop(cell, reverse, params, xs, carry0, mask)
    else:
        xp = _project(cell, params.w_ih, xs)
        bias = params.b.astype(xp.dtype)
        final, hs = _forward(cell, reverse, params.w_hh, _b_hn(params), xp, bias, carry0, mask, save=False)
    return hs, final


def _project(cell, w_ih, xs):
    """``xs @ w_ih`` for all steps, ``(T, B, G)``, as one 2-D matmul.

    :meth:`~jaxrnn.Cell.input_projection` without the bias: the time loop adds
    it per step, which saves a pass over (and a fresh copy of) the whole
    ``(T, B, G)`` array.
    """
    T, B, I = xs.shape
    return cell.dot(xs.reshape(T * B, I), w_ih).reshape(T, B, -1)


def _b_hn(params):
    return getattr(params, "b_hn", None)


def _recurrence_fwd(cell, reverse, in_loop, params, xs, carry0, mask):
    # The projection's own VJP (kept as a residual) turns dxp into the
    # gradients of w_ih and xs: large matmuls after the backward loop.
    xp, project_vjp = jax.vjp(functools.partial(_project, cell), params.w_ih, xs)
    bias = params.b.astype(xp.dtype)
    final, carries, res = _forward(cell, reverse, params.w_hh, _b_hn(params), xp, bias, carry0, mask, save=True)
    hs = cell.hidden(carries)
    if mask is not None:
        hs = where_valid(mask, hs)
    # Without in-place residuals, xp's buffer is free after the forward loop:
    # the backward writes dxp over it instead of into a fresh zero-filled stack.
    spare = None if _reuses_input_buffer(cell) else xp
    return (hs, final), (params, project_vjp, carry0, carries, res, mask, spare)


def _recurrence_bwd(cell, reverse, in_loop, saved, cotangents):
    del in_loop  # the differentiated forward always hoists the projection
    params, project_vjp, carry0, carries, res, mask, spare = saved
    w_hh, b_hn = params.w_hh, _b_hn(params)
    dhs, dfinal = cotangents
    T = dhs.shape[0]
    weights = gates.prepare(cell, _Params(w_hh, b_hn), dhs.dtype)
    reuse = _reuses_input_buffer(cell)
    first_f, step_f = _walk(T, reverse)
    first, step = _walk(T, not reverse)  # the backward walks the other way

    def load(bufs, t):
        """Step ``t``'s inputs, copied out of the stacks one iteration ahead.

        On CPU, XLA fuses a ``dynamic-slice`` of a stacked array into each
        elementwise consumer, and a fusion that reads one such slice at
        several offsets (the gate blocks) is not vectorised: several times
        slower than copying the slice into the loop carry first.
        """
        carry_prev = jax.tree.map(
            lambda s, c: jnp.where(t == first_f, c, _index(s, jnp.clip(t - step_f, 0, T - 1))), carries, carry0
        )
        res_t = _index((bufs + res[len(bufs) :]) if reuse else res, t)
        valid = None if mask is None else _index(mask, t)
        return _index(dhs, t), carry_prev, res_t, valid

    def body(i, state):
        dcarry, (dh_t, carry_prev, res_t, valid), bufs = state
        t = first + step * i
        total = dcarry._replace(h=dcarry.h + dh_t)
        dxp_t, dprev, dmm = gates.backward(cell, weights, carry_prev, res_t, total)
        if valid is not None:
            dxp_t = where_valid(valid, dxp_t)
            dprev = mask_step(valid, dprev, dcarry)
        # Load the next step's inputs from the updated buffers: reading them
        # after the write lets XLA update them in place instead of copying.
        if _gru_after(cell):  # r ⊙ dz_n over m_t
            dmm_n = dmm[0][..., 2 * cell.hidden_size :]
            bufs = (_put(bufs[0], t, dxp_t), _put(bufs[1], t, dmm_n if valid is None else where_valid(valid, dmm_n)))
        else:
            bufs = (_put(bufs[0], t, dxp_t),)
        return dprev, load(bufs, jnp.clip(t + step, 0, T - 1)), bufs

    bufs = (res[0], res[1]) if _gru_after(cell) else ((res[0],) if reuse else (spare,))
    state = (dfinal, load(bufs, first), bufs)
    dcarry0, _, bufs = lax.fori_loop(0, T, body, state, unroll=BACKWARD_UNROLL)
    dxp = bufs[0]

    prev = _previous(carries, carry0, reverse)
    dw_hh, db_hn = gates.weight_grads(cell, *_matmul_operands(cell, prev, res, bufs))
    dw_ih, dxs = project_vjp(dxp)
    db = jnp.sum(dxp.reshape(-1, dxp.shape[-1]), axis=0).astype(params.b.dtype)
    dparams = params._replace(w_ih=dw_ih, w_hh=dw_hh.astype(w_hh.dtype), b=db)
    if b_hn is not None:
        dparams = dparams._replace(b_hn=db_hn.astype(b_hn.dtype))
    return dparams, dxs, dcarry0, None


def _matmul_operands(cell, prev, res, bufs):
    """:func:`gates.matmul_operands` after the backward loop, whose buffers ``bufs`` hold ``dxp``
    (and for a GRU with ``reset="after"`` ``r ⊙ dz_n``, written over ``m``: ``r`` itself is gone).

    For that GRU, ``dW_hh = [h_{t-1}ᵀ dz_{ru}, h_{t-1}ᵀ (r ⊙ dz_n)]``: two
    matmuls, the first reading columns of ``dxp`` (XLA multiplies a column
    slice without copying it) and the second ``r ⊙ dz_n``.
    """
    if _gru_after(cell):
        dxp, dmm_n = bufs
        return (prev.h, prev.h), (dxp[..., : 2 * cell.hidden_size], dmm_n)
    return gates.matmul_operands(cell, prev, res, bufs[0])


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
