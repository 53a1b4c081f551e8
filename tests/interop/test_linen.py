"""jaxrnn.linen modules compute, drop out and train exactly like the functional core."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

import jaxrnn
from jaxrnn import interop
from jaxrnn import linen as jlinen
from jaxrnn.sequence import pool
from _util import assert_close, normal

IMPL = "reference"
I, H, B, T, V = 3, 4, 3, 5, 11
LENGTHS = jnp.array([T, 1, 3], jnp.int32)

CELLS = {
    "elman": jaxrnn.Elman(H),
    "lstm": jaxrnn.LSTM(H),
    "gru_before": jaxrnn.GRU(H),
    "gru_after": jaxrnn.GRU(H, reset="after"),
}


def _xs(seed=0, shape=(B, T, I)):
    return normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("name", list(CELLS))
def test_rnn_matches_core(name):
    cell = CELLS[name]
    xs = _xs()
    for reverse in (False, True):
        layer = jlinen.RNN(cell, reverse=reverse, impl=IMPL)
        variables = layer.init(jax.random.key(1), xs)
        params = variables["params"]["cell"]
        assert type(params) is type(cell.init(jax.random.key(0), I))  # the functional NamedTuple itself
        ys, carry = layer.apply(variables, xs, seq_lengths=LENGTHS, return_carry=True)
        assert_close((ys, carry), jaxrnn.rnn(cell, params, xs, seq_lengths=LENGTHS, reverse=reverse, impl=IMPL))


def test_stack_rnn_matches_core_and_dropout_uses_the_dropout_stream():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, bidirectional=True, dropout=0.5)
    model = jlinen.StackRNN(stack, impl=IMPL)
    xs = _xs(2)
    variables = model.init(jax.random.key(3), xs, seq_lengths=LENGTHS, deterministic=True)
    params = variables["params"]["layers"]
    assert all(isinstance(p, jaxrnn.LayerParams) for p in params) and len(params) == 2

    ys, finals = model.apply(variables, xs, seq_lengths=LENGTHS, deterministic=True, return_carry=True)
    assert_close((ys, finals), stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL))

    rngs = {"dropout": jax.random.key(4)}
    ys = model.apply(variables, xs, seq_lengths=LENGTHS, deterministic=False, rngs=rngs)
    key = model.apply(variables, rngs=rngs, method=lambda m: m.make_rng("dropout"))  # the key the call drew
    assert_close(ys, stack.apply(params, xs, seq_lengths=LENGTHS, dropout_key=key, impl=IMPL)[0])
    assert not np.allclose(ys, model.apply(variables, xs, seq_lengths=LENGTHS, deterministic=True))
    with pytest.raises(ValueError, match="deterministic"):  # flax's rule: set it on the module or the call
        model.apply(variables, xs)


def test_loads_converted_parameters_and_swaps_in_for_flax_bidirectional():
    """The one-line swap: nn.Bidirectional(nn.RNN(OptimizedLSTMCell)) → jaxrnn.linen.StackRNN, same weights."""
    flax_layer = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(H)), nn.RNN(nn.OptimizedLSTMCell(H)))
    xs = _xs(5)
    flax_vars = flax_layer.init(jax.random.key(6), xs, seq_lengths=LENGTHS)
    stack, params = interop.from_flax(flax_layer, flax_vars)
    ours = jlinen.StackRNN(stack, impl=IMPL)
    ys = ours.apply({"params": {"layers": params}}, xs, seq_lengths=LENGTHS)
    ys_ref = flax_layer.apply(flax_vars, xs, seq_lengths=LENGTHS)
    valid = (jnp.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    assert_close(jnp.where(valid, ys, 0.0), jnp.where(valid, ys_ref, 0.0))


class Classifier(nn.Module):
    """SimpleBiLSTM-style: embedding → bidirectional LSTM (jaxrnn.linen.StackRNN) → max pool → dense."""

    stack: jaxrnn.Stack

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(0.1), (V, I))
        self.encoder = jlinen.StackRNN(self.stack, impl=IMPL)
        self.head = nn.Dense(2)

    def __call__(self, tokens, lengths, deterministic=True):
        ys = self.encoder(self.embedding[tokens], seq_lengths=lengths, deterministic=deterministic)
        return self.head(pool(ys, lengths, "max"))


def _core_logits(stack, params, tokens, lengths, dropout_key):
    """The same model written on the functional core."""
    ys, _ = stack.apply(
        params["encoder"]["layers"], params["embedding"][tokens], seq_lengths=lengths, dropout_key=dropout_key, impl=IMPL
    )
    head = params["head"]
    return pool(ys, lengths, "max") @ head["kernel"] + head["bias"][None, :]


def test_train_state_steps_equal_core_steps():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, bidirectional=True, dropout=0.3)
    model = Classifier(stack)
    tokens = jax.random.randint(jax.random.key(7), (B, T), 0, V)
    labels = jnp.array([0, 1, 1])
    variables = model.init(jax.random.key(8), tokens, LENGTHS)
    tx = optax.adam(5e-2)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

    def flax_loss(params, key):
        logits = state.apply_fn({"params": params}, tokens, LENGTHS, deterministic=False, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def flax_step(state, key):
        loss, grads = jax.value_and_grad(flax_loss)(state.params, key)
        return state.apply_gradients(grads=grads), loss

    def dropout_key(key):  # the key StackRNN draws from the 'dropout' stream, at its path 'encoder'
        return model.apply(variables, rngs={"dropout": key}, method=lambda m: m.encoder.make_rng("dropout"))

    def core_loss(params, key):
        logits = _core_logits(stack, params, tokens, LENGTHS, dropout_key(key))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    params, opt_state = variables["params"], tx.init(variables["params"])
    losses, core_losses = [], []
    for step in range(4):
        key = jax.random.key(100 + step)
        state, loss = flax_step(state, key)
        core_value, grads = jax.value_and_grad(core_loss)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
        core_losses.append(float(core_value))
    assert_close(np.array(losses), np.array(core_losses), dtype=jnp.float32)
    assert_close(state.params, params, scale=10.0)  # a few Adam steps of f32 rounding
    assert losses[-1] < losses[0]


def test_rnn_sequence_dropout_only_when_asked():
    layers = (nn.RNN(nn.GRUCell(H)), nn.RNN(nn.GRUCell(H)))
    module = jlinen.RNNSequence(layers, dropout_rate=0.5)
    xs = _xs(9)
    variables = module.init(jax.random.key(0), xs)
    stack, params = interop.from_flax(module, variables)
    assert stack.dropout == 0.5 and stack.num_layers == 2
    assert_close(module.apply(variables, xs, seq_lengths=LENGTHS), stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)[0])
    dropped = module.apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(dropped, module.apply(variables, xs))


def test_linen_errors():
    xs = _xs()
    with pytest.raises(TypeError, match="cell: expected a jaxrnn cell"):
        jlinen.RNN("lstm").init(jax.random.key(0), xs)
    with pytest.raises(TypeError, match="stack: expected a jaxrnn.Stack"):
        jlinen.StackRNN(jaxrnn.LSTM(H)).init(jax.random.key(0), xs)
    with pytest.raises(ValueError, match="impl: expected one of"):
        jlinen.RNN(jaxrnn.LSTM(H), impl="cudnn").init(jax.random.key(0), xs)
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), bidirectional=True)
    one_layer = stack.init(jax.random.key(0), I)[0]
    with pytest.raises(TypeError, match=r"params\['layers'\]: expected a tuple of 1 LayerParams, got a single LayerParams"):
        jlinen.StackRNN(stack).apply({"params": {"layers": one_layer}}, xs)
    params = jaxrnn.LSTM(H).init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"params\['cell'\].w_ih: expected shape \(input_size, 20\)"):
        jlinen.RNN(jaxrnn.LSTM(H + 1)).apply({"params": {"cell": params}}, xs)
