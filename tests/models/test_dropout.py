"""Dropout in the models: the biLM's variational dropout against hand-written ``jaxrnn.rnn`` runs on
inputs masked with the documented keys; the NNX tagger's dropout stream against the functional
``apply`` with the same key, and without dropout in eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
from _util import assert_close, randomize
from flax import nnx

import jaxrnn
from jaxrnn.models import Batch, BiLM, Tagger
from jaxrnn.models import nnx as mnnx

B, T, V, H, L, P = 3, 5, 8, 4, 2, 0.4
LENGTHS = jnp.array([T, 3, 2])
IMPL = "reference"


def test_bilm_variational_dropout_equals_hand_composition():
    bilm = BiLM(V, jaxrnn.GRU(H), L, dropout=P, dropout_mode="variational", impl=IMPL)
    params = randomize(bilm.init(jax.random.key(0)), jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    key = jax.random.key(7)
    _, fwd, bwd, _, _ = bilm.layer_outputs(params, ids, LENGTHS, dropout_key=key)
    # Documented draw: keys = split(key, 2L), forward layer j from keys[j], backward from keys[L + j]; each layer
    # is a one-layer Stack with input_dropout, whose mask comes from split(k, 1)[-1], shape (B, 1, H).
    keys = jax.random.split(key, 2 * L)
    valid = (jnp.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    emb = jnp.where(valid, params.embedding[ids], 0.0)
    for name, reverse, got, offset in (("forward", False, fwd, 0), ("backward", True, bwd, L)):
        u = emb
        for j, p in enumerate(getattr(params, name)):
            keep = jax.random.bernoulli(jax.random.split(keys[offset + j], 1)[-1], 1 - P, (B, 1, H))
            # One mask per sequence: the same for the reversed sequence, so reverse=True applies as is.
            u, _ = jaxrnn.rnn(bilm.cell, p.fwd, jnp.where(keep, u / (1 - P), 0.0), seq_lengths=LENGTHS, reverse=reverse, impl=IMPL)
            assert_close(got[j], u)
    no_drop = bilm.layer_outputs(params, ids, LENGTHS)[1]
    assert float(jnp.abs(no_drop[-1] - fwd[-1]).max()) > 1e-3


def test_nnx_tagger_dropout_stream_and_eval_equal_functional_apply():
    stack = jaxrnn.Stack(jaxrnn.LSTM(H), 2, bidirectional=True, dropout=P, dropout_mode="variational", input_dropout=0.1)
    tagger = Tagger(3, stack, input_size=6, vocab_size=V, impl=IMPL)
    module = mnnx.Tagger(tagger, rngs=nnx.Rngs(params=0, dropout=1))
    ids = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    params = module.get_params()
    key = nnx.clone(module).rngs()  # the key the next call draws
    train_out = module(ids, LENGTHS)
    assert_close(train_out, tagger.apply(params, ids, LENGTHS, dropout_key=key))
    module.eval()
    eval_out = module(ids, LENGTHS)
    assert_close(eval_out, tagger.apply(params, ids, LENGTHS))
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-3
    assert_close(nnx.view(module, deterministic=True)(ids, LENGTHS), eval_out)
    labels = jax.random.randint(jax.random.key(3), (B, T), 0, 3)
    batch = Batch(ids, labels, LENGTHS)
    assert_close(module.loss(batch), tagger.loss(params, batch))
    assert_close(module.accuracy(batch), tagger.accuracy(params, batch))
    # Given parameters, no rngs: deterministic use only.
    given = mnnx.Tagger(tagger, params=params, deterministic=True)
    assert_close(given(ids, LENGTHS), eval_out)
    np.testing.assert_array_equal(np.asarray(eval_out)[1, 3:], 0.0)
