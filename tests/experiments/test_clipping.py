"""``jaxrnn experiment clipping``: recorded norms are the gradients' norms; the clipped fraction follows the threshold."""

import functools

import jax
import numpy as np
import optax
import pytest

from jaxrnn.experiments import clipping, common

CFG = clipping.CONFIGS["small"]


def test_recorded_norms_are_optax_tree_norms_and_clipping_follows_them(experiment_record):
    record, out = experiment_record("clipping")
    results = record["results"]
    assert (out / "clipping.png").is_file() and results["max_norm"] == CFG["max_norm"]
    # the mean predictor's loss is the variance of a sum of two uniforms on [0, 1]: 2/12, to sampling error
    assert results["mean_predictor_loss"] == pytest.approx(1 / 6, abs=0.01)
    # the same run again, here: the record's numbers are this run's
    cell, run = clipping.train_run(CFG, record["seed"], clip=True)
    np.testing.assert_allclose(run.grad_norms, results["clipped"]["grad_norms"], rtol=1e-6)
    # one recorded step: ‖∇L‖ at the parameters it started from, recomputed with optax.tree.norm
    k = CFG["check_step"]
    batch = common.adding_batches(CFG["batch_size"], CFG["seq_len"], record["seed"])(k)
    grads = jax.grad(functools.partial(common.adding_loss, cell))(run.kept[k], batch)
    norm = float(optax.tree.norm(grads))
    assert results["clipped"]["grad_norms"][k] == pytest.approx(norm, rel=1e-5)
    assert results["norm_check"]["optax_tree_norm"] == pytest.approx(norm, rel=1e-5)
    # that SGD step moved the parameters by lr · min(‖g‖, max_norm)
    moved = float(optax.tree.norm(jax.tree_util.tree_map(lambda a, b: a - b, run.kept[k + 1], run.kept[k])))
    assert moved == pytest.approx(CFG["learning_rate"] * min(norm, CFG["max_norm"]), rel=1e-4)


def test_clipped_fraction_is_the_fraction_of_norms_above_the_threshold(experiment_record):
    results = experiment_record("clipping")[0]["results"]
    for label in ("clipped", "unclipped"):
        r = results[label]
        norms = np.asarray(r["grad_norms"], float)
        assert len(norms) == len(r["losses"]) == len(r["clipped"]) == CFG["steps"]
        above = np.isfinite(norms) & (norms > CFG["max_norm"])
        expected = above if label == "clipped" else np.zeros_like(above)  # the unclipped run never clips
        np.testing.assert_array_equal(r["clipped"], expected)
        assert r["clipped_fraction"] == pytest.approx(expected.mean())
    # the setting explodes: without clipping the gradient norm reaches far beyond the threshold
    assert results["unclipped"]["max_grad_norm"] > 100 * CFG["max_norm"]
    # the cliff of one tanh unit: a wall far steeper than its plateaus
    assert results["cliff"]["max_abs_slope"] > 100 * results["cliff"]["median_abs_slope"]
