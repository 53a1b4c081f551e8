"""jaxrnn.train.make_train_step: the loss and gradient norm it reports are measured before clipping
(against the global norm in NumPy and a hand-computed case), a non-finite loss or gradient is never applied,
and a second call with the same shapes does not trace again."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrnn import train
from _util import normal


def squared_error(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def problem(seed=0, n=8, d=3):
    kx, ky, kw = jax.random.split(jax.random.key(seed), 3)
    x = normal(kx, (n, d))
    y = normal(ky, (n,))
    params = {"w": normal(kw, (d,)), "b": jnp.zeros(())}
    return params, (x, y)


def assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


@jax.custom_vjp
def poison_gradient(x, flag):
    """The identity forward; backward, the cotangent becomes NaN where ``flag`` is 1 (the loss stays finite)."""
    return x


def _poison_fwd(x, flag):
    return x, flag


def _poison_bwd(flag, g):
    return jnp.where(flag > 0, jnp.nan, g), jnp.zeros_like(flag)


poison_gradient.defvjp(_poison_fwd, _poison_bwd)


# --------------------------------------------------------------------------
# Clipping, measured
# --------------------------------------------------------------------------
def test_grad_norm_is_the_global_norm_before_clipping():
    params, batch = problem()
    grads = jax.grad(squared_error)(params, batch)
    # The global norm in float64 NumPy (optax.global_norm, the usual reference, is deprecated).
    norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree_util.tree_leaves(grads))))
    max_norm = 0.25 * norm
    step = train.make_train_step(squared_error, optax.sgd(1.0), max_grad_norm=max_norm)
    new_params, _, metrics = step(params, step.init(params), batch)
    np.testing.assert_allclose(float(metrics.grad_norm), norm, rtol=1e-6)
    np.testing.assert_allclose(float(metrics.loss), float(squared_error(params, batch)), rtol=1e-6)
    assert bool(metrics.clipped) and bool(metrics.finite) and metrics.aux is None
    # SGD(1) on the clipped gradient: params - g * max_norm / |g|.
    expected = jax.tree_util.tree_map(lambda p, g: p - g * (max_norm / norm), params, grads)
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_grad_norm, clipped", [(None, False), (5.0, False), (4.0, True), (6.0, False)])
def test_clipped_hand_computed(max_grad_norm, clipped):
    """loss = w . a with a = (3, 4): the gradient is a, its norm 5; clipping at 4 scales it by 4/5."""
    a = jnp.array([3.0, 4.0])
    step = train.make_train_step(lambda p, batch: jnp.dot(p, batch), optax.sgd(1.0), max_grad_norm=max_grad_norm)
    w = jnp.array([1.0, -1.0])
    new_w, _, metrics = step(w, step.init(w), a)
    assert float(metrics.grad_norm) == pytest.approx(5.0)
    assert bool(metrics.clipped) is clipped
    scale = 4.0 / 5.0 if clipped else 1.0
    np.testing.assert_allclose(np.asarray(new_w), np.asarray(w - scale * a), rtol=1e-6)


# --------------------------------------------------------------------------
# A non-finite step is never applied
# --------------------------------------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_nan_in_batch_is_not_applied(max_grad_norm):
    params, (x, y) = problem()
    step = train.make_train_step(squared_error, optax.adam(1e-2), max_grad_norm=max_grad_norm)
    opt_state = step.init(params)
    params, opt_state, metrics = step(params, opt_state, (x, y))  # one good step: non-trivial Adam moments
    assert bool(metrics.finite)

    bad_y = y.at[3].set(jnp.nan)
    new_params, new_state, metrics = step(params, opt_state, (x, bad_y))
    assert not bool(metrics.finite) and not bool(metrics.clipped)
    assert np.isnan(float(metrics.loss))
    assert all_finite(new_params)
    assert_tree_equal(new_params, params)
    assert_tree_equal(new_state, opt_state)

    # The next finite step is applied as if the bad one had never happened.
    after, _, metrics = step(new_params, new_state, (x, y))
    expected, _, _ = step(params, opt_state, (x, y))
    assert bool(metrics.finite)
    assert_tree_equal(after, expected)


def test_loss_nan_at_a_chosen_step_is_not_applied():
    """A loss_fn that returns NaN (gradient finite) at step 3 of 5: only that step is skipped."""
    params, (x, y) = problem(1)

    def loss_fn(params, batch):
        x, y, bad = batch
        return jnp.where(bad, jnp.nan, squared_error(params, (x, y)))

    step = train.make_train_step(loss_fn, optax.sgd(0.1))
    opt_state = step.init(params)
    for i in range(5):
        before = params
        params, opt_state, metrics = step(params, opt_state, (x, y, jnp.asarray(i == 3)))
        assert bool(metrics.finite) is (i != 3)
        assert all_finite(params)
        if i == 3:
            assert_tree_equal(params, before)
        else:
            assert float(jnp.abs(params["w"] - before["w"]).max()) > 0


def test_nan_gradient_with_finite_loss_is_not_applied():
    params, (x, y) = problem(2)

    def loss_fn(params, batch):
        x, y, flag = batch
        return squared_error({"w": poison_gradient(params["w"], flag), "b": params["b"]}, (x, y))

    step = train.make_train_step(loss_fn, optax.adam(1e-2), max_grad_norm=1.0)
    opt_state = step.init(params)
    new_params, new_state, metrics = step(params, opt_state, (x, y, jnp.float32(1.0)))
    assert np.isfinite(float(metrics.loss)) and not np.isfinite(float(metrics.grad_norm))
    assert not bool(metrics.finite) and not bool(metrics.clipped)
    assert_tree_equal(new_params, params)
    assert_tree_equal(new_state, opt_state)
    new_params, _, metrics = step(params, opt_state, (x, y, jnp.float32(0.0)))
    assert bool(metrics.finite) and all_finite(new_params)


# --------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------
def test_second_call_with_same_shapes_does_not_retrace():
    traces = []

    def loss_fn(params, batch):
        traces.append(1)  # runs once per trace, never when the compiled step runs
        return squared_error(params, batch)

    params, batch = problem()
    step = train.make_train_step(loss_fn, optax.adam(1e-2), max_grad_norm=1.0)
    opt_state = step.init(params)
    params, opt_state, _ = step(params, opt_state, batch)
    first = len(traces)  # the first call traces (once or more: a shape check may trace too)
    assert first >= 1
    for seed in (3, 4):  # new values, same shapes and dtypes
        _, other = problem(seed)
        params, opt_state, _ = step(params, opt_state, other)
    assert len(traces) == first
    x, y = batch  # a new batch shape traces again: the counter counts traces
    step(params, opt_state, (x[:4], y[:4]))
    assert len(traces) > first


def test_has_aux_and_bad_arguments():
    params, batch = problem()
    step = train.make_train_step(lambda p, b: (squared_error(p, b), {"n": b[1].shape[0]}), optax.sgd(0.1), has_aux=True)
    _, _, metrics = step(params, step.init(params), batch)
    assert int(metrics.aux["n"]) == 8
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        train.make_train_step(None, optax.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer: expected an optax.GradientTransformation"):
        train.make_train_step(squared_error, "adam")
    with pytest.raises(ValueError, match="max_grad_norm"):
        train.make_train_step(squared_error, optax.sgd(0.1), max_grad_norm=0.0)
