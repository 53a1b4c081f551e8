r"""The Jacobian profile ``‖∂h_{T-1}/∂h_t‖`` while a small RNN learns a long-range task.

:func:`profile_during_training` trains with :func:`jaxrnn.train.make_train_step`
(the one training step of jaxrnn) and records
:func:`jaxrnn.analysis.jacobian_norms_to_last` on a fixed probe sequence.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.analysis.common import HIGHEST, WRT, check_single_cell
from jaxrnn.analysis.jacobians import jacobian_norms_to_last
from jaxrnn.checks import check_index, check_key, check_one_of, check_rate
from jaxrnn.runner import check_impl, rnn
from jaxrnn.train import make_train_step

Array = jax.Array

__all__ = ["TrainingProfile", "profile_during_training"]


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
    (``optax.adam``) on fresh batches, one :func:`jaxrnn.train.make_train_step`
    step each (no clipping; a non-finite step is not applied); the forward
    pass is :func:`jaxrnn.rnn` with ``impl``. Every ``every`` steps (and at the
    end) the profile :func:`jaxrnn.analysis.jacobian_norms_to_last` is
    recorded on one fixed probe sequence.

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
      wrt: ``"h"`` or ``"carry"`` (see :func:`jaxrnn.analysis.jacobian_product`).
      impl: the runner's implementation for training.

    Returns:
      :class:`TrainingProfile`.

    Example:
      >>> run = profile_during_training(jaxrnn.Elman(16), num_steps=20, every=5)
      >>> run.profiles.shape
      (5, 15)
    """
    check_single_cell(cell)
    sizes = dict(seq_len=seq_len, input_size=input_size, num_steps=num_steps, every=every, batch_size=batch_size)
    seq_len, input_size, num_steps, every, batch_size = (check_index(v, name) for name, v in sizes.items())
    learning_rate = check_rate("learning_rate", learning_rate, 0.0, float("inf"), closed_low=False)
    check_impl(impl)
    check_one_of("wrt", wrt, WRT)
    key = jax.random.key(0) if check_key("key", key) is None else key
    k_init, k_out, k_probe, k_data = jax.random.split(key, 4)
    H = cell.hidden_size
    cell_params = cell.init(k_init, input_size) if params is None else params
    readout = (jax.random.normal(k_out, (H, 1)) / np.sqrt(H), jnp.zeros((1,)))
    theta = (cell_params, readout)
    probe = jax.random.normal(k_probe, (seq_len, input_size))
    jacobian_norms_to_last(cell, cell_params, probe, wrt=wrt)  # validates params against the probe

    def loss_fn(theta, xs):
        p, (w_out, b_out) = theta
        h_last = rnn(cell, p, xs, impl=impl)[1].h  # (B, H)
        pred = (jnp.matmul(h_last, w_out, precision=HIGHEST) + b_out[None])[:, 0]
        return jnp.mean(jnp.square(pred - xs[:, 0, 0]))

    step = make_train_step(loss_fn, optax.adam(learning_rate))
    record = sorted(set(range(0, num_steps + 1, every)) | {num_steps})
    opt_state = step.init(theta)
    profiles, losses = [], []
    for t in range(num_steps + 1):
        if t in record:
            profiles.append(jacobian_norms_to_last(cell, theta[0], probe, wrt=wrt))
        if t < num_steps:
            batch = jax.random.normal(jax.random.fold_in(k_data, t), (batch_size, seq_len, input_size))
            theta, opt_state, metrics = step(theta, opt_state, batch)
            losses.append(metrics.loss)
    return TrainingProfile(jnp.asarray(record), jnp.stack(profiles), jnp.stack(losses), theta, probe)
