"""``jaxrnn experiment initialisation``: profiles and horizons follow their definitions; the variants are the named inits."""

import jax
import numpy as np
import pytest

from jaxrnn import LSTM
from jaxrnn.experiments import common, initialisation

CFG = initialisation.CONFIGS["small"]


def test_profiles_horizons_and_the_lectures_orderings(experiment_record):
    record, out = experiment_record("initialisation")
    results = record["results"]
    T, thr = CFG["profile_len"], CFG["threshold"]
    assert (out / "initialisation.png").is_file()
    for name in CFG["variants"]:
        entry = results[name]
        profile = np.asarray(entry["profile"])
        assert len(profile) == T and profile[0] == pytest.approx(1.0)  # ratio at ℓ = 0 is 1 by definition
        below = np.nonzero(profile < thr)[0]
        assert entry["horizon"] == (below[0] if len(below) else T)  # first ℓ below the threshold, else T
        assert len(entry["losses"]) == CFG["steps"] and np.isfinite(entry["final_loss"])
        assert entry["final_loss"] < entry["losses"][0]  # every variant learns something
    # orthogonal: every singular value 1; Gaussian N(0, 1/H): spread
    lo, hi = results["elman_orthogonal"]["singular_values"]
    assert lo == pytest.approx(1.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
    lo, hi = results["elman_gaussian"]["singular_values"]
    assert hi > 1.5 and hi / lo > 10
    # the lectures' claims at initialisation: a larger forget bias keeps more gradient far back,
    # and the identity-initialised ReLU RNN keeps more than the tanh RNNs
    far = {name: results[name]["profile"][T - 1] for name in CFG["variants"]}
    assert far["lstm_forget_0"] < far["lstm_forget_1"] < far["lstm_forget_3"]
    assert far["irnn"] > max(far["elman_orthogonal"], far["elman_gaussian"])


def test_variants_are_the_named_initialisations():
    key = jax.random.key(0)
    cell, params = initialisation.variant("lstm_forget_3", 16, 2, 1, key)
    k_model, _ = jax.random.split(key)
    reference = common.init_model(LSTM(16, forget_bias=3.0), k_model, 2, 1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)
    with pytest.raises(ValueError, match="name"):
        initialisation.variant("xavier", 4, 2, 1, key)
