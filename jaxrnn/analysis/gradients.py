r"""Gradients through time: ``∂J/∂h_t`` for every step in one backward pass, their ratios and the memory horizon.

Backpropagation through time multiplies the gradient by one Jacobian per step,
so how much of the gradient at step ``t`` reaches step ``t - ℓ`` is measured
here exactly: :func:`grads_through_time` differentiates ``J`` with respect to
the runner's ``carry_perturbation`` hook (:func:`jaxrnn.rnn`,
:meth:`jaxrnn.Stack.apply`) at zero, which gives ``∂J/∂h_t`` (and
``∂J/∂c_t``) for all ``t`` at once; :func:`gradient_ratios` and
:func:`memory_horizon` turn their norms into the lectures' ratio
``‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxrnn.analysis.common import REDUCE, apply_loss, check_loss_fn, run_model, validate_run
from jaxrnn.cells import LSTM, acc_dtype
from jaxrnn.checks import check_one_of, check_rate
from jaxrnn.runner import check_impl
from jaxrnn.stack import Stack

Array = jax.Array

__all__ = ["GradNorms", "grad_norms_through_time", "gradient_ratios", "grads_through_time", "memory_horizon"]


def _ignore_impl(impl, function):
    """``impl`` of the gradient functions: validated, then ignored with a ``DeprecationWarning``."""
    if impl is None:
        return
    check_impl(impl)
    warnings.warn(
        f"{function}(impl=...) is deprecated and ignored: exact gradients through time use the reference "
        "recurrence (the carry_perturbation hook of jaxrnn.rnn), whatever the implementation; drop the argument",
        DeprecationWarning,
        stacklevel=3,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _state_grads(model, loss_fn, loss_at, params, xs, initial_carry, seq_lengths):
    steps = (xs.shape[0],) if xs.ndim == 2 else xs.shape[:2]  # (T,) or (B, T): the perturbation's leading axes
    zeros = jax.tree_util.tree_map(lambda c: c.astype(acc_dtype(xs.dtype)), model.zero_carry(steps))

    def J(perturbation):
        ys = run_model(model, params, xs, initial_carry, seq_lengths, "reference", perturbation)
        return apply_loss(loss_fn, loss_at, ys, seq_lengths)

    return jax.value_and_grad(J)(zeros)


def _grads(cell_or_stack, params, xs, loss_fn, loss_at, initial_carry, seq_lengths):
    loss_fn = check_loss_fn(loss_fn)
    seq_lengths = validate_run(cell_or_stack, params, xs, initial_carry, seq_lengths, loss_at)
    return _state_grads(cell_or_stack, loss_fn, loss_at, params, xs, initial_carry, seq_lengths)


def grads_through_time(
    cell_or_stack,
    params,
    xs: Array,
    loss_fn: Optional[Callable[[Array], Array]] = None,
    *,
    loss_at: str = "last",
    initial_carry: Any = None,
    seq_lengths: Optional[Array] = None,
    impl: Any = None,
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
    The perturbations are the ``carry_perturbation`` argument of
    :func:`jaxrnn.rnn` (:meth:`jaxrnn.Stack.apply`), all zero; a single
    reverse pass gives every ``∂J/∂δ_t`` without forming any Jacobian.

    Implementation. The hook runs the reference recurrence
    (``cell.step_projected`` in a masked ``lax.scan``): the fused backends
    take no per-step perturbation, so exact gradients through time always
    come from the reference. ``impl`` is therefore deprecated: it is still
    accepted and validated, and passing it emits a ``DeprecationWarning``
    saying it is ignored. (:func:`clipping_report` and
    :func:`profile_during_training`, which only run the model, do use their
    ``impl``.)

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
      seq_lengths: ``(B,)`` valid lengths; gradients at padded steps are zero,
        and padded inputs (even NaN) never reach a gradient.
      impl: deprecated and ignored (see above); ``None`` by default.

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
    _ignore_impl(impl, "grads_through_time")
    return _grads(cell_or_stack, params, xs, loss_fn, loss_at, initial_carry, seq_lengths)


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
    impl: Any = None,
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
      impl: deprecated and ignored; see :func:`grads_through_time`.

    Returns:
      :class:`GradNorms` ``(h, c, loss)``.

    Example:
      >>> cell = jaxrnn.Elman(32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> norms = grad_norms_through_time(cell, params, jnp.ones((4, 100, 8)), reduce="mean")
      >>> ratios = norms.h[::-1] / norms.h[-1]          # ‖∂J/∂h_{T-1-ℓ}‖ / ‖∂J/∂h_{T-1}‖
    """
    _ignore_impl(impl, "grad_norms_through_time")
    check_one_of("reduce", reduce, REDUCE)
    loss, grads = _grads(cell_or_stack, params, xs, loss_fn, loss_at, initial_carry, seq_lengths)
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
      threshold: a ratio in (0, 1), e.g. 0.01 for "1% of the gradient".
      seq_lengths: optional ``(B,)`` valid lengths; see :func:`gradient_ratios`.

    Returns:
      ``(...)`` int32 horizons.

    Example:
      >>> memory_horizon(0.9 ** jnp.arange(100.0)[::-1], threshold=0.01)  # 0.9^44 < 0.01
      Array(44, dtype=int32)
    """
    check_rate("threshold", threshold, 0.0, 1.0, closed_low=False, what="a gradient ratio")
    ratios = gradient_ratios(norms, seq_lengths)
    below = ratios < threshold  # NaN compares False
    T = ratios.shape[-1]
    if seq_lengths is None:
        available = jnp.full(ratios.shape[:-1], T, jnp.int32)
    else:
        available = jnp.broadcast_to(jnp.asarray(seq_lengths, jnp.int32), ratios.shape[:-1])
    first = jnp.argmax(below, axis=-1).astype(jnp.int32)
    return jnp.where(jnp.any(below, axis=-1), first, available)
