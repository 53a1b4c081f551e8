"""flax's nn.RNN / nn.Bidirectional convert to a Stack and back exactly; outputs equal flax's on padded batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxrnn
from jaxrnn import interop
from jaxrnn import linen as jlinen
from _util import assert_close, normal

IMPL = "reference"
I, H, B, T = 3, 5, 4, 6
LENGTHS = jnp.array([T, 1, 0, 4], jnp.int32)  # unsorted, with a length-1 and an empty sequence

CELLS = {
    "OptimizedLSTMCell": lambda: nn.OptimizedLSTMCell(H),
    "LSTMCell": lambda: nn.LSTMCell(H),
    "GRUCell": lambda: nn.GRUCell(H),
    "SimpleCell": lambda: nn.SimpleCell(H),
    "SimpleCell_relu": lambda: nn.SimpleCell(H, activation_fn=nn.relu),
}


def _xs(seed=1, shape=(B, T, I)):
    return normal(jax.random.key(seed), shape)


def _randomise(variables, seed):
    """Every leaf random (biases included), so that no parameter is checked only at its zero init."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.5 * normal(k, x.shape) for k, x in zip(keys, leaves)])


def _valid(ys, lengths=LENGTHS):
    mask = (jnp.arange(ys.shape[1])[None, :] < lengths[:, None])[..., None]
    return jnp.where(mask, ys, 0.0)


def _bidirectional(name):
    return nn.Bidirectional(nn.RNN(CELLS[name]()), nn.RNN(CELLS[name]()))


def _assert_identical(a, b):
    """Same tree structure and bitwise-equal leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def _carry_rows(tree, rows):
    return jax.tree.map(lambda c: c[rows], tree)


@pytest.mark.parametrize("name", list(CELLS))
def test_bidirectional_matches_flax_on_padded_batch(name):
    """Outputs at valid positions and both final carries equal flax's; the round trip gives flax's variables back."""
    module = _bidirectional(name)
    xs = _xs()
    variables = _randomise(module.init(jax.random.key(0), xs, seq_lengths=LENGTHS), seed=2)
    (carry_f, carry_b), ys_ref = module.apply(variables, xs, seq_lengths=LENGTHS, return_carry=True)

    stack, params = interop.from_flax(module, variables)
    assert stack.bidirectional and stack.num_layers == 1 and len(params) == 1
    ys, finals = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)
    assert_close(_valid(ys), _valid(ys_ref))
    assert_close(ys, _valid(ys))  # jaxrnn zeroes padded outputs
    nonempty = np.asarray(LENGTHS) > 0  # flax's carry of an empty sequence indexes step -1
    assert_close(_carry_rows(interop.carry_to_flax(stack, finals), nonempty), _carry_rows((carry_f, carry_b), nonempty))

    back, back_vars = interop.to_flax(stack, params)
    assert isinstance(back, nn.Bidirectional)
    _assert_identical(back_vars, variables)
    assert_close(_valid(back.apply(back_vars, xs, seq_lengths=LENGTHS)), _valid(ys_ref))


@pytest.mark.parametrize("name", list(CELLS))
def test_rnn_matches_flax_and_round_trips(name):
    module = nn.RNN(CELLS[name]())
    xs = _xs(3)
    variables = _randomise(module.init(jax.random.key(0), xs), seed=4)
    carry_ref, ys_ref = module.apply(variables, xs, seq_lengths=LENGTHS, return_carry=True)

    stack, params = interop.from_flax(module, variables)
    assert not stack.bidirectional and stack.num_layers == 1
    ys, finals = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)
    assert_close(_valid(ys), _valid(ys_ref))
    nonempty = np.asarray(LENGTHS) > 0
    assert_close(_carry_rows(interop.carry_to_flax(stack, finals), nonempty), _carry_rows(carry_ref, nonempty))

    back, back_vars = interop.to_flax(stack, params)
    assert isinstance(back, nn.RNN)
    _assert_identical(back_vars, variables)

    # The initial carry converts from flax's structure, too.
    initial = jax.tree.map(lambda c: normal(jax.random.key(5), c.shape), carry_ref)
    ys_ref = module.apply(variables, xs, initial_carry=initial)
    ys = stack.apply(params, xs, initial_carry=interop.carry_from_flax(stack, initial), impl=IMPL)[0]
    assert_close(ys, ys_ref)


def test_time_major_rnn():
    module = nn.RNN(nn.GRUCell(H), time_major=True)
    xs = _xs(6, (T, B, I))
    variables = _randomise(module.init(jax.random.key(0), xs), seed=7)
    stack, params = interop.from_flax(module, variables)
    assert_close(stack.apply(params, xs, time_major=module.time_major, impl=IMPL)[0], module.apply(variables, xs))


def test_cells_round_trip_exactly():
    """cell: flax → jaxrnn → flax gives identical variables (SimpleCell(residual=True) excepted: see to_flax)."""
    xs = _xs(8)
    for name, make in CELLS.items():
        module = make()
        carry = module.initialize_carry(jax.random.key(0), (B, I))
        variables = _randomise(module.init(jax.random.key(0), carry, xs[:, 0]), seed=9)
        cell, params = interop.from_flax(module, variables)
        back, back_vars = interop.to_flax(cell, params)
        _assert_identical(back_vars, variables)
        _, y_ref = module.apply(variables, carry, xs[:, 0])
        _, y = back.apply(back_vars, carry, xs[:, 0])
        assert_close(y, y_ref, err_msg=name)

    residual = nn.SimpleCell(H, residual=True)
    carry = residual.initialize_carry(jax.random.key(0), (B, I))
    variables = _randomise(residual.init(jax.random.key(0), carry, xs[:, 0]), seed=10)
    back, back_vars = interop.to_flax(*interop.from_flax(residual, variables))
    assert not back.residual
    assert_close(back_vars["params"]["h"]["kernel"], variables["params"]["h"]["kernel"] + jnp.eye(H))
    assert_close(back.apply(back_vars, carry, xs[:, 0])[1], residual.apply(variables, carry, xs[:, 0])[1])


def test_jaxrnn_to_flax_to_jaxrnn_multilayer():
    """A 3-layer bidirectional stack → RNNSequence of nn.Bidirectional → the same stack and parameters."""
    stack = jaxrnn.Stack(jaxrnn.GRU(H, reset="after"), num_layers=3, bidirectional=True, dropout=0.25)
    params = stack.init(jax.random.key(11), I)
    module, variables = interop.to_flax(stack, params)
    assert isinstance(module, jlinen.RNNSequence) and len(module.layers) == 3
    assert sorted(variables["params"]) == ["layers_0", "layers_1", "layers_2"]
    xs = _xs(12)
    carries, ys_ref = module.apply(variables, xs, seq_lengths=LENGTHS, return_carry=True)
    ys, finals = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)
    assert_close(ys, ys_ref)  # RNNSequence zeroes padded outputs, as jaxrnn does
    nonempty = np.asarray(LENGTHS) > 0
    assert_close(_carry_rows(interop.carry_to_flax(stack, finals), nonempty), _carry_rows(carries, nonempty))

    again, params_again = interop.from_flax(module, variables)
    assert again == stack
    _assert_identical(params_again, params)


def test_compact_parent_names():
    """In an @nn.compact parent the cells are registered there, as OptimizedLSTMCell_0/_1, next to other layers."""

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, xs, lengths):
            xs = nn.Dense(I)(xs)
            return nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(H)), nn.RNN(nn.OptimizedLSTMCell(H)))(
                xs, seq_lengths=lengths
            )

    xs = _xs(13)
    variables = _randomise(Encoder().init(jax.random.key(0), xs, LENGTHS), seed=14)
    assert {"Dense_0", "OptimizedLSTMCell_0", "OptimizedLSTMCell_1"} == set(variables["params"])
    ys_ref = Encoder().apply(variables, xs, LENGTHS)

    stack, params = interop.from_flax(_bidirectional("OptimizedLSTMCell"), variables)
    dense = variables["params"]["Dense_0"]
    hidden = xs @ dense["kernel"] + dense["bias"][None, None, :]
    assert_close(_valid(stack.apply(params, hidden, seq_lengths=LENGTHS, impl=IMPL)[0]), _valid(ys_ref))
    np.testing.assert_array_equal(
        params[0].bwd.w_ih[:, :H], variables["params"]["OptimizedLSTMCell_1"]["ii"]["kernel"]
    )


def test_parent_attribute_names_and_scan_lifted_hand_written_model():
    """The variables inside a parent's params (setup attributes), and flax's sst2-style hand-written
    bidirectional LSTM: an nn.scan-lifted OptimizedLSTMCell_0 under forward_lstm / backward_lstm,
    with flip_sequences for the backward direction."""

    class ScanLSTM(nn.Module):
        @functools.partial(
            nn.transforms.scan, variable_broadcast="params", in_axes=1, out_axes=1, split_rngs={"params": False}
        )
        @nn.compact
        def __call__(self, carry, x):
            return nn.OptimizedLSTMCell(H)(carry, x)

    class HandWrittenBiLSTM(nn.Module):
        def setup(self):
            self.forward_lstm = ScanLSTM()
            self.backward_lstm = ScanLSTM()

        def __call__(self, xs, lengths):
            zeros = (jnp.zeros((xs.shape[0], H)), jnp.zeros((xs.shape[0], H)))
            _, forward = self.forward_lstm(zeros, xs)
            flip = functools.partial(nn.recurrent.flip_sequences, seq_lengths=lengths, num_batch_dims=1, time_major=False)
            _, backward = self.backward_lstm(zeros, flip(xs))
            return jnp.concatenate([forward, flip(backward)], axis=-1)

    class Classifier(nn.Module):
        def setup(self):
            self.encoder = HandWrittenBiLSTM()

        def __call__(self, xs, lengths):
            return self.encoder(xs, lengths)

    xs = _xs(15)
    variables = _randomise(Classifier().init(jax.random.key(0), xs, LENGTHS), seed=16)
    assert set(variables["params"]["encoder"]["forward_lstm"]) == {"OptimizedLSTMCell_0"}
    ys_ref = Classifier().apply(variables, xs, LENGTHS)

    module = _bidirectional("OptimizedLSTMCell")
    for tree in (variables, variables["params"]["encoder"]):  # the whole tree (one key) or the subtree
        stack, params = interop.from_flax(module, tree)
        assert_close(_valid(stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)[0]), _valid(ys_ref))

    # A setup attribute holding nn.Bidirectional: params['bi']['forward_rnn']['cell'].
    class Parent(nn.Module):
        def setup(self):
            self.bi = _bidirectional("GRUCell")

        def __call__(self, xs, lengths):
            return self.bi(xs, seq_lengths=lengths)

    variables = _randomise(Parent().init(jax.random.key(0), xs, LENGTHS), seed=17)
    stack, params = interop.from_flax(_bidirectional("GRUCell"), variables)
    assert_close(_valid(stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)[0]), _valid(Parent().apply(variables, xs, LENGTHS)))


def test_flax_bidirectional_reverses_padded_sequences_correctly():
    """The accurate claim (docs/migrating.md): flax's nn.Bidirectional reverses each sequence's valid part
    (its backward output at valid positions equals jaxrnn's and a per-sequence run's); what it does not do
    is zero the outputs at padded positions. A hand-rolled scan over the padded array returns the carry
    after the padding."""
    module = _bidirectional("LSTMCell")
    xs = _xs(18)
    variables = _randomise(module.init(jax.random.key(0), xs, seq_lengths=LENGTHS), seed=19)
    ys_flax = module.apply(variables, xs, seq_lengths=LENGTHS)
    stack, params = interop.from_flax(module, variables)
    ys = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)[0]
    assert_close(_valid(ys_flax), _valid(ys))
    for b, n in enumerate(np.asarray(LENGTHS)):  # per-sequence reference: the unpadded sequence alone
        if n:
            alone = stack.apply(params, xs[b, :n], impl=IMPL)[0]
            assert_close(ys_flax[b, :n], alone)
    padded = ~np.asarray(_valid(jnp.ones((B, T, 1))), bool)[..., 0]
    assert np.abs(np.asarray(ys_flax)[padded]).max() > 1e-3  # flax leaves non-zero values at padding
    assert np.all(np.asarray(ys)[padded] == 0)

    # A hand-rolled scan (no seq_lengths) ends on the padding: its final carry differs from the last valid one.
    cell_module = nn.LSTMCell(H)
    cell_vars = {"params": variables["params"]["forward_rnn"]["cell"]}
    carry = cell_module.initialize_carry(jax.random.key(0), (B, I))
    scanned, _ = jax.lax.scan(lambda c, x: cell_module.apply(cell_vars, c, x), carry, jnp.swapaxes(xs, 0, 1))
    finals = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)[1]
    c_valid, h_valid = interop.carry_to_flax(stack, finals)[0]
    assert np.abs(np.asarray(scanned[1] - h_valid)[1]).max() > 1e-3  # the length-1 sequence
    assert_close(scanned[1][0], h_valid[0])  # the full-length one agrees


def test_converted_lstm_keeps_flax_biases_and_reinit_uses_forget_bias_one():
    module = _bidirectional("OptimizedLSTMCell")
    variables = module.init(jax.random.key(0), _xs(), seq_lengths=LENGTHS)  # flax's init: zero biases
    stack, params = interop.from_flax(module, variables)
    np.testing.assert_array_equal(params[0].fwd.b, np.zeros(4 * H))  # copied exactly, forget gate included
    fresh = stack.init(jax.random.key(0), I)[0].fwd.b
    np.testing.assert_array_equal(fresh[H : 2 * H], np.ones(H))  # jaxrnn's re-init: forget bias 1
    np.testing.assert_array_equal(jaxrnn.LSTM(H, forget_bias=0.0).init(jax.random.key(0), I).b, np.zeros(4 * H))


def test_from_flax_errors_list_found_keys_and_expected_path():
    bi = _bidirectional("OptimizedLSTMCell")
    with pytest.raises(
        ValueError,
        match=r"expected params\['encoder'\]\['forward_rnn'\].*params\['encoder'\]\['forward_rnn'\]\['cell'\].*"
        r"found keys \['bar', 'foo'\] at params\['encoder'\]",
    ):
        interop.from_flax(bi, {"params": {"encoder": {"foo": 1, "bar": 2}}})
    with pytest.raises(
        ValueError,
        match=r"expected params\['enc'\]\['ir'\]\['kernel'\] for GRUCell.*"
        r"params\['enc'\]\['cell'\].*found keys \['x', 'y'\] at params\['enc'\]",
    ):
        interop.from_flax(nn.RNN(nn.GRUCell(H)), {"enc": {"x": 1, "y": 2}})
    with pytest.raises(ValueError, match=r"expected params\['cell'\]\['ir'\]\['kernel'\].*found keys \['bias'\] at params\['cell'\]\['ir'\]"):
        interop.from_flax(nn.RNN(nn.GRUCell(H)), {"cell": {"ir": {"bias": jnp.zeros(H)}}})
    # A different mistake, a different message: a missing parameter of an otherwise fine cell.
    variables = bi.init(jax.random.key(0), _xs(), seq_lengths=LENGTHS)
    params = jax.tree.map(lambda x: x, variables["params"])
    del params["backward_rnn"]["cell"]["hg"]
    with pytest.raises(
        ValueError,
        match=r"no parameter \['hg'\]\['kernel'\] for OptimizedLSTMCell at params\['backward_rnn'\]\['cell'\] "
        r"\(found keys \['hf', 'hi', 'ho', 'if', 'ig', 'ii', 'io'\]",
    ):
        interop.from_flax(bi, params)

    class Two(nn.Module):
        @nn.compact
        def __call__(self, xs):
            xs = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(H)), nn.RNN(nn.OptimizedLSTMCell(H)))(xs)
            return nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(H)), nn.RNN(nn.OptimizedLSTMCell(H)))(xs)

    two = Two().init(jax.random.key(0), _xs())
    with pytest.raises(ValueError, match=r"expected 2 OptimizedLSTMCell_N entries.*found 4"):
        interop.from_flax(bi, two)
    flat = two["params"]
    stack, params = interop.from_flax(bi, {k: flat[k] for k in ("OptimizedLSTMCell_2", "OptimizedLSTMCell_3")})
    np.testing.assert_array_equal(params[0].fwd.w_hh[:, :H], flat["OptimizedLSTMCell_2"]["hi"]["kernel"])

    with pytest.raises(TypeError, match=r"module.backward_rnn.cell: expected a flax.linen .*got MGUCell"):
        interop.from_flax(nn.Bidirectional(nn.RNN(nn.GRUCell(H)), nn.RNN(nn.MGUCell(H))), {})
    with pytest.raises(ValueError, match="module.reverse: expected False"):
        interop.from_flax(nn.RNN(nn.GRUCell(H), reverse=True), {})
    with pytest.raises(ValueError, match="module.merge_fn: expected concatenation"):
        interop.from_flax(nn.Bidirectional(nn.RNN(nn.GRUCell(H)), nn.RNN(nn.GRUCell(H)), merge_fn=jnp.add), {})
    mixed = nn.Bidirectional(nn.RNN(nn.GRUCell(H)), nn.RNN(nn.GRUCell(H + 1)))
    with pytest.raises(ValueError, match="module: expected one cell configuration in every layer and direction"):
        interop.from_flax(mixed, mixed.init(jax.random.key(0), _xs()))


def test_to_flax_and_carry_errors():
    with pytest.raises(ValueError, match=r"cell_or_stack: expected GRU\(reset='after'\)"):
        interop.to_flax(jaxrnn.GRU(H), jaxrnn.GRU(H).init(jax.random.key(0), I))
    elman = jaxrnn.Elman(H, activation="linear")
    with pytest.raises(ValueError, match="cell_or_stack: expected an Elman activation"):
        interop.to_flax(elman, elman.init(jax.random.key(0), I))
    residual = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, connection="residual")
    with pytest.raises(ValueError, match="cell_or_stack.connection: expected None"):
        interop.to_flax(residual, residual.init(jax.random.key(0), I))
    with pytest.raises(TypeError, match="cell_or_stack: expected a jaxrnn cell or Stack, got str"):
        interop.to_flax("lstm", None)
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), bidirectional=True)
    layer = stack.init(jax.random.key(0), I)[0]
    with pytest.raises(TypeError, match="params: expected a tuple of 1 LayerParams, got a single LayerParams"):
        interop.to_flax(stack, layer)  # Stack.check_params names the structure mistake
    carry = jaxrnn.LSTMCarry(jnp.zeros((B, H)), jnp.zeros((B, H)))
    with pytest.raises(TypeError, match=r"carries\[0\]: expected a \(forward, backward\) pair"):
        interop.carry_to_flax(stack, (carry,))
    with pytest.raises(TypeError, match="carries: expected a tuple of 1 per-layer carries, got LSTMCarry"):
        interop.carry_to_flax(stack, carry)
    with pytest.raises(TypeError, match=r"carry\[1\]: expected flax's LSTM carry \(c, h\)"):
        interop.carry_from_flax(stack, ((carry.c, carry.h), carry.h))
    with pytest.raises(TypeError, match="carry_or_stack: expected a jaxrnn Stack when carries are given"):
        interop.carry_to_flax(carry, (carry,))
