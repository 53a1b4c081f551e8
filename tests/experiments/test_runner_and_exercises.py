"""``jaxrnn experiment``: the record's contents, the command line's checks, and the exercises' answers."""

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from jaxrnn import GRU, LSTM, LSTMCarry, cli, experiments, rnn
from jaxrnn.cli import experiment as experiment_cli
from jaxrnn.experiments import common, exercises
from _util import normal

RECORD_KEYS = {"experiment", "config", "seed", "device", "versions", "seconds", "results", "figures"}


def test_record_has_every_field_and_the_figure_is_a_png(experiment_record):
    record, out = experiment_record("exercises")
    assert RECORD_KEYS <= set(record)
    assert record["experiment"] == "exercises" and record["seed"] == 0
    assert record["config"] == {"name": "small", **exercises.CONFIGS["small"]}
    assert record["versions"]["jax"] == jax.__version__ and record["device"].startswith("cpu")
    assert 0 < record["seconds"] < 600
    assert record["figures"] == [str(out / "exercises.png")]
    image = matplotlib.image.imread(record["figures"][0])
    assert image.ndim == 3 and image.shape[1] > 500


def test_exercise_answers_match_the_lectures(experiment_record):
    results = experiment_record("exercises")[0]["results"]
    eig = results["eigenvalue"]["steps"]
    assert eig["50"]["percent"] == pytest.approx(7.69, abs=1e-9) and eig["100"]["percent"] == pytest.approx(0.59)
    for n in (50, 100):
        assert eig[str(n)]["theory"] == pytest.approx(0.95**n, rel=1e-12)
        assert eig[str(n)]["measured"] == pytest.approx(0.95**n, rel=1e-4)  # a linear RNN with W = 0.95·Q
    assert results["forget_0"]["max_abs_c_minus_i_g"] < 1e-6 and results["forget_0"]["max_cell_path_product"] < 1e-30
    assert results["forget_1_input_0"]["max_abs_cT_minus_c0"] < 1e-20
    assert results["gru_as_lstm"]["max_abs_diff"] < 1e-5 and results["gru_as_lstm"]["output_scale"] > 0.1
    counts = results["parameter_counts"]
    # 4(H(I+H)+H) and 3(H(I+H)+H) at I = 256, H = 512; reset="after" adds the H-vector b_hn
    assert counts["count_params"] == {"lstm": 1574912, "gru_before": 1181184, "gru_after": 1181184 + 512}
    assert counts["lecture"] == {"lstm": 1574912, "gru": 1181184}
    assert counts["gru_over_lstm"] == pytest.approx(0.75, abs=1e-6)
    assert results["all_passed"] is True


def test_pinned_gates_are_exactly_zero_and_one():
    cfg = exercises.CONFIGS["small"]  # its shapes: the experiment's compilations are reused
    H, I, T, B = cfg["lstm_hidden"], cfg["input_size"], cfg["forget_steps"], cfg["batch"]
    cell = LSTM(H)
    params = exercises.pinned_forget_gate(cell, cell.init(jax.random.key(1), I), forget=1, input_gate=0)
    xs = normal(jax.random.key(2), (B, T, I)) * 10
    c0 = jnp.tile(jnp.arange(H, dtype=jnp.float32) - H / 2 + 0.5, (B, 1))  # no zero: 0 + i·g would be 1e-23
    carry0 = LSTMCarry(jnp.ones((B, H)), c0)
    carries, (i, f, g, o) = common.state_trajectory(cell, params, xs, carry0)
    cs = carries.c
    assert np.all(np.asarray(f) == 1.0) and np.all(np.asarray(i) < 1e-20)
    np.testing.assert_array_equal(cs[-1], carry0.c)


def test_gru_as_tied_lstm_differs_when_the_gates_are_not_tied():
    """The construction is exact; untie it (f from the reset gate instead of 1 - u) and the outputs differ."""
    cfg = exercises.CONFIGS["small"]
    cell = GRU(cfg["gru_hidden"])
    params = cell.init(jax.random.key(0), cfg["input_size"])
    xs = normal(jax.random.key(1), (cfg["batch"], cfg["gru_steps"], cfg["input_size"]))
    ref = rnn(cell, params, xs, impl="reference")[0]
    np.testing.assert_allclose(exercises.gru_as_tied_lstm(cell, params, xs), ref, atol=1e-6)
    r, u, n = cell.split_gates(params.w_hh)
    swapped = params._replace(w_hh=jnp.concatenate([u, r, n], axis=1))  # a different GRU
    assert float(jnp.max(jnp.abs(exercises.gru_as_tied_lstm(cell, swapped, xs) - ref))) > 1e-3


def test_longest_passing_rule():
    assert common.longest_passing([1, 2, 4, 8], [1.0, 0.95, 0.6, 0.97], 0.9) == 2
    assert common.longest_passing([1, 2], [0.5, 1.0], 0.9) == 0
    assert common.longest_passing([3, 5, 9], [0.9, 0.9, 0.9], 0.9) == 9
    assert common.longest_passing([1, 2, 3], [1.0, float("nan"), 1.0], 0.5) == 1
    with pytest.raises(ValueError, match="keys"):
        common.longest_passing([2, 1], [1.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="scores"):
        common.longest_passing([1, 2], [1.0], 0.5)


def test_format_table():
    text = common.format_table(["cell", "acc"], [["lstm", "1.00"], ["elman", "0.5"]])
    assert text.splitlines() == ["cell    acc", "-----  ----", "lstm   1.00", "elman   0.5"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["nope"], "invalid choice"),
        (["exercises", "--config", "huge"], "--config"),
        (["exercises", "--seed", "-3"], "--seed"),
        (["depths"], "invalid choice"),
        ([], "NAME"),
    ],
)
def test_usage_errors_are_one_line_before_any_work(argv, words, capsys, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(experiments, "run_experiment", lambda *a, **k: calls.append(a))
    for main in (experiment_cli.main, lambda a: cli.main(["experiment", *a])):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jaxrnn experiment: ") and words in err
    taken = tmp_path / "file"
    taken.write_text("x")
    assert experiment_cli.main(["exercises", "--out", str(taken)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert calls == []


def test_unknown_experiment_and_config_in_python():
    with pytest.raises(ValueError, match="name"):
        experiments.run_experiment("nope")
    with pytest.raises(ValueError, match="config"):
        experiments.run_experiment("exercises", "medium")


@pytest.mark.parametrize("name", sorted(experiments.EXPERIMENTS))
def test_full_config_has_every_setting_of_the_small_one(name):
    """``--config full`` is not run here; it must at least name the same settings, each of the same kind."""
    configs = experiments.load(name).CONFIGS
    assert set(configs) == {"small", "full"} and set(configs["small"]) == set(configs["full"])
    for key, value in configs["small"].items():
        assert type(configs["full"][key]) is type(value), key
