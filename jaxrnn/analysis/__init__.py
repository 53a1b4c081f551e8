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
``∂c_s/∂c_{s-1} = diag(f_s)`` (the "gradient highway"). This package measures
all of it exactly, with JAX autodiff. Its modules (this ``__init__`` only
re-exports their public names):

* :mod:`~jaxrnn.analysis.gradients`: :func:`grad_norms_through_time`
  (``‖∂J/∂h_t‖`` and ``‖∂J/∂c_t‖`` for every ``t`` in one backward pass, through
  the ``carry_perturbation`` hook of :func:`jaxrnn.rnn`),
  :func:`grads_through_time`, :func:`gradient_ratios`, :func:`memory_horizon`.
* :mod:`~jaxrnn.analysis.jacobians`: :func:`jacobian_product`,
  :func:`step_jacobian_spectra`, :func:`jacobian_norms_to_last`,
  :func:`spectral_radius`, :func:`lstm_cell_path` (``∏ f`` along the LSTM
  cell path): the Jacobians and what shrinks them.
* :mod:`~jaxrnn.analysis.saturation`: :func:`tanh_saturation`.
* :mod:`~jaxrnn.analysis.linear`: :func:`linear_rnn_check`, the lectures'
  ``λ^ℓ`` for a linear RNN.
* :mod:`~jaxrnn.analysis.clipping`: :func:`clipping_report`,
  :func:`loss_along_direction`, :func:`scalar_rnn_cliff`: exploding
  gradients, clipping and the "cliff".
* :mod:`~jaxrnn.analysis.profile`: :func:`profile_during_training`, the
  Jacobian profile while a small RNN trains.
* :mod:`~jaxrnn.analysis.common`: what they share (argument checks, the
  loss, running a cell or a Stack).
* :mod:`~jaxrnn.analysis.figures`: the figures of ``jaxrnn gradients``
  (matplotlib; imported only when used).

Time index convention (every function here). For inputs of length ``T``,
position ``t ∈ {0, …, T-1}`` is the step that consumes ``xs[..., t, :]`` and
``h_t`` (``c_t``) is the state it produces; the initial carry is ``h_{-1}``.
The lectures' last state ``h_T`` is ``h_{T-1}`` here, and their ratio
``‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖`` is ``norms[T-1-ℓ] / norms[T-1]``.
"""

import importlib

from jaxrnn.analysis.clipping import ClipReport, CliffCurve, clipping_report, loss_along_direction, scalar_rnn_cliff
from jaxrnn.analysis.common import LOSS_AT, REDUCE, WRT, sum_of_outputs
from jaxrnn.analysis.gradients import (
    GradNorms,
    grad_norms_through_time,
    gradient_ratios,
    grads_through_time,
    memory_horizon,
)
from jaxrnn.analysis.jacobians import (
    CellPath,
    JacobianProduct,
    jacobian_norms_to_last,
    jacobian_product,
    lstm_cell_path,
    spectral_radius,
    step_jacobian_spectra,
)
from jaxrnn.analysis.linear import LinearCheck, linear_rnn_check
from jaxrnn.analysis.profile import TrainingProfile, profile_during_training
from jaxrnn.analysis.saturation import SATURATION_THRESHOLDS, Saturation, tanh_saturation

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


def __getattr__(name):
    # ``jaxrnn.analysis.figures`` is imported on first use only: it imports matplotlib,
    # which ``import jaxrnn`` must not pay for.
    if name == "figures":
        return importlib.import_module("jaxrnn.analysis.figures")
    raise AttributeError(f"module 'jaxrnn.analysis' has no attribute {name!r}")
