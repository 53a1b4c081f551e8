"""Training: one generic, jitted step for every model, and the trainer on top of it.

Example:
  >>> from jaxrnn import train
  >>> step = train.make_train_step(loss_fn, optax.adam(3e-3), max_grad_norm=1.0)
  >>> opt_state = step.init(params)
  >>> params, opt_state, metrics = step(params, opt_state, batch)
  >>> params, history = train.fit(loss_fn, params, lambda lr: optax.adam(lr), batches,
  ...                             learning_rate=3e-3, steps=1000, checkpoint_dir="runs/a")
  >>> train.plot_history(history, "runs/a/loss.png")
"""

from jaxrnn.train.checkpoint import load_checkpoint
from jaxrnn.train.clipping import ClippedOptimizer, split_clipping
from jaxrnn.train.progress import History, plot_history
from jaxrnn.train.step import StepMetrics, TrainStep, make_train_step, tree_select
from jaxrnn.train.trainer import FaultLimitError, fit

__all__ = [
    "ClippedOptimizer",
    "FaultLimitError",
    "History",
    "StepMetrics",
    "TrainStep",
    "fit",
    "load_checkpoint",
    "make_train_step",
    "plot_history",
    "split_clipping",
    "tree_select",
]
