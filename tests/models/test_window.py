"""The fixed-window neural LM (jaxrnn.models.window) against a NumPy hand computation (padded start, window
concatenation, tanh layer, softmax), its loss falling on a toy corpus under jaxrnn.train's step, and its
whole-split Evaluation against a direct computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import assert_close, normal

from jaxrnn import train
from jaxrnn.models.window import WindowLM, WindowParams


def random_params(model, seed=0):
    params = model.init(jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.3 * normal(k, x.shape) for x, k in zip(leaves, keys)])


def numpy_logits(model, params, row):
    """logits[t] for one 1-D row, by hand: [E[x_{t-n+1}]; ...; E[x_t]] (pad = V before the start) -> tanh -> linear."""
    p = {k: np.asarray(v, np.float64) for k, v in params._asdict().items()}
    n, V = model.window, model.vocab_size
    out = []
    for t in range(len(row)):
        ids = [row[s] if s >= 0 else V for s in range(t - n + 1, t + 1)]
        x = np.concatenate([p["embed"][i] for i in ids])
        h = np.tanh(x @ p["w_hidden"] + p["b_hidden"])
        out.append(h @ p["w_out"] + p["b_out"])
    return np.stack(out)


def numpy_nll(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]


def test_logits_match_numpy():
    model = WindowLM(5, window=3, embed_size=4, hidden_size=6)
    params = random_params(model)
    assert model.pad_id == 5 and params.embed.shape == (6, 4) and params.w_hidden.shape == (12, 6)
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 5, dtype=jnp.int32)
    logits = model.apply(params, tokens)
    expected = np.stack([numpy_logits(model, params, list(np.asarray(r))) for r in tokens])
    assert_close(logits, expected.astype(np.float32))
    # An explicit context replaces the padding: the same as reading it as a prefix.
    context = tokens[:, :2]
    assert_close(model.apply(params, tokens[:, 2:], context=context), logits[:, 2:])


def test_loss_matches_numpy_and_masks_padding():
    model = WindowLM(5, window=2, embed_size=3, hidden_size=4)
    params = random_params(model, seed=3)
    tokens = jax.random.randint(jax.random.key(4), (3, 6), 0, 5, dtype=jnp.int32)
    lengths = np.array([6, 4, 2])
    terms = []
    for r, m in zip(np.asarray(tokens), lengths):
        terms.append(numpy_nll(numpy_logits(model, params, list(r[: m - 1])), r[1:m]))
    assert_close(model.loss(params, (tokens, jnp.asarray(lengths))), np.float32(np.concatenate(terms).mean()))
    full = np.concatenate([numpy_nll(numpy_logits(model, params, list(r[:-1])), r[1:]) for r in np.asarray(tokens)])
    assert_close(model.loss(params, tokens), np.float32(full.mean()))
    # Under jit an out-of-range id makes the loss NaN (the train step then refuses the step).
    assert np.isnan(float(jax.jit(model.loss)(params, tokens.at[0, 3].set(5))))


def test_loss_decreases_on_toy_corpus():
    text = np.array([0, 1, 2, 3, 1, 2, 0, 3] * 30, np.int32)
    model = WindowLM(4, window=2, embed_size=4, hidden_size=16)
    params = model.init(jax.random.key(0))
    windows = jnp.asarray(text[: 16 * 15].reshape(16, 15))
    step = train.make_train_step(model.loss, optax.adam(3e-2))
    opt_state = step.init(params)
    first = float(model.loss(params, windows))
    for _ in range(150):
        params, opt_state, metrics = step(params, opt_state, windows)
        assert bool(metrics.finite)
    final = float(model.loss(params, windows))
    # Given the previous two tokens the next is determined except at the start of each row: far below log 4.
    assert final < 0.3 * first and first > 0.8 * math.log(4), (first, final)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_evaluate_matches_direct_computation(chunk):
    model = WindowLM(6, window=3, embed_size=3, hidden_size=5)
    params = random_params(model, seed=5)
    ids = np.asarray(jax.random.randint(jax.random.key(6), (19,), 0, 6))
    terms = numpy_nll(numpy_logits(model, params, list(ids[:-1])), ids[1:])
    result = model.evaluate(params, ids, chunk=chunk)
    assert result.count == 18
    assert result.nll == pytest.approx(terms.mean(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(terms.mean()), rel=1e-5)
    assert result.bits_per_token == pytest.approx(terms.mean() / math.log(2), rel=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="window: expected a positive int, got 0"):
        WindowLM(5, window=0)
    model = WindowLM(5, window=2, embed_size=3, hidden_size=4)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"tokens: expected token ids in \[0, 6\), got min 0 and max 7"):
        model.apply(params, jnp.array([[0, 7]]))
    with pytest.raises(ValueError, match=r"tokens: expected token ids in \[0, 5\), got min 0 and max 5"):
        model.loss(params, jnp.array([[0, 5, 1]]))  # the pad id is never a target
    with pytest.raises(ValueError, match=r"params.w_out: expected shape \(4, 5\), got \(4, 6\)"):
        model.apply(params._replace(w_out=jnp.zeros((4, 6))), jnp.array([[0, 1]]))
    with pytest.raises(TypeError, match="params: expected WindowParams"):
        model.apply(tuple(params), jnp.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"context: expected shape \(1, 1\), got \(1, 2\)"):
        model.apply(params, jnp.array([[0, 1]]), context=jnp.array([[0, 1]]))
    assert isinstance(params, WindowParams)
