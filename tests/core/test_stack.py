"""Stacks against manual compositions of ``jaxrnn.rnn``; connections, dropout, padding, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from jaxrnn.stack import HIGHWAY_BIAS, apply_dropout
from _util import assert_close, normal

B, T, I, H = 3, 5, 4, 6
IMPL = "reference"


def _xs(shape=(B, T, I), seed=1):
    return normal(jax.random.key(seed), shape)


def _perturb(params, seed=7):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [a + 0.2 * normal(k, a.shape) for a, k in zip(leaves, keys)])


def manual(stack, params, xs, lengths=None, dropout_keys=None):
    """Layer-by-layer composition of ``jaxrnn.rnn`` calls, written out plainly."""
    run = lambda p, u, rev=False: jaxrnn.rnn(stack.cell, p, u, seq_lengths=lengths, reverse=rev, impl=IMPL)  # noqa: E731
    mask = None if lengths is None else (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    inputs, finals = xs, []
    for i, p in enumerate(params):
        if stack.bidirectional:
            (yf, ff), (yb, fb) = run(p.fwd, inputs), run(p.bwd, inputs, True)
            y, final = jnp.concatenate([yf, yb], -1), (ff, fb)
        else:
            y, final = run(p.fwd, inputs)
        finals.append(final)
        same = inputs.shape[-1] == y.shape[-1]
        if stack.connection == "residual" and same:
            y = y + inputs
        elif stack.connection == "highway" and same:
            g = jax.nn.sigmoid(inputs @ p.highway.w + p.highway.b[None, None, :])
            y = g * y + (1 - g) * inputs
        if mask is not None:
            y = jnp.where(mask, y, 0.0)
        if dropout_keys is not None and i < len(params) - 1:
            keep = jax.random.bernoulli(dropout_keys[i], 1 - stack.dropout, y.shape)
            y = jnp.where(keep, y / (1 - stack.dropout), 0.0)
        inputs = jnp.concatenate([inputs, y], -1) if stack.connection == "dense" and i < len(params) - 1 else y
    return inputs, tuple(finals)


CASES = [
    pytest.param(jaxrnn.Stack(jaxrnn.LSTM(H), 3), id="lstm-3"),
    pytest.param(jaxrnn.Stack(jaxrnn.GRU(H), 2, bidirectional=True), id="gru-2-bi"),
    pytest.param(jaxrnn.Stack(jaxrnn.Elman(H), 3, connection="residual"), id="elman-residual"),
    pytest.param(jaxrnn.Stack(jaxrnn.LSTM(H), 3, bidirectional=True, connection="dense"), id="lstm-bi-dense"),
    pytest.param(jaxrnn.Stack(jaxrnn.GRU(H, reset="after"), 3, connection="highway"), id="gru-highway"),
]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("stack", CASES)
def test_stack_equals_manual_composition(stack, with_lengths):
    params = _perturb(stack.init(jax.random.key(0), I))
    xs = _xs()
    lengths = jnp.array([T, 2, 1]) if with_lengths else None
    ys, finals = stack.apply(params, xs, seq_lengths=lengths, impl=IMPL)
    ys_ref, finals_ref = manual(stack, params, xs, lengths)
    assert ys.shape == (B, T, stack.output_size)
    assert_close(ys, ys_ref)
    assert_close(finals, finals_ref)
    if with_lengths:
        np.testing.assert_array_equal(ys[1, 2:], 0.0)


def test_bidirectional_is_forward_and_backward_concatenated():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 1, bidirectional=True)
    params = stack.init(jax.random.key(0), I)
    xs, lengths = _xs(), jnp.array([T, 3, 2])
    ys, ((hf, hb),) = stack.apply(params, xs, seq_lengths=lengths)
    # the backward half at position 0 has seen the whole valid sequence: equal to the
    # backward direction's final hidden state; the forward half at len-1 equals h_fwd
    for b, n in enumerate([T, 3, 2]):
        assert_close(ys[b, 0, H:], hb.h[b])
        assert_close(ys[b, n - 1, :H], hf.h[b])


def test_layer_input_sizes_and_param_counts():
    bi = jaxrnn.Stack(jaxrnn.LSTM(H), 3, bidirectional=True)
    p = bi.init(jax.random.key(0), I)
    per = lambda n_in: 4 * (n_in * H + H * H + H)  # noqa: E731
    assert jaxrnn.count_params(p) == 2 * (per(I) + 2 * per(2 * H))
    dense = jaxrnn.Stack(jaxrnn.GRU(H), 3, connection="dense")
    assert [dense.layer_input_size(i, I) for i in range(3)] == [I, I + H, I + 2 * H]
    hw = jaxrnn.Stack(jaxrnn.Elman(H), 3, connection="highway")
    p = hw.init(jax.random.key(0), I)
    assert p[0].highway is None and p[1].highway.w.shape == (H, H)
    np.testing.assert_array_equal(p[1].highway.b, HIGHWAY_BIAS)
    per_e = lambda n_in: n_in * H + H * H + H  # noqa: E731
    assert jaxrnn.count_params(p) == per_e(I) + 2 * (per_e(H) + H * H + H)


def test_residual_applies_to_first_layer_when_widths_match():
    stack = jaxrnn.Stack(jaxrnn.Elman(H), 2, connection="residual")
    params = stack.init(jax.random.key(0), H)
    xs = _xs((B, T, H))
    ys, _ = stack.apply(params, xs)
    ys_ref, _ = manual(stack, params, xs)
    assert_close(ys, ys_ref)
    plain = jaxrnn.Stack(jaxrnn.Elman(H), 2)
    assert float(jnp.abs(plain.apply(params, xs)[0] - ys).max()) > 1e-2


def test_dropout_only_with_key_and_only_between_layers():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 3, dropout=0.5)
    params, xs = stack.init(jax.random.key(0), I), _xs()
    no_drop = jaxrnn.Stack(jaxrnn.LSTM(H), 3)
    assert_close(stack.apply(params, xs)[0], no_drop.apply(params, xs)[0])
    key = jax.random.key(3)
    ys, _ = stack.apply(params, xs, dropout_key=key)
    ys_ref, _ = manual(stack, params, xs, dropout_keys=jax.random.split(key, 3))
    assert_close(ys, ys_ref)
    assert float(jnp.abs(ys - no_drop.apply(params, xs)[0]).max()) > 1e-3
    one = jaxrnn.Stack(jaxrnn.LSTM(H), 1, dropout=0.5)  # nothing between layers: no dropout
    p1 = one.init(jax.random.key(0), I)
    assert_close(one.apply(p1, xs, dropout_key=key)[0], one.apply(p1, xs)[0])


def test_initial_carry_and_time_major():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 2, bidirectional=True)
    params, xs = stack.init(jax.random.key(0), I), _xs()
    carry = jax.tree_util.tree_map(lambda z: jnp.full(z.shape, 0.3), stack.zero_carry((B,)))
    ys, finals = stack.apply(params, xs, initial_carry=carry)
    ys0, _ = stack.apply(params, xs)
    assert float(jnp.abs(ys - ys0).max()) > 1e-3
    run = lambda p, u, c, rev=False: jaxrnn.rnn(stack.cell, p, u, initial_carry=c, reverse=rev)  # noqa: E731
    (y0f, _), (y0b, _) = run(params[0].fwd, xs, carry[0][0]), run(params[0].bwd, xs, carry[0][1], True)
    u = jnp.concatenate([y0f, y0b], -1)
    (y1f, f1f), (y1b, f1b) = run(params[1].fwd, u, carry[1][0]), run(params[1].bwd, u, carry[1][1], True)
    assert_close(ys, jnp.concatenate([y1f, y1b], -1))
    assert_close(finals[1], (f1f, f1b))
    ys_tm, finals_tm = stack.apply(params, jnp.swapaxes(xs, 0, 1), initial_carry=carry, time_major=True)
    assert_close(jnp.swapaxes(ys_tm, 0, 1), ys)
    assert_close(finals_tm, finals)


def test_unbatched_stack_with_length():
    stack = jaxrnn.Stack(jaxrnn.GRU(H), 2, bidirectional=True, connection="residual")
    params, xs = stack.init(jax.random.key(0), I), _xs()
    lengths = jnp.array([T, 3, 2])
    ys, _ = stack.apply(params, xs, seq_lengths=lengths)
    y1, _ = stack.apply(params, xs[1], seq_lengths=3)
    assert_close(y1, ys[1])


def test_gradients_flow_through_every_layer_and_skip_padding():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 3, bidirectional=True, connection="highway")
    params, xs = stack.init(jax.random.key(0), I), _xs()
    lengths = jnp.array([T, 2, 4])
    g_p, g_x = jax.grad(lambda p, x: stack.apply(p, x, seq_lengths=lengths)[0].sum(), argnums=(0, 1))(params, xs)
    for layer in g_p:
        assert float(jnp.abs(layer.fwd.w_hh).max()) > 0 and float(jnp.abs(layer.bwd.w_ih).max()) > 0
    np.testing.assert_array_equal(g_x[1, 2:], 0.0)


def test_no_retrace():
    stack = jaxrnn.Stack(jaxrnn.GRU(H), 2, bidirectional=True)
    params = stack.init(jax.random.key(0), I)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(p, x, lengths):
        return stack.apply(p, x, seq_lengths=lengths)

    chex.clear_trace_counter()
    f(params, _xs(), jnp.array([1, 2, 3]))
    f(params, _xs(seed=9), jnp.array([5, 5, 1]))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_layers=0), ValueError, "num_layers: expected a positive int, got 0"),
        (dict(connection="skip"), ValueError, "connection: expected one of"),
        (dict(dropout=1.0), ValueError, r"dropout: expected a rate in \[0, 1\)"),
        (dict(cell="lstm"), TypeError, "cell: expected a jaxrnn cell"),
    ],
)
def test_bad_config(kwargs, exc, match):
    args = dict(cell=jaxrnn.LSTM(H), num_layers=2) | kwargs
    with pytest.raises(exc, match=match):
        jaxrnn.Stack(**args)


def test_bad_apply_arguments():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 2, bidirectional=True)
    params, xs = stack.init(jax.random.key(0), I), _xs()
    with pytest.raises(ValueError, match=r"xs: expected last dimension 4 .*got shape \(3, 5, 9\)"):
        stack.apply(params, jnp.ones((B, T, 9)))
    with pytest.raises(TypeError, match="params: expected a tuple of 2 LayerParams, got 1 layers"):
        stack.apply(params[:1], xs)
    with pytest.raises(TypeError, match=r"initial_carry\[0\]: expected a \(forward, backward\) pair"):
        stack.apply(params, xs, initial_carry=(stack.cell.zero_carry(B),) * 2)
    bad = stack.zero_carry((B,))
    bad = (bad[0], (bad[1][0], stack.cell.zero_carry(B + 1)))
    with pytest.raises(ValueError, match=r"initial_carry\[1\]\[1\].h: expected shape \(3, 6\), got \(4, 6\)"):
        stack.apply(params, xs, initial_carry=bad)
    with pytest.raises(ValueError, match=r"seq_lengths: expected values in \[0, 5\]"):
        stack.apply(params, xs, seq_lengths=np.array([1, 2, 8]))
    uni = jaxrnn.Stack(jaxrnn.LSTM(H), 2)
    with pytest.raises(ValueError, match=r"params\[0\].bwd: expected None"):
        uni.apply(params, xs)
    with pytest.raises(ValueError, match="impl: expected one of"):
        stack.apply(params, xs, impl="fast")


# ---------------------------------------------------------------- variational dropout
def _mask_probe(rate, time_major=False, seed=5, batch=B, width=H):
    """The input mask a stack draws, read off a run: a linear Elman layer with ``w_ih = I``,
    ``w_hh = 0``, ``b = 0`` outputs its (dropped) input, and the input is all ones."""
    stack = jaxrnn.Stack(jaxrnn.Elman(width, activation="linear"), 1, dropout_mode="variational", input_dropout=rate)
    params = (jaxrnn.LayerParams(jaxrnn.ElmanParams(jnp.eye(width), jnp.zeros((width, width)), jnp.zeros(width))),)
    shape = (T, batch, width) if time_major else (batch, T, width)
    return stack.apply(params, jnp.ones(shape), dropout_key=jax.random.key(seed), time_major=time_major, impl=IMPL)[0]


def test_variational_stack_equals_manual_composition_with_one_mask_per_sequence():
    stack = jaxrnn.Stack(
        jaxrnn.LSTM(H), 3, bidirectional=True, dropout=0.5, dropout_mode="variational", input_dropout=0.3
    )
    params, xs = _perturb(stack.init(jax.random.key(0), I)), _xs()
    lengths = jnp.array([T, 2, 4])
    key = jax.random.key(3)
    ys, finals = stack.apply(params, xs, seq_lengths=lengths, dropout_key=key, impl=IMPL)
    # The documented draw: keys = split(key, L); outputs of layer i from keys[i], the input from keys[-1];
    # each mask has shape (B, 1, D): one per sequence and feature, broadcast over time.
    keys = jax.random.split(key, 3)
    in_keep = jax.random.bernoulli(keys[-1], 0.7, (B, 1, I))
    out_keep = [jax.random.bernoulli(keys[i], 0.5, (B, 1, 2 * H)) for i in range(2)]
    mask = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    u, finals_ref = jnp.where(in_keep, xs / 0.7, 0.0), []
    for i, p in enumerate(params):
        yf, ff = jaxrnn.rnn(stack.cell, p.fwd, u, seq_lengths=lengths, impl=IMPL)
        yb, fb = jaxrnn.rnn(stack.cell, p.bwd, u, seq_lengths=lengths, reverse=True, impl=IMPL)
        finals_ref.append((ff, fb))
        u = jnp.where(mask, jnp.concatenate([yf, yb], -1), 0.0)
        if i < 2:
            u = jnp.where(out_keep[i], u / 0.5, 0.0)
    assert_close(ys, u)
    assert_close(finals, tuple(finals_ref))
    np.testing.assert_array_equal(ys[1, 2:], 0.0)  # padding stays zero
    np.testing.assert_array_equal(ys[2, 4:], 0.0)
    # Without a key: no dropout at all.
    assert_close(stack.apply(params, xs, seq_lengths=lengths, impl=IMPL)[0], manual(stack, params, xs, lengths)[0])


@pytest.mark.parametrize("time_major", [False, True], ids=["batch-major", "time-major"])
def test_variational_mask_is_constant_over_time_and_varies_over_sequences(time_major):
    probe = np.asarray(_mask_probe(0.5, time_major=time_major))
    masks = np.swapaxes(probe, 0, 1) if time_major else probe  # (B, T, H)
    np.testing.assert_array_equal(masks, np.broadcast_to(masks[:, :1], masks.shape))  # same at every step
    assert set(np.unique(masks)) <= {0.0, 2.0}  # kept units scaled by 1 / (1 - 0.5)
    assert 0 < (masks[:, 0] == 0).sum() < masks[:, 0].size  # some dropped, some kept
    assert not np.array_equal(masks[0, 0], masks[1, 0])  # a different mask per sequence
    per_step = jaxrnn.Stack(jaxrnn.Elman(H), 1, input_dropout=0.5)  # default mode: masks vary over time
    assert per_step.dropout_mode == "per_step"
    step_masks = np.asarray(apply_dropout(jax.random.key(5), jnp.ones((B, T, H)), 0.5))
    assert not np.array_equal(step_masks, np.broadcast_to(step_masks[:, :1], step_masks.shape))


def test_variational_masks_preserve_the_expectation():
    # 4096 sequences x 8 features = 32768 independent mask entries, each 0 or 1/(1-p) with mean 1 and
    # variance p/(1-p) = 3/7: the sample mean has standard deviation sqrt(3/7 / 32768) ≈ 0.0036.
    # The bound 0.02 is 5.5 standard deviations (a false failure has probability < 1e-7).
    probe = _mask_probe(0.3, batch=4096, width=8)
    per_sequence = probe[:, 0]  # (4096, 8): one draw per sequence and feature
    assert abs(float(per_sequence.mean()) - 1.0) < 0.02
    assert abs(float((per_sequence == 0).mean()) - 0.3) < 0.02 * 0.7  # the drop rate, same bound scaled


def test_variational_dropout_ignores_poisoned_padding_in_values_and_gradients():
    stack = jaxrnn.Stack(jaxrnn.GRU(H), 2, dropout=0.4, dropout_mode="variational", input_dropout=0.2)
    params, xs = stack.init(jax.random.key(0), I), _xs()
    lengths = jnp.array([T, 2, 3])
    pad = ~(jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    poisoned = jnp.where(pad, jnp.nan, xs)
    clean = jnp.where(pad, 0.0, xs)
    key = jax.random.key(11)

    def f(p, x):
        ys, _ = stack.apply(p, x, seq_lengths=lengths, dropout_key=key, impl=IMPL)
        return jnp.sum(ys**2), ys

    (v1, ys1), g1 = jax.value_and_grad(f, has_aux=True)(params, poisoned)
    (v2, ys2), g2 = jax.value_and_grad(f, has_aux=True)(params, clean)
    assert_close(ys1, ys2)
    assert_close(v1, v2)
    assert_close(g1, g2)
    np.testing.assert_array_equal(ys1[1, 2:], 0.0)


def test_per_step_is_still_the_default_and_unchanged():
    explicit = jaxrnn.Stack(jaxrnn.LSTM(H), 3, dropout=0.5, dropout_mode="per_step")
    default = jaxrnn.Stack(jaxrnn.LSTM(H), 3, dropout=0.5)
    assert default.dropout_mode == "per_step" and default.input_dropout == 0.0
    params, xs = default.init(jax.random.key(0), I), _xs()
    key = jax.random.key(3)
    ys, _ = explicit.apply(params, xs, dropout_key=key)
    assert_close(ys, default.apply(params, xs, dropout_key=key)[0])
    assert_close(ys, manual(default, params, xs, dropout_keys=jax.random.split(key, 3))[0])
    variational = jaxrnn.Stack(jaxrnn.LSTM(H), 3, dropout=0.5, dropout_mode="variational")
    assert float(jnp.abs(variational.apply(params, xs, dropout_key=key)[0] - ys).max()) > 1e-3


def test_input_dropout_alone_acts_on_a_single_layer():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 1, input_dropout=0.5)
    assert stack.uses_dropout and not jaxrnn.Stack(jaxrnn.LSTM(H), 1, dropout=0.5).uses_dropout
    params, xs = stack.init(jax.random.key(0), I), _xs()
    key = jax.random.key(4)
    keep = jax.random.bernoulli(jax.random.split(key, 1)[-1], 0.5, xs.shape)  # per step: a mask of xs's shape
    ys_ref, _ = jaxrnn.rnn(stack.cell, params[0].fwd, jnp.where(keep, xs / 0.5, 0.0), impl=IMPL)
    assert_close(stack.apply(params, xs, dropout_key=key, impl=IMPL)[0], ys_ref)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dropout_mode="gal"), ValueError, r"dropout_mode: expected one of \('per_step', 'variational'\), got 'gal'"),
        (dict(input_dropout=1.0), ValueError, r"input_dropout: expected a rate in \[0, 1\), got 1.0"),
        (dict(input_dropout=-0.1), ValueError, r"input_dropout: expected a rate in \[0, 1\)"),
        (dict(input_dropout="0.1"), TypeError, r"input_dropout: expected a rate in \[0, 1\), got str"),
    ],
)
def test_bad_dropout_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jaxrnn.Stack(jaxrnn.LSTM(H), 2, **kwargs)
