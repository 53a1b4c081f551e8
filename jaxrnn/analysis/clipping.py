r"""Exploding gradients: norm clipping, the loss along a direction and the scalar RNN's "cliff".

Pascanu et al. (2013): where ``ρ(W_hh) > 1`` the loss surface of an RNN has
walls on which the gradient is huge; clipping its global norm keeps the step
bounded. :func:`clipping_report` measures the norm before and after
``optax.clip_by_global_norm``; :func:`loss_along_direction` and
:func:`scalar_rnn_cliff` draw the wall.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrnn.analysis.common import apply_loss, check_loss_fn, run_model, validate_run
from jaxrnn.cells import Carry, Elman, ElmanParams
from jaxrnn.checks import check_index, check_one_of, check_rate
from jaxrnn.runner import check_impl, rnn

Array = jax.Array

__all__ = ["ClipReport", "CliffCurve", "clipping_report", "loss_along_direction", "scalar_rnn_cliff"]


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
    ``optax.clip_by_global_norm`` and the norms are ``optax.tree.norm``.

    Args:
      cell_or_stack: a cell or a :class:`jaxrnn.Stack`.
      params: its parameters.
      xs: ``(B, T, I)`` or ``(T, I)`` inputs.
      max_norm: the clipping threshold (``> 0``).
      loss_fn, loss_at: the loss, as in :func:`jaxrnn.analysis.grads_through_time`.
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
    max_norm = check_rate("max_norm", max_norm, 0.0, float("inf"), closed_low=False)
    check_impl(impl)
    loss_fn = check_loss_fn(loss_fn)
    seq_lengths = validate_run(cell_or_stack, params, xs, initial_carry, seq_lengths, loss_at)
    static = (cell_or_stack, loss_fn, loss_at, impl)
    return _clipping_report(*static, params, xs, initial_carry, seq_lengths, max_norm)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _clipping_report(model, loss_fn, loss_at, impl, params, xs, initial_carry, seq_lengths, max_norm):
    def J(p):
        ys = run_model(model, p, xs, initial_carry, seq_lengths, impl)
        return apply_loss(loss_fn, loss_at, ys, seq_lengths)

    loss, grads = jax.value_and_grad(J)(params)
    clip = optax.clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(params))
    return ClipReport(optax.tree.norm(grads), optax.tree.norm(clipped), clipped, loss)


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
    check_one_of("activation", activation, ("tanh", "linear"))
    seq_len = check_index(seq_len, "seq_len")
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
