"""jaxrnn.data.text: a character vocabulary that round-trips, windows that cover every target once,
random windows that are slices, a split that keeps the order; clear errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import data


def test_vocab_round_trip_on_default_text():
    text = data.load_text()
    assert text == data.DEFAULT_TEXT and len(text) > 5000 and text.isascii()
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.max() == vocab.size - 1
    assert vocab.decode(ids) == text


def test_split_windows_cover_every_target_once():
    ids = np.arange(23, dtype=np.int32)
    w = data.split_windows(ids, 5)
    assert w.shape == ((23 - 1) // 4, 5)
    np.testing.assert_array_equal(w[:, 1:].ravel(), ids[1 : 1 + w.shape[0] * 4])
    np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])  # consecutive windows overlap by one


def test_sample_windows_are_slices():
    ids = jnp.arange(100, dtype=jnp.int32) * 3
    w = np.asarray(data.sample_windows(jax.random.key(0), ids, 16, 9))
    assert w.shape == (16, 9)
    starts = w[:, 0] // 3
    np.testing.assert_array_equal(w, 3 * (starts[:, None] + np.arange(9)[None, :]))
    assert starts.max() <= 100 - 9 and len(set(starts.tolist())) > 1


def test_train_val_split_and_load_text_file(tmp_path):
    a, b = data.train_val_split(np.arange(10), 0.25)
    np.testing.assert_array_equal(np.concatenate([a, b]), np.arange(10))
    assert b.size == 3
    path = tmp_path / "t.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert data.load_text(path) == "hello world\n"


def test_bad_input_errors(tmp_path):
    vocab = data.Vocab.from_text("abc")
    with pytest.raises(ValueError, match="text: character 'z' is not in the vocabulary"):
        vocab.encode("abz")
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 3\), got min 0 and max 3"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="chars: expected distinct characters"):
        data.Vocab("aba")
    with pytest.raises(ValueError, match="ids: expected at least 5 tokens for window=5, got 4"):
        data.split_windows(np.arange(4), 5)
    with pytest.raises(ValueError, match="window: expected an int >= 2, got 1"):
        data.split_windows(np.arange(4), 1)
    with pytest.raises(ValueError, match="ids: expected at least window=9 tokens, got 4"):
        data.sample_windows(jax.random.key(0), jnp.arange(4), 2, 9)
    with pytest.raises(FileNotFoundError, match="text: no such file"):
        data.load_text(tmp_path / "missing.txt")
