"""jaxrnn.analysis.figures: the figure data against jaxrnn.analysis and the theory, the lecture's
claims on that data, PNGs written; importing jaxrnn does not import matplotlib."""

import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
from _util import assert_close, normal

import jaxrnn
from jaxrnn import analysis
from jaxrnn.analysis import figures


def test_gradients_through_time_data_and_lecture_claims():
    data = figures.gradients_through_time_data(seq_len=40, hidden_size=8, batch_size=3, seed=1)
    # the figure's curves are analysis.grad_norms_through_time's batch-mean ratios on the same inputs
    k_x, k_p = jax.random.split(jax.random.key(1))
    xs = normal(k_x, (3, 40, 8))
    cell = jaxrnn.LSTM(8, forget_bias=3.0)
    norms = analysis.grad_norms_through_time(cell, cell.init(k_p, 8), xs, reduce="mean")
    d = data["LSTM, forget bias 3"]
    assert_close(d["ratio_h"], norms.h[::-1] / norms.h[-1])
    assert_close(d["ratio_c"][1:], (norms.c[::-1] / norms.h[-1])[1:])
    assert np.isnan(d["ratio_c"][0])
    assert d["horizon"] == int(analysis.memory_horizon(norms.h, 0.01))
    # the lectures' claim on this data: the open highway keeps far more gradient than a vanilla RNN
    elman = data["Elman (tanh)"]
    assert d["ratio_h"][30] > 1e3 * elman["ratio_h"][30]
    assert d["horizon"] > elman["horizon"]
    assert data["GRU, update bias -3"]["horizon"] > data["GRU"]["horizon"]
    assert 0.0 <= elman["saturation"][1] <= elman["saturation"][0] <= 1.0


def test_lambda_grid_data_matches_theory():
    lams, lengths = (0.9, 0.95, 1.1), (10, 50, 100)
    theory, measured = figures.lambda_grid_data(lams, lengths, hidden_size=8)
    np.testing.assert_allclose(theory, np.array(lams)[:, None] ** np.array(lengths)[None, :])
    np.testing.assert_allclose(measured, theory, rtol=1e-5)
    np.testing.assert_allclose(measured[1, 1], 0.0769, atol=5e-5)  # the lecture's 0.95^50


def png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    assert np.std(image[..., :3]) > 0.05  # something was drawn
    return image


def test_plot_functions_on_given_data(tmp_path):
    """The plot functions take data from anywhere (here made up) and create missing folders."""
    ws = np.linspace(0.0, 2.0, 50)
    curve = analysis.CliffCurve(ws, (ws - 1.0) ** 2, 2 * (ws - 1.0))
    path = figures.plot_cliff(curve, curve, str(tmp_path / "sub" / "c.png"), seq_len=20)
    assert path == str(tmp_path / "sub" / "c.png")
    png(path)
    profiles = 0.5 ** np.arange(6.0)[::-1][None, :] * np.ones((3, 1))
    run = analysis.TrainingProfile(np.array([0, 2, 4]), profiles, np.linspace(1.0, 0.5, 4), None, None)
    png(figures.plot_training_profile(run, str(tmp_path / "t.png")))


def test_import_jaxrnn_does_not_import_matplotlib():
    """Only jaxrnn.analysis.figures imports matplotlib, and jaxrnn.analysis loads it on first use."""
    code = (
        "import sys, jaxrnn, jaxrnn.analysis as A; print('matplotlib' in sys.modules); "
        "A.figures.plot_cliff; print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
