"""Character-level text as tokens: a vocabulary, a train/validation split and training windows.

Example:
  >>> vocab = Vocab.from_text("hello")
  >>> ids = vocab.encode("hole")
  >>> vocab.decode(ids)
  'hole'
  >>> windows = split_windows(ids, 3)  # (1, 3): consecutive windows overlap by one token
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["Vocab", "sample_windows", "split_windows", "train_val_split"]


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Vocab:
    """A character vocabulary: token ``i`` is the character ``chars[i]``.

    Args:
      chars: the distinct characters, in token order.

    Example:
      >>> vocab = Vocab.from_text("hello")
      >>> vocab.chars, vocab.size
      ('ehlo', 4)
      >>> vocab.encode("hole").tolist()
      [1, 3, 2, 0]
    """

    chars: str

    def __post_init__(self):
        if not isinstance(self.chars, str) or not self.chars:
            raise ValueError(f"chars: expected a non-empty string, got {self.chars!r}")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("chars: expected distinct characters, got duplicates")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """The sorted set of characters of ``text``."""
        if not isinstance(text, str) or not text:
            raise ValueError("text: expected a non-empty string")
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        """Number of tokens ``V``."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``(len(text),)`` int32 token ids.

        Raises:
          ValueError: ``text`` holds a character outside the vocabulary.
        """
        try:
            return np.fromiter((self._index[c] for c in text), np.int32, len(text))
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of token ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected shape (T,), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"ids: expected values in [0, {self.size}), got min {ids.min()} and max {ids.max()}")
        return "".join(self.chars[i] for i in ids.tolist())


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
