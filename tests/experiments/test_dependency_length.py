"""``jaxrnn experiment dependency-length``: the record follows its rule; the evaluation is checked on a hand-set model."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import Elman, ElmanParams
from jaxrnn.experiments import common, dependency_length

CFG = dependency_length.CONFIGS["small"]


def test_record_structure_and_the_max_distance_rule(experiment_record):
    record, out = experiment_record("dependency-length")
    results = record["results"]
    assert record["config"]["distances"] == CFG["distances"] and (out / "dependency-length.png").is_file()
    assert results["target_accuracy"] == CFG["target_accuracy"] and results["chance"] == 1 / CFG["num_symbols"]
    for name in ("elman", "lstm", "gru"):
        accs = results[name]["accuracy_by_distance"]
        assert sorted(accs, key=int) == [str(d) for d in CFG["distances"]]
        scores = [accs[str(d)] for d in CFG["distances"]]
        for a in scores:  # an accuracy over eval_size test sequences: a multiple of 1/eval_size in [0, 1]
            assert 0.0 <= a <= 1.0 and a * CFG["eval_size"] == pytest.approx(round(a * CFG["eval_size"]))
        # the documented rule, applied by hand to the reported numbers
        expected = 0
        for d, a in zip(CFG["distances"], scores):
            if a < CFG["target_accuracy"]:
                break
            expected = d
        assert results[name]["max_distance"] == expected
        assert all(np.isfinite(v) and v >= 0 for v in results[name]["final_loss_by_distance"].values())
    assert max(results[n]["accuracy_by_distance"]["1"] for n in ("elman", "lstm", "gru")) > 0.5  # above chance 0.25


def shift_register(num_symbols, depth, read):
    """A linear Elman RNN whose state holds the last ``depth`` inputs; the read-out answers the one ``read`` back."""
    K, H = num_symbols, num_symbols * depth
    w_hh = np.zeros((H, H), np.float32)
    for j in range(depth - 1):  # block j (x_{t-j}) moves to block j+1
        w_hh[j * K : (j + 1) * K, (j + 1) * K : (j + 2) * K] = np.eye(K)
    w_ih = np.zeros((K, H), np.float32)
    w_ih[:, :K] = np.eye(K)
    w = np.zeros((H, K), np.float32)
    w[read * K : (read + 1) * K] = np.eye(K)
    cell = Elman(H, activation="linear")
    params = common.ModelParams(ElmanParams(jnp.asarray(w_ih), jnp.asarray(w_hh), jnp.zeros(H)), jnp.asarray(w), jnp.zeros(K))
    return cell, params


def test_evaluation_on_a_hand_set_delay_line():
    """A model that reads the symbol 2 back scores 1 at ℓ = 2 and chance elsewhere, through the experiment's own code."""
    K, T = 4, 6
    cell, params = shift_register(K, 4, read=2)
    accuracy = lambda ell: dependency_length.distance_accuracy(  # noqa: E731
        cell, params, ell, seq_len=T, num_symbols=K, size=2000, seed=3
    )
    assert accuracy(2) == 1.0
    for ell in (0, 1, 3):
        assert abs(accuracy(ell) - 1 / K) < 0.05  # independent uniform symbols: chance
    # its loss is the cross-entropy of logits one-hot(answer): log(K - 1 + e) - 1
    batch = (np.full((2, T), 1, np.int32), np.full((2,), 1, np.int32))
    loss = dependency_length.last_step_loss(cell, K, params, batch)
    assert float(loss) == pytest.approx(np.log(K - 1 + np.e) - 1, rel=1e-6)
