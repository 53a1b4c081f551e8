"""The flax NNX wrappers compute, differentiate and train exactly like the functional core."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxrnn
from jaxrnn import nnx as jnnx
from _util import assert_close, normal

IMPL = "reference"
I, H, B, T = 3, 4, 3, 5
LENGTHS = jnp.array([T, 1, 3], jnp.int32)

CELLS = {
    "elman": jaxrnn.Elman(H),
    "lstm": jaxrnn.LSTM(H),
    "gru_before": jaxrnn.GRU(H),
    "gru_after": jaxrnn.GRU(H, reset="after"),
}


def _xs(seed=0, shape=(B, T, I)):
    return normal(jax.random.key(seed), shape)


def _random_carry(cell, seed):
    zero = cell.zero_carry((B,))
    keys = jax.random.split(jax.random.key(seed), len(zero))
    return type(zero)(*(normal(k, c.shape) for k, c in zip(keys, zero)))


def _param_leaves(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", list(CELLS))
def test_rnn_matches_core(name):
    cell = CELLS[name]
    model = jnnx.RNN(cell, I, rngs=nnx.Rngs(0), impl=IMPL)
    params = model.get_params()
    assert type(params) is type(cell.init(jax.random.key(0), I))
    xs, carry = _xs(), _random_carry(cell, 1)
    for reverse in (False, True):
        ys, final = model(xs, seq_lengths=LENGTHS, initial_carry=carry, reverse=reverse, return_carry=True)
        ys_ref, final_ref = jaxrnn.rnn(
            cell, params, xs, seq_lengths=LENGTHS, initial_carry=carry, reverse=reverse, impl=IMPL
        )
        assert_close((ys, final), (ys_ref, final_ref))
    assert_close(model(xs), jaxrnn.rnn(cell, params, xs, impl=IMPL)[0])


def test_rnn_time_major_and_given_params():
    cell = CELLS["lstm"]
    params = cell.init(jax.random.key(3), I)
    model = jnnx.RNN(cell, params=params, time_major=True, impl=IMPL)
    xs = _xs(shape=(T, B, I))
    assert_close(model(xs), jaxrnn.rnn(cell, params, xs, time_major=True, impl=IMPL)[0])


def test_param_count_matches_core():
    stack = jaxrnn.Stack(jaxrnn.GRU(H, reset="after"), num_layers=3, bidirectional=True, connection="highway")
    model = jnnx.StackRNN(stack, I, rngs=nnx.Rngs(0))
    expected = jaxrnn.count_params(stack.init(jax.random.key(1), I))
    assert sum(leaf.size for leaf in _param_leaves(model)) == expected
    assert jaxrnn.count_params(model.get_params()) == expected
    layer = jnnx.RNN(jaxrnn.GRU(H), I, rngs=nnx.Rngs(0))  # reset="before": no b_hn
    expected = jaxrnn.count_params(jaxrnn.GRU(H).init(jax.random.key(0), I))
    assert sum(leaf.size for leaf in _param_leaves(layer)) == expected


def test_stack_rnn_matches_core_and_dropout():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, bidirectional=True, dropout=0.5)
    model = jnnx.StackRNN(stack, I, rngs=nnx.Rngs(params=0, dropout=1), impl=IMPL)
    params, xs = model.get_params(), _xs()
    initial = tuple((_random_carry(stack.cell, 2 * k), _random_carry(stack.cell, 2 * k + 1)) for k in range(2))

    # Dropout on (the default): the mask comes from the module's own `dropout` stream.
    key = nnx.clone(model).rngs()
    ys, finals = model(xs, seq_lengths=LENGTHS, initial_carry=initial, return_carry=True)
    ys_ref, finals_ref = stack.apply(
        params, xs, seq_lengths=LENGTHS, initial_carry=initial, dropout_key=key, impl=IMPL
    )
    assert_close((ys, finals), (ys_ref, finals_ref))
    assert not np.allclose(model(xs), model(xs))  # a fresh mask per call

    # Dropout off: eval(), nnx.view and the call-time flag all give the plain stack.
    ys_eval = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)[0]
    assert_close(model(xs, seq_lengths=LENGTHS, deterministic=True), ys_eval)
    assert_close(nnx.view(model, deterministic=True)(xs, seq_lengths=LENGTHS), ys_eval)
    model.eval()
    assert model.deterministic
    assert_close(model(xs, seq_lengths=LENGTHS), ys_eval)


def test_stack_rnn_from_converted_params():
    """Parameters from elsewhere (here another init, as from_torch would give) are used as given."""
    stack = jaxrnn.Stack(jaxrnn.Elman(H, activation="relu"), num_layers=2)
    params = stack.init(jax.random.key(5), I)
    model = jnnx.StackRNN(stack, params=params, time_major=True, impl=IMPL)
    xs = _xs(shape=(T, B, I))
    assert_close(model(xs), stack.apply(params, xs, time_major=True, impl=IMPL)[0])


def _loss_core(stack, params, xs, targets):
    ys, _ = stack.apply(params, xs, seq_lengths=LENGTHS, impl=IMPL)
    return jnp.mean((ys[..., :1] - targets) ** 2)


def test_nnx_grad_equals_core_grad():
    stack = jaxrnn.Stack(jaxrnn.GRU(H, reset="after"), num_layers=2, bidirectional=True, connection="residual")
    model = jnnx.StackRNN(stack, I, rngs=nnx.Rngs(0), deterministic=True, impl=IMPL)
    xs, targets = _xs(1), _xs(2, (B, T, 1))

    grads = nnx.grad(lambda m: jnp.mean((m(xs, seq_lengths=LENGTHS)[..., :1] - targets) ** 2))(model)
    graphdef, _ = nnx.split(model)
    nnx_grads = nnx.merge(graphdef, grads).get_params()  # the State back in the core's structure
    core_grads = jax.grad(lambda p: _loss_core(stack, p, xs, targets))(model.get_params())
    assert_close(nnx_grads, core_grads)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(core_grads)) > 0


def test_optax_training_reduces_loss_like_core():
    """A few Adam steps through nnx.Optimizer; the trained parameters equal the same steps on the core."""
    cell = jaxrnn.LSTM(H)
    model = jnnx.RNN(cell, I, rngs=nnx.Rngs(0), impl=IMPL)
    xs = _xs(3)
    targets = jnp.cumsum(xs[..., :1], axis=1) / 3.0  # running sum of the first feature

    def loss_fn(m):
        return jnp.mean((m(xs)[..., :1] - targets) ** 2)

    tx = optax.adam(3e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    params = model.get_params()
    opt_state = tx.init(params)

    def core_loss(p):
        return jnp.mean((jaxrnn.rnn(cell, p, xs, impl=IMPL)[0][..., :1] - targets) ** 2)

    losses = []
    for _ in range(30):
        losses.append(float(train_step(model, optimizer)))
        grads = jax.grad(core_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert losses[-1] < 0.5 * losses[0], losses
    assert_close(model.get_params(), params, scale=10.0)  # 30 Adam steps of f32 rounding


def test_nnx_errors():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, dropout=0.5)
    with pytest.raises(TypeError, match="rngs: expected nnx.Rngs"):
        jnnx.RNN(jaxrnn.LSTM(H), I)
    with pytest.raises(TypeError, match="rngs: expected nnx.Rngs"):
        jnnx.StackRNN(stack, I, rngs=jax.random.key(0))
    with pytest.raises(ValueError, match="input_size: expected a positive int"):
        jnnx.RNN(jaxrnn.LSTM(H), 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="cell: expected a jaxrnn cell"):
        jnnx.RNN("lstm", I, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="stack: expected a jaxrnn.Stack"):
        jnnx.StackRNN(jaxrnn.LSTM(H), I, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl: expected one of"):
        jnnx.RNN(jaxrnn.LSTM(H), I, rngs=nnx.Rngs(0), impl="cudnn")
    params = jaxrnn.LSTM(H).init(jax.random.key(0), I)
    with pytest.raises(ValueError, match=r"params.w_ih: expected shape \(input_size, 20\).*got \(3, 16\)"):
        jnnx.RNN(jaxrnn.LSTM(H + 1), params=params)
    with pytest.raises(ValueError, match="input_size: 7 disagrees"):
        jnnx.RNN(jaxrnn.LSTM(H), 7, params=params)
    with pytest.raises(TypeError, match="params: expected a tuple of 2 LayerParams, got 1 layers"):
        jnnx.StackRNN(stack, params=stack.init(jax.random.key(0), I)[:1])
    bidir = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"params\[0\].bwd: expected backward-cell parameters"):
        jnnx.StackRNN(bidir, params=stack.init(jax.random.key(0), I))
    model = jnnx.StackRNN(stack, params=stack.init(jax.random.key(0), I), impl=IMPL)
    with pytest.raises(ValueError, match="rngs: dropout is on"):
        model(_xs())
    assert_close(model(_xs(), deterministic=True), stack.apply(model.get_params(), _xs(), impl=IMPL)[0])


# --------------------------------------------------------------------------
# Loading functional parameters; gradients back in the core's structure
# --------------------------------------------------------------------------
def test_params_from_state_equals_core_grad_by_name():
    """nnx.grad's State → tuple of LayerParams, equal to jax.grad of the core leaf for leaf, by name."""
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), num_layers=2, bidirectional=True, connection="highway")
    model = jnnx.StackRNN(stack, I, rngs=nnx.Rngs(0), deterministic=True, impl=IMPL)
    xs, targets = _xs(4), _xs(5, (B, T, 1))
    grads = nnx.grad(lambda m: jnp.mean((m(xs, seq_lengths=LENGTHS)[..., :1] - targets) ** 2))(model)
    got = jnnx.params_from_state(model, grads)
    want = jax.grad(lambda p: _loss_core(stack, p, xs, targets))(model.get_params())
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), (path_w, w) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)):
        assert path == path_w
        assert_close(g, w, err_msg=jax.tree_util.keystr(path))
    # The module's own parameter State converts the same way (and to the plain parameters).
    assert_close(jnnx.params_from_state(model, nnx.state(model, nnx.Param)), model.get_params())
    assert_close(jnnx.params_from_state(model, nnx.to_pure_dict(nnx.state(model, nnx.Param))), model.get_params())
    # Zipping the State's leaves with the parameters' leaves pairs them wrongly (sorted keys: b before w_ih).
    state_shapes = [leaf.shape for leaf in jax.tree.leaves(grads)]
    assert state_shapes != [leaf.shape for leaf in jax.tree.leaves(want)]

    cell = CELLS["gru_after"]
    layer = jnnx.RNN(cell, I, rngs=nnx.Rngs(1), impl=IMPL)
    grads = nnx.grad(lambda m: jnp.sum(m(xs, seq_lengths=LENGTHS) ** 2))(layer)
    want = jax.grad(lambda p: jnp.sum(jaxrnn.rnn(cell, p, xs, seq_lengths=LENGTHS, impl=IMPL)[0] ** 2))(layer.get_params())
    got = jnnx.params_from_state(layer, grads)
    assert type(got) is type(want)
    assert_close(got, want)


def test_params_from_state_errors():
    model = jnnx.RNN(CELLS["lstm"], I, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="model: expected a jaxrnn.nnx RNN or StackRNN, got Linear"):
        jnnx.params_from_state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {})
    with pytest.raises(ValueError, match=r"state: expected an entry \['params'\]\.w_ih.*found \['b', 'w_hh'\]"):
        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del state["params"]["w_ih"]
        jnnx.params_from_state(model, state)


def test_load_converted_torch_and_flax_parameters():
    """params= takes what from_torch / from_flax return; the module computes what the source computes."""
    torch = pytest.importorskip("torch")
    from flax import linen as nn

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
    stack, params = jaxrnn.from_torch(lstm)
    model = jnnx.StackRNN(stack, params=params, deterministic=True, impl=IMPL)
    xs = _xs(6)
    lengths = torch.tensor(np.array(LENGTHS), dtype=torch.int64)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.tensor(np.array(xs)), lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        out, _ = lstm(packed)
    ys_ref, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    assert_close(model(xs, seq_lengths=LENGTHS), ys_ref.numpy())

    flax_cell = nn.GRUCell(H)
    variables = nn.RNN(flax_cell).init(jax.random.key(0), xs)
    cell, cell_params = jaxrnn.from_flax(flax_cell, variables)  # the cell inside nn.RNN's variables
    layer = jnnx.RNN(cell, params=cell_params, impl=IMPL)
    valid = (jnp.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    ys_ref = nn.RNN(flax_cell).apply(variables, xs, seq_lengths=LENGTHS)
    assert_close(jnp.where(valid, layer(xs, seq_lengths=LENGTHS), 0.0), jnp.where(valid, ys_ref, 0.0))

    # The structures a conversion hands out, given to the wrong wrapper, get Stack.check_params's diagnosis.
    with pytest.raises(TypeError, match="got the parameters of a single cell"):
        jnnx.StackRNN(jaxrnn.Stack(cell), params=cell_params)
    with pytest.raises(TypeError, match=r"got a single LayerParams; wrap it: \(params,\)"):
        jnnx.StackRNN(stack, params=params[0])
    with pytest.raises(TypeError, match="got a pair of cell parameters"):
        one = jaxrnn.Stack(stack.cell, bidirectional=True)
        jnnx.StackRNN(one, params=(params[0].fwd, params[0].bwd))
