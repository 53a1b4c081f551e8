"""The ELMo-style biLM against hand-written references: ``scalar_mix`` against its formula in NumPy;
both LMs against ``jaxrnn.rnn`` compositions (forward, and ``reverse=True`` for the backward LM); the
joint loss against a per-sequence NumPy computation (the backward LM scores the previous token, at valid
positions only); a tagger on scalar-mix features end to end, its gradient in the mix weights against
finite differences; the NNX wrapper against the functional calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_close, randomize

import jaxrnn
from jaxrnn.models import Batch, BiLM, MixParams, Tagger, scalar_mix

B, T, V, H, L = 3, 5, 8, 4, 2
LENGTHS = np.array([T, 3, 1])
IMPL = "reference"


def make(connection="residual", **kw):
    return BiLM(V, jaxrnn.LSTM(H), L, connection=connection, impl=IMPL, **kw)


def tokens(seed=0, poison=False):
    ids = np.array(jax.random.randint(jax.random.key(seed), (B, T), 0, V))
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    ids[pad] = np.array(jax.random.randint(jax.random.key(seed + 1), (B, T), 0, V))[pad] if poison else 0
    return jnp.asarray(ids)


def hand_layers(bilm, params, ids, lengths):
    """Per direction, L ``jaxrnn.rnn`` runs (the backward LM with ``reverse=True``), residual connections added."""
    emb = params.embedding[ids]
    out = {}
    for name, reverse in (("forward", False), ("backward", True)):
        u, layers = emb, []
        for p in getattr(params, name):
            y, _ = jaxrnn.rnn(bilm.cell, p.fwd, u, seq_lengths=lengths, reverse=reverse, impl=IMPL)
            u = y + u if bilm.connection == "residual" else y
            layers.append(u)
        out[name] = layers
    return emb, out["forward"], out["backward"]


def softmax_logits(params, y):
    return y @ params.softmax.w + params.softmax.b[None, None, :]


def test_scalar_mix_equals_its_formula():
    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(3)]
    weights, gamma = np.array([0.3, -1.2, 2.0], np.float32), np.float32(1.7)
    s = np.exp(weights - weights.max())
    s = s / s.sum()
    want = gamma * sum(s[j] * layers[j] for j in range(3))
    assert_close(scalar_mix([jnp.asarray(x) for x in layers], jnp.asarray(weights), gamma), want)
    assert_close(scalar_mix(layers, np.zeros(3, np.float32), 1.0), sum(layers) / 3)  # zero weights: the average
    with pytest.raises(ValueError, match=r"layers\[2\]: expected shape \(2, 3, 4\) \(as layers\[0\]\), got \(2, 3, 5\)"):
        scalar_mix([*layers[:2], np.zeros((2, 3, 5), np.float32)], weights, gamma)
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\) \(one per layer\), got \(2,\)"):
        scalar_mix(layers, weights[:2], gamma)
    with pytest.raises(ValueError, match=r"gamma: expected a scalar, got shape \(1,\)"):
        scalar_mix(layers, weights, np.ones(1))
    with pytest.raises(TypeError, match="layers: expected a non-empty list"):
        scalar_mix([], weights, gamma)


@pytest.mark.parametrize("connection", [None, "residual"])
def test_both_lms_equal_hand_compositions(connection):
    bilm = make(connection)
    params = randomize(bilm.init(jax.random.key(0)), jax.random.key(1))
    ids, lengths = tokens(), jnp.asarray(LENGTHS)
    emb, fwd, bwd = hand_layers(bilm, params, ids, lengths)
    valid = (np.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    v = lambda x: np.where(valid, np.asarray(x), 0.0)  # noqa: E731
    f_logits, b_logits = bilm.apply(params, ids, lengths)
    assert_close(v(f_logits), v(softmax_logits(params, fwd[-1])))
    assert_close(v(b_logits), v(softmax_logits(params, bwd[-1])))
    reps = bilm.representations(params, ids, lengths)
    assert len(reps) == L + 1 and all(r.shape == (B, T, 2 * H) for r in reps)
    assert_close(reps[0], v(jnp.concatenate([emb, emb], -1)))
    for j in range(L):
        assert_close(reps[j + 1], v(jnp.concatenate([fwd[j], bwd[j]], -1)))
    mix = MixParams(jnp.array([0.5, -0.3, 1.0]), jnp.array(0.8))
    assert_close(bilm.embed_contextual(params, mix, ids, lengths), scalar_mix(reps, mix.weights, mix.gamma))


def test_joint_loss_equals_per_sequence_computation_and_ignores_padding():
    bilm = make()
    params = randomize(bilm.init(jax.random.key(0)), jax.random.key(1))
    ids, lengths = tokens(), jnp.asarray(LENGTHS)
    def nll(logits, targets, positions):  # -Σ log softmax(logits[positions])[targets], float64
        z = np.asarray(logits, np.float64)[positions]
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -logp[np.arange(len(targets)), targets].sum()

    f_total = b_total = 0.0
    count = 0
    for b, n in enumerate(LENGTHS):  # each sequence alone, through the hand composition
        _, fwd, bwd = hand_layers(bilm, params, ids[b : b + 1, :n], None)
        seq = np.asarray(ids[b, :n])
        f_total += nll(softmax_logits(params, fwd[-1])[0], seq[1:], np.arange(n - 1))  # position t predicts t + 1
        b_total += nll(softmax_logits(params, bwd[-1])[0], seq[:-1], np.arange(1, n))  # position t predicts t - 1
        count += n - 1
    want = 0.5 * (f_total / count + b_total / count)
    assert_close(bilm.loss(params, Batch(ids, seq_lengths=lengths)), want, scale=10)
    got_f, got_b, got_n = bilm.nll(params, ids, lengths)
    assert int(got_n) == count
    assert_close(got_f, f_total, scale=10)
    assert_close(got_b, b_total, scale=10)
    # Poisoned padding: same loss and gradients.
    grad = jax.value_and_grad(bilm.loss)
    (l1, g1), (l2, g2) = grad(params, Batch(ids, seq_lengths=lengths)), grad(params, dict(tokens=tokens(poison=True), seq_lengths=lengths))
    assert not np.array_equal(ids, tokens(poison=True))
    assert_close(l1, l2)
    assert_close(g1, g2)


def test_tagger_on_scalar_mix_features_end_to_end():
    C = 3
    with jax.enable_x64(True):
        bilm = make()
        bp = randomize(bilm.init(jax.random.key(0), jnp.float64), jax.random.key(1))
        tagger = Tagger(C, jaxrnn.Stack(jaxrnn.GRU(3), bidirectional=True), input_size=2 * H, impl=IMPL)
        tp = randomize(tagger.init(jax.random.key(2), jnp.float64), jax.random.key(3))
        ids, lengths = tokens(), jnp.asarray(LENGTHS)
        labels = jax.random.randint(jax.random.key(4), (B, T), 0, C)

        @jax.jit  # one compilation for the eight evaluations (eagerly, each would compile its scans anew)
        def loss(weights, gamma):
            feats = bilm.embed_contextual(bp, MixParams(weights, gamma), ids, lengths)
            return tagger.loss(tp, Batch(feats, labels, lengths))

        weights, gamma = jnp.array([0.2, -0.5, 0.7], jnp.float64), jnp.float64(1.3)
        grad, g_gamma = jax.jit(jax.grad(loss, argnums=(0, 1)))(weights, gamma)
        eps = 1e-5
        fd = np.array([(loss(weights.at[j].add(eps), gamma) - loss(weights.at[j].add(-eps), gamma)) / (2 * eps) for j in range(3)])
        np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-9)
        assert np.abs(grad).max() > 1e-4  # the gradient does flow into the mix weights
        fd_gamma = (loss(weights, gamma + eps) - loss(weights, gamma - eps)) / (2 * eps)
        np.testing.assert_allclose(float(g_gamma), float(fd_gamma), rtol=1e-6, atol=1e-9)


def test_nnx_bilm_equals_functional_calls():
    from flax import nnx

    from jaxrnn.models import nnx as mnnx

    bilm = make(dropout=0.3)
    module = mnnx.BiLM(bilm, rngs=nnx.Rngs(params=0, dropout=1))
    ids, lengths = tokens(), jnp.asarray(LENGTHS)
    module.eval()
    params, mix = module.get_params(), module.get_mix()
    assert_close(module(ids, lengths), bilm.embed_contextual(params, mix, ids, lengths))
    assert_close(module.representations(ids, lengths), bilm.representations(params, ids, lengths))
    batch = Batch(ids, seq_lengths=lengths)
    assert_close(module.loss(batch), bilm.loss(params, batch))
    # nnx.grad over the module reaches the mix weights, as jax.grad of the functional mix does.
    grads = nnx.grad(lambda m: jnp.sum(m(ids, lengths) ** 2))(module)
    want = jax.grad(lambda w: jnp.sum(bilm.embed_contextual(params, MixParams(w, mix.gamma), ids, lengths) ** 2))(mix.weights)
    assert_close(grads["mix"]["weights"][...], want)


def test_bad_configuration_and_params():
    with pytest.raises(ValueError, match=r"connection: expected one of \(None, 'residual', 'highway'\), got 'dense'"):
        make("dense")
    with pytest.raises(ValueError, match=r"dropout_mode: expected one of"):
        make(dropout_mode="sometimes")
    bilm = make()
    params = bilm.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"params.embedding: expected shape \(8, 4\)"):
        bilm.apply(params._replace(embedding=jnp.zeros((8, 5))), tokens())
    with pytest.raises(TypeError, match="mix_params: expected MixParams"):
        bilm.embed_contextual(params, (jnp.zeros(3), 1.0), tokens())
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\)"):
        bilm.embed_contextual(params, MixParams(jnp.zeros(2), jnp.ones(())), tokens())
