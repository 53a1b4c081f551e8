"""The C++ decode of a stacked LSTM language model (``jaxrnn_lstm_decode``, taken by ``lm.generate`` on the
``"ffi"`` backend) against a Python loop over ``model.step`` that samples with ``jax.random.categorical`` (the
tokens, and the logits each was drawn from); greedy decoding, ties and NaN logits against ``jnp.argmax``; the
cases that keep the ``lax.scan`` decode; one compilation for any key and temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _ffi_cases import requires_ffi
from _util import assert_close, normal
from jaxrnn import kernels
from jaxrnn.kernels.ffi import DecodeWeights, lstm_decode
from jaxrnn.models import lm

pytestmark = requires_ffi


def _model(V, H, L, E, impl="ffi", **kwargs):
    return lm.LanguageModel(V, jaxrnn.LSTM(H), num_layers=L, embed_size=E, impl=impl, **kwargs)


def _params(model, seed):
    params = model.init(jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.3 * normal(k, x.shape) for x, k in zip(leaves, keys)])


def _python_loop(model, params, key, prompt, length, temperature):
    """Reference: the prompt through ``model.step``, then ``length`` draws of ``jax.random.categorical`` on
    ``logits / temperature`` with ``jax.random.split(key, length)[i]`` (the argmax for temperature 0)."""
    step = jax.jit(model.step)  # one compilation, not an op-by-op dispatch per step
    carry = model.zero_carry((prompt.shape[0],))
    for t in range(prompt.shape[1]):
        carry, logits = step(params, carry, prompt[:, t])
    tokens, seen = [], []
    for k in jax.random.split(key, length):
        seen.append(np.asarray(logits))
        if temperature > 0:
            token = jax.random.categorical(k, logits / temperature, axis=-1).astype(jnp.int32)
        else:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(token))
        carry, logits = step(params, carry, token)
    return np.stack(tokens, axis=1), np.stack(seen, axis=1)


def _takes_decode(model, params, prompt, length, top_k=None):
    text = str(jax.make_jaxpr(lambda p: lm._generate(model, p, jax.random.key(0), prompt, length, 1.0, top_k, None, False))(params))
    return "jaxrnn_lstm_decode" in text


# (V, H, L, E, B, length, temperature, options): two layers, units not a multiple of 16 and a vocabulary of
# two panels with a partial one, rows split into two chunks with a partial register block; one layer at batch 1
# on one thread; three layers, tied output weights, greedy.
CASES = [
    (37, 20, 2, 8, 19, 12, 1.3, {}),
    (40, 16, 1, 5, 1, 45, 0.7, {"impl": kernels.FFI(threads=1)}),
    (33, 24, 3, 24, 9, 10, 0.0, {"tie_weights": True}),
]


@pytest.mark.parametrize("case", CASES, ids=["2-layers-2-chunks", "1-layer-batch-1-one-thread", "3-layers-tied-greedy"])
def test_matches_python_loop_over_categorical(case):
    V, H, L, E, B, length, temperature, options = case
    model = _model(V, H, L, E, **{"impl": "ffi", **options})
    params = _params(model, seed=L)
    prompt = jax.random.randint(jax.random.key(5), (B, 3), 0, V, dtype=jnp.int32)
    assert _takes_decode(model, params, prompt, length)
    key = jax.random.key(9)
    tokens, logits = lm.generate(model, params, key, prompt, length, temperature, return_logits=True)
    want_tokens, want_logits = _python_loop(model, params, key, prompt, length, temperature)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    assert_close(logits, want_logits, scale=10)  # after up to 45 steps of three layers
    assert len(set(want_tokens.ravel().tolist())) > 2  # not a constant sequence
    np.testing.assert_array_equal(np.asarray(lm.generate(model, params, key, prompt, length, temperature)), want_tokens)


def test_argmax_ties_and_nan_as_jnp_argmax():
    """Greedy: the lowest id among equal logits; any temperature: the first NaN (as ``jnp.argmax``)."""
    V, H, B = 5, 16, 3
    model = _model(V, H, 1, 4)
    params = _params(model, seed=3)
    weights = DecodeWeights(model.first_projections(params), params.rnn[0].fwd.w_hh, (), params.w_out, params.b_out)
    carry = model.zero_carry((B,))
    logits0 = jnp.array([[0.0, 2.0, 2.0, 1.0, 2.0], [1.0, jnp.nan, 5.0, jnp.nan, 0.0], [3.0] * 5])
    noise = jnp.zeros((1, B, V))
    for temperature in (0.0, 0.5):
        tokens = lstm_decode(weights, carry, logits0, noise, temperature)
        np.testing.assert_array_equal(np.asarray(tokens[0]), np.asarray(jnp.argmax(logits0 / max(temperature, 1.0), -1)))
        np.testing.assert_array_equal(np.asarray(tokens[0]), [1, 1, 0])
    with pytest.raises(ValueError, match=r"carry: expected 1 per-layer carries .* got 2"):
        lstm_decode(weights, (carry[0], carry[0]), logits0, noise, 1.0)


def test_scan_decode_where_the_kernel_does_not_apply():
    """top-k / top-p sampling, connections between layers, other cells and the xla backend keep the lax.scan decode."""
    prompt = jnp.zeros((4, 2), jnp.int32)
    plain = _model(11, 16, 2, 8)
    params = _params(plain, seed=0)
    assert _takes_decode(plain, params, prompt, 20)
    assert not _takes_decode(plain, params, prompt, 20, top_k=3)
    assert not _takes_decode(_model(11, 16, 2, 8, impl="xla"), params, prompt, 20)
    residual = lm.LanguageModel(11, jaxrnn.Stack(jaxrnn.LSTM(16), 2, connection="residual"), embed_size=8, impl="ffi")
    assert not _takes_decode(residual, residual.init(jax.random.key(0)), prompt, 20)
    gru = lm.LanguageModel(11, jaxrnn.GRU(16), num_layers=2, embed_size=8, impl="ffi")
    assert not _takes_decode(gru, gru.init(jax.random.key(0)), prompt, 20)


def test_one_compilation_for_any_key_and_temperature():
    model = _model(13, 16, 2, 8)
    params = _params(model, seed=1)
    prompt = jnp.ones((8, 2), jnp.int32)
    first = lm.generate(model, params, jax.random.key(0), prompt, 17, 0.9)
    size = lm._generate._cache_size()
    second = lm.generate(model, params, jax.random.key(1), prompt + 1, 17, 0.4)
    greedy = lm.generate(model, params, jax.random.key(1), prompt, 17, 0.0)
    assert lm._generate._cache_size() == size
    assert first.shape == second.shape == greedy.shape == (8, 17)
    assert not np.array_equal(np.asarray(first), np.asarray(second))


# (V, H, L, B, N, temperature): units not a multiple of 16 (two members: 16 and 24 units), three layers with an
# odd batch, one row, one layer (its layer-0 product after the step's only barrier).
SPLIT_CASES = [(37, 40, 2, 19, 12, 1.3), (33, 48, 3, 9, 10, 0.0), (29, 32, 2, 1, 15, 0.8), (31, 40, 1, 5, 12, 0.9)]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=["units-40", "3-layers-greedy", "batch-1", "1-layer"])
def test_units_split_is_bit_identical_to_rows(case):
    """``split="units"`` (a team over the hidden units, meeting at a barrier per layer) sums in the order of the
    rows split: the same tokens and logits, bit for bit; and (the first case) ``lm.generate`` with it matches the
    reference loop."""
    V, H, L, B, N, temperature = case
    model = _model(V, H, L, 8)
    params = _params(model, seed=H)
    weights = DecodeWeights(model.first_projections(params), params.rnn[0].fwd.w_hh,
                            tuple((p.fwd.w_ih, p.fwd.w_hh, p.fwd.b) for p in params.rnn[1:]), params.w_out, params.b_out)
    keys = jax.random.split(jax.random.key(H), 1 + 2 * L)
    carry = tuple(jaxrnn.LSTMCarry(0.5 * normal(keys[1 + 2 * l], (B, H)),
                                   normal(keys[2 + 2 * l], (B, H))) for l in range(L))
    logits0 = normal(keys[0], (B, V))
    noise = jax.random.gumbel(jax.random.key(7), (N, B, V))
    got = {split: lstm_decode(weights, carry, logits0, noise, temperature, return_logits=True, threads=2, split=split)
           for split in ("rows", "units")}
    np.testing.assert_array_equal(np.asarray(got["units"][0]), np.asarray(got["rows"][0]))
    np.testing.assert_array_equal(np.asarray(got["units"][1]), np.asarray(got["rows"][1]))
    assert len(set(np.asarray(got["units"][0]).ravel().tolist())) > 2
    if case != SPLIT_CASES[0]:
        return
    # Through lm.generate with FFI(split="units"), against the Python loop over model.step (the first case).
    units = _model(V, H, L, 8, impl=kernels.FFI(threads=2, split="units"))
    prompt = jax.random.randint(jax.random.key(3), (B, 2), 0, V, dtype=jnp.int32)
    key = jax.random.key(11)
    tokens, logits = lm.generate(units, params, key, prompt, N, temperature, return_logits=True)
    want_tokens, want_logits = _python_loop(model, params, key, prompt, N, temperature)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    assert_close(logits, want_logits, scale=10)


def test_decode_options_are_checked():
    model = _model(5, 16, 1, 4)
    params = _params(model, seed=3)
    weights = DecodeWeights(model.first_projections(params), params.rnn[0].fwd.w_hh, (), params.w_out, params.b_out)
    args = (weights, model.zero_carry((2,)), jnp.zeros((2, 5)), jnp.zeros((3, 2, 5)), 1.0)
    with pytest.raises(ValueError, match=r"split: expected one of \('auto', 'units', 'rows'\), got 'cols'"):
        lstm_decode(*args, split="cols")
    with pytest.raises(ValueError, match=r"threads: expected a positive int or None, got 0"):
        lstm_decode(*args, threads=0)
