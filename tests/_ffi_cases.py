"""The problems both C++-kernel test files (``tests/kernels/test_ffi*.py``) draw from: the cells, the shapes that
reach every path of ``kernels/rnn_cpu.cc``, a random problem and its VJP with random cotangents.

Importing it with ``JAXRNN_REQUIRE_FFI=1`` (CI) fails when the library cannot be built here;
``requires_ffi`` skips a test module otherwise.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _util import normal, randomize
from jaxrnn.kernels import ffi

REASON = ffi.unavailable_reason()
if REASON is not None and os.environ.get("JAXRNN_REQUIRE_FFI") == "1":
    raise RuntimeError(f"JAXRNN_REQUIRE_FFI=1 but the C++ kernel is unavailable: {REASON}")
requires_ffi = pytest.mark.skipif(REASON is not None, reason=f"C++ kernel unavailable: {REASON}")

# (B, T, H, I): one member (H < 16); 3 blocks of 16 units with a partial last block and
# 17 rows (two 8-row blocks and a 1-row tail; too little work to split on its own); steps large
# enough for two members in both loops of every cell (at least 0.7 MFLOP, see team_size in rnn_cpu.cc).
SHAPES = [(3, 7, 5, 4), (17, 6, 40, 6), (24, 5, 128, 16)]
# (shape, kernels.FFI options). "auto" splits the third shape by rows (its weights fit a core's cache:
# three 8-row chunks over two threads); the units case runs it as a team at a barrier per step, and the
# forced rows case splits 17 rows into chunks of 8 and 9.
CASES = [
    (SHAPES[0], {}),
    (SHAPES[1], {}),
    (SHAPES[1], {"split": "rows"}),
    (SHAPES[2], {}),
    (SHAPES[2], {"split": "units"}),
]

CELLS = {
    "lstm": jaxrnn.LSTM,
    "gru": lambda H: jaxrnn.GRU(H, reset="after"),
    "gru-before": lambda H: jaxrnn.GRU(H, reset="before"),
    "elman": jaxrnn.Elman,
    "elman-relu": lambda H: jaxrnn.Elman(H, activation="relu"),
    "elman-linear": lambda H: jaxrnn.Elman(H, activation="linear"),
}


def problem(B, T, H, I, seed=0, cell="lstm"):
    cell = CELLS[cell](H)
    k = jax.random.split(jax.random.key(seed), 5)
    # Random weights of a fixed scale: past H = 64 they shrink as 1/sqrt(H) (else the recurrence grows chaotic
    # with H and amplifies rounding, and two float32 computations part by more than the tolerance).
    params = jax.tree.map(lambda a: a * min(1.0, (64 / H) ** 0.5), randomize(cell.init(k[0], I), k[1]))
    if isinstance(cell, jaxrnn.Elman):
        # Half the random weights: at full scale the Elman map amplifies rounding so much that two float32
        # computations (either of which is within 1e-5 of a float64 run) differ by twice the tolerance.
        params = jax.tree.map(lambda a: 0.5 * a, params)
    xs = normal(k[2], (B, T, I))
    carry0 = randomize(cell.zero_carry(B), k[3], scale=1.0)
    lengths = jnp.asarray(np.random.RandomState(seed).randint(1, T, B), jnp.int32).at[0].set(0).at[-1].set(T)
    return cell, params, xs, carry0, lengths


def outputs_and_vjp(impl, cell, params, xs, carry0, lengths, reverse, cot_key):
    def f(p, x, c):
        return jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lengths, reverse=reverse, impl=impl)

    (ys, final), vjp = jax.vjp(f, params, xs, carry0)
    k1, k2 = jax.random.split(cot_key)
    dys = normal(k1, ys.shape)
    dfinal = randomize(jax.tree.map(jnp.zeros_like, final), k2, scale=1.0)
    return ys, final, vjp((dys, dfinal)), f(params, xs, carry0)[0]


def final_loss(final):
    """A scalar from a final carry of any cell, with a different cotangent per leaf."""
    return sum(jnp.sum(jnp.sin((k + 1.0) * leaf)) for k, leaf in enumerate(final))
