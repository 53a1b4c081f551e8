"""PyTorch and flax linen weights loaded into jaxrnn compute what the source computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxrnn
from jaxrnn import interop
from _util import assert_close, normal

torch = pytest.importorskip("torch")

IMPL = "reference"
KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
I, H, B, T = 3, 5, 4, 6


def _torch_module(kind, num_layers=1, bidirectional=False, bias=True, batch_first=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first)
    if kind.startswith("rnn"):
        return torch.nn.RNN(I, H, nonlinearity=kind[4:], **kw)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](I, H, **kw)


def _np(t):
    return t.detach().numpy()


def _random_state(module, batch, seed):
    """Random ``h_0`` (and ``c_0``) in PyTorch's layout ``(L * D, B, H)``."""
    g = torch.Generator().manual_seed(seed)
    shape = (module.num_layers * (2 if module.bidirectional else 1), batch, H)
    h0 = torch.randn(shape, generator=g)
    return (h0, torch.randn(shape, generator=g)) if module.mode == "LSTM" else (h0,)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# --------------------------------------------------------------------------
# PyTorch: every cell x depth/direction x bias x layout
# --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_matches_torch(kind, num_layers, bidirectional, bias, batch_first):
    module = _torch_module(kind, num_layers, bidirectional, bias, batch_first)
    torch.manual_seed(1)
    x = torch.randn((B, T, I) if batch_first else (T, B, I))
    state = _random_state(module, B, seed=2)
    with torch.no_grad():
        y_ref, final_ref = module(x, state if len(state) == 2 else state[0])

    stack, params = interop.from_torch(module)
    assert isinstance(stack, jaxrnn.Stack) and len(params) == num_layers
    initial = interop.carry_from_torch(stack, *state)
    ys, finals = stack.apply(
        params, jnp.asarray(_np(x)), initial_carry=initial, time_major=not module.batch_first, impl=IMPL
    )
    assert_close(ys, _np(y_ref))
    assert_close(_as_tuple(interop.carry_to_torch(stack, finals)), tuple(map(_np, _as_tuple(final_ref))))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_packed_sequence(kind, batch_first):
    """2-layer bidirectional on a padded batch: PyTorch sees a packed sequence, jaxrnn ``seq_lengths``."""
    module = _torch_module(kind, 2, True, True, batch_first, seed=3)
    lengths = np.array([4, 1, T, 3], np.int64)  # unsorted, with a length-1 sequence
    torch.manual_seed(4)
    x = torch.randn((B, T, I) if batch_first else (T, B, I))  # padding holds garbage, not zeros
    state = _random_state(module, B, seed=5)
    pack = torch.nn.utils.rnn.pack_padded_sequence(
        x, torch.as_tensor(lengths), batch_first=batch_first, enforce_sorted=False
    )
    with torch.no_grad():
        out, final_ref = module(pack, state if len(state) == 2 else state[0])
    y_ref, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=T)

    stack, params = interop.from_torch(module)
    ys, finals = stack.apply(
        params,
        jnp.asarray(_np(x)),
        seq_lengths=jnp.asarray(lengths, jnp.int32),
        initial_carry=interop.carry_from_torch(stack, *state),
        time_major=not batch_first,
        impl=IMPL,
    )
    assert_close(ys, _np(y_ref))  # zeros at padded steps on both sides
    for got, want in zip(_as_tuple(interop.carry_to_torch(stack, finals)), _as_tuple(final_ref)):
        for k in range(4):  # per layer and direction
            assert_close(got[k], _np(want[k]), err_msg=f"layer {k // 2}, direction {k % 2}")


def test_from_torch_gru_update_gate_is_negated():
    """jaxrnn's update gate from the converted weights is exactly PyTorch's ``1 - z``."""
    module = _torch_module("gru", seed=6)
    torch.manual_seed(7)
    x, h = torch.randn(B, I), torch.randn(B, H)
    w_ih, w_hh = module.weight_ih_l0, module.weight_hh_l0
    b_ih, b_hh = module.bias_ih_l0, module.bias_hh_l0
    with torch.no_grad():  # PyTorch's documented z = σ(W_iz x + b_iz + W_hz h + b_hz)
        z = torch.sigmoid(x @ w_ih[H : 2 * H].T + b_ih[H : 2 * H] + h @ w_hh[H : 2 * H].T + b_hh[H : 2 * H])

    stack, (layer,) = interop.from_torch(module)
    p, cell = layer.fwd, stack.cell
    assert cell.reset == "after"
    pre = cell.input_projection(p, jnp.asarray(_np(x))) + jnp.asarray(_np(h)) @ p.w_hh
    u = jax.nn.sigmoid(pre[:, H : 2 * H])
    assert_close(u, 1.0 - _np(z))

    # Undoing the negation gives a cell that disagrees with PyTorch: the test can fail.
    unnegated = p._replace(
        w_ih=p.w_ih.at[:, H : 2 * H].multiply(-1.0),
        w_hh=p.w_hh.at[:, H : 2 * H].multiply(-1.0),
        b=p.b.at[H : 2 * H].multiply(-1.0),
    )
    with torch.no_grad():
        h_ref = _np(module.forward(x[None], h[None])[0][0])
    _, good = cell.step(p, jaxrnn.Carry(jnp.asarray(_np(h))), jnp.asarray(_np(x)))
    _, bad = cell.step(unnegated, jaxrnn.Carry(jnp.asarray(_np(h))), jnp.asarray(_np(x)))
    assert_close(good, h_ref)
    assert np.max(np.abs(np.asarray(bad) - h_ref)) > 1e-2


def test_from_torch_unbatched_and_dropout():
    """Unbatched (T, I) input and state (L*D, H); the dropout rate carries over to the stack."""
    torch.manual_seed(8)
    module = torch.nn.LSTM(I, H, num_layers=2, dropout=0.25).eval()
    x = torch.randn(T, I)
    h0, c0 = torch.randn(2, H), torch.randn(2, H)
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = module(x, (h0, c0))
    stack, params = interop.from_torch(module)
    assert stack.dropout == 0.25
    initial = interop.carry_from_torch(stack, h0, c0)
    ys, finals = stack.apply(params, jnp.asarray(_np(x)), initial_carry=initial, impl=IMPL)
    assert_close(ys, _np(y_ref))
    assert_close(interop.carry_to_torch(stack, finals), (_np(h_ref), _np(c_ref)))


def test_from_torch_errors():
    with pytest.raises(ValueError, match="proj_size"):
        interop.from_torch(torch.nn.LSTM(I, H, proj_size=2))
    with pytest.raises(TypeError, match="single cells"):
        interop.from_torch(torch.nn.LSTMCell(I, H))
    with pytest.raises(TypeError, match="expected a torch.nn.RNN, LSTM or GRU, got Linear"):
        interop.from_torch(torch.nn.Linear(I, H))
    with pytest.raises(TypeError, match="got str"):
        interop.from_torch("lstm")


def test_carry_from_torch_errors():
    lstm_stack, _ = interop.from_torch(torch.nn.LSTM(I, H, num_layers=2, bidirectional=True))
    gru_stack, _ = interop.from_torch(torch.nn.GRU(I, H))
    with pytest.raises(ValueError, match="c0: expected the LSTM cell state"):
        interop.carry_from_torch(lstm_stack, np.zeros((4, B, H), np.float32))
    with pytest.raises(ValueError, match="c0: expected None"):
        interop.carry_from_torch(gru_stack, np.zeros((1, B, H), np.float32), np.zeros((1, B, H), np.float32))
    with pytest.raises(ValueError, match=r"h0: expected shape \(4, \*batch, 5\).*got \(2, 4, 5\)"):
        interop.carry_from_torch(lstm_stack, np.zeros((2, B, H), np.float32), np.zeros((2, B, H), np.float32))
    with pytest.raises(ValueError, match=r"c0: expected the shape of h0"):
        interop.carry_from_torch(lstm_stack, np.zeros((4, B, H), np.float32), np.zeros((4, 3, H), np.float32))
    with pytest.raises(TypeError, match="carries: expected a tuple of 1"):
        interop.carry_to_torch(gru_stack, jaxrnn.Carry(jnp.zeros((B, H))))
    with pytest.raises(TypeError, match=r"carries: expected one \(forward, backward\) pairs of LSTMCarry"):
        carry = jaxrnn.LSTMCarry(jnp.zeros((B, H)), jnp.zeros((B, H)))
        interop.carry_to_torch(lstm_stack, (carry, carry))


# --------------------------------------------------------------------------
# flax linen
# --------------------------------------------------------------------------
FLAX_CELLS = {
    "LSTMCell": lambda: nn.LSTMCell(H),
    "OptimizedLSTMCell": lambda: nn.OptimizedLSTMCell(H),
    "GRUCell": lambda: nn.GRUCell(H),
    "SimpleCell": lambda: nn.SimpleCell(H),
    "SimpleCell_relu": lambda: nn.SimpleCell(H, activation_fn=nn.relu),
    "SimpleCell_residual": lambda: nn.SimpleCell(H, residual=True),
}


def _flax_setup(name, seed=0):
    """A flax cell with every parameter (biases included) random, inputs and a random initial carry."""
    module = FLAX_CELLS[name]()
    k_init, k_rand, k_x, k_c = jax.random.split(jax.random.key(seed), 4)
    xs = normal(k_x, (B, T, I))
    carry = module.initialize_carry(k_init, (B, I))
    carry = jax.tree.map(lambda c, k: 0.5 * normal(k, c.shape), carry,
                         _split_like(k_c, carry))
    variables = module.init(k_init, carry, xs[:, 0])
    variables = jax.tree.map(lambda v, k: 0.5 * normal(k, v.shape), variables,
                             _split_like(k_rand, variables))
    return module, variables, xs, carry


def _split_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


@pytest.mark.parametrize("name", list(FLAX_CELLS))
def test_from_flax_matches_flax_rnn(name):
    module, variables, xs, carry = _flax_setup(name)
    flax_rnn = nn.RNN(module, return_carry=True)
    wrapped = {"params": {"cell": variables["params"]}}
    final_ref, ys_ref = flax_rnn.apply(wrapped, xs, initial_carry=carry)

    cell, params = interop.from_flax(module, variables)
    ys, final = jaxrnn.rnn(cell, params, xs, initial_carry=interop.carry_from_flax(cell, carry), impl=IMPL)
    assert_close(ys, ys_ref)
    assert_close(interop.carry_to_flax(final), final_ref)

    # With padding: final carries at each sequence's last valid step, valid outputs equal.
    lengths = jnp.array([T, 1, 3, 5], jnp.int32)
    final_ref, ys_ref = flax_rnn.apply(wrapped, xs, initial_carry=carry, seq_lengths=lengths)
    cell, params = interop.from_flax(module, variables["params"])  # the bare params dict also works
    ys, final = jaxrnn.rnn(
        cell, params, xs, initial_carry=interop.carry_from_flax(cell, carry), seq_lengths=lengths, impl=IMPL
    )
    valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    assert_close(jnp.where(valid, ys, 0.0), jnp.where(valid, ys_ref, 0.0))
    assert_close(interop.carry_to_flax(final), final_ref)


def test_from_flax_gru_update_gate_is_negated():
    """flax's GRU interpolates with z; the converted update gate is 1 - z."""
    module, variables, xs, carry = _flax_setup("GRUCell", seed=1)
    p = variables["params"]
    x, h = xs[:, 0], carry
    z = jax.nn.sigmoid(x @ p["iz"]["kernel"] + p["iz"]["bias"][None, :] + h @ p["hz"]["kernel"])
    cell, params = interop.from_flax(module, variables)
    pre = cell.input_projection(params, x) + h @ params.w_hh
    assert_close(jax.nn.sigmoid(pre[:, H : 2 * H]), 1.0 - z)


def test_from_flax_errors():
    module, variables, _, _ = _flax_setup("LSTMCell")
    with pytest.raises(TypeError, match="got MGUCell"):
        interop.from_flax(nn.MGUCell(H), variables)
    # nn.RNN is supported now (tests/interop/test_flax_modules.py); an unsupported cell inside it is not.
    with pytest.raises(TypeError, match=r"module.cell: expected a flax.linen LSTMCell.*got MGUCell"):
        interop.from_flax(nn.RNN(nn.MGUCell(H)), variables)
    with pytest.raises(TypeError, match="module: expected .*nn.RNN, nn.Bidirectional.*got Dense"):
        interop.from_flax(nn.Dense(H), variables)
    with pytest.raises(TypeError, match="variables: expected a mapping"):
        interop.from_flax(module, [1, 2])
    with pytest.raises(ValueError, match="module.gate_fn"):
        interop.from_flax(nn.LSTMCell(H, gate_fn=jax.nn.hard_sigmoid), variables)
    with pytest.raises(ValueError, match="module.activation_fn"):
        interop.from_flax(nn.GRUCell(H, activation_fn=jax.nn.gelu), _flax_setup("GRUCell")[1])
    with pytest.raises(ValueError, match="module.activation_fn: jaxrnn's Elman supports tanh and relu"):
        interop.from_flax(nn.SimpleCell(H, activation_fn=jax.nn.gelu), _flax_setup("SimpleCell")[1])
    params = dict(variables["params"])
    del params["hg"]
    with pytest.raises(ValueError, match=r"no parameter \['hg'\]\['kernel'\]"):
        interop.from_flax(module, params)
    params = dict(variables["params"], hf={"kernel": jnp.zeros((H, H + 1)), "bias": jnp.zeros(H)})
    with pytest.raises(ValueError, match=r"variables\['hf'\]\['kernel'\]: expected shape \(5, 5\).*got \(5, 6\)"):
        interop.from_flax(module, params)
    with pytest.raises(ValueError, match=r"expected params\['ii'\]\['kernel'\]"):
        interop.from_flax(module, {"params": {}})
    with pytest.raises(ValueError, match=r"\[.ir.\]\[.kernel.\]: expected shape \(3, 6\)"):  # params of a narrower cell
        interop.from_flax(nn.GRUCell(H + 1), _flax_setup("GRUCell")[1])


def test_flax_carry_helpers_errors():
    lstm, gru = jaxrnn.LSTM(H), jaxrnn.GRU(H)
    with pytest.raises(TypeError, match=r"flax's LSTM carry \(c, h\)"):
        interop.carry_from_flax(lstm, jnp.zeros((B, H)))
    with pytest.raises(TypeError, match="single-array carry"):
        interop.carry_from_flax(gru, (jnp.zeros((B, H)), jnp.zeros((B, H))))
    with pytest.raises(TypeError, match="LSTMCarry or Carry"):
        interop.carry_to_flax(jnp.zeros((B, H)))
