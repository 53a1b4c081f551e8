"""Every argument of the public API with a wrong type, a wrong shape and an edge value.

Each case asserts the exception type and that the message starts with (or
names) the argument, before any XLA error. Edge values that are valid (0, 1,
empty) are checked to work in the tests of their modules (empty batches in
``tests/core/test_robustness.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from jaxrnn import train

H, I, B, T = 4, 3, 2, 5
LSTM = jaxrnn.LSTM(H)
P = LSTM.init(jax.random.key(0), I)
XS = jnp.ones((B, T, I))
STACK = jaxrnn.Stack(jaxrnn.GRU(H), 2, bidirectional=True, connection="highway")
SP = STACK.init(jax.random.key(0), I)


def _bad_highway():
    layer = SP[1]
    return (SP[0], layer._replace(highway=layer.highway._replace(w=jnp.ones((3, 3)))))


CASES = [
    # --- cells -------------------------------------------------------------
    ("hidden_size", TypeError, lambda: jaxrnn.LSTM("4")),
    ("hidden_size", TypeError, lambda: jaxrnn.GRU(4.0)),
    ("hidden_size", TypeError, lambda: jaxrnn.Elman(True)),
    ("hidden_size", ValueError, lambda: jaxrnn.LSTM(0)),
    ("compute_dtype", TypeError, lambda: jaxrnn.LSTM(4, compute_dtype=jnp.int32)),
    ("compute_dtype", TypeError, lambda: jaxrnn.LSTM(4, compute_dtype="not-a-dtype")),
    ("kernel_init", ValueError, lambda: jaxrnn.LSTM(4, kernel_init="zeros!")),
    ("recurrent_init", ValueError, lambda: jaxrnn.LSTM(4, recurrent_init=3)),
    ("activation", ValueError, lambda: jaxrnn.Elman(4, activation="gelu")),
    ("reset", ValueError, lambda: jaxrnn.GRU(4, reset="middle")),
    ("input_size", ValueError, lambda: LSTM.init(jax.random.key(0), 0)),
    ("input_size", TypeError, lambda: LSTM.init(jax.random.key(0), 2.5)),
    ("dtype", TypeError, lambda: LSTM.init(jax.random.key(0), 3, dtype=jnp.int8)),
    # --- rnn ---------------------------------------------------------------
    ("cell", TypeError, lambda: jaxrnn.rnn("lstm", P, XS)),
    ("xs", TypeError, lambda: jaxrnn.rnn(LSTM, P, jnp.ones((B, T, I), jnp.int32))),
    ("xs", TypeError, lambda: jaxrnn.rnn(LSTM, P, [[1.0]])),
    ("xs", ValueError, lambda: jaxrnn.rnn(LSTM, P, jnp.ones((I,)))),
    ("xs", ValueError, lambda: jaxrnn.rnn(LSTM, P, jnp.ones((B, T, I + 1)))),
    ("params", TypeError, lambda: jaxrnn.rnn(LSTM, {"w": 1}, XS)),
    ("params.w_hh", ValueError, lambda: jaxrnn.rnn(LSTM, P._replace(w_hh=jnp.ones((H, H))), XS)),
    ("params.b", ValueError, lambda: jaxrnn.rnn(LSTM, P._replace(b=jnp.ones((3,))), XS)),
    ("params.w_ih", TypeError, lambda: jaxrnn.rnn(LSTM, P._replace(w_ih=P.w_ih.astype(jnp.int32)), XS)),
    ("initial_carry", TypeError, lambda: jaxrnn.rnn(LSTM, P, XS, initial_carry=jnp.zeros((B, H)))),
    ("initial_carry.c", ValueError, lambda: jaxrnn.rnn(LSTM, P, XS, initial_carry=jaxrnn.LSTMCarry(jnp.zeros((B, H)), jnp.zeros((B, 1))))),
    ("seq_lengths", TypeError, lambda: jaxrnn.rnn(LSTM, P, XS, seq_lengths=jnp.ones((B,)))),
    ("seq_lengths", ValueError, lambda: jaxrnn.rnn(LSTM, P, XS, seq_lengths=np.ones((B + 1,), int))),
    ("seq_lengths", ValueError, lambda: jaxrnn.rnn(LSTM, P, XS, seq_lengths=np.array([-1, 2]))),
    ("seq_lengths", ValueError, lambda: jaxrnn.rnn(LSTM, P, XS, seq_lengths=np.array([T + 1, 2]))),
    ("reverse", TypeError, lambda: jaxrnn.rnn(LSTM, P, XS, reverse="yes")),
    ("time_major", TypeError, lambda: jaxrnn.rnn(LSTM, P, XS, time_major=None)),
    ("impl", ValueError, lambda: jaxrnn.rnn(LSTM, P, XS, impl="fast")),
    ("carry_perturbation", TypeError, lambda: jaxrnn.rnn(LSTM, P, XS, carry_perturbation=jnp.zeros((B, T, H)))),
    ("impl", ValueError, lambda: jaxrnn.rnn(LSTM, P, XS, impl="xla", carry_perturbation=jaxrnn.LSTMCarry(jnp.zeros((B, T, H)), jnp.zeros((B, T, H))))),
    # --- Stack -------------------------------------------------------------
    ("cell", TypeError, lambda: jaxrnn.Stack("gru")),
    ("num_layers", ValueError, lambda: jaxrnn.Stack(LSTM, 0)),
    ("num_layers", TypeError, lambda: jaxrnn.Stack(LSTM, 2.0)),
    ("bidirectional", TypeError, lambda: jaxrnn.Stack(LSTM, 2, bidirectional="no")),
    ("connection", ValueError, lambda: jaxrnn.Stack(LSTM, 2, connection="skip")),
    ("dropout", TypeError, lambda: jaxrnn.Stack(LSTM, 2, dropout="0.5")),
    ("dropout", ValueError, lambda: jaxrnn.Stack(LSTM, 2, dropout=1.0)),
    ("dropout", ValueError, lambda: jaxrnn.Stack(LSTM, 2, dropout=float("nan"))),
    ("params", TypeError, lambda: STACK.apply(SP[0], XS)),  # a bare LayerParams
    ("params", TypeError, lambda: STACK.apply((SP[0].fwd, SP[0].bwd), XS)),  # a (fwd, bwd) pair
    ("params", TypeError, lambda: STACK.apply(SP[0].fwd, XS)),  # a cell's parameters
    ("params[1]", TypeError, lambda: STACK.apply((SP[0], "layer"), XS)),
    ("params[1].highway", ValueError, lambda: STACK.apply(_bad_highway(), XS)),
    ("params[0].bwd.w_hh", ValueError, lambda: STACK.apply((SP[0]._replace(bwd=SP[0].bwd._replace(w_hh=jnp.ones((2, 2)))), SP[1]), XS)),
    ("dropout_key", TypeError, lambda: STACK.apply(SP, XS, dropout_key=3)),
    ("xs", ValueError, lambda: STACK.apply(SP, jnp.ones((B, T, I + 2)))),
    ("initial_carry", TypeError, lambda: STACK.apply(SP, XS, initial_carry=jnp.zeros((B, H)))),
    ("carry_perturbation", TypeError, lambda: STACK.apply(SP, XS, carry_perturbation=jnp.zeros(3))),
    ("time_major", TypeError, lambda: STACK.apply(SP, XS, time_major="no")),
    # --- train -------------------------------------------------------------
    ("loss_fn", TypeError, lambda: train.make_train_step("loss", optax.adam(1e-3))),
    ("optimizer", TypeError, lambda: train.make_train_step(lambda p, b: 0.0, "adam")),
    ("max_grad_norm", ValueError, lambda: train.make_train_step(lambda p, b: 0.0, optax.adam(1e-3), max_grad_norm=0.0)),
    ("max_grad_norm", ValueError, lambda: train.make_train_step(lambda p, b: 0.0, optax.adam(1e-3), max_grad_norm=float("inf"))),
    ("max_grad_norm", TypeError, lambda: train.make_train_step(lambda p, b: 0.0, optax.adam(1e-3), max_grad_norm="1")),
]


@pytest.mark.parametrize("name, exc, call", CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_argument_is_named(name, exc, call):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{name}:") or f"{name}:" in message.split("\n")[0], message
    assert "expected" in message, message


def test_numpy_integers_are_sizes():
    cell = jaxrnn.LSTM(np.int64(4))
    assert cell.hidden_size == 4 and type(cell.hidden_size) is int
    params = cell.init(jax.random.key(0), np.int32(3))
    stack = jaxrnn.Stack(cell, np.int16(2))
    assert params.w_ih.shape == (3, 16) and stack.num_layers == 2


def test_train_step_rejects_a_non_scalar_loss():
    step = train.make_train_step(lambda p, b: p * b, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar loss, got shape \(3,\)"):
        step(jnp.ones(3), step.init(jnp.ones(3)), jnp.ones(3))


ANALYSIS_CASES = [
    ("loss_fn", TypeError, dict(loss_fn=lambda y: None)),
    ("loss_fn", TypeError, dict(loss_fn=lambda y: (jnp.sum(y), 1.0))),
    ("loss_fn", ValueError, dict(loss_fn=lambda y: y)),
    ("loss_fn", TypeError, dict(loss_fn="sum")),
    ("loss_at", ValueError, dict(loss_at="first")),
]


@pytest.mark.parametrize("name, exc, kwargs", ANALYSIS_CASES, ids=[c[0] + "-" + str(i) for i, c in enumerate(ANALYSIS_CASES)])
def test_analysis_arguments_are_named(name, exc, kwargs):
    from jaxrnn import analysis

    with pytest.raises(exc, match=rf"^{name}: expected"):
        analysis.grad_norms_through_time(LSTM, P, XS, **kwargs)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_memory_horizon_threshold_is_a_ratio(threshold):
    from jaxrnn import analysis

    norms = analysis.grad_norms_through_time(LSTM, P, XS)
    with pytest.raises(ValueError, match=r"^threshold: expected a gradient ratio in \(0, 1\)"):
        analysis.memory_horizon(norms.h, threshold)


@pytest.mark.parametrize("field", ["kernel_init", "recurrent_init"])
def test_callable_initialisers_get_the_expected_signature_in_errors(field):
    cell = jaxrnn.LSTM(H, **{field: lambda key, shape: jnp.zeros(shape)})  # missing dtype
    with pytest.raises(TypeError, match=rf"^{field}: expected a callable init\(key, shape, dtype\)"):
        cell.init(jax.random.key(0), I)
    cell = jaxrnn.LSTM(H, **{field: lambda key, shape, dtype: jnp.zeros((2, 2), dtype)})
    with pytest.raises(ValueError, match=rf"^{field}: expected .* got an array of shape \(2, 2\)"):
        cell.init(jax.random.key(0), I)
    good = jaxrnn.LSTM(H, **{field: lambda key, shape, dtype: jnp.full(shape, 0.5, dtype)})
    params = good.init(jax.random.key(0), I)
    assert np.all(np.asarray(params.w_ih if field == "kernel_init" else params.w_hh) == 0.5)
