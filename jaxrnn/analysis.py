r"""Gradient flow through time: how much of the gradient at step ``t`` reaches step ``t - ℓ``.

Backpropagation through time multiplies the gradient by one Jacobian per step,

.. math::
    \frac{\partial J}{\partial h_{t-\ell}}
        = \Big(\prod_{s=t-\ell+1}^{t} \frac{\partial h_s}{\partial h_{s-1}}\Big)^{\!\top}
          \frac{\partial J}{\partial h_t},
    \qquad
    \frac{\partial h_s}{\partial h_{s-1}} = \operatorname{diag}(\phi'(z_s))\, W_{hh}^\top
    \ \text{(Elman)},

so a vanilla RNN loses it geometrically (eigenvalues of ``W_hh`` below 1,
saturated ``tanh``) while the LSTM's additive cell update keeps a path with
``∂c_s/∂c_{s-1} = diag(f_s)`` (the "gradient highway"). This module measures
all of it exactly, with JAX autodiff:

* :func:`grad_norms_through_time`: ``‖∂J/∂h_t‖`` (and ``‖∂J/∂c_t‖``) for every
  ``t`` in one backward pass; :func:`gradient_ratios`, :func:`memory_horizon`.
* :func:`jacobian_product`, :func:`step_jacobian_spectra`,
  :func:`jacobian_norms_to_last`, :func:`spectral_radius`,
  :func:`tanh_saturation`: the Jacobians and what shrinks them.
* :func:`linear_rnn_check`, :func:`lstm_cell_path`: the lectures' theory
  (``λ^ℓ`` for a linear RNN, ``∏ f`` along the LSTM cell path) as checks.
* :func:`clipping_report`, :func:`loss_along_direction`,
  :func:`scalar_rnn_cliff`: exploding gradients, clipping and the "cliff".
* :func:`profile_during_training`: the Jacobian profile while a small RNN trains.

Time index convention (every function here). For inputs of length ``T``,
position ``t ∈ {0, …, T-1}`` is the step that consumes ``xs[..., t, :]`` and
``h_t`` (``c_t``) is the state it produces; the initial carry is ``h_{-1}``.
The lectures' last state ``h_T`` is ``h_{T-1}`` here, and their ratio
``‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖`` is ``norms[T-1-ℓ] / norms[T-1]``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxrnn import cells as _cells
from jaxrnn.cells import LSTM, Carry, Elman, ElmanParams, LSTMCarry, expand_bias
from jaxrnn.cells import check_params
from jaxrnn.checks import check_inputs, check_lengths
from jaxrnn.runner import check_impl, rnn
from jaxrnn.scan import mask_step
from jaxrnn.stack import Stack

Array = jax.Array

__all__ = [
    "CellPath",
    "ClipReport",
    "CliffCurve",
    "GradNorms",
    "JacobianProduct",
    "LinearCheck",
    "Saturation",
    "TrainingProfile",
    "clipping_report",
    "grad_norms_through_time",
    "gradient_ratios",
    "grads_through_time",
    "jacobian_norms_to_last",
    "jacobian_product",
    "linear_rnn_check",
    "loss_along_direction",
    "lstm_cell_path",
    "memory_horizon",
    "profile_during_training",
    "scalar_rnn_cliff",
    "spectral_radius",
    "step_jacobian_spectra",
    "sum_of_outputs",
    "tanh_saturation",
]

LOSS_AT = ("last", "sum", "sequence")
REDUCE = ("none", "mean")
WRT = ("carry", "h")
#: The lectures' saturation table: ``tanh'`` is 0.19 at ``±0.9`` and 0.02 at ``±0.99``.
SATURATION_THRESHOLDS = (0.19, 0.02)
_HIGHEST = lax.Precision.HIGHEST


def sum_of_outputs(y: Array) -> Array:
    """Default loss ``J = Σ y``: its gradient with respect to ``y`` is all ones.

    Any direction would do for the ratios; this one does not depend on the
    state, so the profile reflects the recurrence alone.
    """
    return jnp.sum(y)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def _check_model(model, name="cell_or_stack"):
    if not isinstance(model, (Stack, _cells.Cell)):
        raise TypeError(
            f"{name}: expected a jaxrnn cell (Elman, LSTM, GRU) or a jaxrnn.Stack, got {type(model).__name__}"
        )


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_loss_fn(loss_fn):
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable or None, got {type(loss_fn).__name__}")
    return sum_of_outputs if loss_fn is None else loss_fn


def _validate_run(model, params, xs, initial_carry, seq_lengths):
    """Validate a run with the runner's own checks (``eval_shape``: nothing is computed)."""
    _check_model(model)
    check_inputs(xs)
    if seq_lengths is not None:
        T = xs.shape[0] if xs.ndim == 2 else xs.shape[1]
        seq_lengths = check_lengths(seq_lengths, () if xs.ndim == 2 else (xs.shape[0],), T)
    if isinstance(model, Stack):
        run = lambda p, x, c, n: model.apply(p, x, initial_carry=c, seq_lengths=n, impl="reference")  # noqa: E731
    else:
        run = lambda p, x, c, n: rnn(model, p, x, initial_carry=c, seq_lengths=n, impl="reference")  # noqa: E731
    jax.eval_shape(run, params, xs, initial_carry, seq_lengths)
    return seq_lengths


_NOT_A_STACK = "cell: expected a single jaxrnn cell; for a Stack pass stack.cell and one layer's params[l].fwd"


def _check_cell_run(cell, params, xs, initial_carry):
    """Checks for the Jacobian functions: one cell, ``xs`` ``(T, I)`` or ``(B, T, I)``."""
    if isinstance(cell, Stack):
        raise TypeError(_NOT_A_STACK)
    _check_model(cell, "cell")
    _validate_run(cell, params, xs, initial_carry, None)


def _check_positions(T, **positions):
    for name, value in positions.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected a Python int position, got {type(value).__name__}")
        if not 0 <= value < T:
            raise ValueError(f"{name}: expected a position in [0, {T - 1}] (T = {T}), got {value}")


def _acc(dtype):
    """The carry dtype for inputs of ``dtype`` (float32; float64 for float64 inputs)."""
    return _cells.acc_dtype(dtype)


# --------------------------------------------------------------------------
# The perturbed recurrence: ∂J/∂h_t for every t in one backward pass
# --------------------------------------------------------------------------
def _scan_layer(cell, params, xs_tm, carry0, deltas, lengths, reverse):
    """The reference recurrence with ``deltas[t]`` added to the carry after step ``t``.

    Same semantics as :func:`jaxrnn.runner.scan_reference` (padding keeps the
    carry and outputs zero; ``reverse`` walks only the valid part backwards),
    so at ``deltas = 0`` it reproduces ``jaxrnn.rnn``. The output ``y_t`` is the
    perturbed ``h_t``, so ``∂J/∂δ_t`` includes ``J``'s direct dependence on
    ``y_t`` as well as every later step.
    """
    cell = cell.resolve(xs_tm.dtype)
    xp = cell.input_projection(params, xs_tm)

    def body(carry, inputs):
        xp_t, delta_t, t = inputs
        new, _ = cell.step_projected(params, carry, xp_t)
        new = jax.tree_util.tree_map(jnp.add, new, delta_t)
        h = cell.hidden(new)
        if lengths is not None:
            valid = t < lengths
            new = mask_step(valid, new, carry)
            h = jnp.where(valid[:, None], h, 0.0)
        return new, h

    steps = jnp.arange(xp.shape[0], dtype=jnp.int32)
    final, hs = lax.scan(body, carry0, (xp, deltas, steps), reverse=reverse)
    return hs.astype(xs_tm.dtype), final


def _forward(model, params, xs_tm, carry0, deltas, lengths):
    """Outputs ``(T, B, D)`` of a cell or a Stack (no dropout) with carry perturbations."""
    if not isinstance(model, Stack):
        return _scan_layer(model, params, xs_tm, carry0, deltas, lengths, False)[0]
    T = xs_tm.shape[0]
    mask = None
    if lengths is not None:
        mask = (jnp.arange(T)[:, None] < lengths[None, :])[..., None]
    inputs = xs_tm
    for layer, p in enumerate(params):
        if model.bidirectional:
            (c_f, c_b), (d_f, d_b) = carry0[layer], deltas[layer]
            y_f = _scan_layer(model.cell, p.fwd, inputs, c_f, d_f, lengths, False)[0]
            y_b = _scan_layer(model.cell, p.bwd, inputs, c_b, d_b, lengths, True)[0]
            y = jnp.concatenate([y_f, y_b], axis=-1)
        else:
            y = _scan_layer(model.cell, p.fwd, inputs, carry0[layer], deltas[layer], lengths, False)[0]
        out = model.connect(p, inputs, y)
        if mask is not None:
            out = jnp.where(mask, out, jnp.zeros((), out.dtype))
        last = layer == len(params) - 1
        inputs = jnp.concatenate([inputs, out], axis=-1) if model.connection == "dense" and not last else out
    return inputs


def _scalar(loss_fn):
    def fn(y):
        J = loss_fn(y)
        if jnp.shape(J) != ():
            raise ValueError(f"loss_fn: expected a scalar loss, got shape {jnp.shape(J)} for outputs {y.shape}")
        return J

    return fn


def _apply_loss(loss_fn, loss_at, ys_tm, lengths, unbatched):
    """``J`` from time-major outputs ``(T, B, D)``; ``loss_fn`` sees the user's layout."""
    loss_fn = _scalar(loss_fn)
    unbatch = (lambda y: y[0]) if unbatched else (lambda y: y)  # noqa: E731
    if loss_at == "last":
        if lengths is None:
            y = ys_tm[-1]
        else:
            y = ys_tm[jnp.maximum(lengths - 1, 0), jnp.arange(ys_tm.shape[1])]
        return loss_fn(unbatch(y))
    if loss_at == "sum":
        return jnp.sum(jax.vmap(lambda y: loss_fn(unbatch(y)))(ys_tm))
    ys = ys_tm[:, 0] if unbatched else jnp.swapaxes(ys_tm, 0, 1)
    return loss_fn(ys)


def _batch_major(xs, initial_carry, seq_lengths):
    """Add the batch axis of an unbatched run."""
    if xs.ndim == 3:
        return xs, initial_carry, seq_lengths
    add = lambda a: a[None]  # noqa: E731
    carry = None if initial_carry is None else jax.tree_util.tree_map(add, initial_carry)
    lengths = None if seq_lengths is None else jnp.reshape(seq_lengths, (1,))
    return xs[None], carry, lengths


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _state_grads(model, loss_fn, loss_at, params, xs, initial_carry, seq_lengths):
    unbatched = xs.ndim == 2
    xs, initial_carry, seq_lengths = _batch_major(xs, initial_carry, seq_lengths)
    B, T = xs.shape[:2]
    xs_tm = jnp.swapaxes(xs, 0, 1)
    lengths = None if seq_lengths is None else jnp.clip(seq_lengths.astype(jnp.int32), 0, T)
    if initial_carry is None:
        initial_carry = model.zero_carry((B,))
    carry0 = jax.tree_util.tree_map(lambda c: c.astype(_acc(xs.dtype)), initial_carry)
    zeros = jax.tree_util.tree_map(lambda c: jnp.zeros((T, *c.shape), c.dtype), carry0)

    def J(deltas):
        ys_tm = _forward(model, params, xs_tm, carry0, deltas, lengths)
        return _apply_loss(loss_fn, loss_at, ys_tm, lengths, unbatched)

    loss, grads = jax.value_and_grad(J)(zeros)
    layout = (lambda g: g[:, 0]) if unbatched else (lambda g: jnp.swapaxes(g, 0, 1))  # noqa: E731
    return loss, jax.tree_util.tree_map(layout, grads)


def grads_through_time(
    cell_or_stack,
    params,
    xs: Array,
    loss_fn: Optional[Callable[[Array], Array]] = None,
    *,
    loss_at: str = "last",
    initial_carry: Any = None,
    seq_lengths: Optional[Array] = None,
    impl: str = "reference",
):
    r"""``∂J/∂h_t`` (and ``∂J/∂c_t`` for an LSTM) for every step, in one backward pass.

    Definition. ``∂J/∂h_t`` is the *total* derivative through the future: the
    gradient of ``J`` with respect to a perturbation ``δ_t`` added to the state
    right after step ``t`` (to the carry that step ``t+1`` reads and to the
    output ``y_t``),

    .. math::
        \frac{\partial J}{\partial h_t} = \frac{\partial}{\partial \delta_t}
        J\big(\ldots,\ h_t \leftarrow h_t + \delta_t,\ \ldots\big)\Big|_{\delta=0}
        = \frac{\partial J}{\partial y_t}
          + \Big(\frac{\partial h_{t+1}}{\partial h_t}\Big)^{\!\top}\frac{\partial J}{\partial h_{t+1}}
          + \ldots

    For an LSTM ``∂J/∂c_t`` is the same for a perturbation of ``c_t`` (it
    reaches ``J`` only through steps after ``t``; ``h_t`` is already computed).
    All perturbations are zero and enter one ``lax.scan``; a single reverse pass
    gives every ``∂J/∂δ_t`` without forming any Jacobian.

    The scan is the reference recurrence (``cell.step_projected`` with the
    runner's masking), whatever ``impl`` is: the fused backends take no
    per-step perturbation. ``impl`` is validated so that every analysis
    function takes the same arguments; functions that run the model through
    :func:`jaxrnn.rnn` (:func:`clipping_report`, :func:`profile_during_training`)
    pass it on.

    Batches. ``J`` is one scalar; examples do not interact, so when ``J`` is a
    sum of per-example losses, example ``b``'s slice ``∂J/∂h_t[b]`` is the
    gradient of its own loss. (With a batch *mean* every slice is scaled by
    ``1/B``, which ratios cancel.)

    Args:
      cell_or_stack: a cell or a :class:`jaxrnn.Stack` (run without dropout).
      params: its parameters.
      xs: ``(B, T, I)`` inputs, or ``(T, I)`` for one unbatched sequence.
      loss_fn: maps outputs to a scalar; what it sees depends on ``loss_at``.
        Default :func:`sum_of_outputs`.
      loss_at: ``"last"``: ``J = loss_fn(y_last)`` with ``y_last`` ``(B, D)``
        the output at each sequence's last valid step; ``"sum"``:
        ``J = Σ_t loss_fn(y_t)`` with ``y_t`` ``(B, D)`` (padded outputs are
        zero and carry no gradient); ``"sequence"``: ``J = loss_fn(ys)`` with
        ``ys`` ``(B, T, D)``. Unbatched: the same without ``B``. ``D`` is ``H``
        for a cell, the stack's ``output_size`` for a Stack.
      initial_carry: as for :func:`jaxrnn.rnn` (or :meth:`jaxrnn.Stack.apply`).
      seq_lengths: ``(B,)`` valid lengths; gradients at padded steps are zero.
      impl: validated; see above.

    Returns:
      ``(loss, grads)``. For a cell ``grads`` is a carry (``Carry(h)`` or
      ``LSTMCarry(h, c)``) whose leaves are ``(B, T, H)`` (``(T, H)``
      unbatched); for a Stack, a tuple with one such carry per layer, a
      ``(forward, backward)`` pair per bidirectional layer (the backward
      direction's "future" is the earlier positions).

    Example:
      >>> cell = jaxrnn.LSTM(32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> loss, g = grads_through_time(cell, params, jnp.ones((4, 50, 8)))
      >>> g.h.shape, g.c.shape
      ((4, 50, 32), (4, 50, 32))
    """
    check_impl(impl)
    _check_model(cell_or_stack)
    _check_choice("loss_at", loss_at, LOSS_AT)
    loss_fn = _check_loss_fn(loss_fn)
    seq_lengths = _validate_run(cell_or_stack, params, xs, initial_carry, seq_lengths)
    return _state_grads(cell_or_stack, loss_fn, loss_at, params, xs, initial_carry, seq_lengths)


class GradNorms(NamedTuple):
    """Output of :func:`grad_norms_through_time`.

    Attributes:
      h: ``‖∂J/∂h_t‖₂`` over the hidden units. Cell: ``(B, T)`` per example
        (``(T,)`` unbatched or with ``reduce="mean"``). Stack: a leading layer
        axis ``(L, …)``, and for bidirectional stacks a direction axis after it
        ``(L, 2, …)`` (0 forward, 1 backward).
      c: ``‖∂J/∂c_t‖₂`` in the same layout for LSTMs, else ``None``.
      loss: the scalar ``J``.
    """

    h: Array
    c: Optional[Array]
    loss: Array


def grad_norms_through_time(
    cell_or_stack,
    params,
    xs: Array,
    loss_fn: Optional[Callable[[Array], Array]] = None,
    *,
    loss_at: str = "last",
    reduce: str = "none",
    initial_carry: Any = None,
    seq_lengths: Optional[Array] = None,
    impl: str = "reference",
) -> GradNorms:
    r"""``‖∂J/∂h_t‖`` for every ``t`` (and ``‖∂J/∂c_t‖`` for an LSTM), one backward pass.

    ``∂J/∂h_t`` is the total derivative through the future defined in
    :func:`grads_through_time`: the gradient with respect to a perturbation
    added to ``h_t`` right after step ``t``. Its norm over the hidden units is
    taken per example.

    Args:
      cell_or_stack: a cell or a :class:`jaxrnn.Stack` (norms per layer).
      params: its parameters.
      xs: ``(B, T, I)`` inputs, or ``(T, I)`` unbatched.
      loss_fn: see :func:`grads_through_time` (default :func:`sum_of_outputs`).
      loss_at: ``"last"`` (default), ``"sum"`` or ``"sequence"``.
      reduce: ``"none"``: per-example norms ``‖∂J/∂h_t[b]‖``, shape ``(B, T)``;
        ``"mean"``: their mean over the batch, ``(T,)`` (the mean of norms,
        not the norm of the mean gradient; padded steps count as zeros).
      initial_carry: as for :func:`jaxrnn.rnn`.
      seq_lengths: ``(B,)`` valid lengths.
      impl: validated; see :func:`grads_through_time`.

    Returns:
      :class:`GradNorms` ``(h, c, loss)``.

    Example:
      >>> cell = jaxrnn.Elman(32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> norms = grad_norms_through_time(cell, params, jnp.ones((4, 100, 8)), reduce="mean")
      >>> ratios = norms.h[::-1] / norms.h[-1]          # ‖∂J/∂h_{T-1-ℓ}‖ / ‖∂J/∂h_{T-1}‖
    """
    _check_choice("reduce", reduce, REDUCE)
    loss, grads = grads_through_time(
        cell_or_stack, params, xs, loss_fn, loss_at=loss_at,
        initial_carry=initial_carry, seq_lengths=seq_lengths, impl=impl,
    )  # fmt: skip
    norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))  # noqa: E731  (g: float32 or float64)
    if isinstance(cell_or_stack, Stack):
        cell = cell_or_stack.cell
        per_layer = [tuple(d) if cell_or_stack.bidirectional else (d,) for d in grads]

        def field(name):
            arrays = [jnp.stack([norm(getattr(d, name)) for d in layer]) for layer in per_layer]
            out = jnp.stack(arrays)  # (L, directions, [B,] T)
            return out if cell_or_stack.bidirectional else out[:, 0]

    else:
        cell = cell_or_stack

        def field(name):
            return norm(getattr(grads, name))

    h = field("h")
    c = field("c") if isinstance(cell, LSTM) else None
    if reduce == "mean" and xs.ndim == 3:
        h = jnp.mean(h, axis=-2)
        c = None if c is None else jnp.mean(c, axis=-2)
    return GradNorms(h, c, loss)


# --------------------------------------------------------------------------
# Ratios and the memory horizon
# --------------------------------------------------------------------------
def gradient_ratios(norms: Array, seq_lengths: Optional[Array] = None) -> Array:
    r"""The lectures' ratio ``‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖`` for ``ℓ = 0, 1, …``.

    Args:
      norms: ``(..., T)`` gradient norms by position (e.g. ``GradNorms.h``
        from a last-step loss).
      seq_lengths: optional ``(B,)`` valid lengths when ``norms`` is
        ``(..., B, T)``: distances are then counted from each sequence's last
        valid step, and ``ℓ`` beyond its start gives NaN.

    Returns:
      ``(..., T)`` ratios ``r[..., ℓ] = norms[..., last-ℓ] / norms[..., last]``.

    Example:
      >>> gradient_ratios(jnp.array([0.25, 0.5, 1.0]))
      Array([1.  , 0.5 , 0.25], dtype=float32)
    """
    norms = jnp.asarray(norms)
    if norms.ndim < 1:
        raise ValueError(f"norms: expected shape (..., T), got {norms.shape}")
    if seq_lengths is None:
        return jnp.flip(norms, axis=-1) / norms[..., -1:]
    lengths = jnp.asarray(seq_lengths)
    if norms.ndim < 2 or lengths.shape != norms.shape[-2:-1]:
        raise ValueError(f"seq_lengths: expected shape {norms.shape[-2:-1]} to match norms (..., B, T) {norms.shape}")
    T = norms.shape[-1]
    idx = lengths[:, None] - 1 - jnp.arange(T)[None, :]  # (B, T): position of distance ℓ
    valid = idx >= 0
    gathered = jnp.take_along_axis(norms, jnp.broadcast_to(jnp.maximum(idx, 0), norms.shape), axis=-1)
    last_idx = jnp.broadcast_to(jnp.maximum(lengths - 1, 0)[:, None], (*norms.shape[:-1], 1))
    last = jnp.take_along_axis(norms, last_idx, axis=-1)
    return jnp.where(jnp.broadcast_to(valid, norms.shape), gathered / last, jnp.nan)


def memory_horizon(norms: Array, threshold: float = 0.01, seq_lengths: Optional[Array] = None) -> Array:
    r"""Smallest distance ``ℓ`` at which the gradient ratio falls below ``threshold``.

    ``ℓ* = min{ℓ : ‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖ < threshold}``: how far back a
    loss at the last step still reaches with at least that fraction of its
    gradient. It is the first crossing (gated cells need not decay
    monotonically). When the ratio never falls below ``threshold`` the result
    is the number of positions available (``T``, or the sequence's length):
    the horizon is then at least that long (exploding or preserved gradients).

    Args:
      norms: ``(..., T)`` norms by position (from a loss at the last step).
      threshold: a ratio in ``(0, 1)``, e.g. 0.01 for "1% of the gradient".
      seq_lengths: optional ``(B,)`` valid lengths; see :func:`gradient_ratios`.

    Returns:
      ``(...)`` int32 horizons.

    Example:
      >>> memory_horizon(0.9 ** jnp.arange(100.0)[::-1], threshold=0.01)  # 0.9^44 < 0.01
      Array(44, dtype=int32)
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold:
        raise ValueError(f"threshold: expected a positive ratio, e.g. 0.01, got {threshold!r}")
    ratios = gradient_ratios(norms, seq_lengths)
    below = ratios < threshold  # NaN compares False
    T = ratios.shape[-1]
    if seq_lengths is None:
        available = jnp.full(ratios.shape[:-1], T, jnp.int32)
    else:
        available = jnp.broadcast_to(jnp.asarray(seq_lengths, jnp.int32), ratios.shape[:-1])
    first = jnp.argmax(below, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.any(below, axis=-1), first, available)


# --------------------------------------------------------------------------
# Per-step Jacobians (jax.jacfwd of the cell's step with respect to the carry)
# --------------------------------------------------------------------------
def _flatten(carry):
    return jnp.concatenate(list(carry), axis=-1)


def _unflatten(cell, state):
    return cell.carry_type(*jnp.split(state, len(cell.carry_type._fields), axis=-1))


def _carry_step(cell, params):
    """``s_t = f(s_{t-1}, xp_t)`` on the flat state ``s = [h]`` or ``[h; c]`` ``(S,)``."""

    def f(state, xp_t):
        new, _ = cell.step_projected(params, _unflatten(cell, state), xp_t)
        return _flatten(new)

    return f


def _block(cell, matrix, wrt):
    H = cell.hidden_size
    return matrix[..., :H, :H] if wrt == "h" else matrix


def _prepare_cell(cell, params, xs, initial_carry, wrt, validate=True):
    """Validate; return ``(xs (B, T, I), flat carry0 (B, S), unbatched)``."""
    if validate:
        _check_cell_run(cell, params, xs, initial_carry)
    _check_choice("wrt", wrt, WRT)
    unbatched = xs.ndim == 2
    xs, initial_carry, _ = _batch_major(xs, initial_carry, None)
    if initial_carry is None:
        initial_carry = cell.zero_carry((xs.shape[0],))
    carry0 = _flatten(jax.tree_util.tree_map(lambda c: c.astype(_acc(xs.dtype)), initial_carry))
    return xs, carry0, unbatched


def _unbatch(tree, unbatched):
    return jax.tree_util.tree_map(lambda a: a[0], tree) if unbatched else tree


def _matmul(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _run_to(f, state, xp):
    return lax.scan(lambda s, x: (f(s, x), None), state, xp)[0]


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _jacobian_product(cell, params, xs, carry0, start, stop, wrt):
    def one(x, s0):
        c = cell.resolve(x.dtype)
        xp = c.input_projection(params, x)
        f = _carry_step(c, params)
        state = _run_to(f, s0, xp[: start + 1])

        def body(carry, xp_t):
            s, M = carry
            return (f(s, xp_t), _matmul(jax.jacfwd(f)(s, xp_t), M)), None

        eye = jnp.eye(state.shape[-1], dtype=state.dtype)
        (_, M), _ = lax.scan(body, (state, eye), xp[start + 1 : stop + 1])
        M = _block(c, M, wrt)
        return M, jnp.linalg.svd(M, compute_uv=False)

    return jax.vmap(one)(xs, carry0)


class JacobianProduct(NamedTuple):
    """Output of :func:`jacobian_product`.

    Attributes:
      matrix: ``(S, S)`` Jacobian ``∂s_stop/∂s_start`` (leading ``B`` when batched).
      singular_values: ``(S,)`` in decreasing order.
      norm: the spectral norm (largest singular value), a scalar (``(B,)``).
    """

    matrix: Array
    singular_values: Array
    norm: Array


def jacobian_product(
    cell, params, xs: Array, start: int, stop: int, *, wrt: str = "carry", initial_carry: Any = None
) -> JacobianProduct:
    r"""``∂h_{stop}/∂h_{start}`` as the product of per-step Jacobians from autodiff.

    .. math::
        \frac{\partial s_{stop}}{\partial s_{start}}
        = J_{stop}\, J_{stop-1} \cdots J_{start+1},
        \qquad J_t = \frac{\partial s_t}{\partial s_{t-1}}
        \ \text{(} \texttt{jax.jacfwd} \text{ of } \texttt{cell.step} \text{ in the carry)}

    evaluated along the trajectory that ``xs`` drives (``start == stop``
    gives the identity). With a loss at step ``stop`` only,
    ``∂J/∂h_{start} = (∂h_{stop}/∂h_{start})^T ∂J/∂h_{stop}``.

    The state ``s``: ``h`` for Elman and GRU. For an LSTM, ``wrt="carry"``
    uses the full carry ``s = [h; c]`` (``S = 2H``), the map whose powers decide
    whether gradients vanish; ``wrt="h"`` returns the ``h → h`` block of that
    product, ``∂h_{stop}/∂h_{start}`` with ``c_{start}`` held fixed (paths
    through ``c_{start+1}, …`` included). It is *not* the product of per-step
    ``h → h`` blocks.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``: one product per example).
      start, stop: positions with ``0 <= start <= stop < T``.
      wrt: ``"carry"`` or ``"h"`` (they differ only for an LSTM).
      initial_carry: carry with leaves ``(H,)`` (``(B, H)``); zeros by default.

    Returns:
      :class:`JacobianProduct` ``(matrix (S, S), singular_values (S,), norm ())``,
      with a leading ``B`` axis for batched ``xs``; ``S = H``, or ``2H`` for an
      LSTM with ``wrt="carry"``.

    Example:
      >>> cell = jaxrnn.Elman(16)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> jp = jacobian_product(cell, params, jnp.ones((30, 4)), start=0, stop=29)
      >>> jp.matrix.shape, float(jp.norm) < 1
      ((16, 16), True)
    """
    _check_cell_run(cell, params, xs, initial_carry)
    _check_positions(xs.shape[-2], start=start, stop=stop)
    if start > stop:
        raise ValueError(f"start: expected start <= stop, got start={start}, stop={stop}")
    xs_b, carry0, unbatched = _prepare_cell(cell, params, xs, initial_carry, wrt, validate=False)
    M, sv = _jacobian_product(cell, params, xs_b, carry0, int(start), int(stop), wrt)
    return _unbatch(JacobianProduct(M, sv, sv[:, 0]), unbatched)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _step_jacobians(cell, params, xs, carry0, wrt):
    def one(x, s0):
        c = cell.resolve(x.dtype)
        f = _carry_step(c, params)

        def body(s, xp_t):
            return f(s, xp_t), _block(c, jax.jacfwd(f)(s, xp_t), wrt)

        return lax.scan(body, s0, c.input_projection(params, x))[1]

    return jax.vmap(one)(xs, carry0)


def step_jacobian_spectra(cell, params, xs: Array, *, wrt: str = "carry", initial_carry: Any = None) -> Array:
    r"""Singular values of every per-step Jacobian ``∂h_t/∂h_{t-1}``.

    For Elman, ``∂h_t/∂h_{t-1} = diag(φ'(z_t)) W_{hh}^T``: its singular values
    are those of ``W_hh`` shrunk by the activation's slope. ``t = 0`` is the
    Jacobian with respect to the initial carry. ``wrt`` as in
    :func:`jacobian_product` (for an LSTM, ``"h"`` is the per-step ``h → h``
    block, ``c_{t-1}`` held fixed).

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``).
      wrt: ``"carry"`` or ``"h"``.
      initial_carry: carry with leaves ``(H,)`` (``(B, H)``); zeros by default.

    Returns:
      ``(T, S)`` singular values per step in decreasing order (``(B, T, S)``).

    Example:
      >>> cell = jaxrnn.Elman(16, activation="linear", recurrent_scale=0.9)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> step_jacobian_spectra(cell, params, jnp.ones((5, 4)))[0]  # all 0.9: W_hh = 0.9·Q
    """
    xs_b, carry0, unbatched = _prepare_cell(cell, params, xs, initial_carry, wrt)
    jacs = _step_jacobians(cell, params, xs_b, carry0, wrt)
    return _unbatch(jnp.linalg.svd(jacs, compute_uv=False), unbatched)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _norms_to_last(cell, params, xs, carry0, wrt):
    jacs = _step_jacobians(cell, params, xs, carry0, "carry")  # (B, T, S, S)
    c = cell.resolve(xs.dtype)

    def one(J):
        eye = jnp.eye(J.shape[-1], dtype=J.dtype)

        def body(M, J_t):  # M = ∂s_{T-1}/∂s_t; then ∂s_{T-1}/∂s_{t-1} = M J_t
            return _matmul(M, J_t), jnp.linalg.svd(_block(c, M, wrt), compute_uv=False)[0]

        return lax.scan(body, eye, J, reverse=True)[1]

    return jax.vmap(one)(jacs)


def jacobian_norms_to_last(cell, params, xs: Array, *, wrt: str = "carry", initial_carry: Any = None) -> Array:
    r"""``‖∂h_{T-1}/∂h_t‖₂`` (spectral norm) for every position ``t``.

    The loss-free version of the gradient profile: the largest factor by which
    any perturbation of ``h_t`` can reach the last state. Equal to
    ``jacobian_product(cell, params, xs, t, T-1, wrt=wrt).norm`` for each
    ``t``, computed with one reverse accumulation ``M_{t-1} = M_t J_t``.
    Memory ``O(T·S²)`` (the per-step Jacobians), so meant for small ``H``.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``).
      wrt: ``"carry"`` or ``"h"``; see :func:`jacobian_product`.
      initial_carry: carry with leaves ``(H,)`` (``(B, H)``); zeros by default.

    Returns:
      ``(T,)`` norms (``(B, T)``); the last entry is 1.

    Example:
      >>> cell = jaxrnn.GRU(16)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> jacobian_norms_to_last(cell, params, jnp.ones((50, 4))).shape
      (50,)
    """
    xs_b, carry0, unbatched = _prepare_cell(cell, params, xs, initial_carry, wrt)
    return _unbatch(_norms_to_last(cell, params, xs_b, carry0, wrt), unbatched)


def spectral_radius(cell, params) -> np.ndarray:
    r"""Spectral radius ``ρ = max |eig|`` of each gate's recurrent block ``W_hh[:, k·H:(k+1)·H]``.

    The lectures' linear analysis: ``‖g W^ℓ‖`` behaves like ``ρ^ℓ`` for large
    ``ℓ``, so ``ρ < 1`` vanishes and ``ρ > 1`` can explode. Computed eagerly
    with NumPy (not traceable).

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters (``w_hh`` ``(H, G)``).

    Returns:
      ``(num_gates,)`` float64 radii in the cell's gate order (Elman: one;
      LSTM: ``i, f, g, o``; GRU: ``r, u, n``).

    Example:
      >>> cell = jaxrnn.Elman(64, recurrent_scale=0.95)
      >>> np.round(spectral_radius(cell, cell.init(jax.random.key(0), 8)), 4)  # W_hh = 0.95·Q
      array([0.95])
    """
    if isinstance(cell, Stack):
        raise TypeError(_NOT_A_STACK)
    _check_model(cell, "cell")
    check_params(cell, params)
    w = np.asarray(params.w_hh, np.float64)
    H = cell.hidden_size
    return np.array([np.max(np.abs(np.linalg.eigvals(w[:, k * H : (k + 1) * H]))) for k in range(cell.num_gates)])


# --------------------------------------------------------------------------
# tanh saturation
# --------------------------------------------------------------------------
def _tanh_sites(cell, params, carry, xp_t, new):
    """The cell's ``tanh`` outputs at one step: name -> ``(*batch, H)``."""
    H = cell.hidden_size
    if isinstance(cell, Elman):
        return {"h": new.h}
    if isinstance(cell, LSTM):
        z_g = xp_t[..., 2 * H : 3 * H] + cell.dot(carry.h, params.w_hh[:, 2 * H : 3 * H])
        return {"g": jnp.tanh(z_g), "c": jnp.tanh(new.c)}
    xr, xn = xp_t[..., :H], xp_t[..., 2 * H :]
    if cell.reset == "after":
        hr, hn = cell.dot(carry.h, params.w_hh[:, :H]), cell.dot(carry.h, params.w_hh[:, 2 * H :])
        r = jax.nn.sigmoid(xr + hr)
        return {"n": jnp.tanh(xn + r * (hn + expand_bias(params.b_hn, hn)))}
    r = jax.nn.sigmoid(xr + cell.dot(carry.h, params.w_hh[:, :H]))
    return {"n": jnp.tanh(xn + cell.dot(r * carry.h, params.w_hh[:, 2 * H :]))}


@functools.partial(jax.jit, static_argnums=(0,))
def _tanh_values(cell, params, xs, carry0):
    cell = cell.resolve(xs.dtype)
    xp = cell.input_projection(params, jnp.swapaxes(xs, 0, 1))

    def body(carry, xp_t):
        new, _ = cell.step_projected(params, carry, xp_t)
        return new, _tanh_sites(cell, params, carry, xp_t, new)

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
    less than 2% of its gradient per step. Sites: Elman ``"h"`` (needs
    ``activation="tanh"``); LSTM ``"g"`` (the candidate) and ``"c"``
    (``tanh(c_t)`` in ``h_t = o_t ⊙ tanh(c_t)``); GRU ``"n"`` (the candidate).

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
    _check_cell_run(cell, params, xs, initial_carry)
    xs_b, initial_carry, _ = _batch_major(xs, initial_carry, None)
    if initial_carry is None:
        initial_carry = cell.zero_carry((xs_b.shape[0],))
    carry0 = jax.tree_util.tree_map(lambda c: c.astype(_acc(xs_b.dtype)), initial_carry)
    values = _tanh_values(cell, params, xs_b, carry0)
    thr = jnp.asarray(thresholds, jnp.float32)
    per_step, overall = {}, {}
    for name, a in values.items():
        slope = 1.0 - jnp.square(a.astype(jnp.float32))  # (T, B, H)
        below = slope[..., None] < thr.reshape(1, 1, 1, -1)  # (T, B, H, K)
        per_step[name] = jnp.mean(below, axis=(1, 2))
        overall[name] = jnp.mean(below, axis=(0, 1, 2))
    return Saturation(thresholds, per_step, overall)


# --------------------------------------------------------------------------
# Theory checks
# --------------------------------------------------------------------------
class LinearCheck(NamedTuple):
    """Output of :func:`linear_rnn_check`.

    Attributes:
      measured: ``(T,)`` ratios ``‖∂J/∂h_{T-1-ℓ}‖ / ‖∂J/∂h_{T-1}‖``, ``ℓ = 0..T-1``.
      predicted: ``(T,)`` the theory, ``λ^ℓ``.
      max_rel_error: ``max_ℓ |measured/predicted - 1|``.
      spectral_radius: ``ρ(W_hh)``, equal to ``λ``.
    """

    measured: Array
    predicted: Array
    max_rel_error: Array
    spectral_radius: float


def linear_rnn_check(
    lam: float,
    seq_len: int,
    *,
    hidden_size: int = 16,
    input_size: int = 4,
    key: Optional[Array] = None,
    dtype=jnp.float32,
) -> LinearCheck:
    r"""The lectures' linear case: ``‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖ = λ^ℓ`` exactly.

    A linear Elman RNN ``h_t = W_{ih}^T x_t + W_{hh}^T h_{t-1} + b`` with
    ``W_hh = λ Q`` (``Q`` orthogonal; ``Elman(H, activation="linear",
    recurrent_init="orthogonal", recurrent_scale=λ)``) backpropagates
    ``∂J/∂h_{t-1} = W_hh ∂J/∂h_t = λ Q ∂J/∂h_t``, so with the loss at the last
    step every backward step scales the norm by exactly ``λ``: 0.95 keeps
    ``0.95^50 = 7.7%`` after 50 steps and ``0.6%`` after 100; ``λ = 1.1``
    explodes (``1.1^100 ≈ 13780``). The ratio is measured with
    :func:`grad_norms_through_time` on random inputs.

    Precision: float32 weights are orthogonal to about ``1e-7``, so the
    measured ratio drifts from ``λ^ℓ`` by roughly ``1e-7·ℓ`` (``1e-5`` at
    ``ℓ = 100``). With ``dtype=jnp.float64`` (needs ``jax.enable_x64``) the
    initialiser's ``W_hh`` (sampled in float32) is re-orthogonalised in float64
    (``λ·U Vᵀ`` from its SVD) and the check holds to about ``1e-13``.

    Args:
      lam: ``λ > 0``.
      seq_len: ``T >= 1``.
      hidden_size: ``H``.
      input_size: ``I``.
      key: PRNG key for weights and inputs (default ``jax.random.key(0)``).
      dtype: ``jnp.float32`` or ``jnp.float64``.

    Returns:
      :class:`LinearCheck`.

    Example:
      >>> check = linear_rnn_check(0.95, 101)
      >>> float(check.measured[50]), float(check.max_rel_error) < 1e-5
      (0.0769..., True)
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise ValueError(f"lam: expected a positive float, got {lam!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype: float64 needs 64-bit mode (wrap the call in `with jax.enable_x64(True):`)")
    key = jax.random.key(0) if key is None else key
    k_init, k_x = jax.random.split(key)
    cell = Elman(hidden_size, activation="linear", recurrent_init="orthogonal", recurrent_scale=float(lam))
    params = cell.init(k_init, input_size, dtype=dtype)
    if dtype == jnp.float64:
        u, _, vt = np.linalg.svd(np.asarray(params.w_hh, np.float64))
        params = params._replace(w_hh=jnp.asarray(lam * (u @ vt), dtype))
    xs = jax.random.normal(k_x, (seq_len, input_size), dtype)
    norms = grad_norms_through_time(cell, params, xs).h
    measured = gradient_ratios(norms)
    predicted = jnp.asarray(float(lam) ** np.arange(seq_len, dtype=np.float64), dtype)
    err = jnp.max(jnp.abs(measured / predicted - 1.0))
    return LinearCheck(measured, predicted, err, float(spectral_radius(cell, params)[0]))


class CellPath(NamedTuple):
    """Output of :func:`lstm_cell_path`.

    Attributes:
      jacobian: ``(H, H)`` ``∂c_stop/∂c_start`` along the cell path (autodiff).
      forget_product: ``(H,)`` ``∏_{s=start+1}^{stop} f_s``.
      max_abs_error: ``max |jacobian - diag(forget_product)|``.
      full_jacobian: ``(H, H)`` the total ``∂c_stop/∂c_start`` (paths through
        ``h`` included), for comparison.
    """

    jacobian: Array
    forget_product: Array
    max_abs_error: Array
    full_jacobian: Array


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _cell_path(cell, params, xs, carry0, start, stop):
    H = cell.hidden_size

    def one(x, c0):
        c = cell.resolve(x.dtype)
        xp = c.input_projection(params, x)
        f = _carry_step(c, params)
        carry = _unflatten(c, _run_to(f, c0, xp[: start + 1]))
        window = xp[start + 1 : stop + 1]

        def c_stop(c_start, hold_h):
            def body(carry, xp_t):
                h = lax.stop_gradient(carry.h) if hold_h else carry.h
                return c.step_projected(params, LSTMCarry(h, carry.c), xp_t)[0], None

            return lax.scan(body, LSTMCarry(carry.h, c_start), window)[0].c

        def gates(carry, xp_t):  # the forget gate along the real trajectory
            z_f = xp_t[..., H : 2 * H] + c.dot(carry.h, params.w_hh[:, H : 2 * H])
            return c.step_projected(params, carry, xp_t)[0], jax.nn.sigmoid(z_f)

        forgets = lax.scan(gates, carry, window)[1]
        jac = jax.jacfwd(functools.partial(c_stop, hold_h=True))(carry.c)
        full = jax.jacfwd(functools.partial(c_stop, hold_h=False))(carry.c)
        prod = jnp.prod(forgets, axis=0)
        return jac, prod, jnp.max(jnp.abs(jac - jnp.diag(prod))), full

    return jax.vmap(one)(xs, carry0)


def lstm_cell_path(cell, params, xs: Array, start: int, stop: int, *, initial_carry: Any = None) -> CellPath:
    r"""The LSTM's gradient highway: ``∂c_{stop}/∂c_{start}`` along the cell path is ``∏ f``.

    With ``c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t``, holding ``h``'s influence out
    (the gates read ``h_{t-1}`` as a constant: ``stop_gradient`` in every step)
    leaves only the diagonal path,

    .. math::
        \frac{\partial c_{stop}}{\partial c_{start}}\Big|_{\text{cell path}}
        = \operatorname{diag}\Big(\prod_{s=start+1}^{stop} f_s\Big),

    a product of learned scalars instead of ``(diag(tanh') W)^ℓ``: with
    ``f ≈ 1`` the gradient passes unchanged. The Jacobian comes from
    ``jax.jacfwd`` of the whole window; the forget gates from the trajectory.

    Args:
      cell: an :class:`~jaxrnn.LSTM`.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``).
      start, stop: positions, ``0 <= start <= stop < T``.
      initial_carry: ``LSTMCarry`` with leaves ``(H,)`` (``(B, H)``).

    Returns:
      :class:`CellPath` (leading ``B`` axis for batched ``xs``).

    Example:
      >>> cell = jaxrnn.LSTM(16, forget_bias=3.0)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> path = lstm_cell_path(cell, params, jnp.ones((60, 4)), 9, 59)
      >>> float(path.max_abs_error) < 1e-5
      True
    """
    if not isinstance(cell, LSTM):
        raise TypeError(f"cell: expected a jaxrnn.LSTM, got {type(cell).__name__}")
    _check_cell_run(cell, params, xs, initial_carry)
    _check_positions(xs.shape[-2], start=start, stop=stop)
    if start > stop:
        raise ValueError(f"start: expected start <= stop, got start={start}, stop={stop}")
    xs_b, carry0, unbatched = _prepare_cell(cell, params, xs, initial_carry, "carry", validate=False)
    return _unbatch(CellPath(*_cell_path(cell, params, xs_b, carry0, int(start), int(stop))), unbatched)


# --------------------------------------------------------------------------
# Exploding gradients: clipping and the cliff
# --------------------------------------------------------------------------
def _run_model(model, params, xs, initial_carry, seq_lengths, impl):
    if isinstance(model, Stack):
        return model.apply(params, xs, initial_carry=initial_carry, seq_lengths=seq_lengths, impl=impl)[0]
    return rnn(model, params, xs, initial_carry=initial_carry, seq_lengths=seq_lengths, impl=impl)[0]


class ClipReport(NamedTuple):
    """Output of :func:`clipping_report`.

    Attributes:
      norm_before: global norm ``‖g‖ = sqrt(Σ_leaves Σ g²)`` of the parameter gradient.
      norm_after: global norm after ``optax.clip_by_global_norm(max_norm)``:
        ``min(‖g‖, max_norm)``.
      grads: the clipped gradient ``g · min(1, max_norm/‖g‖)`` (params' structure).
      loss: the loss value.
    """

    norm_before: Array
    norm_after: Array
    grads: Any
    loss: Array


def clipping_report(
    cell_or_stack,
    params,
    xs: Array,
    max_norm: float,
    loss_fn: Optional[Callable[[Array], Array]] = None,
    *,
    loss_at: str = "last",
    initial_carry: Any = None,
    seq_lengths: Optional[Array] = None,
    impl: str = "reference",
) -> ClipReport:
    r"""The parameter gradient's global norm before and after norm clipping.

    Pascanu et al. (2013)'s remedy for exploding gradients: if
    ``‖g‖ ≥ max_norm`` then ``g ← (max_norm/‖g‖) g`` — the same direction,
    a bounded step. The gradient comes from :func:`jaxrnn.rnn` (or
    :meth:`jaxrnn.Stack.apply`) with ``impl``; clipping is
    ``optax.clip_by_global_norm``.

    Args:
      cell_or_stack: a cell or a :class:`jaxrnn.Stack`.
      params: its parameters.
      xs: ``(B, T, I)`` or ``(T, I)`` inputs.
      max_norm: the clipping threshold (``> 0``).
      loss_fn, loss_at: the loss, as in :func:`grads_through_time`.
      initial_carry, seq_lengths: as for :func:`jaxrnn.rnn`.
      impl: the runner's implementation.

    Returns:
      :class:`ClipReport`.

    Example:
      >>> cell = jaxrnn.Elman(16, recurrent_scale=1.5)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> report = clipping_report(cell, params, jnp.ones((2, 50, 4)), max_norm=1.0)
      >>> float(report.norm_after) <= 1.0 + 1e-6
      True
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm: expected a positive float, got {max_norm!r}")
    check_impl(impl)
    _check_choice("loss_at", loss_at, LOSS_AT)
    loss_fn = _check_loss_fn(loss_fn)
    seq_lengths = _validate_run(cell_or_stack, params, xs, initial_carry, seq_lengths)
    static = (cell_or_stack, loss_fn, loss_at, impl)
    return _clipping_report(*static, params, xs, initial_carry, seq_lengths, float(max_norm))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _clipping_report(model, loss_fn, loss_at, impl, params, xs, initial_carry, seq_lengths, max_norm):
    unbatched = xs.ndim == 2

    def J(p):
        ys = _run_model(model, p, xs, initial_carry, seq_lengths, impl)
        ys_tm = ys[:, None] if unbatched else jnp.swapaxes(ys, 0, 1)
        lengths = None
        if seq_lengths is not None:
            lengths = jnp.clip(jnp.reshape(seq_lengths, (-1,)).astype(jnp.int32), 0, ys_tm.shape[0])
        return _apply_loss(loss_fn, loss_at, ys_tm, lengths, unbatched)

    loss, grads = jax.value_and_grad(J)(params)
    clip = optax.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(params))
    return ClipReport(_global_norm(grads), _global_norm(clipped), clipped, loss)


def _global_norm(tree):
    """``sqrt(Σ_leaves Σ g²)``, the norm ``optax.clip_by_global_norm`` clips."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)))


def loss_along_direction(loss_fn: Callable[[Any], Array], params, direction, alphas: Array):
    r"""``L(α) = loss_fn(params + α·direction)`` and its slope ``dL/dα``, for every ``α``.

    A one-dimensional slice of the loss surface (the "cliff" figure); the
    slope is a forward-mode directional derivative (``jax.jvp``).

    Args:
      loss_fn: ``params -> scalar``.
      params: the base point (a pytree).
      direction: a pytree with the structure of ``params``.
      alphas: ``(N,)`` step sizes.

    Returns:
      ``(losses (N,), slopes (N,))``.

    Example:
      >>> losses, slopes = loss_along_direction(lambda p: p["w"] ** 2, {"w": 0.0}, {"w": 1.0}, jnp.linspace(-1, 1, 5))
    """
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(direction):
        raise ValueError(
            f"direction: expected the structure of params {jax.tree_util.tree_structure(params)}, "
            f"got {jax.tree_util.tree_structure(direction)}"
        )
    alphas = jnp.asarray(alphas)
    if alphas.ndim != 1:
        raise ValueError(f"alphas: expected shape (N,), got {alphas.shape}")

    def at(alpha):
        point = lambda a: jax.tree_util.tree_map(lambda p, d: p + a * d, params, direction)  # noqa: E731
        return jax.jvp(lambda a: loss_fn(point(a)), (alpha,), (jnp.ones_like(alpha),))

    return jax.jit(jax.vmap(at))(alphas)


class CliffCurve(NamedTuple):
    """Output of :func:`scalar_rnn_cliff`: ``loss (N,)`` and ``slope = dL/dw (N,)`` at ``ws (N,)``."""

    ws: Array
    loss: Array
    slope: Array


def scalar_rnn_cliff(
    ws: Array,
    *,
    activation: str = "tanh",
    bias: float = -0.1,
    h0: float = 0.5,
    target: float = 0.5,
    seq_len: int = 50,
    impl: str = "reference",
) -> CliffCurve:
    r"""Loss of a one-unit RNN as a function of its recurrent weight (Pascanu et al. 2013).

    ``h_t = φ(w h_{t-1} + b)`` from ``h_{-1} = h0`` with no input, loss
    ``L(w) = (h_{T-1} - target)²``, run through :func:`jaxrnn.rnn` with
    ``impl``. For ``tanh`` and ``b < 0``, ``h0 > 0``: below a critical ``w``
    the state decays to the negative fixed point, above it the positive fixed
    point survives; between the two ``h_{T-1}`` jumps over a tiny range of
    ``w``: a wall in ``L`` where ``|dL/dw|`` is huge (the exploding gradient),
    flat plateaus elsewhere. For ``"linear"``, ``h_{T-1} ≈ w^T h0`` and the
    wall is the exponential growth beyond ``|w| = 1``.

    Args:
      ws: ``(N,)`` recurrent weights.
      activation: ``"tanh"`` or ``"linear"``.
      bias: ``b``.
      h0: the initial state.
      target: the loss target.
      seq_len: ``T``.
      impl: the runner's implementation.

    Returns:
      :class:`CliffCurve`.

    Example:
      >>> curve = scalar_rnn_cliff(jnp.linspace(0.5, 2.0, 301))
      >>> float(jnp.max(jnp.abs(curve.slope))) > 100 * float(jnp.median(jnp.abs(curve.slope)))
      True
    """
    if activation not in ("tanh", "linear"):
        raise ValueError(f"activation: expected 'tanh' or 'linear', got {activation!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    check_impl(impl)
    ws = jnp.asarray(ws)
    if ws.ndim != 1:
        raise ValueError(f"ws: expected shape (N,), got {ws.shape}")
    dtype = ws.dtype if jnp.issubdtype(ws.dtype, jnp.floating) else jnp.float32
    ws = ws.astype(dtype)  # float64 ws (with x64 enabled) run the whole curve in float64
    cell = Elman(1, activation=activation)
    xs = jnp.zeros((seq_len, 1), dtype)
    carry0 = Carry(jnp.full((1,), h0, dtype))

    def loss(p):
        h_last = rnn(cell, p, xs, initial_carry=carry0, impl=impl)[1].h[0]
        return jnp.square(h_last - target)

    base = ElmanParams(jnp.zeros((1, 1), dtype), jnp.zeros((1, 1), dtype), jnp.full((1,), bias, dtype))
    direction = ElmanParams(jnp.zeros((1, 1), dtype), jnp.ones((1, 1), dtype), jnp.zeros((1,), dtype))
    losses, slopes = loss_along_direction(loss, base, direction, ws)
    return CliffCurve(ws, losses, slopes)


# --------------------------------------------------------------------------
# The profile while training
# --------------------------------------------------------------------------
class TrainingProfile(NamedTuple):
    """Output of :func:`profile_during_training`.

    Attributes:
      steps: ``(K,)`` training steps at which a profile was recorded (0 = before training).
      profiles: ``(K, T)`` ``‖∂h_{T-1}/∂h_t‖₂`` on the probe sequence.
      losses: ``(num_steps,)`` training loss at each step (before its update).
      params: ``(cell_params, (w_out (H, 1), b_out (1,)))`` after training.
      probe: ``(T, I)`` the probe sequence.
    """

    steps: Array
    profiles: Array
    losses: Array
    params: Any
    probe: Array


def profile_during_training(
    cell,
    *,
    seq_len: int = 15,
    input_size: int = 1,
    num_steps: int = 40,
    every: int = 5,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    key: Optional[Array] = None,
    params: Any = None,
    wrt: str = "h",
    impl: str = "reference",
) -> TrainingProfile:
    r"""Train a small RNN on a long-range toy task; record ``‖∂h_{T-1}/∂h_t‖`` as it learns.

    Task ("remember the first input"): ``x_t ~ N(0, 1)^I`` for ``t < T``; the
    target is ``x_0[0]``, read out linearly from ``h_{T-1}``:
    ``ŷ = h_{T-1} w_out + b_out``, loss ``mean (ŷ - x_0[0])²``. Solving it
    requires the gradient from step ``T-1`` to reach step 0. Adam
    (``optax.adam``) on fresh batches; the forward pass is :func:`jaxrnn.rnn`
    with ``impl``. Every ``every`` steps (and at the end) the profile
    :func:`jacobian_norms_to_last` is recorded on one fixed probe sequence.

    Args:
      cell: an Elman, LSTM or GRU cell.
      seq_len: ``T``.
      input_size: ``I``.
      num_steps: optimiser steps.
      every: record a profile each ``every`` steps.
      batch_size: ``B``.
      learning_rate: Adam's step size.
      key: PRNG key (default ``jax.random.key(0)``).
      params: initial cell parameters (default ``cell.init``).
      wrt: ``"h"`` or ``"carry"`` (see :func:`jacobian_product`).
      impl: the runner's implementation for training.

    Returns:
      :class:`TrainingProfile`.

    Example:
      >>> run = profile_during_training(jaxrnn.Elman(16), num_steps=20, every=5)
      >>> run.profiles.shape
      (5, 15)
    """
    _check_model(cell, "cell")
    if isinstance(cell, Stack):
        raise TypeError("cell: expected a single jaxrnn cell, got a Stack")
    sizes = dict(seq_len=seq_len, input_size=input_size, num_steps=num_steps, every=every, batch_size=batch_size)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    check_impl(impl)
    _check_choice("wrt", wrt, WRT)
    key = jax.random.key(0) if key is None else key
    k_init, k_out, k_probe, k_data = jax.random.split(key, 4)
    H = cell.hidden_size
    cell_params = cell.init(k_init, input_size) if params is None else params
    readout = (jax.random.normal(k_out, (H, 1)) / np.sqrt(H), jnp.zeros((1,)))
    theta = (cell_params, readout)
    probe = jax.random.normal(k_probe, (seq_len, input_size))
    jacobian_norms_to_last(cell, cell_params, probe, wrt=wrt)  # validates params against the probe
    tx = optax.adam(learning_rate)

    def loss_fn(theta, xs):
        p, (w_out, b_out) = theta
        h_last = rnn(cell, p, xs, impl=impl)[1].h  # (B, H)
        pred = (jnp.matmul(h_last, w_out, precision=_HIGHEST) + b_out[None])[:, 0]
        return jnp.mean(jnp.square(pred - xs[:, 0, 0]))

    @jax.jit
    def update(theta, opt_state, step):
        xs = jax.random.normal(jax.random.fold_in(k_data, step), (batch_size, seq_len, input_size))
        loss, grads = jax.value_and_grad(loss_fn)(theta, xs)
        updates, opt_state = tx.update(grads, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss

    record = sorted(set(range(0, num_steps + 1, every)) | {num_steps})
    opt_state = tx.init(theta)
    profiles, losses = [], []
    for step in range(num_steps + 1):
        if step in record:
            profiles.append(jacobian_norms_to_last(cell, theta[0], probe, wrt=wrt))
        if step < num_steps:
            theta, opt_state, loss = update(theta, opt_state, step)
            losses.append(loss)
    return TrainingProfile(jnp.asarray(record), jnp.stack(profiles), jnp.stack(losses), theta, probe)
