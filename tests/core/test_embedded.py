"""``jaxrnn.Embedded`` inputs in the runner and the stack: the same results and gradients as the looked-up rows,
in every layout, and clear errors (the C++ LSTM's own path: tests/kernels/test_ffi_embedded.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _util import assert_close, normal, randomize
from jaxrnn.embedded import Embedded, lookup

V, I, H = 9, 4, 8


def _problem(seed=0):
    table = normal(jax.random.key(seed), (V, I))
    ids = jax.random.randint(jax.random.key(seed + 1), (3, 5), 0, V)
    lengths = jnp.array([5, 2, 0])
    return table, ids, lengths


def test_lookup_is_the_rows_and_nan_outside():
    table = jnp.arange(6.0).reshape(3, 2)
    got = lookup(table, jnp.array([[2, 0], [3, -1]]))
    np.testing.assert_array_equal(got[0], [[4.0, 5.0], [0.0, 1.0]])
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(Embedded(table, jnp.array([1])).lookup(), [[2.0, 3.0]])


@pytest.mark.parametrize("layout", ["batch", "time", "unbatched"])
def test_rnn_matches_the_looked_up_rows(layout):
    table, ids, lengths = _problem()
    cell = jaxrnn.GRU(H)
    params = randomize(cell.init(jax.random.key(2), I), jax.random.key(3))
    kw = {"batch": {}, "time": {"time_major": True}, "unbatched": {}}[layout]
    ids = {"batch": ids, "time": ids.T, "unbatched": ids[0]}[layout]
    lengths = {"batch": lengths, "time": lengths, "unbatched": jnp.array(3)}[layout]

    @jax.jit
    def both(params, table):
        def loss(p, t, embedded):
            xs = Embedded(t, ids) if embedded else lookup(t, ids)
            ys, h = jaxrnn.rnn(cell, p, xs, seq_lengths=lengths, reverse=True, impl="xla", **kw)
            return jnp.sum(jnp.sin(ys)) + jnp.sum(h.h**2), ys

        return [jax.value_and_grad(loss, (0, 1), has_aux=True)(params, table, e) for e in (True, False)]

    got, want = both(params, table)
    assert_close(got, want)


def test_stack_matches_the_looked_up_rows():
    """Bidirectional, two layers, a residual connection that reads the first layer's (looked-up) input."""
    table, ids, lengths = _problem()
    table = jnp.concatenate([table, table], axis=1)  # I = H: the residual joins
    stack = jaxrnn.Stack(jaxrnn.LSTM(H // 2), 2, bidirectional=True, connection="residual")
    params = randomize(stack.init(jax.random.key(2), H), jax.random.key(3))

    @jax.jit
    def both(params, table):
        def loss(p, t, embedded):
            xs = Embedded(t, ids) if embedded else lookup(t, ids)
            ys, _ = stack.apply(p, xs, seq_lengths=lengths, impl="reference")
            return jnp.sum(jnp.sin(ys)), ys

        return [jax.value_and_grad(loss, (0, 1), has_aux=True)(params, table, e) for e in (True, False)]

    got, want = both(params, table)
    assert_close(got, want)


def test_errors_name_the_argument():
    table, ids, _ = _problem()
    cell = jaxrnn.LSTM(H)
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(TypeError, match=r"xs\.table: expected a floating-point array"):
        jaxrnn.rnn(cell, params, Embedded(ids, ids))
    with pytest.raises(TypeError, match=r"xs\.ids: expected an integer array"):
        jaxrnn.rnn(cell, params, Embedded(table, table))
    with pytest.raises(ValueError, match=r"xs\.ids: expected shape \(B, T\) or \(T,\), got \(1, 3, 5\)"):
        jaxrnn.rnn(cell, params, Embedded(table, ids[None]))
    with pytest.raises(ValueError, match=r"xs\.table: expected last dimension 4 .* got shape \(9, 5\)"):
        jaxrnn.rnn(cell, params, Embedded(jnp.ones((V, 5)), ids))
    stack = jaxrnn.Stack(cell)
    with pytest.raises(ValueError, match=r"xs\.table: expected last dimension 4 .* got shape \(9, 5\)"):
        stack.apply(stack.init(jax.random.key(0), I), Embedded(jnp.ones((V, 5)), ids))


def test_forward_mode_and_the_analysis_hook_read_the_rows():
    """jax.jvp and carry_perturbation run the reference recurrence, which looks the rows up."""
    table, ids, _ = _problem()
    cell = jaxrnn.LSTM(H)
    params = cell.init(jax.random.key(0), I)
    f = lambda t, e: jaxrnn.rnn(cell, params, Embedded(t, ids) if e else lookup(t, ids))[0]  # noqa: E731
    dt = jnp.ones_like(table)
    assert_close(jax.jvp(lambda t: f(t, True), (table,), (dt,)), jax.jvp(lambda t: f(t, False), (table,), (dt,)))
    zero = jax.tree.map(lambda a: jnp.zeros((3, 5, H)), cell.zero_carry(3))
    got = jaxrnn.rnn(cell, params, Embedded(table, ids), carry_perturbation=zero)
    assert_close(got, jaxrnn.rnn(cell, params, lookup(table, ids)))
