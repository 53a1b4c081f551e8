"""The sentence classifier against hand composition for each pooling mode (``jaxrnn.rnn`` runs, the
pooling written out per sequence, the MLP); a padded batch equals each sequence run alone; ``pool``
re-exported with its signature; the NNX wrapper equals the functional ``apply``."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_close, normal, randomize

import jaxrnn
from jaxrnn import models
from jaxrnn.models import Batch, Classifier

B, T, V, E, H, C = 3, 5, 9, 4, 3, 4
LENGTHS = np.array([T, 2, 1])
IMPL = "reference"
POOLINGS = ["last", "mean", "max", "attention"]


def make(pooling, bidirectional=True, vocab=V):
    stack = jaxrnn.Stack(jaxrnn.GRU(H), 1, bidirectional=bidirectional)
    return Classifier(C, stack, input_size=E, vocab_size=vocab, pooling=pooling, hidden_sizes=(6,), impl=IMPL)


def tokens(seed=0):
    ids = np.array(jax.random.randint(jax.random.key(seed), (B, T), 0, V))
    ids[np.arange(T)[None, :] >= LENGTHS[:, None]] = 0
    return jnp.asarray(ids)


def hand_sentence(clf, params, seq):
    """One unpadded sequence ``(n,)``: jaxrnn.rnn forward and reverse, then the pooling written out."""
    u = params.embedding[seq][None]
    p = params.layers[0]
    yf = jaxrnn.rnn(clf.stack.cell, p.fwd, u, impl=IMPL)[0][0]
    if not clf.stack.bidirectional:
        ys = yf
        last = ys[-1]
    else:
        yb = jaxrnn.rnn(clf.stack.cell, p.bwd, u, reverse=True, impl=IMPL)[0][0]
        ys = jnp.concatenate([yf, yb], -1)
        last = jnp.concatenate([yf[-1], yb[0]])  # each direction's final state
    if clf.pooling == "last":
        return last
    if clf.pooling == "mean":
        return ys.mean(0)
    if clf.pooling == "max":
        return ys.max(0)
    w = jax.nn.softmax(ys @ params.query)
    return w @ ys


def hand_mlp(params, h):
    (l1, l2) = params.mlp
    return jnp.tanh(h @ l1.w + l1.b) @ l2.w + l2.b


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_logits_equal_hand_composition_per_sequence(pooling, bidirectional):
    clf = make(pooling, bidirectional)
    params = randomize(clf.init(jax.random.key(0)), jax.random.key(1))
    ids = tokens()
    logits = clf.apply(params, ids, jnp.asarray(LENGTHS))
    assert logits.shape == (B, C)
    for b, n in enumerate(LENGTHS):
        assert_close(logits[b], hand_mlp(params, hand_sentence(clf, params, ids[b, :n])))
        assert_close(logits[b], clf.apply(params, ids[b : b + 1, :n])[0])  # the sequence run alone


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padding_changes_neither_logits_nor_gradients(pooling):
    clf = make(pooling)
    params = randomize(clf.init(jax.random.key(0)), jax.random.key(1))
    clean = tokens()
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    poisoned = jnp.where(pad, jax.random.randint(jax.random.key(5), (B, T), 0, V), clean)
    labels = jnp.array([0, 3, 1])
    lengths = jnp.asarray(LENGTHS)
    (l1, g1), (l2, g2) = (jax.value_and_grad(clf.loss)(params, Batch(t, labels, lengths)) for t in (clean, poisoned))
    assert_close(l1, l2)
    assert_close(g1, g2)
    # The loss is the mean cross-entropy of the per-sequence logits.
    rows = np.stack([np.asarray(clf.apply(params, clean[b : b + 1, :n])[0], np.float64) for b, n in enumerate(LENGTHS)])
    logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
    assert_close(l1, -logp[np.arange(B), np.asarray(labels)].mean(), scale=10)
    assert_close(clf.accuracy(params, Batch(clean, labels, lengths)), (rows.argmax(-1) == np.asarray(labels)).mean())


def test_pool_is_reexported_with_its_signature():
    assert models.pool is jaxrnn.sequence.pool
    assert str(inspect.signature(models.pool)) == "(ys, seq_lengths, mode, *, bidirectional=False)"
    ys = normal(jax.random.key(0), (B, T, 2 * H))
    lengths = jnp.asarray(LENGTHS)
    for b, n in enumerate(LENGTHS):  # the formula, per sequence
        assert_close(models.pool(ys, lengths, "max")[b], ys[b, :n].max(0))
        assert_close(models.pool(ys, lengths, "mean")[b], ys[b, :n].mean(0))
        want = jnp.concatenate([ys[b, n - 1, :H], ys[b, 0, H:]])
        assert_close(models.pool(ys, lengths, "last", bidirectional=True)[b], want)


def test_feature_classifier_and_bad_arguments():
    F = 6
    clf = Classifier(C, jaxrnn.Stack(jaxrnn.LSTM(H)), input_size=F, pooling="mean", impl=IMPL)
    params = randomize(clf.init(jax.random.key(0)), jax.random.key(1))
    x = normal(jax.random.key(2), (B, T, F))
    ys, _ = jaxrnn.rnn(clf.stack.cell, params.layers[0].fwd, x, seq_lengths=jnp.asarray(LENGTHS), impl=IMPL)
    h = ys.sum(1) / jnp.asarray(LENGTHS, jnp.float32)[:, None]
    assert_close(clf.apply(params, x, jnp.asarray(LENGTHS)), h @ params.mlp[0].w + params.mlp[0].b[None, :])  # linear: no hidden
    with pytest.raises(ValueError, match=r"pooling: expected one of \('last', 'mean', 'max', 'attention'\), got 'sum'"):
        make("sum")
    with pytest.raises(ValueError, match="hidden_sizes\\[1\\]: expected a positive int, got 0"):
        Classifier(C, clf.stack, input_size=F, hidden_sizes=(4, 0))
    with pytest.raises(ValueError, match="activation: expected one of"):
        Classifier(C, clf.stack, input_size=F, activation="gelu")
    with pytest.raises(ValueError, match=r"labels: expected shape \(3,\), got \(3, 5\)"):
        clf.loss(params, Batch(x, jnp.zeros((B, T), jnp.int32)))
    with pytest.raises(ValueError, match=r"params.query: expected shape \(6,\) for pooling='attention'"):
        make("attention").apply(make("max").init(jax.random.key(0)), tokens())


def test_nnx_classifier_equals_functional_apply():
    from flax import nnx

    from jaxrnn.models import nnx as mnnx

    clf = make("attention")
    module = mnnx.Classifier(clf, rngs=nnx.Rngs(0))
    ids, lengths = tokens(), jnp.asarray(LENGTHS)
    assert_close(module(ids, lengths), clf.apply(module.get_params(), ids, lengths))
    params = randomize(clf.init(jax.random.key(3)), jax.random.key(4))
    given = mnnx.Classifier(clf, params=params)
    assert_close(given(ids, lengths), clf.apply(params, ids, lengths))
    batch = Batch(ids, jnp.array([1, 0, 2]), lengths)
    assert_close(given.loss(batch), clf.loss(params, batch))
    assert_close(given.accuracy(batch), clf.accuracy(params, batch))
    with pytest.raises(TypeError, match="model: expected a jaxrnn.models.Classifier, got Tagger"):
        mnnx.Classifier(models.Tagger(C, clf.stack, input_size=E), rngs=nnx.Rngs(0))
