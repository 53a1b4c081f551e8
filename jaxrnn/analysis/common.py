"""What the analysis modules share: checks of the model, loss and positions, and the loss itself.

Every public function of :mod:`jaxrnn.analysis` validates its arguments here
with the runner's own checks before anything is traced, runs the model
through :func:`jaxrnn.rnn` or :meth:`jaxrnn.Stack.apply` (:func:`run_model`),
and reduces the outputs to a scalar with :func:`apply_loss`.

Time index convention (every analysis function). For inputs of length ``T``,
position ``t ∈ {0, …, T-1}`` is the step that consumes ``xs[..., t, :]`` and
``h_t`` (``c_t``) is the state it produces; the initial carry is ``h_{-1}``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxrnn.cells import Cell, acc_dtype
from jaxrnn.checks import check_index, check_inputs, check_lengths, check_one_of
from jaxrnn.runner import rnn
from jaxrnn.stack import Stack

Array = jax.Array

__all__ = [
    "HIGHEST",
    "LOSS_AT",
    "NOT_A_STACK",
    "REDUCE",
    "WRT",
    "apply_loss",
    "batch_major",
    "check_cell_run",
    "check_loss_fn",
    "check_model",
    "check_positions",
    "check_single_cell",
    "check_window",
    "initial_state",
    "run_model",
    "sum_of_outputs",
    "unbatch",
    "validate_run",
]

#: Where the loss reads the outputs (see :func:`jaxrnn.analysis.grads_through_time`).
LOSS_AT = ("last", "sum", "sequence")
#: How per-example gradient norms are reduced over the batch.
REDUCE = ("none", "mean")
#: The state a Jacobian is taken with respect to: the whole carry, or ``h`` alone.
WRT = ("carry", "h")
#: Matmul precision of the analysis' own products (exact float32 on every backend).
HIGHEST = lax.Precision.HIGHEST
#: The error for a Stack passed where one cell is expected.
NOT_A_STACK = "cell: expected a single jaxrnn cell; for a Stack pass stack.cell and one layer's params[l].fwd"


def sum_of_outputs(y: Array) -> Array:
    """Default loss ``J = Σ y``: its gradient with respect to ``y`` is all ones.

    Any direction would do for the ratios; this one does not depend on the
    state, so the profile reflects the recurrence alone.
    """
    return jnp.sum(y)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def check_model(model, name="cell_or_stack"):
    """Raise ``TypeError`` unless ``model`` is a jaxrnn cell or a :class:`jaxrnn.Stack`."""
    if not isinstance(model, (Stack, Cell)):
        raise TypeError(
            f"{name}: expected a jaxrnn cell (Elman, LSTM, GRU) or a jaxrnn.Stack, got {type(model).__name__}"
        )


def check_single_cell(cell, name="cell"):
    """Raise ``TypeError`` unless ``cell`` is one jaxrnn cell (a Stack gets a hint)."""
    if isinstance(cell, Stack):
        raise TypeError(NOT_A_STACK)
    check_model(cell, name)


def check_loss_fn(loss_fn):
    """``loss_fn``, or :func:`sum_of_outputs` for ``None``; anything else not callable raises ``TypeError``."""
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable or None, got {type(loss_fn).__name__}")
    return sum_of_outputs if loss_fn is None else loss_fn


def check_positions(T, **positions):
    """Each keyword must be a Python (or NumPy) int position in ``[0, T-1]``."""
    for name, value in positions.items():
        check_index(value, name, minimum=0)
        if not 0 <= value < T:
            raise ValueError(f"{name}: expected a position in [0, {T - 1}] (T = {T}), got {value}")


def check_window(T, start, stop):
    """``start`` and ``stop`` positions with ``0 <= start <= stop < T``; returned as ints."""
    check_positions(T, start=start, stop=stop)
    if start > stop:
        raise ValueError(f"start: expected start <= stop, got start={start}, stop={stop}")
    return int(start), int(stop)


def validate_run(model, params, xs, initial_carry, seq_lengths, loss_at=None):
    """Validate a run with the runner's own checks (``eval_shape``: nothing is computed).

    Args:
      model: a cell or a Stack.
      params, xs, initial_carry, seq_lengths: as for :func:`run_model`.
      loss_at: also checked against :data:`LOSS_AT` when given.

    Returns:
      ``seq_lengths`` as an array (or ``None``).
    """
    check_model(model)
    if loss_at is not None:
        check_one_of("loss_at", loss_at, LOSS_AT)
    check_inputs(xs)
    if seq_lengths is not None:
        T = xs.shape[0] if xs.ndim == 2 else xs.shape[1]
        seq_lengths = check_lengths(seq_lengths, () if xs.ndim == 2 else (xs.shape[0],), T)
    jax.eval_shape(lambda p, x, c, n: run_model(model, p, x, c, n), params, xs, initial_carry, seq_lengths)
    return seq_lengths


def check_cell_run(cell, params, xs, initial_carry):
    """Checks for the per-cell functions: one cell, ``xs`` ``(T, I)`` or ``(B, T, I)``."""
    check_single_cell(cell)
    validate_run(cell, params, xs, initial_carry, None)


# --------------------------------------------------------------------------
# Running the model and the loss
# --------------------------------------------------------------------------
def run_model(model, params, xs, initial_carry=None, seq_lengths=None, impl="reference", carry_perturbation=None):
    """Outputs ``ys`` of a cell (:func:`jaxrnn.rnn`) or a Stack (:meth:`jaxrnn.Stack.apply`, no dropout)."""
    run = dict(initial_carry=initial_carry, seq_lengths=seq_lengths, impl=impl, carry_perturbation=carry_perturbation)
    if isinstance(model, Stack):
        return model.apply(params, xs, **run)[0]
    return rnn(model, params, xs, **run)[0]


def _scalar(loss_fn: Callable[[Array], Array]):
    def fn(y):
        J = loss_fn(y)
        if not hasattr(J, "shape") and not isinstance(J, (int, float)):
            raise TypeError(f"loss_fn: expected a scalar array, got {type(J).__name__} for outputs {y.shape}")
        if jnp.shape(J) != ():
            raise ValueError(f"loss_fn: expected a scalar loss, got shape {jnp.shape(J)} for outputs {y.shape}")
        return J

    return fn


def apply_loss(loss_fn, loss_at: str, ys: Array, seq_lengths: Optional[Array] = None) -> Array:
    """``J`` from outputs ``ys`` ``(B, T, D)`` (``(T, D)`` unbatched) for ``loss_at`` in :data:`LOSS_AT`.

    ``"last"``: ``loss_fn(y_last)`` with ``y_last`` ``(B, D)`` at each
    sequence's last valid step; ``"sum"``: ``Σ_t loss_fn(y_t)`` with ``y_t``
    ``(B, D)``; ``"sequence"``: ``loss_fn(ys)``. ``loss_fn`` must return a scalar.
    """
    loss_fn = _scalar(loss_fn)
    if loss_at == "sequence":
        return loss_fn(ys)
    ys_tm = ys if ys.ndim == 2 else jnp.swapaxes(ys, 0, 1)  # (T, [B,] D)
    if loss_at == "sum":
        return jnp.sum(jax.vmap(loss_fn)(ys_tm))
    if seq_lengths is None:
        return loss_fn(ys_tm[-1])
    T = ys_tm.shape[0]
    last = jnp.clip(jnp.asarray(seq_lengths).astype(jnp.int32) - 1, 0, max(T - 1, 0))
    return loss_fn(ys_tm[last] if ys.ndim == 2 else ys_tm[last, jnp.arange(ys_tm.shape[1])])


# --------------------------------------------------------------------------
# Batching and the initial state
# --------------------------------------------------------------------------
def batch_major(xs, initial_carry=None):
    """Add the batch axis of an unbatched run: ``(xs (B, T, I), initial_carry (B, H) or None, unbatched)``."""
    if xs.ndim == 3:
        return xs, initial_carry, False
    carry = None if initial_carry is None else jax.tree_util.tree_map(lambda a: a[None], initial_carry)
    return xs[None], carry, True


def initial_state(cell, xs, initial_carry=None):
    """``(xs (B, T, I), carry0 (B, H) in the accumulation dtype, unbatched)`` for a per-cell scan."""
    xs, initial_carry, unbatched = batch_major(xs, initial_carry)
    if initial_carry is None:
        initial_carry = cell.zero_carry((xs.shape[0],))
    carry0 = jax.tree_util.tree_map(lambda c: c.astype(acc_dtype(xs.dtype)), initial_carry)
    return xs, carry0, unbatched


def unbatch(tree: Any, unbatched: bool):
    """Drop the leading batch axis that :func:`batch_major` added."""
    return jax.tree_util.tree_map(lambda a: a[0], tree) if unbatched else tree
