"""One generic training step: a loss function and an optax transformation, jitted.

Every training loop of jaxrnn (the language model, the demo, the analysis'
training profile, the trainer) is this step in a Python loop. It returns the
metrics the lectures care about, measured rather than assumed: the loss, the
global gradient norm *before* clipping, and whether the step was clipped. A
step whose loss or gradient is not finite is never applied: the parameters
and optimiser state come back unchanged and ``metrics.finite`` is ``False``
(the trainer decides what to do next).

Example:
  >>> def loss_fn(params, batch):
  ...     x, y = batch
  ...     return jnp.mean((x @ params - y) ** 2)
  >>> step = make_train_step(loss_fn, optax.adam(1e-2), max_grad_norm=1.0)
  >>> opt_state = step.init(params)
  >>> params, opt_state, metrics = step(params, opt_state, (x, y))
  >>> metrics.loss, metrics.grad_norm, metrics.clipped, metrics.finite
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrnn.checks import check_rate

Array = jax.Array

__all__ = ["StepMetrics", "TrainStep", "make_train_step", "tree_select"]


class StepMetrics(NamedTuple):
    """What one training step measured.

    Attributes:
      loss: scalar float32 loss at the parameters the step started from.
      grad_norm: scalar global L2 norm of the gradient before clipping
        (``optax.tree.norm``, formerly ``optax.global_norm``).
      clipped: scalar bool, ``grad_norm > max_grad_norm`` (``False`` without clipping).
      finite: scalar bool, loss and gradient finite; when ``False`` the step
        was not applied.
      aux: what ``loss_fn`` returned beside the loss (``has_aux=True``), else ``None``.
    """

    loss: Array
    grad_norm: Array
    clipped: Array
    finite: Array
    aux: Any = None


def tree_select(pred, on_true, on_false):
    """``on_true`` where the scalar ``pred`` holds, else ``on_false``, leaf by leaf (same structure)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class TrainStep(NamedTuple):
    """A training step and the optimiser state it needs (like an optax transformation: pure functions).

    Attributes:
      init: ``init(params) -> opt_state``.
      step: ``step(params, opt_state, batch) -> (params, opt_state, StepMetrics)``, jitted.
      optimizer: the optax transformation (without the clipping added by ``max_grad_norm``).
    """

    init: Callable[[Any], Any]
    step: Callable[..., Any]
    optimizer: optax.GradientTransformation

    def __call__(self, params, opt_state, batch):
        return self.step(params, opt_state, batch)


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    max_grad_norm: Optional[float] = None,
    has_aux: bool = False,
    jit: bool = True,
) -> TrainStep:
    """Build ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a scalar loss, or
        ``(loss, aux)`` with ``has_aux=True``. ``batch`` is any pytree.
      optimizer: an optax ``GradientTransformation``.
      max_grad_norm: clip the gradient to this global norm
        (``optax.clip_by_global_norm``) before the optimiser; ``None``: no clipping.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      jit: compile the step (with ``jax.jit``; a second call with the same
        shapes does not recompile).

    Returns:
      A :class:`TrainStep`: call it as ``step(params, opt_state, batch)``;
      ``step.init(params)`` makes the optimiser state.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(params, batch), got {type(loss_fn).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer: expected an optax.GradientTransformation, got {type(optimizer).__name__}")
    if max_grad_norm is not None:
        max_grad_norm = check_rate("max_grad_norm", max_grad_norm, 0.0, float("inf"), closed_low=False, what="a positive number")
    clip = optax.identity() if max_grad_norm is None else optax.clip_by_global_norm(max_grad_norm)
    tx = optax.chain(clip, optimizer)

    def value_and_grad(params, batch):
        out = jax.eval_shape(loss_fn, params, batch)  # checked before autodiff's own error
        if has_aux and not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"loss_fn: expected (loss, aux) with has_aux=True, got {type(out).__name__}")
        shape = getattr(out[0] if has_aux else out, "shape", None)
        if shape != ():
            kind = f"shape {shape}" if shape is not None else type(out).__name__
            raise ValueError(f"loss_fn: expected a scalar loss{' and aux' if has_aux else ''}, got {kind}")
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
        loss, aux = out if has_aux else (out, None)
        return loss, aux, grads

    def step(params, opt_state, batch):
        loss, aux, grads = value_and_grad(params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        clipped = jnp.asarray(False) if max_grad_norm is None else grad_norm > max_grad_norm
        # A non-finite gradient never reaches the optimiser (whose moments it would poison).
        safe = tree_select(finite, grads, jax.tree_util.tree_map(jnp.zeros_like, grads))
        updates, new_state = tx.update(safe, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params = tree_select(finite, new_params, params)
        opt_state = tree_select(finite, new_state, opt_state)
        metrics = StepMetrics(loss.astype(jnp.float32), grad_norm.astype(jnp.float32), clipped & finite, finite, aux)
        return params, opt_state, metrics

    return TrainStep(tx.init, jax.jit(step) if jit else step, optimizer)
