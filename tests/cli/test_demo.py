"""``jaxrnn demo``: it trains, reports a lower perplexity after training,
writes a valid PNG, and answers bad command lines with one line and status 2,
before any work (well under a second)."""

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrnn import cli, data, demo
from jaxrnn.cli import demo as demo_cli

TINY = ["--hidden", "16", "--embed", "8", "--batch", "8", "--seq-len", "24", "--impl", "reference"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_perplexity(out, label):
    match = re.search(rf"^\s*{label}\s+([0-9.]+)", out, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{out}"
    return float(match.group(1))


def check_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert np.std(pixels[..., :3]) > 0.05  # something is drawn


def test_demo_trains_and_writes_figure(tmp_path, capsys):
    out_dir = tmp_path / "figs"
    rc = demo_cli.main([*TINY, "--steps", "40", "--out", str(out_dir), "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    before = read_perplexity(out, "perplexity before training")
    after = read_perplexity(out, "perplexity after training")
    assert after < before, out
    for cell in ("LSTM", "GRU", "Elman"):  # all three trained with the same budget
        assert f"\n{cell}: 1 layer(s), hidden 16" in out
    assert read_perplexity(out, "after training, GRU") < before
    assert f"Figure: {out_dir / demo.FIGURE_NAME}" in out
    check_png(out_dir / demo.FIGURE_NAME)
    # The progress table has a row per evaluation, ending at the last step.
    rows = re.findall(r"^\s+(\d+)\s+\S+\s+\S+\s+[0-9.]+\s+[0-9.]+s$", out, re.MULTILINE)
    assert rows[0] == "0" and rows[-1] == "40" and len(rows) == 11


def test_demo_user_text_single_cell(tmp_path, capsys):
    text = "the cat sat on the mat. " * 30
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    rc = demo_cli.main([*TINY, "--steps", "30", "--cell", "gru", "--no-compare", "--prompt", "the ",
                    "--text", str(path), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"({len(text):,} chars, {data.Vocab.from_text(text).size} distinct)" in out
    assert "\nGRU: " in out and "\nLSTM: " not in out
    assert read_perplexity(out, "perplexity after training") < read_perplexity(out, "perplexity before training")
    check_png(tmp_path / demo.FIGURE_NAME)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--steps", "0"], "--steps: expected a positive integer, got '0'"),
        (["--steps", "ten"], "--steps: expected a positive integer, got 'ten'"),
        (["--cell", "rnn"], "--cell: invalid choice: 'rnn'"),
        (["--text", "/nonexistent/corpus.txt"], "text: no such file '/nonexistent/corpus.txt'"),
        (["--prompt", "The~"], "--prompt: characters '~' do not occur in the text"),
        (["--seq-len", "100000"], "--seq-len: 100000 is too long"),
        (["--temperature", "-1"], "--temperature: expected a finite number >= 0, got '-1'"),
        (["--temperature", "nan"], "--temperature: expected a finite number >= 0, got 'nan'"),
        (["--temperature", "inf"], "--temperature: expected a finite number >= 0, got 'inf'"),
        (["--lr", "inf"], "--lr: expected a positive finite number, got 'inf'"),
        (["--lr", "nan"], "--lr: expected a positive finite number, got 'nan'"),
        (["--lr=-1e-3"], "--lr: expected a positive finite number, got '-1e-3'"),
        (["--clip", "0"], "--clip: expected a positive finite number, got '0'"),
        (["--seed", "-1"], "--seed: expected an integer in [0, 2**31), got '-1'"),
        (["--prompt", ""], "--prompt: expected at least one character"),
    ],
)
def test_bad_flags_one_line_nonzero(argv, message, capsys):
    start = time.perf_counter()
    assert demo_cli.main(argv) == 2
    assert time.perf_counter() - start < 1.0  # rejected before any training
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxrnn demo: "), captured.err
    assert message in lines[0]


def bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    missing = tmp_path / "missing.txt"
    return [
        (missing, f"argument --text: no such file {str(missing)!r}"),
        (empty, f"argument --text: file {str(empty)!r} is empty"),
        (binary, f"argument --text: file {str(binary)!r} is binary, expected UTF-8 text"),
        (latin, f"argument --text: file {str(latin)!r} is not UTF-8 text"),
    ]


def test_bad_text_file_named_before_any_work(tmp_path, capsys):
    for path, message in bad_files(tmp_path):
        start = time.perf_counter()
        assert cli.main(["demo", "--text", str(path), "--out", str(tmp_path / "out")]) == 2
        assert time.perf_counter() - start < 1.0
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"jaxrnn demo: {message}"), captured.err
    assert not (tmp_path / "out").exists()


def test_out_an_existing_file_rejected_before_training(tmp_path, capsys):
    existing = tmp_path / "figure.png"
    existing.write_bytes(b"not a folder")
    start = time.perf_counter()
    assert cli.main(["demo", "--steps", "1000000", "--out", str(existing)]) == 2
    assert time.perf_counter() - start < 1.0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"jaxrnn demo: argument --out: expected a folder, but {str(existing)!r} is an existing file"
    ]
    assert existing.read_bytes() == b"not a folder"


def test_bad_flag_in_a_subprocess(tmp_path):
    """The installed entry point: one line on stderr, exit status 2, nothing on stdout."""
    existing = tmp_path / "file"
    existing.write_text("x", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "jaxrnn", "demo", "--out", str(existing)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"jaxrnn demo: argument --out: expected a folder, but {str(existing)!r} is an existing file"
    ]


def test_cli_dispatches_to_demo(capsys):
    assert cli.main(["demo", "--steps", "-3"]) == 2
    assert capsys.readouterr().err.startswith("jaxrnn demo: argument --steps")
    assert demo_cli.main(["--help"]) == 0
    assert "--no-compare" in capsys.readouterr().out
