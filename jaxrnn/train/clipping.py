"""An optimiser that clips the gradient first and says so, so that a train step can measure the clipping.

``optax.chain(optax.clip_by_global_norm(c), adam)`` clips inside the
optimiser, where nobody sees by how much. :class:`ClippedOptimizer` is that
same optax transformation (same ``init``, ``update`` and state), but it keeps
its two parts: :func:`split_clipping` hands them to
:func:`jaxrnn.train.make_train_step` as ``(optimizer, max_grad_norm)``, and
the step then clips itself and reports the gradient norm before clipping and
whether it clipped. Its state is the step's state (``step.init(params) ==
ClippedOptimizer(...).init(params)`` leaf for leaf), so code that calls
``optimizer.init(params)`` keeps working.

Example:
  >>> optimizer = ClippedOptimizer(optax.adam(3e-3), max_grad_norm=1.0)
  >>> inner, max_grad_norm = split_clipping(optimizer)  # (the adam, 1.0)
  >>> step = make_train_step(loss_fn, inner, max_grad_norm=max_grad_norm)
"""

from __future__ import annotations

from typing import Optional, Tuple

import optax

from jaxrnn.checks import check_rate

__all__ = ["ClippedOptimizer", "split_clipping"]


class ClippedOptimizer(optax.GradientTransformation):
    """``optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)`` that remembers both.

    Args:
      optimizer: the optax transformation applied after clipping.
      max_grad_norm: the global gradient norm to clip to (positive, finite).

    Attributes:
      optimizer: as given.
      max_grad_norm: as given, a float.
    """

    def __new__(cls, optimizer: optax.GradientTransformation, max_grad_norm: float):
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer: expected an optax.GradientTransformation, got {type(optimizer).__name__}")
        max_grad_norm = check_rate("max_grad_norm", max_grad_norm, 0.0, float("inf"), closed_low=False)
        chained = optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)
        self = super().__new__(cls, chained.init, chained.update)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        return self

    def __getnewargs__(self):  # copy and pickle rebuild from the parts, not from (init, update)
        return (self.optimizer, self.max_grad_norm)

    def __repr__(self):
        return f"ClippedOptimizer({self.optimizer!r}, max_grad_norm={self.max_grad_norm!r})"


def split_clipping(optimizer: optax.GradientTransformation) -> Tuple[optax.GradientTransformation, Optional[float]]:
    """``(inner optimizer, max_grad_norm)`` of a :class:`ClippedOptimizer`; ``(optimizer, None)`` for any other."""
    if isinstance(optimizer, ClippedOptimizer):
        return optimizer.optimizer, optimizer.max_grad_norm
    return optimizer, None
