"""``jaxrnn experiment attention-path``: attention's gradient does not decay with distance, an Elman RNN's does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import Elman, rnn
from jaxrnn.experiments import attention_path as ap
from _util import normal

CFG = ap.CONFIGS["small"]


def test_record_attention_does_not_decay_geometrically(experiment_record):
    record, out = experiment_record("attention-path")
    results = record["results"]
    assert (out / "attention-path.png").is_file()
    for name in ("elman", "lstm", "attention"):
        norms = np.asarray(results[name]["norms"])
        assert len(norms) == CFG["seq_len"] and np.all(norms > 0)
        assert results[name]["far_over_near"] == pytest.approx(norms[-1] / norms[1], rel=1e-6)
    att, elman, lstm = results["attention"], results["elman"], results["lstm"]
    assert att["far_over_near"] > 0.1 and att["rate"] > 0.95  # one step from every token
    assert elman["far_over_near"] < 1e-3 and elman["rate"] < 0.9  # a product over ℓ steps
    assert att["far_over_near"] > 1e3 * elman["far_over_near"]
    assert elman["rate"] < lstm["rate"] < att["rate"]


def test_input_gradient_norms_against_jacrev():
    xs = normal(jax.random.key(0), (1, 5, 3))
    params = ap.init_attention(jax.random.key(1), 3, 4)
    jac = jax.jacrev(lambda x: ap.attention_last(params, x[None])[0])(xs[0])  # (D, T, I)
    expected = np.linalg.norm(np.asarray(jac).sum(0), axis=-1)[::-1]  # ∂(Σ y)/∂x_{T-1-ℓ}
    np.testing.assert_allclose(ap.input_gradient_norms(ap.attention_last, params, xs), expected, rtol=1e-5)


def test_uniform_attention_is_flat_and_a_contracting_elman_is_geometric():
    T, I, D, H = 12, 3, 4, 6
    xs = normal(jax.random.key(0), (1, T, I))
    params = ap.init_attention(jax.random.key(1), I, D)
    uniform = params._replace(wq=jnp.zeros((I, D)))  # q = 0: every weight 1/T, ∂J/∂x_s = W_v 1 / T
    norms = ap.input_gradient_norms(ap.attention_last, uniform, xs)
    np.testing.assert_allclose(norms, np.linalg.norm(np.asarray(params.wv).sum(1)) / T, rtol=1e-5)
    # Elman with ‖W_hh‖ = 0.5 and tanh' <= 1: ‖∂J/∂x_{T-1-ℓ}‖ <= ‖W_ih‖ · 0.5^ℓ · ‖1_H‖
    cell = Elman(H, recurrent_scale=0.5)
    p = cell.init(jax.random.key(2), I)
    elman = ap.input_gradient_norms(lambda q, x: rnn(cell, q, x, impl="reference")[0][:, -1], p, xs)
    bound = np.linalg.norm(np.asarray(p.w_ih), 2) * 0.5 ** np.arange(T) * np.sqrt(H)
    assert np.all(elman <= bound * (1 + 1e-5))


def test_rate_is_fitted_before_float32_underflow():
    """A geometric decay 0.5^ℓ that underflows to 0 after ℓ = 40: the rate is still 0.5, from the ℓ before it."""
    norms = np.asarray(0.5 ** np.arange(60), np.float32)
    norms[41:] = 0
    far_over_near, rate = ap.decay_summary(norms)
    assert far_over_near == 0 and rate == pytest.approx(0.5, rel=1e-6)
