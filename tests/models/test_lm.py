"""The language model (jaxrnn.models.lm, also jaxrnn.lm) against hand-written references: Python
loops over ``cell.step`` with an explicit log-softmax, per-row evaluation, and ``jaxrnn.rnn`` over
the full prefix; its train step (jaxrnn.train's: clipping measured, non-finite steps never applied);
token ids out of range (an error where concrete, a NaN loss under jit, never a clamp)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import assert_close, normal

import jaxrnn
from jaxrnn import data, lm, models
from jaxrnn.models import lm as models_lm

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
    leaves = [x + 0.3 * normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
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
    assert set(metrics) == {"loss", "grad_norm", "clipped", "finite"}
    assert bool(metrics["clipped"]) and bool(metrics["finite"])

    for _ in range(100):
        params, opt_state, metrics = train_step(params, opt_state, windows)
    final = float(lm.loss(model, params, windows))
    assert final < 0.2 * unigram_entropy, (final, unigram_entropy)


def test_train_step_state_and_plain_optax_optimizer():
    model = tiny_model("gru", layers=1)
    params = random_params(model)
    tokens = random_tokens(jax.random.key(10), (3, 6))
    optimizer = lm.make_optimizer(1e-2, clip_norm=1e6)
    train_step = lm.make_train_step(model, optimizer)
    # optimizer.init (what callers did) and train_step.init make the same state.
    a, b = optimizer.init(params), train_step.init(params)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    _, _, metrics = train_step(params, a, tokens)
    assert not bool(metrics["clipped"]) and bool(metrics["finite"])
    # Any optax transformation: no clipping, and the state from train_step.init.
    sgd_step = lm.make_train_step(model, optax.sgd(0.1))
    new, _, metrics = sgd_step(params, sgd_step.init(params), tokens)
    grad = jax.grad(lambda p: lm.loss(model, p, tokens))(params)
    assert_close(new, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grad))
    assert not bool(metrics["clipped"])
    with pytest.raises(TypeError, match="model: expected a LanguageModel"):
        lm.make_train_step("lstm", optimizer)
    with pytest.raises(ValueError, match="clip_norm"):
        lm.make_optimizer(1e-2, clip_norm=0.0)


def test_train_step_never_applies_out_of_range_ids():
    """Under the step's jit ids cannot be checked: an id outside [0, V) makes the loss NaN and the step is
    rejected (parameters and optimiser state unchanged and finite), wherever it is, padding included."""
    model = tiny_model("lstm")
    params = random_params(model)
    optimizer = lm.make_optimizer(1e-2, clip_norm=1.0)
    train_step = lm.make_train_step(model, optimizer)
    tokens = random_tokens(jax.random.key(11), (3, 6))
    params, opt_state, metrics = train_step(params, train_step.init(params), tokens)
    assert bool(metrics["finite"])
    lengths = jnp.array([6, 4, 6], jnp.int32)
    for bad, seq_lengths in (
        (tokens.at[1, 2].set(7), None),  # an input
        (tokens.at[0, 5].set(9), None),  # a target only
        (tokens.at[2, 0].set(-1), None),  # negative: no wrap-around either
        (tokens.at[1, 5].set(7), lengths),  # in padding
    ):
        new_params, new_state, metrics = train_step(params, opt_state, bad, seq_lengths)
        assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
        for x, y in zip(jax.tree_util.tree_leaves((new_params, new_state)), jax.tree_util.tree_leaves((params, opt_state))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(new_params))


# --------------------------------------------------------------------------
# Token ids out of range: an error where concrete, NaN under jit, never a clamp
# --------------------------------------------------------------------------
def test_out_of_range_ids_raise_where_concrete():
    model = tiny_model("gru")
    params = model.init(jax.random.key(0))
    ok = jnp.zeros((2, 4), jnp.int32)
    for bad, lo, hi in ((ok.at[1, 2].set(7), 0, 7), (ok.at[0, 0].set(-2), -2, 0), (ok.at[0, 1].set(12), 0, 12)):
        expected = rf"tokens: expected token ids in \[0, 7\), got min {lo} and max {hi}"
        with pytest.raises(ValueError, match=expected):
            model.apply(params, bad)
        with pytest.raises(ValueError, match=expected):
            lm.loss(model, params, bad)
        with pytest.raises(ValueError, match=expected):
            lm.nll(model, params, bad, jnp.array([4, 2]))  # padding is checked too
    with pytest.raises(ValueError, match=r"tokens: expected token ids in \[0, 7\), got min 0 and max 8"):
        model.step(params, model.zero_carry((2,)), jnp.array([0, 8]))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(batch,\), got \(2, 4\)"):
        model.step(params, model.zero_carry((2,)), ok)
    with pytest.raises(ValueError, match=r"prompt: expected token ids in \[0, 7\), got min -1 and max 0"):
        lm.generate(model, params, jax.random.key(0), jnp.array([0, -1]), 3)


def test_out_of_range_ids_are_nan_under_jit():
    model = tiny_model("lstm")
    params = random_params(model)
    tokens = random_tokens(jax.random.key(12), (3, 6))
    loss = jax.jit(lambda p, t, n=None: lm.loss(model, p, t, n))
    apply = jax.jit(lambda p, t: model.apply(p, t)[0])
    step = jax.jit(lambda p, t: model.step(p, model.zero_carry((3,)), t)[1])
    assert np.isfinite(float(loss(params, tokens)))
    assert_close(loss(params, tokens), lm.loss(model, params, tokens))
    for bad_id in (7, 100, -1, -7):
        bad = tokens.at[1, 3].set(bad_id)
        assert np.isnan(float(loss(params, bad)))
        logits = np.asarray(apply(params, bad))
        assert np.isnan(logits[1, 3:]).all()  # from the bad id on: its row of the batch only
        assert np.isfinite(logits[1, :3]).all() and np.isfinite(logits[[0, 2]]).all()
        step_logits = np.asarray(step(params, bad[:, 3]))
        assert np.isnan(step_logits[1]).all() and np.isfinite(step_logits[[0, 2]]).all()
    # A bad target (the last token is only a target) and a bad id in padding make the loss NaN too.
    assert np.isnan(float(loss(params, tokens.at[0, 5].set(7))))
    assert np.isnan(float(loss(params, tokens.at[0, 5].set(7), jnp.array([4, 6, 6], jnp.int32))))


def test_models_package_and_old_names():
    assert jaxrnn.LanguageModel is models.LanguageModel is lm.LanguageModel is models_lm.LanguageModel
    assert jaxrnn.LMParams is models.LMParams is lm.LMParams
    for name in models_lm.__all__:
        assert getattr(lm, name) is getattr(models, name) is getattr(models_lm, name), name
    assert lm.generate is models.generate and lm.make_train_step is models.make_train_step


# --------------------------------------------------------------------------
# Bad input: clear errors before any XLA error
# --------------------------------------------------------------------------
def test_bad_input_errors():
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


# --------------------------------------------------------------------------
# Weight tying, embedding dropout, a Stack as the recurrent part
# --------------------------------------------------------------------------
def test_tied_logits_are_h_times_embedding_transposed():
    model = lm.LanguageModel(7, jaxrnn.LSTM(4), num_layers=2, embed_size=4, impl="reference", tie_weights=True)
    params = random_params(model, seed=5)
    assert params.w_out is None
    tokens = random_tokens(jax.random.key(20), (2, 5))
    logits, _ = model.apply(params, tokens)
    h = params.embed[tokens]
    for layer in params.rnn:
        h, _ = jaxrnn.rnn(model.cell, layer.fwd, h, impl="reference")
    E, b = np.asarray(params.embed, np.float64), np.asarray(params.b_out, np.float64)
    expected = np.asarray(h, np.float64) @ E.T + b  # (B, T, V), by hand
    assert_close(logits, expected.astype(np.float32))
    # The reference loop with w_out = E.T gives the tied loss.
    untied_view = params._replace(w_out=params.embed.T)
    per_token = np.concatenate([reference_nll(model, untied_view, np.asarray(r)) for r in tokens])
    assert_close(lm.loss(model, params, tokens), np.float32(per_token.mean()))


def test_tied_gradient_is_sum_of_embedding_and_output_gradients():
    tied = lm.LanguageModel(7, jaxrnn.GRU(4), embed_size=4, impl="reference", tie_weights=True)
    untied = lm.LanguageModel(7, jaxrnn.GRU(4), embed_size=4, impl="reference")
    params = random_params(tied, seed=6)
    tokens = random_tokens(jax.random.key(21), (3, 6))
    g_tied = jax.grad(lambda p: lm.loss(tied, p, tokens))(params)
    untied_params = params._replace(w_out=params.embed.T)  # equal matrices
    g_untied = jax.grad(lambda p: lm.loss(untied, p, tokens))(untied_params)
    assert_close(lm.loss(tied, params, tokens), lm.loss(untied, untied_params, tokens))
    assert_close(g_tied.embed, g_untied.embed + g_untied.w_out.T)
    assert_close(g_tied.rnn, g_untied.rnn)
    assert_close(g_tied.b_out, g_untied.b_out)
    assert float(jnp.abs(g_untied.w_out).max()) > 1e-3 and float(jnp.abs(g_untied.embed).max()) > 1e-3


def test_tie_weights_errors():
    with pytest.raises(ValueError, match=r"tie_weights: expected embed_size == hidden_size .*got embed_size=3 and hidden_size=5"):
        lm.LanguageModel(7, jaxrnn.LSTM(5), embed_size=3, tie_weights=True)
    with pytest.raises(TypeError, match="tie_weights: expected a bool, got str 'yes'"):
        lm.LanguageModel(7, jaxrnn.LSTM(5), embed_size=5, tie_weights="yes")
    model = lm.LanguageModel(7, jaxrnn.LSTM(5), embed_size=5, tie_weights=True)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"params.w_out: expected None \(tie_weights=True\), got shape \(5, 7\)"):
        model.apply(params._replace(w_out=jnp.zeros((5, 7))), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"embedding_dropout: expected a rate in \[0, 1\), got 1.0"):
        lm.LanguageModel(7, jaxrnn.LSTM(5), embedding_dropout=1.0)


def test_embedding_dropout_matches_hand_masked_embeddings():
    rate = 0.4
    model = lm.LanguageModel(7, jaxrnn.GRU(5), embed_size=3, impl="reference", embedding_dropout=rate)
    params = random_params(model, seed=7)
    tokens = random_tokens(jax.random.key(22), (3, 6))
    key = jax.random.key(23)
    # Reference: the documented mask, k_embed = split(key)[0], applied to the embeddings by hand.
    k_embed, _ = jax.random.split(key)
    keep = np.asarray(jax.random.bernoulli(k_embed, 1 - rate, (3, 5, 3)))
    assert 0 < keep.mean() < 1
    xs = np.asarray(params.embed)[np.asarray(tokens[:, :-1])] * keep / (1 - rate)
    ys, _ = jaxrnn.rnn(model.cell, params.rnn[0].fwd, jnp.asarray(xs, jnp.float32), impl="reference")
    logits = np.asarray(ys, np.float64) @ np.asarray(params.w_out, np.float64) + np.asarray(params.b_out)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.asarray(tokens[:, 1:])[..., None], -1).mean()
    assert_close(lm.loss(model, params, tokens, dropout_key=key), np.float32(expected))
    # Without a key there is no dropout (evaluation); the train step takes the key.
    assert_close(lm.loss(model, params, tokens), np.float32(np.mean([reference_nll(model, params, np.asarray(r)) for r in tokens])))
    step = lm.make_train_step(model, optax.sgd(0.0))
    _, _, metrics = step(params, step.init(params), tokens, dropout_key=key)
    assert_close(metrics["loss"], np.float32(expected))


def test_stack_as_the_recurrent_part():
    stack = jaxrnn.Stack(jaxrnn.LSTM(4), num_layers=3, connection="dense")
    model = lm.LanguageModel(7, stack, embed_size=3, impl="reference")
    assert model.stack is stack and model.num_layers == 3 and model.hidden_size == 4
    params = random_params(model, seed=8)
    tokens = random_tokens(jax.random.key(24), (2, 6))
    logits, _ = model.apply(params, tokens)
    ys, _ = stack.apply(params.rnn, params.embed[tokens], impl="reference")
    assert_close(logits, ys @ params.w_out + params.b_out[None, None])
    # step() follows the connections too: stepping token by token gives apply's logits.
    carry, stepped = model.zero_carry((2,)), []
    for t in range(6):
        carry, out = model.step(params, carry, tokens[:, t])
        stepped.append(out)
    assert_close(jnp.stack(stepped, axis=1), logits)
    with pytest.raises(ValueError, match="cell: expected a unidirectional Stack"):
        lm.LanguageModel(7, jaxrnn.Stack(jaxrnn.LSTM(4), bidirectional=True))
    with pytest.raises(ValueError, match="num_layers: expected 1 or the Stack's num_layers 3, got 2"):
        lm.LanguageModel(7, stack, num_layers=2)


# --------------------------------------------------------------------------
# Bits per token and whole-split evaluation
# --------------------------------------------------------------------------
def test_bits_per_token_is_nll_over_ln2():
    model = tiny_model("gru", layers=1)
    params = random_params(model)
    tokens = random_tokens(jax.random.key(25), (4, 7))
    total, count = lm.nll(model, params, tokens)
    nats = float(total) / int(count)
    assert lm.bits_per_token(model, params, tokens, batch_size=3) == pytest.approx(nats / math.log(2), rel=1e-6)
    assert 2 ** lm.bits_per_token(model, params, tokens) == pytest.approx(lm.perplexity(model, params, tokens), rel=1e-6)
    result = lm.Evaluation.from_total(6.0, 4)
    assert result == (1.5, math.exp(1.5), 1.5 / math.log(2), 4)


@pytest.mark.parametrize("batch, window", [(1, 4), (1, 50), (3, 2), (4, 3)])
def test_evaluate_whole_split_matches_direct_computation(batch, window):
    model = tiny_model("lstm", layers=2)
    params = random_params(model, seed=9)
    ids = np.asarray(random_tokens(jax.random.key(26), (23,)))
    result = lm.evaluate(model, params, ids, window=window, batch=batch)
    # Direct: the Python loop over cell.step on each stream of predictions, carry never reset inside a stream.
    count = ids.size - 1
    per_stream = -(-count // batch)
    terms = []
    for b in range(batch):
        lo, hi = b * per_stream, min((b + 1) * per_stream, count)
        if lo < hi:
            terms.append(reference_nll(model, params, ids[lo : hi + 1]))  # inputs lo..hi-1, targets lo+1..hi
    terms = np.concatenate(terms)
    assert terms.size == count == result.count
    assert result.nll == pytest.approx(terms.mean(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(terms.mean()), rel=1e-5)
    assert result.bits_per_token == pytest.approx(terms.mean() / math.log(2), rel=1e-5)
    if batch == 1:  # one stream: the whole sequence, i.e. the loss of the single row
        assert result.nll == pytest.approx(float(lm.loss(model, params, jnp.asarray(ids)[None])), rel=1e-5)


def test_evaluate_errors():
    model = tiny_model("gru", layers=1)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"token_ids: expected a 1-D integer array of at least 2 ids, got shape \(1,\)"):
        lm.evaluate(model, params, np.array([3]))
    with pytest.raises(ValueError, match=r"token_ids: expected token ids in \[0, 7\), got min 0 and max 9"):
        lm.evaluate(model, params, np.array([0, 9, 1]))
    with pytest.raises(ValueError, match="window: expected a positive int, got 0"):
        lm.evaluate(model, params, np.array([0, 1, 2]), window=0)
