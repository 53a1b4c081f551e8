"""jaxrnn.plotting and the ``jaxrnn gradients`` command: data against jaxrnn.analysis and
the theory, the lecture's claims on the figure data, PNGs written, one-line CLI errors."""

import os

import jax
import matplotlib.image
import numpy as np
import pytest
from _util import assert_close

import jaxrnn
from jaxrnn import analysis, cli, plotting

# the same sizes as the data test below, so that both share compilations
SMALL = "--seq-len 40 --hidden 8 --batch 3 --train-steps 3 --every 2 --train-seq-len 5".split()


def test_gradients_through_time_data_and_lecture_claims():
    data = plotting.gradients_through_time_data(seq_len=40, hidden_size=8, batch_size=3, seed=1)
    # the figure's curves are analysis.grad_norms_through_time's batch-mean ratios on the same inputs
    k_x, k_p = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(k_x, (3, 40, 8))
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
    theory, measured = plotting.lambda_grid_data(lams, lengths, hidden_size=8)
    np.testing.assert_allclose(theory, np.array(lams)[:, None] ** np.array(lengths)[None, :])
    np.testing.assert_allclose(measured, theory, rtol=1e-5)
    np.testing.assert_allclose(measured[1, 1], 0.0769, atol=5e-5)  # the lecture's 0.95^50


def _png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
    assert np.std(image[..., :3]) > 0.05  # something was drawn
    return image


def test_main_writes_figures_and_tables(tmp_path, capsys):
    assert plotting.main(["--out", str(tmp_path), *SMALL]) == 0
    out = capsys.readouterr().out
    for name in ("gradients_through_time", "lambda_grid", "training_profile", "cliff"):
        _png(tmp_path / f"{name}.png")
    for label in ("Elman (tanh)", "LSTM, forget bias 3", "GRU, update bias -3", "horizon@0.01", "max |dL/dw|"):
        assert label in out
    # the λ table prints the measured ratio next to the theory
    row = next(line for line in out.splitlines() if line.startswith("0.95 "))
    assert "0.0769 (0.0769)" in row and "0.00592 (0.00592)" in row


def test_main_selected_figure_only(tmp_path, capsys):
    assert plotting.main(["--out", str(tmp_path), "--figures", "lambda"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["lambda_grid.png"]
    assert "wrote 1 figure(s)" in capsys.readouterr().out


def test_plot_functions_on_given_data(tmp_path):
    """The plot functions take data from anywhere (here made up) and create missing folders."""
    ws = np.linspace(0.0, 2.0, 50)
    curve = analysis.CliffCurve(ws, (ws - 1.0) ** 2, 2 * (ws - 1.0))
    path = plotting.plot_cliff(curve, curve, str(tmp_path / "sub" / "c.png"), seq_len=20)
    assert path == str(tmp_path / "sub" / "c.png")
    _png(path)
    profiles = 0.5 ** np.arange(6.0)[::-1][None, :] * np.ones((3, 1))
    run = analysis.TrainingProfile(np.array([0, 2, 4]), profiles, np.linspace(1.0, 0.5, 4), None, None)
    _png(plotting.plot_training_profile(run, str(tmp_path / "t.png")))


@pytest.mark.parametrize(
    "argv",
    [a.split() for a in ("--bogus", "--seq-len 0", "--threshold 2", "--figures nope", "--max-norm -1", "--impl cuda")],
)
def test_usage_errors_print_one_line(argv, capsys):
    assert plotting.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxrnn gradients: ")
    assert cli.main(["gradients", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_help(capsys):
    assert plotting.main(["--help"]) == 0
    assert "--out" in capsys.readouterr().out
