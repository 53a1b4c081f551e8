r"""Per-step Jacobians and their products: what shrinks or grows the gradient through time.

.. math::
    \frac{\partial h_s}{\partial h_{s-1}} = \operatorname{diag}(\phi'(z_s))\, W_{hh}^\top
    \ \text{(Elman)},

so a vanilla RNN loses the gradient geometrically (eigenvalues of ``W_hh``
below 1, saturated ``tanh``) while the LSTM's additive cell update keeps a
path with ``∂c_s/∂c_{s-1} = diag(f_s)`` (the "gradient highway").
:func:`jacobian_product`, :func:`step_jacobian_spectra` and
:func:`jacobian_norms_to_last` take ``jax.jacfwd`` of the cell's step with
respect to the carry along the trajectory the inputs drive;
:func:`spectral_radius` is the linear analysis of ``W_hh``;
:func:`lstm_cell_path` checks the highway ``∏ f``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn.analysis.common import (
    HIGHEST,
    WRT,
    check_cell_run,
    check_single_cell,
    check_window,
    initial_state,
    unbatch,
)
from jaxrnn.cells import LSTM, LSTMCarry, check_params
from jaxrnn.checks import check_one_of

Array = jax.Array

__all__ = [
    "CellPath",
    "JacobianProduct",
    "jacobian_norms_to_last",
    "jacobian_product",
    "lstm_cell_path",
    "spectral_radius",
    "step_jacobian_spectra",
]


def _flatten(carry):
    return jnp.concatenate(list(carry), axis=-1)


def _unflatten(cell, state):
    return cell.carry_type(*jnp.split(state, len(cell.carry_type._fields), axis=-1))


def _carry_step(cell, params):
    """``s_t = f(s_{t-1}, xp_t)`` on the flat state ``s = [h]`` or ``[h; c]`` ``(S,)``."""

    def f(state, xp_t):
        new, _ = cell.step_projected(params, _unflatten(cell, state), xp_t)
        return _flatten(new)

    return f


def _block(cell, matrix, wrt):
    H = cell.hidden_size
    return matrix[..., :H, :H] if wrt == "h" else matrix


def _prepare(cell, params, xs, initial_carry, wrt, window=None):
    """Validate (``window``: ``(start, stop)`` positions, or ``None``).

    Returns ``(xs (B, T, I), flat carry0 (B, S), unbatched, window as ints)``.
    """
    check_cell_run(cell, params, xs, initial_carry)
    if window is not None:
        window = check_window(xs.shape[-2], *window)
    check_one_of("wrt", wrt, WRT)
    xs, carry0, unbatched = initial_state(cell, xs, initial_carry)
    return xs, _flatten(carry0), unbatched, window


def _matmul(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _run_to(f, state, xp):
    return lax.scan(lambda s, x: (f(s, x), None), state, xp)[0]


# --------------------------------------------------------------------------
# Products of per-step Jacobians
# --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _jacobian_product(cell, params, xs, carry0, start, stop, wrt):
    def one(x, s0):
        c = cell.resolve(x.dtype)
        xp = c.input_projection(params, x)
        f = _carry_step(c, params)
        state = _run_to(f, s0, xp[: start + 1])

        def body(carry, xp_t):
            s, M = carry
            return (f(s, xp_t), _matmul(jax.jacfwd(f)(s, xp_t), M)), None

        eye = jnp.eye(state.shape[-1], dtype=state.dtype)
        (_, M), _ = lax.scan(body, (state, eye), xp[start + 1 : stop + 1])
        M = _block(c, M, wrt)
        return M, jnp.linalg.svd(M, compute_uv=False)

    return jax.vmap(one)(xs, carry0)


class JacobianProduct(NamedTuple):
    """Output of :func:`jacobian_product`.

    Attributes:
      matrix: ``(S, S)`` Jacobian ``∂s_stop/∂s_start`` (leading ``B`` when batched).
      singular_values: ``(S,)`` in decreasing order.
      norm: the spectral norm (largest singular value), a scalar (``(B,)``).
    """

    matrix: Array
    singular_values: Array
    norm: Array


def jacobian_product(
    cell, params, xs: Array, start: int, stop: int, *, wrt: str = "carry", initial_carry: Any = None
) -> JacobianProduct:
    r"""``∂h_{stop}/∂h_{start}`` as the product of per-step Jacobians from autodiff.

    .. math::
        \frac{\partial s_{stop}}{\partial s_{start}}
        = J_{stop}\, J_{stop-1} \cdots J_{start+1},
        \qquad J_t = \frac{\partial s_t}{\partial s_{t-1}}
        \ \text{(} \texttt{jax.jacfwd} \text{ of } \texttt{cell.step} \text{ in the carry)}

    evaluated along the trajectory that ``xs`` drives (``start == stop``
    gives the identity). With a loss at step ``stop`` only,
    ``∂J/∂h_{start} = (∂h_{stop}/∂h_{start})^T ∂J/∂h_{stop}``.

    The state ``s``: ``h`` for Elman and GRU. For an LSTM, ``wrt="carry"``
    uses the full carry ``s = [h; c]`` (``S = 2H``), the map whose powers decide
    whether gradients vanish; ``wrt="h"`` returns the ``h → h`` block of that
    product, ``∂h_{stop}/∂h_{start}`` with ``c_{start}`` held fixed (paths
    through ``c_{start+1}, …`` included). It is *not* the product of per-step
    ``h → h`` blocks.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``: one product per example).
      start, stop: positions with ``0 <= start <= stop < T``.
      wrt: ``"carry"`` or ``"h"`` (they differ only for an LSTM).
      initial_carry: carry with leaves ``(H,)`` (``(B, H)``); zeros by default.

    Returns:
      :class:`JacobianProduct` ``(matrix (S, S), singular_values (S,), norm ())``,
      with a leading ``B`` axis for batched ``xs``; ``S = H``, or ``2H`` for an
      LSTM with ``wrt="carry"``.

    Example:
      >>> cell = jaxrnn.Elman(16)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> jp = jacobian_product(cell, params, jnp.ones((30, 4)), start=0, stop=29)
      >>> jp.matrix.shape, float(jp.norm) < 1
      ((16, 16), True)
    """
    xs_b, carry0, unbatched, (start, stop) = _prepare(cell, params, xs, initial_carry, wrt, (start, stop))
    M, sv = _jacobian_product(cell, params, xs_b, carry0, start, stop, wrt)
    return unbatch(JacobianProduct(M, sv, sv[:, 0]), unbatched)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _step_jacobians(cell, params, xs, carry0, wrt):
    def one(x, s0):
        c = cell.resolve(x.dtype)
        f = _carry_step(c, params)

        def body(s, xp_t):
            return f(s, xp_t), _block(c, jax.jacfwd(f)(s, xp_t), wrt)

        return lax.scan(body, s0, c.input_projection(params, x))[1]

    return jax.vmap(one)(xs, carry0)


def step_jacobian_spectra(cell, params, xs: Array, *, wrt: str = "carry", initial_carry: Any = None) -> Array:
    r"""Singular values of every per-step Jacobian ``∂h_t/∂h_{t-1}``.

    For Elman, ``∂h_t/∂h_{t-1} = diag(φ'(z_t)) W_{hh}^T``: its singular values
    are those of ``W_hh`` shrunk by the activation's slope. ``t = 0`` is the
    Jacobian with respect to the initial carry. ``wrt`` as in
    :func:`jacobian_product` (for an LSTM, ``"h"`` is the per-step ``h → h``
    block, ``c_{t-1}`` held fixed).

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``).
      wrt: ``"carry"`` or ``"h"``.
      initial_carry: carry with leaves ``(H,)`` (``(B, H)``); zeros by default.

    Returns:
      ``(T, S)`` singular values per step in decreasing order (``(B, T, S)``).

    Example:
      >>> cell = jaxrnn.Elman(16, activation="linear", recurrent_scale=0.9)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> step_jacobian_spectra(cell, params, jnp.ones((5, 4)))[0]  # all 0.9: W_hh = 0.9·Q
    """
    xs_b, carry0, unbatched, _ = _prepare(cell, params, xs, initial_carry, wrt)
    jacs = _step_jacobians(cell, params, xs_b, carry0, wrt)
    return unbatch(jnp.linalg.svd(jacs, compute_uv=False), unbatched)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _norms_to_last(cell, params, xs, carry0, wrt):
    jacs = _step_jacobians(cell, params, xs, carry0, "carry")  # (B, T, S, S)
    c = cell.resolve(xs.dtype)

    def one(J):
        eye = jnp.eye(J.shape[-1], dtype=J.dtype)

        def body(M, J_t):  # M = ∂s_{T-1}/∂s_t; then ∂s_{T-1}/∂s_{t-1} = M J_t
            return _matmul(M, J_t), jnp.linalg.svd(_block(c, M, wrt), compute_uv=False)[0]

        return lax.scan(body, eye, J, reverse=True)[1]

    return jax.vmap(one)(jacs)


def jacobian_norms_to_last(cell, params, xs: Array, *, wrt: str = "carry", initial_carry: Any = None) -> Array:
    r"""``‖∂h_{T-1}/∂h_t‖₂`` (spectral norm) for every position ``t``.

    The loss-free version of the gradient profile: the largest factor by which
    any perturbation of ``h_t`` can reach the last state. Equal to
    ``jacobian_product(cell, params, xs, t, T-1, wrt=wrt).norm`` for each
    ``t``, computed with one reverse accumulation ``M_{t-1} = M_t J_t``.
    Memory ``O(T·S²)`` (the per-step Jacobians), so meant for small ``H``.

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``).
      wrt: ``"carry"`` or ``"h"``; see :func:`jacobian_product`.
      initial_carry: carry with leaves ``(H,)`` (``(B, H)``); zeros by default.

    Returns:
      ``(T,)`` norms (``(B, T)``); the last entry is 1.

    Example:
      >>> cell = jaxrnn.GRU(16)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> jacobian_norms_to_last(cell, params, jnp.ones((50, 4))).shape
      (50,)
    """
    xs_b, carry0, unbatched, _ = _prepare(cell, params, xs, initial_carry, wrt)
    return unbatch(_norms_to_last(cell, params, xs_b, carry0, wrt), unbatched)


def spectral_radius(cell, params) -> np.ndarray:
    r"""Spectral radius ``ρ = max |eig|`` of each gate's recurrent block ``W_hh[:, k·H:(k+1)·H]``.

    The lectures' linear analysis: ``‖g W^ℓ‖`` behaves like ``ρ^ℓ`` for large
    ``ℓ``, so ``ρ < 1`` vanishes and ``ρ > 1`` can explode. Computed eagerly
    with NumPy (not traceable).

    Args:
      cell: an Elman, LSTM or GRU cell.
      params: its parameters (``w_hh`` ``(H, G)``).

    Returns:
      ``(num_gates,)`` float64 radii in the cell's gate order (Elman: one;
      LSTM: ``i, f, g, o``; GRU: ``r, u, n``).

    Example:
      >>> cell = jaxrnn.Elman(64, recurrent_scale=0.95)
      >>> np.round(spectral_radius(cell, cell.init(jax.random.key(0), 8)), 4)  # W_hh = 0.95·Q
      array([0.95])
    """
    check_single_cell(cell)
    check_params(cell, params)
    w = np.asarray(params.w_hh, np.float64)
    H = cell.hidden_size
    return np.array([np.max(np.abs(np.linalg.eigvals(w[:, k * H : (k + 1) * H]))) for k in range(cell.num_gates)])


# --------------------------------------------------------------------------
# The LSTM's cell path
# --------------------------------------------------------------------------
class CellPath(NamedTuple):
    """Output of :func:`lstm_cell_path`.

    Attributes:
      jacobian: ``(H, H)`` ``∂c_stop/∂c_start`` along the cell path (autodiff).
      forget_product: ``(H,)`` ``∏_{s=start+1}^{stop} f_s``.
      max_abs_error: ``max |jacobian - diag(forget_product)|``.
      full_jacobian: ``(H, H)`` the total ``∂c_stop/∂c_start`` (paths through
        ``h`` included), for comparison.
    """

    jacobian: Array
    forget_product: Array
    max_abs_error: Array
    full_jacobian: Array


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _cell_path(cell, params, xs, carry0, start, stop):
    H = cell.hidden_size

    def one(x, c0):
        c = cell.resolve(x.dtype)
        xp = c.input_projection(params, x)
        f = _carry_step(c, params)
        carry = _unflatten(c, _run_to(f, c0, xp[: start + 1]))
        window = xp[start + 1 : stop + 1]

        def c_stop(c_start, hold_h):
            def body(carry, xp_t):
                h = lax.stop_gradient(carry.h) if hold_h else carry.h
                return c.step_projected(params, LSTMCarry(h, carry.c), xp_t)[0], None

            return lax.scan(body, LSTMCarry(carry.h, c_start), window)[0].c

        def gates(carry, xp_t):  # the forget gate along the real trajectory
            z_f = xp_t[..., H : 2 * H] + c.dot(carry.h, params.w_hh[:, H : 2 * H])
            return c.step_projected(params, carry, xp_t)[0], jax.nn.sigmoid(z_f)

        forgets = lax.scan(gates, carry, window)[1]
        jac = jax.jacfwd(functools.partial(c_stop, hold_h=True))(carry.c)
        full = jax.jacfwd(functools.partial(c_stop, hold_h=False))(carry.c)
        prod = jnp.prod(forgets, axis=0)
        return jac, prod, jnp.max(jnp.abs(jac - jnp.diag(prod))), full

    return jax.vmap(one)(xs, carry0)


def lstm_cell_path(cell, params, xs: Array, start: int, stop: int, *, initial_carry: Any = None) -> CellPath:
    r"""The LSTM's gradient highway: ``∂c_{stop}/∂c_{start}`` along the cell path is ``∏ f``.

    With ``c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t``, holding ``h``'s influence out
    (the gates read ``h_{t-1}`` as a constant: ``stop_gradient`` in every step)
    leaves only the diagonal path,

    .. math::
        \frac{\partial c_{stop}}{\partial c_{start}}\Big|_{\text{cell path}}
        = \operatorname{diag}\Big(\prod_{s=start+1}^{stop} f_s\Big),

    a product of learned scalars instead of ``(diag(tanh') W)^ℓ``: with
    ``f ≈ 1`` the gradient passes unchanged. The Jacobian comes from
    ``jax.jacfwd`` of the whole window; the forget gates from the trajectory.

    Args:
      cell: an :class:`~jaxrnn.LSTM`.
      params: its parameters.
      xs: ``(T, I)`` inputs (or ``(B, T, I)``).
      start, stop: positions, ``0 <= start <= stop < T``.
      initial_carry: ``LSTMCarry`` with leaves ``(H,)`` (``(B, H)``).

    Returns:
      :class:`CellPath` (leading ``B`` axis for batched ``xs``).

    Example:
      >>> cell = jaxrnn.LSTM(16, forget_bias=3.0)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> path = lstm_cell_path(cell, params, jnp.ones((60, 4)), 9, 59)
      >>> float(path.max_abs_error) < 1e-5
      True
    """
    if not isinstance(cell, LSTM):
        raise TypeError(f"cell: expected a jaxrnn.LSTM, got {type(cell).__name__}")
    xs_b, carry0, unbatched, (start, stop) = _prepare(cell, params, xs, initial_carry, "carry", (start, stop))
    return unbatch(CellPath(*_cell_path(cell, params, xs_b, carry0, start, stop)), unbatched)
