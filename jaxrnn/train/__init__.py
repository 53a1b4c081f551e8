"""Training: one generic, jitted step for every model (and, on top of it, the trainer).

Example:
  >>> from jaxrnn import train
  >>> step = train.make_train_step(loss_fn, optax.adam(3e-3), max_grad_norm=1.0)
  >>> opt_state = step.init(params)
  >>> params, opt_state, metrics = step(params, opt_state, batch)
"""

from jaxrnn.train.clipping import ClippedOptimizer, split_clipping
from jaxrnn.train.step import StepMetrics, TrainStep, make_train_step, tree_select

__all__ = ["ClippedOptimizer", "StepMetrics", "TrainStep", "make_train_step", "split_clipping", "tree_select"]
