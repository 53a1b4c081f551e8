"""Text as tokens: a character or word vocabulary, a train/validation split and training windows.

Example:
  >>> vocab = Vocab.from_text("hello")
  >>> ids = vocab.encode("hole")
  >>> vocab.decode(ids)
  'hole'
  >>> windows = split_windows(ids, 3)  # (1, 3): consecutive windows overlap by one token
  >>> words = Vocab.from_text("the cat saw the dog.", level="word", max_size=4)
  >>> words.tokens
  ('<unk>', '.', 'cat', 'the')
  >>> words.decode(words.encode("the dog saw a cat."))
  'the <unk> <unk> <unk> cat.'
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.checks import check_index, check_one_of
from jaxrnn.data.words import join_words, tokenize_words

Array = jax.Array

__all__ = ["LEVELS", "UNK", "Vocab", "sample_windows", "split_windows", "train_val_split"]

UNK = "<unk>"
"""The default unknown token of :meth:`Vocab.from_text`."""

LEVELS = ("char", "word")
"""Token levels: ``"char"`` (every character a token) or ``"word"`` (:func:`jaxrnn.data.words.tokenize_words`)."""


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Vocab:
    """A vocabulary: token ``i`` is ``tokens[i]``; characters or words.

    Args:
      tokens: the distinct tokens, in id order; a ``str`` is taken as its
        characters (``Vocab("ehlo")``).
      level: ``"char"`` (text splits into characters, ids decode by
        concatenation) or ``"word"`` (text splits with
        :func:`jaxrnn.data.words.tokenize_words`, ids decode with
        :func:`jaxrnn.data.words.join_words`).
      unk: the unknown token (one of ``tokens``), that every token outside the
        vocabulary encodes to; ``None``: such a token is an error.

    Example:
      >>> vocab = Vocab.from_text("hello")
      >>> vocab.chars, vocab.size
      ('ehlo', 4)
      >>> vocab.encode("hole").tolist()
      [1, 3, 2, 0]
      >>> Vocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
      True
    """

    tokens: Tuple[str, ...]
    level: str = "char"
    unk: Optional[str] = None

    def __post_init__(self):
        check_one_of("level", self.level, LEVELS)
        tokens = self.tokens
        if isinstance(tokens, str):
            if self.level != "char":
                raise TypeError(f"tokens: expected a sequence of words for level='word', got the str {tokens[:20]!r}")
            tokens = tuple(tokens)
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError(f"tokens: expected a non-empty sequence of str, got {tokens!r}")
        tokens = tuple(tokens)
        bad = [t for t in tokens if not isinstance(t, str) or not t]
        if bad:
            raise TypeError(f"tokens: expected non-empty strings, got {bad[0]!r}")
        counts = collections.Counter(tokens)
        duplicates = sorted(t for t, c in counts.items() if c > 1)
        if duplicates:
            raise ValueError(f"tokens: expected distinct tokens, got duplicates {duplicates[:10]}")
        if self.unk is not None and self.unk not in counts:
            raise ValueError(f"unk: expected one of the tokens or None, got {self.unk!r}")
        if self.level == "char":
            long = [t for t in tokens if len(t) != 1 and t != self.unk]
            if long:
                raise ValueError(f"tokens: expected single characters (or the unk token) for level='char', got {long[0]!r}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(tokens)})

    @classmethod
    def from_text(
        cls,
        text: str,
        level: str = "char",
        *,
        min_count: int = 1,
        max_size: Optional[int] = None,
        unk: Optional[str] = UNK,
    ) -> "Vocab":
        """The vocabulary of ``text``: its tokens seen at least ``min_count`` times.

        Tokens are sorted (for characters without pruning: the sorted set of
        characters of ``text``). With ``max_size`` the most frequent ones are
        kept (ties: the smaller token first), ``unk`` included in the count.
        The unknown token ``unk`` gets id 0 when it is needed: at word level
        always (held-out text has unseen words), at character level only when
        ``min_count`` or ``max_size`` dropped a character.

        Args:
          text: the training text.
          level: ``"char"`` or ``"word"``.
          min_count: a token seen fewer times is dropped.
          max_size: at most this many tokens, ``unk`` included.
          unk: the unknown token; ``None``: never add one (an error if a
            token would be dropped).

        Example:
          >>> Vocab.from_text("aab", min_count=2).tokens
          ('<unk>', 'a')
        """
        check_one_of("level", level, LEVELS)
        if not isinstance(text, str) or not text:
            raise ValueError("text: expected a non-empty string")
        min_count = check_index(min_count, "min_count")
        counts = collections.Counter(_split(text, level))
        if not counts:
            raise ValueError(f"text: expected at least one {level}, got {text[:40]!r}")
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        dropped = len(kept) < len(counts) or (max_size is not None and len(kept) > check_index(max_size, "max_size"))
        if dropped and unk is None:
            raise ValueError(
                f"unk: expected an unknown token (e.g. {UNK!r}) when min_count={min_count} or max_size={max_size} "
                f"drops tokens, got None"
            )
        specials = (unk,) if unk is not None and (level == "word" or dropped) else ()
        if max_size is not None:
            if max_size <= len(specials):
                raise ValueError(f"max_size: expected at least {len(specials) + 1} (tokens and {unk!r}), got {max_size}")
            kept = kept[: max_size - len(specials)]
        if not kept:
            raise ValueError(f"min_count: expected at most {max(counts.values())} (the highest count), got {min_count}")
        return cls(specials + tuple(sorted(kept)), level, specials[0] if specials else None)

    @property
    def size(self) -> int:
        """Number of tokens ``V``."""
        return len(self.tokens)

    @property
    def unk_id(self) -> Optional[int]:
        """The id of :attr:`unk` (``None`` without one)."""
        return None if self.unk is None else self._index[self.unk]

    @property
    def chars(self) -> str:
        """The characters of a character vocabulary, in id order (the unknown token left out)."""
        if self.level != "char":
            raise AttributeError(f"chars: only a level='char' vocabulary has characters, got level={self.level!r}")
        return "".join(t for t in self.tokens if t != self.unk)

    def tokenize(self, text: str) -> List[str]:
        """``text`` split into this vocabulary's kind of token (characters or words; not yet mapped to ids)."""
        return _split(text, self.level)

    def encode(self, text: Union[str, Sequence[str]]) -> np.ndarray:
        """``(T,)`` int32 token ids of ``text`` (a str, split by :meth:`tokenize`, or a sequence of tokens).

        Raises:
          ValueError: a token outside the vocabulary, without an ``unk`` token.
        """
        tokens = self.tokenize(text) if isinstance(text, str) else list(text)
        index, unk_id = self._index, self.unk_id
        if unk_id is not None:
            return np.fromiter((index.get(t, unk_id) for t in tokens), np.int32, len(tokens))
        try:
            return np.fromiter((index[t] for t in tokens), np.int32, len(tokens))
        except KeyError as e:
            kind = "character" if self.level == "char" else "token"
            raise ValueError(f"text: {kind} {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of token ids (characters concatenated; words by :func:`join_words`)."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected shape (T,), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"ids: expected values in [0, {self.size}), got min {ids.min()} and max {ids.max()}")
        tokens = [self.tokens[i] for i in ids.tolist()]
        return "".join(tokens) if self.level == "char" else join_words(tokens)

    # -- checkpoints ------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict ``{"tokens": [...], "level": ..., "unk": ...}`` for :meth:`from_dict`."""
        return {"tokens": list(self.tokens), "level": self.level, "unk": self.unk}

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "Vocab":
        """The vocabulary :meth:`to_dict` described (e.g. read back from a checkpoint's JSON)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from Vocab.to_dict(), got {type(state).__name__}")
        if set(state) != {"tokens", "level", "unk"}:
            raise ValueError(f"state: expected the keys ['level', 'tokens', 'unk'], got {sorted(state)}")
        return cls(tuple(state["tokens"]), state["level"], state["unk"])


def _split(text: str, level: str) -> List[str]:
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return list(text) if level == "char" else tokenize_words(text)


# --------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------
def train_val_split(ids, val_fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """Split a 1-D token array into a leading training part and a trailing
    validation part of ``ceil(val_fraction * N)`` tokens."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids: expected shape (N,), got {ids.shape}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
    n_val = math.ceil(val_fraction * ids.size)
    return ids[: ids.size - n_val], ids[ids.size - n_val :]


def split_windows(ids, window: int) -> np.ndarray:
    """Cut a 1-D token array into consecutive windows of ``window`` tokens that
    overlap by one, so that every token after the first is predicted exactly
    once by :func:`jaxrnn.models.lm.loss`. A shorter tail is dropped.

    Args:
      ids: ``(N,)`` token ids.
      window: tokens per window ``L`` (inputs are ``L - 1`` of them).

    Returns:
      ``(W, L)`` int32 windows, ``W = (N - 1) // (L - 1)``.
    """
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1:
        raise ValueError(f"ids: expected shape (N,), got {ids.shape}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window: expected an int >= 2, got {window!r}")
    n = (ids.size - 1) // (window - 1)
    if n == 0:
        raise ValueError(f"ids: expected at least {window} tokens for window={window}, got {ids.size}")
    starts = np.arange(n) * (window - 1)
    return ids[starts[:, None] + np.arange(window)[None, :]]


def sample_windows(key: Array, ids: Array, batch_size: int, window: int) -> Array:
    """``batch_size`` windows of ``window`` consecutive tokens at uniformly
    random offsets (jit-friendly; ``batch_size`` and ``window`` are static).

    Args:
      key: PRNG key.
      ids: ``(N,)`` integer token ids, ``N >= window``.
      batch_size: ``B``.
      window: ``L``.

    Returns:
      ``(B, L)`` windows; ``windows[:, :-1]`` are a language model's inputs and
      ``windows[:, 1:]`` its targets.
    """
    if jnp.ndim(ids) != 1:
        raise ValueError(f"ids: expected shape (N,), got {jnp.shape(ids)}")
    if jnp.shape(ids)[0] < window:
        raise ValueError(f"ids: expected at least window={window} tokens, got {jnp.shape(ids)[0]}")
    starts = jax.random.randint(key, (batch_size,), 0, jnp.shape(ids)[0] - window + 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(ids, s, window))(starts)
