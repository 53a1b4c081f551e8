"""``jaxrnn experiment depth``: per-layer gradient norms against the reference implementation, the recorded first
loss against a recomputation, and the summary fields against the runs they summarise."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxrnn.data import Vocab, sample_windows, train_val_split
from jaxrnn.experiments import depth
from jaxrnn.experiments.common import load_text
from jaxrnn.models import lm

CFG = depth.CONFIGS["small"]


@pytest.mark.parametrize("connection", ["none", "dense", "highway"])
def test_layer_grad_norms_match_the_reference_recurrence(connection):
    model = depth.build_model(CFG, 3, connection, vocab_size=11)
    reference = dataclasses.replace(model, impl="reference")  # the scan over Cell.step, no custom VJP
    params = model.init(jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 9), 0, 11)
    grads = jax.grad(lambda p: lm.loss(reference, p, tokens))(params)
    expected = [np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree_util.tree_leaves(layer)))
                for layer in grads.rnn]
    np.testing.assert_allclose(np.asarray(depth.layer_grad_norms(model, params, tokens)), expected, rtol=1e-4)
    # residual and highway join at every layer, the first included (the embedding has the stack's width)
    assert (params.rnn[0].highway is not None) == (connection == "highway")


def test_small_run_records_what_it_summarises(experiment_record):
    record, out = experiment_record("depth")
    res = record["results"]
    assert (out / "depth.png").is_file()
    text = load_text(CFG["text"], CFG["max_chars"])
    vocab = Vocab.from_text(text)
    train_ids, _ = train_val_split(vocab.encode(text))
    first_batch = sample_windows(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 1), 0),
                                 jax.numpy.asarray(train_ids), CFG["batch_size"], CFG["window"] + 1)
    probe_steps = list(range(0, CFG["steps"], CFG["probe_every"])) + [CFG["steps"]]
    for d in CFG["depths"]:
        for c in CFG["connections"]:
            run = res["runs"][f"{c}-{d}"]
            assert len(run["losses"]) == len(run["grad_norms"]) == CFG["steps"]
            assert run["probe_steps"] == probe_steps
            assert [len(n) for n in run["layer_grad_norms"]] == [d] * len(probe_steps)
            assert run["first_layer_grad"] == run["layer_grad_norms"][0][0] > 0
            assert run["first_layer_grad_final"] == run["layer_grad_norms"][-1][0] > 0
            assert run["first_to_last"] == pytest.approx(run["layer_grad_norms"][0][0] / run["layer_grad_norms"][0][-1])
            model = depth.build_model(CFG, d, c, vocab.size)  # the first loss is the loss at initialisation
            assert run["losses"][0] == pytest.approx(float(lm.loss(model, model.init(jax.random.key(0)), first_batch)), rel=1e-5)
            assert np.isfinite(run["val_loss"]) and run["final_loss"] < run["losses"][0]
        by_val = {c: res["runs"][f"{c}-{d}"]["val_loss"] for c in CFG["connections"]}
        assert res["best_by_depth"][str(d)] == min(by_val, key=by_val.get)
        by_train = {c: res["runs"][f"{c}-{d}"]["final_loss"] for c in CFG["connections"]}
        assert res["best_train_by_depth"][str(d)] == min(by_train, key=by_train.get)
    deepest = max(CFG["depths"])
    vals = [res["runs"][f"{c}-{deepest}"]["val_loss"] for c in CFG["connections"]]
    assert res["gap_at_deepest"] == pytest.approx(res["runs"][f"none-{deepest}"]["val_loss"] - min(vals))
