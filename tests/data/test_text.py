"""jaxrnn.data.text: a character vocabulary that round-trips, word vocabularies with <unk>, min_count and
max_size against hand-counted examples, JSON round trips, windows that cover every target once, random windows
that are slices, a split that keeps the order; clear errors for bad input."""

import json

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
    with pytest.raises(ValueError, match=r"tokens: expected distinct tokens, got duplicates \['a'\]"):
        data.Vocab("aba")
    with pytest.raises(ValueError, match="ids: expected at least 5 tokens for window=5, got 4"):
        data.split_windows(np.arange(4), 5)
    with pytest.raises(ValueError, match="window: expected an int >= 2, got 1"):
        data.split_windows(np.arange(4), 1)
    with pytest.raises(ValueError, match="ids: expected at least window=9 tokens, got 4"):
        data.sample_windows(jax.random.key(0), jnp.arange(4), 2, 9)
    with pytest.raises(FileNotFoundError, match="text: no such file"):
        data.load_text(tmp_path / "missing.txt")



# --------------------------------------------------------------------------
# Vocabularies: levels, <unk>, min_count, max_size, checkpoints
# --------------------------------------------------------------------------
def test_char_vocab_by_hand():
    vocab = data.Vocab.from_text("hello")
    assert vocab.tokens == ("e", "h", "l", "o") and vocab.chars == "ehlo" and vocab.unk is None
    assert vocab.encode("hole").tolist() == [1, 3, 2, 0]
    assert data.Vocab("ehlo") == vocab
    # "mississippi": i 4, s 4, p 2, m 1. min_count=2 drops m, so <unk> is added (id 0).
    pruned = data.Vocab.from_text("mississippi", min_count=2)
    assert pruned.tokens == ("<unk>", "i", "p", "s") and pruned.unk_id == 0 and pruned.chars == "ips"
    assert pruned.encode("mips").tolist() == [0, 1, 2, 3]
    assert pruned.decode([0, 1]) == "<unk>i"
    # max_size=3 counts <unk>: the two most frequent, i and s (tied at 4), are kept.
    assert data.Vocab.from_text("mississippi", max_size=3).tokens == ("<unk>", "i", "s")
    assert data.Vocab.from_text("mississippi", max_size=4).tokens == ("i", "m", "p", "s")  # nothing dropped: no <unk>


def test_word_vocab_by_hand():
    text = "The cat sat. The cat ran! A dog sat."
    # tokens: The 2, cat 2, sat 2, . 2, ran 1, ! 1, A 1, dog 1
    vocab = data.Vocab.from_text(text, level="word")
    assert vocab.tokens == ("<unk>", "!", ".", "A", "The", "cat", "dog", "ran", "sat")  # <unk> always at word level
    assert vocab.encode("The dog sat!").tolist() == [4, 6, 8, 1]
    assert vocab.encode("The cow sat.").tolist() == [4, 0, 8, 2]
    assert vocab.encode(["cat", "moo"]).tolist() == [5, 0]  # already tokenized
    assert vocab.decode(vocab.encode("The dog sat!")) == "The dog sat!"
    frequent = data.Vocab.from_text(text, level="word", min_count=2)
    assert frequent.tokens == ("<unk>", ".", "The", "cat", "sat")
    assert frequent.decode(frequent.encode("A cat ran.")) == "<unk> cat <unk>."
    small = data.Vocab.from_text(text, level="word", max_size=3)  # <unk> + 2 of the tied-at-2 tokens, by token order
    assert small.tokens == ("<unk>", ".", "The")
    no_unk = data.Vocab.from_text(text, level="word", unk=None)
    assert no_unk.unk is None and no_unk.size == 8
    with pytest.raises(ValueError, match="text: token 'cow' is not in the vocabulary"):
        no_unk.encode("The cow")
    with pytest.raises(AttributeError, match="chars: only a level='char' vocabulary has characters"):
        vocab.chars  # noqa: B018


def test_vocab_dict_round_trip_through_json():
    for vocab in (
        data.Vocab.from_text("hello world"),
        data.Vocab.from_text("mississippi", min_count=2),
        data.Vocab.from_text("Don't stop, don't!", level="word"),
    ):
        state = json.loads(json.dumps(vocab.to_dict()))
        assert state == {"tokens": list(vocab.tokens), "level": vocab.level, "unk": vocab.unk}
        restored = data.Vocab.from_dict(state)
        ids = list(range(vocab.size))
        assert restored == vocab and restored.decode(ids) == vocab.decode(ids)
        assert restored.encode(vocab.decode(ids)).tolist() == vocab.encode(vocab.decode(ids)).tolist()
    with pytest.raises(ValueError, match=r"state: expected the keys \['level', 'tokens', 'unk'\], got \['tokens'\]"):
        data.Vocab.from_dict({"tokens": ["a"]})
    with pytest.raises(TypeError, match="state: expected a dict from Vocab.to_dict"):
        data.Vocab.from_dict(["a"])


def test_vocab_errors():
    with pytest.raises(ValueError, match=r"unk: expected an unknown token \(e.g. '<unk>'\) when min_count=2"):
        data.Vocab.from_text("aab", min_count=2, unk=None)
    with pytest.raises(ValueError, match=r"level: expected one of \('char', 'word'\), got 'byte'"):
        data.Vocab.from_text("aab", level="byte")
    with pytest.raises(ValueError, match="min_count: expected a positive int, got 0"):
        data.Vocab.from_text("aab", min_count=0)
    with pytest.raises(ValueError, match=r"min_count: expected at most 2 \(the highest count\), got 3"):
        data.Vocab.from_text("aab", min_count=3)
    with pytest.raises(ValueError, match=r"max_size: expected at least 2 \(tokens and '<unk>'\), got 1"):
        data.Vocab.from_text("a b", level="word", max_size=1)
    with pytest.raises(ValueError, match="unk: expected one of the tokens or None, got '<unk>'"):
        data.Vocab(("a", "b"), "word", "<unk>")
    with pytest.raises(ValueError, match="tokens: expected single characters"):
        data.Vocab(("a", "bc"))
    with pytest.raises(TypeError, match="tokens: expected a sequence of words for level='word'"):
        data.Vocab("abc", level="word")
