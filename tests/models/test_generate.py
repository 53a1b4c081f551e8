"""Generation (jaxrnn.models.generate, also jaxrnn.lm.generate) against references: greedy decoding against a
Python loop over ``model.step`` taking the argmax; ``top_k=1`` against greedy; the top-p set against
hand-computed examples (ties included); sampled frequencies against the truncated, renormalised softmax written
in NumPy; one compilation for repeated calls (a trace counter); clear errors for bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from jaxrnn import lm, models
from jaxrnn.models import lm as lm_src
from _util import normal

VOCAB = 6


def tiny_model(vocab=VOCAB, cell=None, **kwargs):
    return models.LanguageModel(vocab, cell or jaxrnn.GRU(5), embed_size=3, impl="reference", **kwargs)


def random_params(model, seed=0, scale=0.3):
    params = model.init(jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def python_greedy(model, params, prompt, length):
    """Reference: feed the prompt token by token through ``model.step``, then take the argmax ``length`` times."""
    carry = model.zero_carry((prompt.shape[0],))
    for t in range(prompt.shape[1]):
        carry, logits = model.step(params, carry, prompt[:, t])
    out = []
    for _ in range(length):
        token = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)
        out.append(token)
        carry, logits = model.step(params, carry, jnp.asarray(token))
    return np.stack(out, axis=1)


# --------------------------------------------------------------------------
# Greedy decoding
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["gru", "lstm_tied"])
def test_greedy_matches_python_loop_over_step(cell):
    if cell == "gru":
        model = tiny_model()
    else:
        model = tiny_model(cell=jaxrnn.LSTM(3), tie_weights=True)
    params = random_params(model, seed=2, scale=1.0)
    prompt = jax.random.randint(jax.random.key(2), (3, 4), 0, VOCAB, dtype=jnp.int32)
    tokens = models.generate(model, params, jax.random.key(3), prompt, 7, temperature=0.0)
    expected = python_greedy(model, params, prompt, 7)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(set(expected.ravel().tolist())) > 1  # not a trivial constant sequence


def test_top_k_1_equals_greedy_and_seed_is_reproducible():
    model = tiny_model()
    params = random_params(model, seed=4, scale=1.0)
    prompt = jax.random.randint(jax.random.key(5), (4, 2), 0, VOCAB, dtype=jnp.int32)
    greedy = models.generate(model, params, jax.random.key(6), prompt, 9, temperature=0.0)
    for key in (6, 7):
        top1 = models.generate(model, params, jax.random.key(key), prompt, 9, temperature=1.3, top_k=1)
        np.testing.assert_array_equal(top1, greedy)
    a = models.generate(model, params, jax.random.key(8), prompt, 9, top_p=0.9)
    b = models.generate(model, params, jax.random.key(8), prompt, 9, top_p=0.9)
    c = models.generate(model, params, jax.random.key(9), prompt, 9, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 9) and bool(jnp.any(a != c))


# --------------------------------------------------------------------------
# The kept set of top-k / top-p, by hand
# --------------------------------------------------------------------------
PROBS = np.array([0.1, 0.4, 0.2, 0.2, 0.1])  # ids 2 and 3 tie, so do 0 and 4


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (None, 0.3, {1}),  # 0.4 >= 0.3 already
        (None, 0.4, {1}),
        (None, 0.5, {1, 2}),  # 0.4 + 0.2 >= 0.5; of the tied 2 and 3 the lower id
        (None, 0.6, {1, 2}),  # exactly reached: no third token
        (None, 0.61, {1, 2, 3}),
        (None, 0.85, {0, 1, 2, 3}),  # 0.8 < 0.85; of the tied 0 and 4 the lower id
        (None, 1.0, {0, 1, 2, 3, 4}),
        (2, None, {1, 2}),  # top-2: 0.4, then the lower id of the tie
        (3, None, {1, 2, 3}),
        (2, 0.6, {1}),  # after top-2 the renormalised probabilities are 2/3 and 1/3
        (2, 0.7, {1, 2}),
    ],
)
def test_filter_logits_keeps_the_smallest_set(top_k, top_p, kept):
    logits = jnp.log(jnp.asarray(PROBS, jnp.float32))
    out = np.asarray(models.filter_logits(logits, top_k=top_k, top_p=top_p))
    assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept
    np.testing.assert_array_equal(out[sorted(kept)], np.asarray(logits)[sorted(kept)])
    # Batched rows are filtered independently: each row as if alone.
    other = jnp.log(jnp.asarray([0.05, 0.05, 0.1, 0.3, 0.5], jnp.float32))
    both = np.asarray(models.filter_logits(jnp.stack([logits, other]), top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(both[0], out)
    np.testing.assert_array_equal(both[1], np.asarray(models.filter_logits(other, top_k=top_k, top_p=top_p)))


# --------------------------------------------------------------------------
# Sampled distributions: the truncated, renormalised softmax
# --------------------------------------------------------------------------
def reference_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """softmax(logits / τ), keep the top k, then the smallest prefix reaching p, renormalise (NumPy, float64)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.size, bool)
    keep[order[: (z.size if top_k is None else top_k)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p is not None:
        cum, nucleus = 0.0, np.zeros(z.size, bool)
        for i in order:
            if keep[i] and cum < top_p:
                nucleus[i] = True
                cum += p[i]
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, None, None), (1.0, 3, None), (1.0, None, 0.6), (1.5, 4, 0.8)],
)
def test_first_token_frequencies_follow_truncated_softmax(temperature, top_k, top_p):
    """N = 20,000 first tokens from one batched call. Bound: every token's frequency within 5 standard errors
    sqrt(p (1 - p) / N) of its probability (a false failure has probability < 1e-5 per test), and tokens outside
    the kept set never drawn."""
    model = tiny_model()
    params = random_params(model, seed=3, scale=0.8)
    n = 20_000
    prompt = jnp.full((n, 2), 1, jnp.int32)
    tokens, logits = models.generate(
        model, params, jax.random.key(10), prompt, 1, temperature, return_logits=True, top_k=top_k, top_p=top_p
    )
    np.testing.assert_array_equal(logits[0, 0], logits[-1, 0])  # every row has the same first distribution
    expected = reference_distribution(logits[0, 0], temperature, top_k, top_p)
    kept = expected > 0
    if top_k is not None or top_p is not None:
        assert 2 <= kept.sum() < VOCAB, expected  # the truncation is exercised, not trivial
    freq = np.bincount(np.asarray(tokens[:, 0]), minlength=VOCAB) / n
    assert np.all(freq[~kept] == 0), (freq, expected)
    bound = 5 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= bound), (freq, expected, bound)


@pytest.mark.parametrize(
    "predraw", [True, False], ids=["noise-before-the-loop-projection-table", "noise-per-step-projection-per-step"]
)
def test_sampling_matches_python_loop_over_categorical(monkeypatch, predraw):
    """Both ways of drawing the Gumbel noise (and of projecting the first layer's input) give the tokens
    of a Python loop over ``model.step`` that calls ``jax.random.categorical`` on the filtered, tempered
    logits with ``jax.random.split(key, length)[i]``."""
    monkeypatch.setattr(lm_src, "NOISE_PREDRAW_BYTES", 2**30 if predraw else 0)
    monkeypatch.setattr(lm_src, "FIRST_PROJECTIONS_MAX_BYTES", 2**30 if predraw else 0)
    model = tiny_model(cell=jaxrnn.LSTM(5), num_layers=2)
    params = random_params(model, seed=6, scale=1.0)
    prompt = jax.random.randint(jax.random.key(4), (5, 3), 0, VOCAB, dtype=jnp.int32)
    # The threshold is read when the decode is traced: a length of each variant's own, so neither reuses the other's program.
    length, key, temperature, top_k = (9 if predraw else 11), jax.random.key(8), 1.3, 4
    tokens = models.generate(model, params, key, prompt, length, temperature, top_k=top_k)
    carry = model.zero_carry((prompt.shape[0],))
    for t in range(prompt.shape[1]):
        carry, logits = model.step(params, carry, prompt[:, t])
    want = []
    for k in jax.random.split(key, length):
        token = jax.random.categorical(k, lm_src.filter_logits(logits / temperature, top_k=top_k), axis=-1)
        want.append(np.asarray(token))
        carry, logits = model.step(params, carry, token.astype(jnp.int32))
    np.testing.assert_array_equal(np.asarray(tokens), np.stack(want, axis=1))
    assert len(set(np.asarray(tokens).ravel().tolist())) > 2  # sampled, not a constant sequence


def test_first_projections_are_each_tokens_projection():
    model = tiny_model(cell=jaxrnn.LSTM(5), num_layers=2)
    params = random_params(model, seed=7)
    table = model.first_projections(params)
    layer = params.rnn[0].fwd
    want = np.asarray(params.embed) @ np.asarray(layer.w_ih) + np.asarray(layer.b)
    np.testing.assert_allclose(np.asarray(table), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"params: expected LMParams"):
        model.first_projections(params.rnn)
    bad = params._replace(rnn=(params.rnn[0],))
    with pytest.raises(TypeError, match=r"params.rnn: expected a tuple of 2 LayerParams, got 1 layers"):
        model.first_projections(bad)


# --------------------------------------------------------------------------
# One compiled loop
# --------------------------------------------------------------------------
def test_second_call_does_not_retrace(monkeypatch):
    model = tiny_model(vocab=9)
    params = random_params(model, seed=5)
    traces = []
    original = type(model)._step  # what the decode loop traces (step = the checks + _step)

    def counting_step(self, *args):
        traces.append(1)
        return original(self, *args)

    monkeypatch.setattr(type(model), "_step", counting_step)
    prompt = jnp.zeros((3, 2), jnp.int32)
    first = models.generate(model, params, jax.random.key(0), prompt, 13, temperature=0.9, top_k=4, top_p=0.8)
    assert len(traces) >= 1  # the step is traced, not run per token: a 13-token decode traced once
    n = len(traces)
    second = models.generate(model, params, jax.random.key(1), prompt + 1, 13, temperature=0.5, top_k=2, top_p=0.5)
    assert len(traces) == n  # new key, prompt, temperature, top_k and top_p values: no retrace
    assert first.shape == second.shape == (3, 13)
    models.generate(model, params, jax.random.key(1), prompt, 13, temperature=0.5)  # top_k/top_p None: new program
    assert len(traces) > n


# --------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------
def test_bad_arguments_name_themselves():
    model = tiny_model()
    params = model.init(jax.random.key(0))
    prompt = jnp.zeros((2, 3), jnp.int32)
    key = jax.random.key(0)
    cases = [
        (dict(temperature=-0.5), ValueError, "temperature: expected a value >= 0, got -0.5"),
        (dict(top_k=0), ValueError, "top_k: expected a positive int, got 0"),
        (dict(top_k=VOCAB + 1), ValueError, rf"top_k: expected an int in \[1, {VOCAB}\] \(the vocabulary size\), got 7"),
        (dict(top_k=2.5), TypeError, "top_k: expected a positive int"),
        (dict(top_p=0.0), ValueError, r"top_p: expected a probability in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), ValueError, r"top_p: expected a probability in \(0, 1\], got 1.5"),
        (dict(top_p=-0.1), ValueError, r"top_p: expected a probability in \(0, 1\]"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            models.generate(model, params, key, prompt, 4, **kwargs)
    with pytest.raises(ValueError, match=r"prompt: expected token ids in \[0, 6\), got min 0 and max 6"):
        models.generate(model, params, key, prompt.at[1, 2].set(VOCAB), 4)
    with pytest.raises(ValueError, match=r"prompt: expected token ids in \[0, 6\), got min -1 and max 0"):
        models.generate(model, params, key, prompt.at[0, 0].set(-1), 4)
    with pytest.raises(ValueError, match=r"prompt: expected at least one token, got shape \(0,\)"):
        models.generate(model, params, key, jnp.zeros((0,), jnp.int32), 4)
    with pytest.raises(ValueError, match=r"prompt: expected shape \(batch, length\) with length >= 1, got \(2, 0\)"):
        models.generate(model, params, key, prompt[:, :0], 4)
    with pytest.raises(TypeError, match="key: expected a PRNG key"):
        models.generate(model, params, 0, prompt, 4)
    assert lm.generate is models.generate and lm.filter_logits is models.filter_logits
