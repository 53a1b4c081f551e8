"""What padding hides never reaches a gradient; empty batches; JAX transformations on the default path.

Every backend is checked against the reference recurrence run on the *clean*
input (padding set to zero), so a NaN or inf written into padded positions
must change nothing: outputs, final carries and every gradient.
"""

import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _util import MAIN_CELLS, assert_close, devices_env, make_cell, normal
from jaxrnn.kernels import Pallas

B, T, I, H = 3, 6, 4, 5
LENGTHS = np.array([6, 2, 0])
BACKENDS = ["reference", "xla", Pallas(interpret=True)]
CELLS = {name: make_cell(name, H) for name in MAIN_CELLS}


def _inputs(poison):
    xs = normal(jax.random.key(1), (B, T, I))
    clean = jnp.where(jnp.arange(T)[None, :, None] < LENGTHS[:, None, None], xs, 0.0)
    padded = ~(jnp.arange(T)[None, :, None] < LENGTHS[:, None, None])
    return clean, jnp.where(padded, poison, xs)


def _loss(cell, impl, reverse):
    def loss(params, xs, carry0):
        ys, final = jaxrnn.rnn(cell, params, xs, initial_carry=carry0, seq_lengths=LENGTHS, reverse=reverse, impl=impl)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in final)

    return loss


@pytest.mark.parametrize("poison", [jnp.nan, jnp.inf, -1e30])
@pytest.mark.parametrize("impl", BACKENDS, ids=["reference", "xla", "pallas"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_poisoned_padding_changes_nothing(name, impl, poison):
    cell = CELLS[name]
    params = cell.init(jax.random.key(0), I)
    carry0 = jax.tree_util.tree_map(lambda z: 0.3 + z, cell.zero_carry(B))
    clean, poisoned = _inputs(poison)
    for reverse in (False, True):
        want_val, want_grads = jax.value_and_grad(_loss(cell, "reference", reverse), argnums=(0, 1, 2))(
            params, clean, carry0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            val, grads = jax.value_and_grad(_loss(cell, impl, reverse), argnums=(0, 1, 2))(params, poisoned, carry0)
        assert np.isfinite(val) and all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
        assert_close(val, want_val)
        assert_close(grads, want_grads)
        # the gradient at every padded input position is exactly zero
        padded = ~(np.arange(T)[None, :] < LENGTHS[:, None])
        assert np.all(np.asarray(grads[1])[padded] == 0.0)


@pytest.mark.parametrize("impl", BACKENDS, ids=["reference", "xla", "pallas"])
@pytest.mark.parametrize("shape", [(0, T, I), (B, 0, I), (0, 0, I)])
def test_empty_batches_and_sequences(impl, shape):
    cell = jaxrnn.LSTM(H)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ys, (h, c) = jaxrnn.rnn(cell, params, xs, impl=impl)
        lengths = np.zeros((shape[0],), np.int32)
        ys2, _ = jaxrnn.rnn(cell, params, xs, impl=impl, seq_lengths=lengths, reverse=True)
        grads = jax.grad(lambda p: jaxrnn.rnn(cell, p, xs, impl=impl)[0].sum())(params)
    assert ys.shape == shape[:2] + (H,) and ys2.shape == ys.shape
    assert h.shape == c.shape == (shape[0], H)
    assert np.all(np.asarray(h) == 0) and all(np.all(np.asarray(g) == 0) for g in grads)


def test_empty_batch_through_stack():
    stack = jaxrnn.Stack(jaxrnn.GRU(H), 2, bidirectional=True)
    params = stack.init(jax.random.key(0), I)
    ys, finals = stack.apply(params, jnp.ones((0, T, I)), seq_lengths=np.zeros((0,), np.int32))
    assert ys.shape == (0, T, 2 * H) and finals[1][0].h.shape == (0, H)


@pytest.mark.parametrize("name", ["lstm", "gru_before"])
def test_forward_mode_on_the_default_path(name):
    """jax.jvp / jacfwd / hessian work with impl="auto" (they fall back to the reference recurrence)."""
    cell = CELLS[name]
    params = cell.init(jax.random.key(0), I)
    xs = normal(jax.random.key(1), (2, 4, I))

    def f(xs):
        return jnp.sum(jnp.tanh(jaxrnn.rnn(cell, params, xs, seq_lengths=np.array([4, 2]))[0]))

    tangent = normal(jax.random.key(2), xs.shape)
    _, jvp = jax.jvp(f, (xs,), (tangent,))
    assert_close(jvp, jnp.vdot(jax.grad(f)(xs), tangent))
    assert_close(jax.jacfwd(f)(xs), jax.grad(f)(xs))
    hess = jax.hessian(f)(xs)
    assert_close(hess.reshape(xs.size, xs.size), hess.reshape(xs.size, xs.size).T)
    stack = jaxrnn.Stack(cell, 2)
    sp = stack.init(jax.random.key(3), I)
    g = lambda xs: stack.apply(sp, xs)[0].sum()  # noqa: E731
    assert_close(jax.jvp(g, (xs,), (tangent,))[1], jnp.vdot(jax.grad(g)(xs), tangent))


def test_forward_mode_with_a_custom_vjp_backend_says_what_to_do():
    cell = jaxrnn.LSTM(H)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((2, 3, I))
    with pytest.raises(ValueError, match=r"impl: 'xla' has a custom VJP.*impl='auto' or 'reference'"):
        jax.jvp(lambda x: jaxrnn.rnn(cell, params, x, impl="xla")[0].sum(), (xs,), (xs,))


@pytest.mark.parametrize("argname", ["reverse", "time_major"])
def test_traced_options_must_be_static(argname):
    cell = jaxrnn.GRU(H)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((2, 3, I))
    f = jax.jit(lambda x, flag: jaxrnn.rnn(cell, params, x, **{argname: flag})[0])
    with pytest.raises(TypeError, match=rf"{argname}: expected a Python bool, got a traced value.*static"):
        f(xs, True)


def test_callable_initialiser_rebuilt_per_call_does_not_recompile():
    xs = jnp.ones((2, 3, I))
    params = jaxrnn.LSTM(H).init(jax.random.key(0), I)
    before = jaxrnn.runner._rnn._cache_size()  # noqa: SLF001  (the runner's compiled-function cache)
    for _ in range(3):
        cell = jaxrnn.LSTM(H, kernel_init=lambda key, shape, dtype: jnp.zeros(shape, dtype))
        jaxrnn.rnn(cell, params, xs, impl="reference")
    assert jaxrnn.runner._rnn._cache_size() - before <= 1  # noqa: SLF001


SHARD_MAP = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, jaxrnn
    from jax.sharding import NamedSharding, PartitionSpec as P
    try:
        from jax import shard_map
    except ImportError:
        from jax.experimental.shard_map import shard_map
    mesh = jax.make_mesh((4,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    for cell in [jaxrnn.LSTM(5), jaxrnn.GRU(5)]:
        p = cell.init(jax.random.key(0), 3)
        xs = jax.random.normal(jax.random.key(1), (8, 6, 3))
        lengths = jnp.arange(8) % 7
        want = jaxrnn.rnn(cell, p, xs, seq_lengths=lengths, impl="reference")[0]
        for impl in ["auto", "reference"]:
            f = shard_map(lambda p, xs, l: jaxrnn.rnn(cell, p, xs, seq_lengths=l, impl=impl)[0],
                          mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=P("b"))
            got = f(p, jax.device_put(xs, NamedSharding(mesh, P("b"))), jax.device_put(lengths, NamedSharding(mesh, P("b"))))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            # gradients of replicated parameters: each device's share, summed by autodiff
            loss = lambda p, xs, l: jaxrnn.rnn(cell, p, xs, seq_lengths=l, impl=impl)[0].sum()
            g = shard_map(jax.grad(loss), mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=P())(p, xs, lengths)
            g_want = jax.grad(loss)(p, xs, lengths)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_want)):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    print("ok")
    """
)


def test_shard_map_over_the_batch():
    env = devices_env(4)
    out = subprocess.run([sys.executable, "-c", SHARD_MAP], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
