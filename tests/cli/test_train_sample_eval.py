"""``jaxrnn train | sample | eval`` and the Tiny Shakespeare benchmark scaffold.

Every check compares with a reference computed here, directly from the
library: the checkpoint's parameters against a run resumed from it, the
samples against :func:`jaxrnn.models.generate`, the numbers against
:func:`jaxrnn.models.lm.evaluate` and :meth:`jaxrnn.models.KneserNey.evaluate`,
and every bad command line is one line on stderr and exit status 2.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from jaxrnn import cli, data, train
from jaxrnn.cli import lm_common
from jaxrnn.models import KneserNey, generate, lm
from _util import devices_env

TINY = ["--hidden", "16", "--embed", "8", "--batch", "4", "--window", "16", "--impl", "reference", "--checkpoint-every", "3"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def load(checkpoint_dir):
    """The model, parameters and metadata of a checkpoint, rebuilt here from the metadata."""
    _, metadata = train.load_checkpoint(checkpoint_dir)
    model = lm_common.build_model(metadata["config"])
    params, _ = train.load_checkpoint(checkpoint_dir, jax.eval_shape(model.init, jax.random.key(0)))
    return model, params, metadata


def corpus_split(text=None):
    vocab = data.Vocab.from_text(text or data.DEFAULT_TEXT)
    return vocab, *data.train_val_split(vocab.encode(text or data.DEFAULT_TEXT), 0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step character LSTM on the embedded corpus: (checkpoint dir, out dir, stdout)."""
    base = tmp_path_factory.mktemp("train")
    ckpt, out = base / "ckpt", base / "out"
    rc = cli.main(["train", *TINY, "--steps", "6", "--eval-every", "3", "--checkpoint-dir", str(ckpt), "--out", str(out)])
    assert rc == 0
    return ckpt, out


def test_train_checkpoint_metrics_and_figure(trained):
    ckpt, out = trained
    model, params, metadata = load(ckpt)
    vocab, train_ids, val_ids = corpus_split()
    assert metadata["model"] == "lm" and data.Vocab.from_dict(metadata["vocab"]) == vocab
    assert metadata["config"] == lm_common.model_config(vocab.size, hidden=16, embed=8, impl="reference")
    assert metadata["data"]["text"] is None and metadata["data"]["val_tokens"] == val_ids.size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "fault" not in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    # the last validation is the whole validation split, scored by lm.evaluate, of the checkpointed parameters
    assert evals[-1]["eval"]["val_loss"] == pytest.approx(lm.evaluate(model, params, val_ids, window=256).nll, rel=1e-6)
    # the first step's loss is lm.loss of the initial parameters on the first random windows
    first = lm_common.random_windows(train_ids, 4, 16, 0)(0)
    assert steps[0]["loss"] == pytest.approx(float(lm.loss(model, model.init(jax.random.key(0)), first)), rel=1e-5)
    png = (out / "loss.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 10_000


def test_resume_equals_uninterrupted_run(trained, tmp_path, capsys):
    ckpt, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed)
    rc, out, err = run(capsys, "train", *TINY, "--steps", "8", "--checkpoint-dir", resumed)
    assert rc == 0 and err == ""
    rc, _, _ = run(capsys, "train", *TINY, "--steps", "8", "--checkpoint-dir", tmp_path / "straight")
    assert rc == 0
    (_, a, meta_a), (_, b, _) = load(resumed), load(tmp_path / "straight")
    assert meta_a["training"] == {"batch": 4, "window": 16, "stateful": False, "seed": 0}
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sample_equals_generate(trained, capsys):
    ckpt, _ = trained
    model, params, metadata = load(ckpt)
    vocab = data.Vocab.from_dict(metadata["vocab"])
    argv = ["sample", "--checkpoint-dir", ckpt, "--prompt", "The ", "--length", "30", "--seed", "3",
            "--num-samples", "2", "--temperature", "0.7", "--top-k", "10", "--top-p", "0.9"]  # fmt: skip
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == ""
    prompt = vocab.encode("The ")
    tokens = generate(model, params, jax.random.key(3), np.tile(prompt, (2, 1)), 30, 0.7, top_k=10, top_p=0.9)
    texts = [vocab.decode(np.concatenate([prompt, row])) for row in np.asarray(tokens)]
    assert out == f"--- sample 1 ---\n{texts[0]}\n--- sample 2 ---\n{texts[1]}\n"
    assert run(capsys, *argv)[1] == out  # the seed decides
    # one greedy sample from the default prompt (the text's first character)
    rc, out, _ = run(capsys, "sample", "--checkpoint-dir", ckpt, "--length", "12", "--temperature", "0")
    greedy = generate(model, params, jax.random.key(0), vocab.encode("T"), 12, 0.0)
    assert rc == 0 and out == "T" + vocab.decode(greedy) + "\n"


def test_eval_equals_direct_scores(trained, tmp_path, capsys):
    ckpt, _ = trained
    model, params, _ = load(ckpt)
    vocab, train_ids, val_ids = corpus_split()
    rc, out, err = run(capsys, "eval", "--checkpoint-dir", ckpt, "--json", "--ngram-order", "3")
    assert rc == 0 and err == ""
    record = json.loads(out)
    model_eval = lm.evaluate(model, params, val_ids, window=256, batch=1)
    ngram_eval = KneserNey(3, 0.75).fit(train_ids, vocab.size).evaluate(val_ids)
    assert record["count"] == val_ids.size - 1 == record["model"]["count"]
    for key in ("nll", "perplexity", "bits_per_token"):
        assert record["model"][key] == pytest.approx(getattr(model_eval, key), rel=1e-6)
        assert record["ngram"][key] == getattr(ngram_eval, key)
    assert record["model"]["bits_per_token"] == pytest.approx(record["model"]["nll"] / math.log(2))
    # the table: the same numbers, per character
    rc, out, _ = run(capsys, "eval", "--checkpoint-dir", ckpt, "--ngram-order", "3")
    lines = out.splitlines()
    assert rc == 0 and "nats/char" in lines[1] and "bits/char" in lines[1]
    assert lines[2].split()[-3:] == [f"{model_eval.nll:.4f}", f"{model_eval.perplexity:.3f}", f"{model_eval.bits_per_token:.4f}"]
    assert lines[3].split()[-3:] == [f"{ngram_eval.nll:.4f}", f"{ngram_eval.perplexity:.3f}", f"{ngram_eval.bits_per_token:.4f}"]
    # --text: the whole file, with 2 streams
    held = tmp_path / "held.txt"
    held.write_text("The keeper lit the lamp at dusk.\n", encoding="utf-8")
    rc, out, _ = run(capsys, "eval", "--checkpoint-dir", ckpt, "--text", held, "--json", "--streams", "2")
    ids = vocab.encode(held.read_text())
    record = json.loads(out)
    assert record["model"]["nll"] == pytest.approx(lm.evaluate(model, params, ids, window=256, batch=2).nll, rel=1e-6)
    assert record["ngram"]["nll"] == KneserNey(5).fit(train_ids, vocab.size).evaluate(ids).nll


def test_stateful_dropout_tied_word_level(tmp_path, capsys):
    """--stateful trains on consecutive windows of 4 streams; the first loss is the model's on the first of them."""
    text = "the cat sat on the mat . the dog sat on the log . " * 40
    path = tmp_path / "words.txt"
    path.write_text(text, encoding="utf-8")
    argv = ["train", "--text", path, "--level", "word", "--stateful", "--layers", "2", "--hidden", "8", "--tie-weights",
            "--dropout", "0.2", "--dropout-mode", "variational", "--batch", "4", "--window", "5", "--steps", "3",
            "--impl", "reference", "--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path / "out"]  # fmt: skip
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == ""
    model, params, metadata = load(tmp_path / "ckpt")
    assert metadata["config"]["embed"] == 8 and model.tie_weights and params.w_out is None
    vocab = data.Vocab.from_dict(metadata["vocab"])
    train_ids, val_ids = data.train_val_split(vocab.encode(text), 0.1)
    streams = train_ids[: train_ids.size // 4 * 4].reshape(4, -1)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1
    # step 1: the first window of every stream, from a zero state, dropout keyed by fit's fold_in(key(seed + 1), 0)
    init = model.init(jax.random.key(0))
    first = lm.loss(model, init, streams[:, :6], dropout_key=jax.random.fold_in(jax.random.key(1), 0))
    assert records[0]["loss"] == pytest.approx(float(first), rel=1e-5)
    assert records[0]["loss"] != pytest.approx(float(lm.loss(model, init, streams[:, :6])), rel=1e-5)  # dropout acts
    batches = lm_common.stream_windows(train_ids, 4, 5)
    np.testing.assert_array_equal(batches(0), streams[:, :6])
    np.testing.assert_array_equal(batches(1), streams[:, 5:11])
    rc, out, _ = run(capsys, "eval", "--checkpoint-dir", tmp_path / "ckpt", "--json")
    assert json.loads(out)["model"]["nll"] == pytest.approx(lm.evaluate(model, params, val_ids, window=256).nll, rel=1e-6)
    rc, out, _ = run(capsys, "sample", "--checkpoint-dir", tmp_path / "ckpt", "--prompt", "the cat", "--length", "4")
    tokens = generate(model, params, jax.random.key(0), vocab.encode("the cat"), 4)
    assert out == vocab.decode(np.concatenate([vocab.encode("the cat"), np.asarray(tokens)])) + "\n"


# --------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, before any work
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    (base / "empty.txt").write_text("  \n", encoding="utf-8")
    (base / "binary.txt").write_bytes(b"abc\x00\x01")
    (base / "odd.txt").write_text("The ~keeper\u00e9", encoding="utf-8")
    (base / "file").write_text("x", encoding="utf-8")
    (base / "no_checkpoint").mkdir()
    # a checkpoint of another model, and one without metadata["model"]
    for name, metadata in (("tagger", {"model": "tagger"}), ("anonymous", {"vocab": "?"})):
        train.fit(lambda p, b: (p["w"] ** 2).sum(), {"w": np.ones(2, np.float32)}, lambda lr: optax.sgd(lr), lambda i: 0,
                  steps=1, learning_rate=0.1, checkpoint_dir=str(base / name), metadata=metadata, progress=False)  # fmt: skip
    return base


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--steps", "0"], "--steps: expected a positive integer, got '0'"),
        (["train", "--cell", "rnn"], "--cell: invalid choice: 'rnn'"),
        (["train", "--model", "tagger"], "--model: invalid choice: 'tagger'"),
        (["train", "--dropout", "1"], "--dropout: expected a rate in [0, 1), got '1'"),
        (["train", "--dropout-mode", "zoneout"], "--dropout-mode: invalid choice"),
        (["train", "--lr", "nan"], "--lr: expected a positive finite number, got 'nan'"),
        (["train", "--min-count", "100000"], "--min-count: expected at most 2168 (the highest count), got 100000"),
        (["train", "--devices", "2"], "--devices: 2 requested, but only 1 cpu device(s) exist"),
        (["train", "--window", "100000"], "--window: 100000 is too long for a training split of 10370 tokens"),
        (["train", "--stateful", "--batch", "64", "--window", "200"], "--window: 200 is too long"),
        (["train", "--tie-weights", "--hidden", "8", "--embed", "4"], "--tie-weights: needs --embed equal to --hidden"),
        (["train", "--text", "/nonexistent/corpus.txt"], "--text: no such file '/nonexistent/corpus.txt'"),
        (["train", "--text", "{bad}/empty.txt"], "--text: file '{bad}/empty.txt' is empty"),
        (["train", "--text", "{bad}/binary.txt"], "--text: file '{bad}/binary.txt' is binary"),
        (["train", "--checkpoint-dir", "{bad}/file"], "--checkpoint-dir: expected a folder"),
        (["train", "--checkpoint-dir", "{trained}", "--no-resume"], "--checkpoint-dir: '{trained}' holds checkpoints"),
        (["train", *TINY, "--hidden", "32", "--checkpoint-dir", "{trained}"], "holds a checkpoint of another run (config differs (hidden))"),
        (["sample", "--checkpoint-dir", "/nonexistent/run"], "--checkpoint-dir: '/nonexistent/run' does not exist"),
        (["sample", "--checkpoint-dir", "{bad}/no_checkpoint"], "--checkpoint-dir: '{bad}/no_checkpoint' holds no checkpoint"),
        (["sample", "--checkpoint-dir", "{bad}/tagger"], "holds a checkpoint of another model (metadata model 'tagger'"),
        (["eval", "--checkpoint-dir", "{bad}/anonymous"], "holds a checkpoint of another model (metadata model None"),
        (["sample", "--checkpoint-dir", "{trained}", "--prompt", "The ~"], "--prompt: characters '~' are not in the model's vocabulary"),
        (["sample", "--checkpoint-dir", "{trained}", "--prompt", ""], "--prompt: expected at least one token"),
        (["sample", "--checkpoint-dir", "{trained}", "--top-k", "999"], "--top-k: expected at most 51"),
        (["sample", "--checkpoint-dir", "{trained}", "--top-p", "0"], "--top-p: expected a probability in (0, 1], got '0'"),
        (["sample", "--checkpoint-dir", "{trained}", "--temperature", "-1"], "--temperature: expected a finite number >= 0"),
        (["sample", "--checkpoint-dir", "{trained}", "--length", "0"], "--length: expected a positive integer"),
        (["eval", "--checkpoint-dir", "{trained}", "--text", "{bad}/binary.txt"], "--text: file '{bad}/binary.txt' is binary"),
        (["eval", "--checkpoint-dir", "{trained}", "--text", "{bad}/odd.txt"], "--text: characters '~é' of '{bad}/odd.txt' are not in"),
        (["eval", "--checkpoint-dir", "{trained}", "--ngram-order", "0"], "--ngram-order: expected a positive integer"),
        (["eval", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_one_line(argv, message, trained, bad_files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --checkpoint-dir (runs/lm) is never created by a refused command
    fill = lambda s: s.format(bad=bad_files, trained=trained[0])  # noqa: E731
    rc, out, err = run(capsys, *[fill(a) for a in argv])
    assert rc == 2, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"jaxrnn {argv[0]}: ") and fill(message) in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_missing_checkpoint_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxrnn", "eval", "--checkpoint-dir", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"jaxrnn eval: --checkpoint-dir: '{tmp_path / 'none'}' does not exist\n"


# --------------------------------------------------------------------------
# The Tiny Shakespeare benchmark scaffold, at a tiny budget on a slice of the embedded corpus
# --------------------------------------------------------------------------
def test_shakespeare_benchmark_tiny_budget(tmp_path, capsys):
    from benchmarks.studies import shakespeare

    text_path = tmp_path / "slice.txt"
    text_path.write_text(data.DEFAULT_TEXT, encoding="utf-8")
    argv = ["--config", "improved", "--text", text_path, "--max-chars", "4000", "--hidden", "16", "--embed", "8",
            "--batch", "4", "--window", "16", "--impl", "reference", "--minutes", "0.1", "--window-lm-minutes", "0.01",
            "--kn-orders", "2", "3", "4", "--eval-points", "2", "--eval-streams", "2", "--out", tmp_path / "out",
            "--checkpoint-dir", tmp_path / "ckpt"]  # fmt: skip
    assert shakespeare.main([str(a) for a in argv]) == 0
    assert "wrote " in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "shakespeare_improved.json").read_text())
    for key in ("val_loss", "config", "seconds", "tokens_per_second", "device", "versions", "curve", "baselines"):
        assert key in result
    assert result["benchmark"] == "shakespeare" and result["config"]["stateful"] and result["config"]["dropout"] == 0.25
    # the budget: stopped within it (or right after the probe, when a loaded machine spends the budget on the
    # probe), plus one step and the last checkpoint; fewer steps than the probe's only when the budget ran out
    probe_end = result["curve"][0]["seconds"]
    assert result["seconds"] <= max(0.1 * 60, probe_end) + 5.0
    assert result["run"]["planned_steps"] >= result["steps"] >= 1
    assert result["steps"] >= shakespeare.PROBE_STEPS or result["seconds"] >= 0.1 * 60, result["steps"]
    # val_loss is lm.evaluate of the saved parameters on the whole validation split of the slice
    model, params, metadata = load(tmp_path / "ckpt")
    vocab, train_ids, val_ids = corpus_split(data.DEFAULT_TEXT[:4000])
    assert metadata["data"]["limit"] == 4000 and metadata["config"]["hidden"] == 16
    direct = lm.evaluate(model, params, val_ids, window=256, batch=2).nll
    assert result["val_loss"] == pytest.approx(direct, rel=1e-6) and result["curve"][-1]["val_loss"] == result["val_loss"]
    assert result["curve"][-1]["step"] == result["steps"]
    assert [p["step"] for p in result["curve"]] == sorted(p["step"] for p in result["curve"])
    kn = result["baselines"]["kneser_ney"]
    fit_ids, held_ids = data.train_val_split(train_ids, 0.1)
    held = {n: KneserNey(n).fit(fit_ids, vocab.size).evaluate(held_ids).nll for n in (2, 3, 4)}
    assert kn["order"] == min(held, key=held.get)
    assert kn["val_loss"] == KneserNey(kn["order"]).fit(train_ids, vocab.size).evaluate(val_ids).nll
    assert result["baselines"]["window_lm"]["val_loss"] > 0 and result["baselines"]["window_lm"]["steps"] >= 1
    png = (tmp_path / "out" / "shakespeare_improved.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    # jaxrnn eval reads the benchmark's checkpoint and gives the same number
    rc, out, _ = run(capsys, "eval", "--checkpoint-dir", tmp_path / "ckpt", "--json", "--streams", "2")
    assert rc == 0 and json.loads(out)["model"]["nll"] == pytest.approx(result["val_loss"], rel=1e-6)


DEVICES_SCRIPT = """
import json, sys
from jaxrnn import cli
argv = ["train", "--stateful", "--hidden", "16", "--embed", "8", "--batch", "4", "--window", "16", "--steps", "3",
        "--impl", "reference", "--eval-every", "3"]
for n in ("1", "2"):
    assert cli.main([*argv, "--devices", n, "--checkpoint-dir", sys.argv[1] + "/ckpt" + n, "--out", sys.argv[1] + "/out" + n]) == 0
assert cli.main(["train", "--devices", "3"]) == 2
"""


def test_devices_data_parallel_equals_one_device(tmp_path):
    """--devices 2 (2 forced host devices) gives the one-device run's losses and validation, to float tolerance."""
    env = devices_env(2)
    proc = subprocess.run([sys.executable, "-c", DEVICES_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = ([json.loads(line) for line in (tmp_path / f"out{n}" / "metrics.jsonl").read_text().splitlines()] for n in (1, 2))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 3]
    for a, b in zip(one, two):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        else:
            assert b["eval"]["val_loss"] == pytest.approx(a["eval"]["val_loss"], rel=1e-5)
    # the refused case, the script's only output on stderr: more devices than exist
    assert proc.stderr == "jaxrnn train: --devices: 3 requested, but only 2 cpu device(s) exist\n"


@pytest.mark.parametrize("flag, calls", [([], 1), (["--no-retain-memory"], 0)])
def test_train_keeps_freed_memory_on_cpu_unless_told(flag, calls, tmp_path, capsys, monkeypatch):
    """``jaxrnn train`` calls :func:`jaxrnn.host.retain_freed_memory` on CPU once, before training; not with
    ``--no-retain-memory``."""
    from jaxrnn import host  # noqa: PLC0415

    seen = []
    monkeypatch.setattr(host, "retain_freed_memory", lambda *a, **k: seen.append((a, k)) or True)
    rc, _, err = run(capsys, "train", *TINY, "--steps", "1", "--checkpoint-dir", tmp_path / "c", *flag)
    assert rc == 0, err
    assert len(seen) == calls
