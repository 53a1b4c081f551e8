"""The language model (jaxrnn.lm) and its data helpers (jaxrnn.data), against
hand-written references: Python loops over ``cell.step`` with an explicit
log-softmax, per-row evaluation, and ``jaxrnn.rnn`` over the full prefix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_close

import jaxrnn
from jaxrnn import data, lm

CELLS = {
    "lstm": jaxrnn.LSTM(5),
    "gru": jaxrnn.GRU(5),
    "gru_after": jaxrnn.GRU(5, reset="after"),
    "elman": jaxrnn.Elman(5),
}


def tiny_model(cell="lstm", layers=2, vocab=7, impl="reference"):
    return lm.LanguageModel(vocab, CELLS[cell], num_layers=layers, embed_size=3, impl=impl)


def random_params(model, seed=0):
    """Initialised parameters with non-zero biases, so every term is exercised."""
    params = model.init(jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def random_tokens(key, shape, vocab=7):
    return jax.random.randint(key, shape, 0, vocab, dtype=jnp.int32)


def reference_nll(model, params, row):
    """Per-token negative log-likelihoods of one 1-D token row, by a Python loop over ``cell.step``."""
    carry = [model.cell.zero_carry(()) for _ in range(model.num_layers)]
    out = []
    for t in range(len(row) - 1):
        x = params.embed[row[t]]
        for layer in range(model.num_layers):
            carry[layer], x = model.cell.step(params.rnn[layer].fwd, carry[layer], x)
        logits = np.asarray(x, np.float64) @ np.asarray(params.w_out, np.float64) + np.asarray(params.b_out)
        shifted = logits - logits.max()
        log_probs = shifted - np.log(np.sum(np.exp(shifted)))
        out.append(-log_probs[int(row[t + 1])])
    return np.asarray(out)


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_loss_matches_python_loop(cell):
    model = tiny_model(cell)
    params = random_params(model)
    tokens = random_tokens(jax.random.key(1), (3, 6))
    expected = np.mean([reference_nll(model, params, np.asarray(r)) for r in tokens])
    assert_close(lm.loss(model, params, tokens), np.float32(expected))


def test_loss_default_impl_matches_reference():
    """The model's default (fused) implementation gives the reference loss and gradient."""
    tokens = random_tokens(jax.random.key(2), (3, 9))
    fast, ref = tiny_model(impl="auto"), tiny_model(impl="reference")
    params = random_params(ref)
    value_fast, grad_fast = jax.value_and_grad(lambda p: lm.loss(fast, p, tokens))(params)
    value_ref, grad_ref = jax.value_and_grad(lambda p: lm.loss(ref, p, tokens))(params)
    assert_close(value_fast, value_ref)
    assert_close(grad_fast, grad_ref, scale=10)


def test_masking_ignores_padded_targets():
    model = tiny_model("gru")
    params = random_params(model)
    tokens = random_tokens(jax.random.key(3), (3, 8))
    lengths = jnp.array([8, 5, 2], jnp.int32)
    value = lm.loss(model, params, tokens, lengths)

    # Reference: every row evaluated alone on its valid tokens only.
    per_token = np.concatenate([reference_nll(model, params, np.asarray(r)[:n]) for r, n in zip(tokens, lengths)])
    assert_close(value, np.float32(per_token.mean()))
    total, count = lm.nll(model, params, tokens, lengths)
    assert int(count) == 7 + 4 + 1

    # Changing padded tokens leaves the loss and its gradient unchanged ...
    pad = jnp.arange(8)[None, :] >= lengths[:, None]
    other = jnp.where(pad, (tokens + 1 + jnp.arange(8)[None, :]) % 7, tokens)
    assert bool(jnp.any(other != tokens))
    grad = jax.grad(lambda p, t: lm.loss(model, p, t, lengths))
    np.testing.assert_array_equal(lm.loss(model, params, other, lengths), value)
    assert_close(grad(params, other), grad(params, tokens))
    # ... and changing a valid one does not.
    changed = tokens.at[1, 4].set((tokens[1, 4] + 1) % 7)
    assert abs(float(lm.loss(model, params, changed, lengths)) - float(value)) > 1e-4


def test_perplexity_chunks_and_uniform_model():
    model = tiny_model("elman", layers=1)
    params = random_params(model)
    tokens = random_tokens(jax.random.key(4), (5, 6))
    lengths = np.array([6, 3, 6, 2, 4], np.int32)
    total, count = lm.nll(model, params, tokens, lengths)
    expected = math.exp(float(total) / int(count))
    assert_close(np.float32(lm.perplexity(model, params, tokens, lengths, batch_size=2)), np.float32(expected))
    # A model that predicts the uniform distribution has perplexity V exactly.
    uniform = params._replace(w_out=jnp.zeros_like(params.w_out), b_out=jnp.zeros_like(params.b_out))
    assert_close(np.float32(lm.perplexity(model, uniform, tokens)), np.float32(model.vocab_size))


def test_unigram_perplexity_by_hand():
    train, evaluate = np.array([0, 0, 0, 1]), np.array([0, 1, 2])
    # add-one counts: [4, 2, 1] / 7
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
    assert lm.unigram_perplexity(train, evaluate, 3) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_generate_carried_state_matches_full_prefix(cell):
    model = tiny_model(cell)
    params = random_params(model)
    prompt = random_tokens(jax.random.key(5), (2, 3))
    tokens, logits = lm.generate(model, params, jax.random.key(6), prompt, 5, temperature=1.0, return_logits=True)
    assert tokens.shape == (2, 5) and logits.shape == (2, 5, 7)
    # Re-run prompt + generated tokens from scratch through jaxrnn.rnn, layer by layer. The output at
    # position P-1+i has read exactly the prefix prompt + tokens[:i], i.e. the state generate() carried.
    sequence = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    x = params.embed[sequence]
    for layer in params.rnn:
        x, _ = jaxrnn.rnn(model.cell, layer.fwd, x, impl="reference")
    expected = x @ params.w_out + params.b_out[None, None, :]
    assert_close(logits, expected[:, prompt.shape[1] - 1 :])


def test_generate_greedy_and_unbatched():
    model = tiny_model("lstm")
    params = random_params(model)
    prompt = random_tokens(jax.random.key(7), (4,))
    tokens, logits = lm.generate(model, params, jax.random.key(8), prompt, 6, temperature=0.0, return_logits=True)
    assert tokens.shape == (6,) and logits.shape == (6, 7)
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))
    batched = lm.generate(model, params, jax.random.key(8), prompt[None], 6, temperature=0.0)
    np.testing.assert_array_equal(batched[0], tokens)


def test_generate_temperature_samples_from_softmax():
    """Sample frequencies of the first new token follow softmax(logits / τ)."""
    model = tiny_model("elman", layers=1, vocab=3)
    params = random_params(model, seed=3)
    prompt = jnp.zeros((4000, 1), jnp.int32)
    tau = 0.5
    tokens, logits = lm.generate(model, params, jax.random.key(9), prompt, 1, temperature=tau, return_logits=True)
    freq = np.bincount(np.asarray(tokens[:, 0]), minlength=3) / 4000
    expected = np.asarray(jax.nn.softmax(logits[0, 0] / tau))
    np.testing.assert_allclose(freq, expected, atol=0.03)  # ~4 standard errors


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def test_training_learns_a_repetitive_text():
    text = "abcabd" * 40
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    p = np.bincount(ids) / ids.size
    unigram_entropy = float(-(p * np.log(p)).sum())  # 1.33 nats

    model = lm.LanguageModel(vocab.size, jaxrnn.LSTM(16), embed_size=4, impl="reference")
    params = model.init(jax.random.key(0))
    optimizer = lm.make_optimizer(1e-2, clip_norm=0.1)
    opt_state = optimizer.init(params)
    train_step = lm.make_train_step(model, optimizer)
    windows = data.split_windows(ids, 13)

    params1, _, metrics = train_step(params, opt_state, windows)
    grad = jax.grad(lambda p: lm.loss(model, p, windows))(params)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree_util.tree_leaves(grad)))
    assert norm > 0.1  # clipping at 0.1 is active: the metric is the norm before clipping
    assert_close(metrics["grad_norm"], np.float32(norm))
    assert_close(metrics["loss"], lm.loss(model, params, windows))

    for _ in range(100):
        params, opt_state, metrics = train_step(params, opt_state, windows)
    final = float(lm.loss(model, params, windows))
    assert final < 0.2 * unigram_entropy, (final, unigram_entropy)


# --------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------
def test_vocab_round_trip_on_default_text():
    text = data.load_text()
    assert text == data.DEFAULT_TEXT and len(text) > 5000 and text.isascii()
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.max() == vocab.size - 1
    assert vocab.decode(ids) == text


def test_split_windows_cover_every_target_once():
    ids = np.arange(23, dtype=np.int32)
    w = data.split_windows(ids, 5)
    assert w.shape == ((23 - 1) // 4, 5)
    np.testing.assert_array_equal(w[:, 1:].ravel(), ids[1 : 1 + w.shape[0] * 4])
    np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])  # consecutive windows overlap by one


def test_sample_windows_are_slices():
    ids = jnp.arange(100, dtype=jnp.int32) * 3
    w = np.asarray(data.sample_windows(jax.random.key(0), ids, 16, 9))
    assert w.shape == (16, 9)
    starts = w[:, 0] // 3
    np.testing.assert_array_equal(w, 3 * (starts[:, None] + np.arange(9)[None, :]))
    assert starts.max() <= 100 - 9 and len(set(starts.tolist())) > 1


def test_train_val_split_and_load_text_file(tmp_path):
    a, b = data.train_val_split(np.arange(10), 0.25)
    np.testing.assert_array_equal(np.concatenate([a, b]), np.arange(10))
    assert b.size == 3
    path = tmp_path / "t.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert data.load_text(path) == "hello world\n"


# --------------------------------------------------------------------------
# Bad input: clear errors before any XLA error
# --------------------------------------------------------------------------
def test_bad_input_errors(tmp_path):
    model = tiny_model("lstm")
    params = model.init(jax.random.key(0))
    ok = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(TypeError, match="tokens: expected an integer array"):
        lm.loss(model, params, ok.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(batch, length\) with length >= 2, got \(4,\)"):
        lm.loss(model, params, ok[0])
    with pytest.raises(ValueError, match=r"tokens: expected shape \(batch, length\) with length >= 2, got \(2, 1\)"):
        lm.loss(model, params, ok[:, :1])
    with pytest.raises(ValueError, match=r"tokens: expected token ids in \[0, 7\), got min 0 and max 7"):
        lm.loss(model, params, ok.at[0, 0].set(7))
    with pytest.raises(ValueError, match=r"seq_lengths: expected shape \(2,\), got \(3,\)"):
        lm.loss(model, params, ok, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"seq_lengths: expected values in \[0, 4\]"):
        lm.loss(model, params, ok, jnp.array([1, 5]))
    with pytest.raises(ValueError, match=r"params.embed: expected shape \(7, 3\), got \(8, 3\)"):
        lm.loss(model, params._replace(embed=jnp.zeros((8, 3))), ok)
    with pytest.raises(TypeError, match="params: expected LMParams"):
        lm.loss(model, tuple(params), ok)
    with pytest.raises(ValueError, match="tokens: expected at least one row with 2 or more valid tokens"):
        lm.perplexity(model, params, ok, np.array([1, 0]))
    with pytest.raises(ValueError, match="length: expected a positive int, got 0"):
        lm.generate(model, params, jax.random.key(0), ok[0], 0)
    with pytest.raises(ValueError, match="temperature: expected a value >= 0, got -1"):
        lm.generate(model, params, jax.random.key(0), ok[0], 3, temperature=-1)
    with pytest.raises(ValueError, match=r"prompt: expected shape \(batch, length\) with length >= 1, got \(2, 0\)"):
        lm.generate(model, params, jax.random.key(0), ok[:, :0], 3)
    with pytest.raises(ValueError, match="vocab_size: expected a positive int, got 0"):
        lm.LanguageModel(0, jaxrnn.LSTM(4))
    with pytest.raises(TypeError, match="cell: expected a jaxrnn cell"):
        lm.LanguageModel(5, "lstm")
    with pytest.raises(ValueError, match="impl: expected one of"):
        lm.LanguageModel(5, jaxrnn.LSTM(4), impl="cudnn")

    vocab = data.Vocab.from_text("abc")
    with pytest.raises(ValueError, match="text: character 'z' is not in the vocabulary"):
        vocab.encode("abz")
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 3\), got min 0 and max 3"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="chars: expected distinct characters"):
        data.Vocab("aba")
    with pytest.raises(ValueError, match="ids: expected at least 5 tokens for window=5, got 4"):
        data.split_windows(np.arange(4), 5)
    with pytest.raises(ValueError, match="window: expected an int >= 2, got 1"):
        data.split_windows(np.arange(4), 1)
    with pytest.raises(ValueError, match="ids: expected at least window=9 tokens, got 4"):
        data.sample_windows(jax.random.key(0), jnp.arange(4), 2, 9)
    with pytest.raises(FileNotFoundError, match="text: no such file"):
        data.load_text(tmp_path / "missing.txt")
