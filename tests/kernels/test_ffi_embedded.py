"""The C++ LSTM's embedded-input path (``jaxrnn.Embedded``: ids into a projected table) against the looked-up
inputs: outputs, final carries and the VJP w.r.t. the parameters, the table and the initial carry, over the shapes
and splits of ``tests/kernels/test_ffi.py``, padded rows in both directions, out-of-range ids; against
``impl="reference"`` on the problem of ``test_padded_ids_reach_nothing``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _ffi_cases import CASES, problem, requires_ffi
from _util import assert_close, normal, randomize
from jaxrnn import kernels
from jaxrnn.embedded import Embedded, lookup

pytestmark = requires_ffi

V = 13


def _embedded_problem(shape, seed=0):
    B, T, H, I = shape
    cell, params, _, carry0, lengths = problem(B, T, H, I, seed=seed)
    table = normal(jax.random.key(seed + 7), (V, I))
    ids = jax.random.randint(jax.random.key(seed + 8), (B, T), 0, V)
    return cell, params, table, ids, carry0, lengths


def _outputs_and_vjp(impl, cell, params, table, ids, carry0, lengths, reverse, embedded):
    def f(p, tab, c):
        xs = Embedded(tab, ids) if embedded else lookup(tab, ids)
        return jaxrnn.rnn(cell, p, xs, initial_carry=c, seq_lengths=lengths, reverse=reverse, impl=impl)

    (ys, final), vjp = jax.vjp(f, params, table, carry0)
    k1, k2 = jax.random.split(jax.random.key(3))
    dys = normal(k1, ys.shape)
    dfinal = randomize(jax.tree.map(jnp.zeros_like, final), k2, scale=1.0)
    return ys, final, vjp((dys, dfinal))


# One member; rows split into chunks of 8 and 9; a team over the hidden units (each member's slice of a table row).
# Against the same backend on the looked-up rows, which tests/kernels/test_ffi.py checks against impl="reference"
# on these shapes (a reference recurrence per variant would compile for half a minute per case).
@pytest.mark.parametrize("shape, options", [CASES[0], CASES[2], CASES[4]], ids=lambda v: str(v))
def test_matches_reference(shape, options):
    cell, params, table, ids, carry0, lengths = _embedded_problem(shape)
    impl = kernels.FFI(**options)

    @jax.jit  # one compilation for every variant
    def both(params, table, carry0):
        out = {}
        for lens in (None, lengths):
            for reverse in (False, True):
                out[lens is not None, reverse] = [
                    _outputs_and_vjp(i, cell, params, table, ids, carry0, lens, reverse, embedded=e)
                    for i, e in ((impl, True), (impl, False))
                ]
        return out

    for variant, (got, want) in both(params, table, carry0).items():
        assert_close(got, want, scale=3.0, err_msg=f"(lengths, reverse) = {variant}")


def test_runs_on_the_table_not_the_rows():
    """The fast path is taken: the forward call's inputs are (T, B, 0), and no (T, B, I) lookup is formed."""
    cell, params, table, ids, carry0, lengths = _embedded_problem((4, 6, 16, 5))

    def loss(p, tab):
        ys, _ = jaxrnn.rnn(cell, p, Embedded(tab, ids), seq_lengths=lengths, impl="ffi")
        return jnp.sum(ys**2)

    text = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(params, table))
    assert "f32[6,4,0]" in text
    assert "f32[6,4,5]" not in text and "f32[4,6,5]" not in text


def test_out_of_range_ids_give_nan_like_the_lookup():
    cell, params, table, ids, carry0, _ = _embedded_problem((3, 7, 5, 4))
    bad = ids.at[1, 2].set(V).at[2, 0].set(-1)
    run = jax.jit(lambda tab, i, impl: jaxrnn.rnn(cell, params, Embedded(tab, i), impl=impl)[0], static_argnums=2)
    got, want = run(table, bad, "ffi"), run(table, bad, "reference")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[1, 2:]).all() and not np.isnan(got[0]).any()
    assert_close(jnp.where(jnp.isnan(want), 0, got), jnp.where(jnp.isnan(want), 0, want))


def test_padded_ids_reach_nothing():
    """Ids past a sequence's length may be anything, out of range included: nothing changes, no gradient."""
    cell, params, table, ids, carry0, lengths = _embedded_problem((3, 7, 5, 4))
    pad = jnp.arange(7)[None, :] >= lengths[:, None]
    junk = jnp.where(pad, V + 5, ids)

    def loss(tab, i):
        ys, (h, c) = jaxrnn.rnn(cell, params, Embedded(tab, i), seq_lengths=lengths, impl="ffi")
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h * c)

    got = jax.value_and_grad(loss)(table, junk)
    assert_close(got, jax.value_and_grad(loss)(table, ids))

    def reference(tab):
        xs = jnp.where(pad[..., None], 0.0, lookup(tab, ids))
        ys, (h, c) = jaxrnn.rnn(cell, params, xs, seq_lengths=lengths, impl="reference")
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h * c)

    assert_close(got, jax.value_and_grad(reference)(table), scale=3.0)


def test_other_cells_look_the_rows_up():
    """The GRU and Elman calls take no table: the runner looks the rows up, with the same results."""
    B, T, H, I = 5, 6, 16, 4
    table = normal(jax.random.key(1), (V, I))
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    for cell in (jaxrnn.GRU(H), jaxrnn.Elman(H)):
        params = randomize(cell.init(jax.random.key(0), I), jax.random.key(4))
        run = jax.jit(lambda p, xs, impl: jaxrnn.rnn(cell, p, xs, impl=impl), static_argnums=2)  # noqa: B023
        assert_close(run(params, Embedded(table, ids), "ffi"), run(params, lookup(table, ids), "reference"))
