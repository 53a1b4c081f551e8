"""jaxrnn.train.clipping: a ClippedOptimizer is optax's clip-then-optimise chain (same updates, same
state as the train step that takes its clipping over), and split_clipping takes it apart."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrnn import train
from jaxrnn.train.clipping import ClippedOptimizer, split_clipping


def test_same_updates_as_the_optax_chain():
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([30.0, -40.0, 0.0])}
    ours = ClippedOptimizer(optax.adam(1e-2), 1.0)
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    assert isinstance(ours, optax.GradientTransformation)
    u1, _ = ours.update(grads, ours.init(params), params)
    u2, _ = theirs.update(grads, theirs.init(params), params)
    np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u2["w"]), rtol=1e-6)


def test_state_is_the_train_steps_and_split_round_trips():
    params = {"w": jnp.ones(3), "b": jnp.zeros(())}
    adam = optax.adam(1e-3)
    optimizer = ClippedOptimizer(adam, 0.5)
    inner, max_grad_norm = split_clipping(optimizer)
    assert inner is adam and max_grad_norm == 0.5
    step = train.make_train_step(lambda p, b: jnp.sum(p["w"] * b) + p["b"], inner, max_grad_norm=max_grad_norm)
    mine, its = optimizer.init(params), step.init(params)
    assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(its)
    # So optimizer.init's state drives the step, which measures the clipping.
    _, _, metrics = step(params, mine, jnp.array([3.0, 0.0, 4.0]))
    assert float(metrics.grad_norm) == pytest.approx(np.sqrt(9 + 16 + 1)) and bool(metrics.clipped)
    assert split_clipping(adam) == (adam, None)


def test_copy_repr_and_bad_arguments():
    optimizer = ClippedOptimizer(optax.sgd(0.1), 2.0)
    for clone in (copy.copy(optimizer), copy.deepcopy(optimizer)):
        assert isinstance(clone, ClippedOptimizer) and clone.max_grad_norm == 2.0
    assert "max_grad_norm=2.0" in repr(optimizer)
    with pytest.raises(TypeError, match="optimizer: expected an optax.GradientTransformation"):
        ClippedOptimizer("adam", 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            ClippedOptimizer(optax.sgd(0.1), bad)
