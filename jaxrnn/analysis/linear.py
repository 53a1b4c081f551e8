r"""The lectures' linear RNN: ``‖∂J/∂h_{T-ℓ}‖ / ‖∂J/∂h_T‖ = λ^ℓ``, measured.

A linear Elman RNN with ``W_hh = λ Q`` (``Q`` orthogonal) scales the gradient
norm by exactly ``λ`` per backward step; :func:`linear_rnn_check` measures the
ratio with :func:`jaxrnn.analysis.grad_norms_through_time` and compares it with
the theory.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.analysis.gradients import grad_norms_through_time, gradient_ratios
from jaxrnn.analysis.jacobians import spectral_radius
from jaxrnn.cells import Elman
from jaxrnn.checks import check_index, check_rate

Array = jax.Array

__all__ = ["LinearCheck", "linear_rnn_check"]


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
    lam = check_rate("lam", lam, 0.0, float("inf"), closed_low=False)
    seq_len = check_index(seq_len, "seq_len")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"dtype: expected float32 or float64, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("dtype: float64 needs 64-bit mode (wrap the call in `with jax.enable_x64(True):`)")
    key = jax.random.key(0) if key is None else key
    k_init, k_x = jax.random.split(key)
    cell = Elman(hidden_size, activation="linear", recurrent_init="orthogonal", recurrent_scale=lam)
    params = cell.init(k_init, input_size, dtype=dtype)
    if dtype == jnp.float64:
        u, _, vt = np.linalg.svd(np.asarray(params.w_hh, np.float64))
        params = params._replace(w_hh=jnp.asarray(lam * (u @ vt), dtype))
    xs = jax.random.normal(k_x, (seq_len, input_size), dtype)
    norms = grad_norms_through_time(cell, params, xs).h
    measured = gradient_ratios(norms)
    predicted = jnp.asarray(lam ** np.arange(seq_len, dtype=np.float64), dtype)
    err = jnp.max(jnp.abs(measured / predicted - 1.0))
    return LinearCheck(measured, predicted, err, float(spectral_radius(cell, params)[0]))
