"""The ``jaxrnn gradients`` command (jaxrnn.cli.gradients): figures and tables written, every
argument checked before any work, one-line errors."""

import os
import subprocess
import sys

import matplotlib.image
import pytest

from jaxrnn import cli
from jaxrnn.cli import gradients

# the same sizes as tests/analysis/test_figures.py's data test, so that both share compilations
SMALL = "--seq-len 40 --hidden 8 --batch 3 --train-steps 3 --every 2 --train-seq-len 5".split()


def png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500


def test_main_writes_figures_and_tables(tmp_path, capsys):
    assert gradients.main(["--out", str(tmp_path), *SMALL]) == 0
    out = capsys.readouterr().out
    for name in ("gradients_through_time", "lambda_grid", "training_profile", "cliff"):
        png(tmp_path / f"{name}.png")
    for label in ("Elman (tanh)", "LSTM, forget bias 3", "GRU, update bias -3", "horizon@0.01", "max |dL/dw|"):
        assert label in out
    # the λ table prints the measured ratio next to the theory
    row = next(line for line in out.splitlines() if line.startswith("0.95 "))
    assert "0.0769 (0.0769)" in row and "0.00592 (0.00592)" in row


def test_main_selected_figure_only(tmp_path, capsys):
    assert gradients.main(["--out", str(tmp_path), "--figures", "lambda"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["lambda_grid.png"]
    assert "wrote 1 figure(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        a.split()
        for a in (
            "--bogus", "--seq-len 0", "--threshold 2", "--figures nope", "--max-norm -1", "--impl cuda",
            "--learning-rate nan", "--seed -1", "--train-cell rnn",
        )
    ],  # fmt: skip
)
def test_usage_errors_print_one_line(argv, capsys):
    assert gradients.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxrnn gradients: ")
    assert cli.main(["gradients", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.fixture
def no_work(monkeypatch):
    """Replace every figure's report by one that records being called."""
    calls = []
    monkeypatch.setattr(gradients, "REPORTS", {name: lambda args, out, n=name: calls.append(n) for name in gradients.FIGURES})
    return calls


def test_out_that_is_a_file_is_rejected_before_any_work(tmp_path, capsys, no_work):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"not a folder")
    for main in (gradients.main, lambda argv: cli.main(["gradients", *argv])):
        assert main(["--out", str(existing), *SMALL]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--out" in err and "existing file" in err
    assert no_work == []  # no figure was started
    assert existing.read_bytes() == b"not a folder"
    # with a good folder, the same command line does the work
    assert gradients.main(["--out", str(tmp_path / "figs"), *SMALL]) == 0
    assert no_work == list(gradients.FIGURES)


def test_out_that_is_a_file_exits_non_zero_from_the_shell(tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "jaxrnn", "gradients", "--out", str(existing)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "existing file" in out.stderr
    assert out.stdout == ""


def test_help(capsys):
    assert gradients.main(["--help"]) == 0
    assert "--out" in capsys.readouterr().out
