"""Sequence utilities on padded batches equal the same computation on each unpadded sequence alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from jaxrnn import scan, sequence
from jaxrnn.sequence import attention_pool, embed, last_valid, pool, sequence_mask
from _util import assert_close, normal

B, T, D = 4, 6, 6
LENGTHS = jnp.array([T, 2, 0, 5], jnp.int32)


def _padded(seed=0, garbage=True):
    """Random ``ys`` whose padded positions hold large garbage (or NaN), as flax or a hand-rolled scan leaves."""
    ys = normal(jax.random.key(seed), (B, T, D))
    if garbage:
        mask = np.asarray(sequence_mask(LENGTHS, T))[..., None]
        ys = jnp.where(mask, ys, 1e4)
    return ys


def _per_sequence(fn, ys, lengths=LENGTHS):
    """``fn(ys[b, :n])`` for each sequence alone (zeros for an empty one)."""
    return jnp.stack([fn(ys[b, :n]) if n else jnp.zeros(ys.shape[-1]) for b, n in enumerate(np.asarray(lengths))])


def test_sequence_mask_is_the_scan_one():
    assert sequence.sequence_mask is scan.sequence_mask
    np.testing.assert_array_equal(sequence_mask(jnp.array([2, 0]), 3), [[True, True, False], [False, False, False]])


@pytest.mark.parametrize("mode", ["last", "mean", "max"])
def test_pool_matches_per_sequence(mode):
    ys = _padded()
    reference = {"last": lambda y: y[-1], "mean": lambda y: y.mean(0), "max": lambda y: y.max(0)}[mode]
    assert_close(pool(ys, LENGTHS, mode), _per_sequence(reference, ys))
    assert_close(pool(ys, None, mode), jnp.stack([reference(y) for y in ys]))  # None: full length
    if mode == "last":
        assert_close(last_valid(ys, LENGTHS), _per_sequence(reference, ys))


def test_bidirectional_last_takes_forward_end_and_backward_start():
    """On a real bidirectional stack: the forward half at the last valid step, the backward half at step 0;
    each equals the final hidden state of that direction (the per-sequence final carries)."""
    stack = jaxrnn.Stack(jaxrnn.LSTM(D // 2), bidirectional=True)
    params = stack.init(jax.random.key(1), 3)
    xs = normal(jax.random.key(2), (B, T, 3))
    ys, ((fwd, bwd),) = stack.apply(params, xs, seq_lengths=LENGTHS, impl="reference")
    got = pool(ys, LENGTHS, "last", bidirectional=True)
    nonempty = np.asarray(LENGTHS) > 0
    assert_close(got[nonempty], jnp.concatenate([fwd.h, bwd.h], axis=-1)[nonempty])
    np.testing.assert_array_equal(got[~nonempty], 0.0)
    for b, n in enumerate(np.asarray(LENGTHS)):  # and against the sequence run alone
        if n:
            alone = stack.apply(params, xs[b, :n], impl="reference")[0]
            assert_close(got[b], jnp.concatenate([alone[-1, : D // 2], alone[0, D // 2 :]]))
    # mean and max do not depend on the direction split
    assert_close(pool(ys, LENGTHS, "mean", bidirectional=True), pool(ys, LENGTHS, "mean"))


@pytest.mark.parametrize("mode", ["last", "mean", "max", "attention"])
def test_padding_gets_zero_gradient_and_empty_sequences_zeros(mode):
    ys = _padded(3)
    query = normal(jax.random.key(4), (D,))

    def f(y):
        if mode == "attention":
            return attention_pool(y, LENGTHS, query)
        return pool(y, LENGTHS, mode, bidirectional=mode == "last")

    out = f(ys)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(out[2], np.zeros(D))  # the empty sequence: zeros, not NaN or -inf
    grad = jax.grad(lambda y: jnp.sum(f(y) * jnp.arange(1.0, D + 1.0)[None, :]))(ys)
    padded = ~np.asarray(sequence_mask(LENGTHS, T))
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[padded], 0.0)  # exactly zero
    assert np.abs(np.asarray(grad)[~padded]).max() > 0
    # NaN in the padding changes nothing either.
    nan = jnp.where(padded[..., None], jnp.nan, ys)
    assert_close(f(nan), out)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda y: jnp.sum(f(y)))(nan))))


def test_attention_pool_matches_per_sequence_softmax():
    ys = _padded(5)
    query = normal(jax.random.key(6), (D,))
    pooled, weights = attention_pool(ys, LENGTHS, query, return_weights=True)

    def alone(y):
        w = jax.nn.softmax(y @ query)
        return w @ y

    assert_close(pooled, _per_sequence(alone, ys))
    np.testing.assert_array_equal(np.asarray(weights)[~np.asarray(sequence_mask(LENGTHS, T))], 0.0)
    assert_close(weights.sum(-1), (np.asarray(LENGTHS) > 0).astype(np.float32))

    # flax's sst2 scoring: keys = tanh(ys W), scored by a vector v; values are ys.
    w = normal(jax.random.key(7), (D, 3))
    v = normal(jax.random.key(8), (3,))
    got = attention_pool(ys, LENGTHS, v, keys=jnp.tanh(ys @ w))
    assert_close(got, _per_sequence(lambda y: jax.nn.softmax(jnp.tanh(y @ w) @ v) @ y, ys))

    # The learned query's gradient ignores the padding too (NaN there included).
    nan = jnp.where(~np.asarray(sequence_mask(LENGTHS, T))[..., None], jnp.nan, ys)
    g_query = jax.grad(lambda q, y: jnp.sum(attention_pool(y, LENGTHS, q)))
    assert_close(g_query(query, nan), g_query(query, ys))
    assert np.all(np.isfinite(np.asarray(g_query(query, nan))))


def test_embed_and_encoder():
    table = normal(jax.random.key(9), (10, 3))
    tokens = jnp.array([[1, 2, 0], [9, 9, 4]])
    np.testing.assert_array_equal(embed(table, tokens), np.asarray(table)[np.asarray(tokens)])
    enc = sequence.Encoder(10, 3, jaxrnn.Stack(jaxrnn.GRU(4), bidirectional=True))
    params = enc.init(jax.random.key(10))
    lengths = jnp.array([3, 1], jnp.int32)
    ys, finals = enc.apply(params, tokens, seq_lengths=lengths, impl="reference")
    ref = enc.stack.apply(params.layers, params.embedding[tokens], seq_lengths=lengths, impl="reference")
    assert_close((ys, finals), ref)
    assert params.embedding.shape == (10, 3)


def test_errors():
    ys = _padded()
    with pytest.raises(ValueError, match=r"mode: expected one of \('last', 'mean', 'max'\), got 'sum'"):
        pool(ys, LENGTHS, "sum")
    with pytest.raises(ValueError, match=r"ys: expected shape \(B, T, D\), got \(6, 6\)"):
        pool(ys[0], LENGTHS, "mean")
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \(4,\), got \(3,\)"):
        pool(ys, LENGTHS[:3], "mean")
    with pytest.raises(ValueError, match=r"seq_lengths: expected values in \[0, 6\]"):
        last_valid(ys, LENGTHS + 5)
    with pytest.raises(ValueError, match="ys: expected an even feature size"):
        pool(ys[..., :5], LENGTHS, "last", bidirectional=True)
    with pytest.raises(ValueError, match=r"query: expected shape \(6,\).*got \(5,\)"):
        attention_pool(ys, LENGTHS, jnp.ones(5))
    with pytest.raises(ValueError, match=r"keys: expected shape"):
        attention_pool(ys, LENGTHS, jnp.ones(2), keys=jnp.ones((B, T - 1, 2)))
    with pytest.raises(TypeError, match="tokens: expected an integer array"):
        embed(jnp.ones((4, 2)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 4\)"):
        embed(jnp.ones((4, 2)), jnp.array([[0, 4]]))
    with pytest.raises(TypeError, match="stack: expected a jaxrnn.Stack"):
        sequence.Encoder(10, 3, jaxrnn.LSTM(4))
