"""The sequence tagger against hand-written references: forward and reverse ``jaxrnn.rnn`` runs with
``seq_lengths``, concatenated and projected; the loss against a per-sequence NumPy computation; poisoned
padding (tokens, labels, NaN features) changes neither the loss nor its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import assert_close, normal, randomize

import jaxrnn
from jaxrnn import models
from jaxrnn.models import Batch, Tagger

B, T, V, E, H, C = 3, 6, 11, 4, 5, 6
LENGTHS = np.array([T, 3, 1])
IMPL = "reference"


def make_tagger(layers=2, **kw):
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), layers, bidirectional=True, **kw)
    return Tagger(C, stack, input_size=E, vocab_size=V, impl=IMPL)


def data(seed=0, poison=False):
    """Tokens and labels; padding holds zeros, or (poison) other ids and labels far outside [0, C)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    tokens = np.array(jax.random.randint(k1, (B, T), 0, V))
    labels = np.array(jax.random.randint(k2, (B, T), 0, C))
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    if poison:
        tokens[pad] = np.array(jax.random.randint(k3, (B, T), 0, V))[pad]
        labels[pad] = -7
    else:
        tokens[pad], labels[pad] = 0, 0
    return jnp.asarray(tokens), jnp.asarray(labels)


def hand_logits(tagger, params, tokens, lengths):
    """Embedding lookup, then per layer a forward and a reverse ``jaxrnn.rnn``, concatenated; then ``y @ w + b``."""
    u = params.embedding[tokens]
    for p in params.layers:
        yf, _ = jaxrnn.rnn(tagger.stack.cell, p.fwd, u, seq_lengths=lengths, impl=IMPL)
        yb, _ = jaxrnn.rnn(tagger.stack.cell, p.bwd, u, seq_lengths=lengths, reverse=True, impl=IMPL)
        u = jnp.concatenate([yf, yb], -1)
    return u @ params.out.w + params.out.b[None, None, :]


def numpy_loss(logits_per_row, labels_per_row):
    """Mean over all valid tokens of -log softmax, one sequence at a time (NumPy, float64)."""
    total, count = 0.0, 0
    for logits, labels in zip(logits_per_row, labels_per_row):
        z = np.asarray(logits, np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(labels)), labels].sum()
        count += len(labels)
    return total / count


def test_logits_equal_hand_composition():
    tagger = make_tagger()
    params = randomize(tagger.init(jax.random.key(0)), jax.random.key(1))
    tokens, _ = data()
    lengths = jnp.asarray(LENGTHS)
    logits = tagger.apply(params, tokens, lengths)
    ref = hand_logits(tagger, params, tokens, lengths)
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    assert logits.shape == (B, T, C)
    assert_close(np.where(valid[..., None], logits, 0.0), np.where(valid[..., None], ref, 0.0))
    np.testing.assert_array_equal(np.asarray(logits)[~valid], 0.0)  # padded logits are zero
    # Full-length batch without seq_lengths: the plain composition.
    assert_close(tagger.apply(params, tokens), hand_logits(tagger, params, tokens, None))


def test_loss_and_accuracy_equal_per_sequence_computation():
    tagger = make_tagger()
    params = randomize(tagger.init(jax.random.key(0)), jax.random.key(1))
    tokens, labels = data()
    batch = Batch(tokens, labels, jnp.asarray(LENGTHS))
    rows = [tagger.apply(params, tokens[b : b + 1, :n])[0] for b, n in enumerate(LENGTHS)]  # each sequence alone
    row_labels = [np.asarray(labels[b, :n]) for b, n in enumerate(LENGTHS)]
    assert_close(tagger.loss(params, batch), numpy_loss(rows, row_labels), scale=10)
    hits = sum(int((np.argmax(np.asarray(r), -1) == lab).sum()) for r, lab in zip(rows, row_labels))
    assert_close(tagger.accuracy(params, batch), hits / LENGTHS.sum())
    # The same through a dict batch and under jit (the configuration is static: a hashable closure).
    as_dict = dict(tokens=tokens, labels=labels, seq_lengths=jnp.asarray(LENGTHS))
    assert_close(jax.jit(tagger.loss)(params, as_dict), tagger.loss(params, batch))


def test_poisoned_padding_changes_neither_loss_nor_gradients():
    tagger = make_tagger()
    params = randomize(tagger.init(jax.random.key(0)), jax.random.key(1))
    lengths = jnp.asarray(LENGTHS)
    clean = Batch(*data(), lengths)
    poisoned = Batch(*data(poison=True), lengths)
    assert not np.array_equal(clean.tokens, poisoned.tokens) and not np.array_equal(clean.labels, poisoned.labels)
    (l1, g1), (l2, g2) = (jax.value_and_grad(tagger.loss)(params, b) for b in (clean, poisoned))
    assert_close(l1, l2)
    assert_close(g1, g2)
    # Under jit too (where ids cannot be checked).
    assert_close(jax.jit(jax.grad(tagger.loss))(params, poisoned), g1)


def test_feature_tagger_ignores_nan_padding():
    F = 7
    tagger = Tagger(C, jaxrnn.Stack(jaxrnn.GRU(H), 1, bidirectional=True, connection="highway"), input_size=F, impl=IMPL)
    params = randomize(tagger.init(jax.random.key(2)), jax.random.key(3))
    assert params.embedding is None
    feats = normal(jax.random.key(4), (B, T, F))
    pad = (np.arange(T)[None, :] >= LENGTHS[:, None])[..., None]
    _, labels = data()
    lengths = jnp.asarray(LENGTHS)
    clean, poisoned = jnp.where(pad, 0.0, feats), jnp.where(pad, jnp.nan, feats)
    g_clean = jax.grad(tagger.loss)(params, Batch(clean, labels, lengths))
    g_poison = jax.grad(tagger.loss)(params, dict(features=poisoned, labels=labels, seq_lengths=lengths))
    assert_close(g_poison, g_clean)
    # Reference: each sequence alone through the stack (jaxrnn.Stack.apply), projected.
    for b, n in enumerate(LENGTHS):
        ys, _ = tagger.stack.apply(params.layers, feats[b : b + 1, :n], impl=IMPL)
        assert_close(tagger.apply(params, poisoned, lengths)[b, :n], (ys @ params.out.w + params.out.b[None, None, :])[0])


def test_train_step_reports_the_tagger_loss():
    tagger = make_tagger(layers=1)
    params = tagger.init(jax.random.key(0))
    batch = Batch(*data(), jnp.asarray(LENGTHS))
    step = jaxrnn.train.make_train_step(tagger.loss, optax.adam(1e-2))
    state = step.init(params)
    new_params, state, metrics = step(params, state, batch)
    assert_close(metrics.loss, tagger.loss(params, batch))
    assert float(tagger.loss(new_params, batch)) < float(metrics.loss)


def test_dropout_key_from_the_batch_or_the_argument():
    tagger = make_tagger(dropout=0.5, dropout_mode="variational")
    params = tagger.init(jax.random.key(0))
    tokens, labels = data()
    lengths = jnp.asarray(LENGTHS)
    key = jax.random.key(9)
    with_key = tagger.loss(params, Batch(tokens, labels, lengths, key))
    assert_close(with_key, tagger.loss(params, Batch(tokens, labels, lengths), dropout_key=key))
    # Reference: the stack run with the same key, projected, then the masked mean.
    ys, _ = tagger.stack.apply(params.layers, params.embedding[tokens], seq_lengths=lengths, dropout_key=key, impl=IMPL)
    logits = ys @ params.out.w + params.out.b[None, None, :]
    rows = [logits[b, :n] for b, n in enumerate(LENGTHS)]
    assert_close(with_key, numpy_loss(rows, [np.asarray(labels[b, :n]) for b, n in enumerate(LENGTHS)]), scale=10)
    assert abs(float(with_key) - float(tagger.loss(params, Batch(tokens, labels, lengths)))) > 1e-4


def test_bad_arguments():
    tagger = make_tagger(layers=1)
    params = tagger.init(jax.random.key(0))
    tokens, labels = data()
    lengths = jnp.asarray(LENGTHS)
    with pytest.raises(ValueError, match=r"labels: expected shape \(3, 6\), got \(3, 5\)"):
        tagger.loss(params, Batch(tokens, labels[:, :5], lengths))
    with pytest.raises(ValueError, match=r"labels: expected class ids in \[0, 6\) at valid positions, got min \d+ and max 6"):
        tagger.loss(params, Batch(tokens, labels.at[0, 0].set(C), lengths))
    with pytest.raises(TypeError, match="labels: expected an integer array"):
        tagger.loss(params, Batch(tokens, labels.astype(jnp.float32), lengths))
    with pytest.raises(TypeError, match="tokens: expected an integer array of token ids"):
        tagger.apply(params, jnp.ones((B, T)), lengths)
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 11\)"):
        tagger.apply(params, tokens.at[0, 0].set(V), lengths)
    with pytest.raises(TypeError, match="params: expected TaggerParams"):
        tagger.apply(params._asdict(), tokens)
    with pytest.raises(ValueError, match=r"params.out: expected w \(10, 6\) and b \(6,\)"):
        tagger.apply(params._replace(out=models.DenseParams(jnp.zeros((10, 5)), jnp.zeros(5))), tokens)
    with pytest.raises(TypeError, match="batch: expected a field 'labels'"):
        tagger.loss(params, dict(tokens=tokens))
    with pytest.raises(ValueError, match="num_classes: expected a positive int, got 0"):
        Tagger(0, tagger.stack, input_size=E)
    with pytest.raises(TypeError, match="stack: expected a jaxrnn.Stack"):
        Tagger(C, jaxrnn.LSTM(H), input_size=E)
    features = Tagger(C, tagger.stack, input_size=E)
    with pytest.raises(ValueError, match=r"features: expected shape \(B, T, 4\) \(input_size\), got \(3, 6, 5\)"):
        features.apply(features.init(jax.random.key(0)), jnp.ones((B, T, 5)))
