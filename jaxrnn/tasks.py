"""Synthetic tasks that isolate one ability of a recurrent network: memory, counting, agreement.

Every generator is deterministic: the same arguments (``seed`` included) give
the same batch, as NumPy arrays (``int32`` tokens, ``float32`` values),
batch-major. Where lengths vary within a batch the sequences are padded at the
end and the batch carries ``seq_lengths`` (``(B,)`` int32), ready for
:func:`jaxrnn.rnn`'s ``seq_lengths``.

* :func:`adding` — the adding problem (Hochreiter & Schmidhuber 1997): the
  target is the sum of the two marked numbers of a long sequence.
* :func:`copy_task` — copy a sequence of symbols after a controllable delay:
  the target is the input shifted right by ``delay``.
* :func:`anbn`, :func:`anbncn` — next-symbol prediction on ``aⁿbⁿ`` and
  ``aⁿbⁿcⁿ`` (Gers & Schmidhuber 2001; Weiss, Goldberg & Yahav 2018): the
  targets are the set of allowed next symbols and the deterministic part.
* :func:`agreement` — subject-verb number agreement across attractors
  ("The keys next to the book on top of the table ___"; Linzen et al. 2016),
  from a small grammar.
* :func:`distance_task` — only the token ``ℓ`` steps back from the end
  determines the target: a dependency of exactly length ``ℓ``.

Example:
  >>> batch = adding(4, 50, seed=0)
  >>> batch.inputs.shape, batch.targets.shape
  ((4, 50, 2), (4,))
  >>> anbn([1, 2]).inputs        # "$ab" and "$aabb", padded with 0 ("$")
  array([[0, 1, 2, 0, 0],
         [0, 1, 1, 2, 2]], dtype=int32)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from jaxrnn.checks import check_index, check_rate

__all__ = [
    "AGREEMENT_NOUNS",
    "AGREEMENT_PREPOSITIONS",
    "AGREEMENT_VOCAB",
    "COUNTING_SYMBOLS",
    "VERBS",
    "AddingBatch",
    "AgreementBatch",
    "CopyBatch",
    "CountingBatch",
    "DistanceBatch",
    "adding",
    "agreement",
    "anbn",
    "anbncn",
    "copy_task",
    "counting_strings",
    "decode_agreement",
    "decode_counting",
    "distance_task",
    "in_counting_language",
    "sample_ns",
]


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(check_index(seed, "seed", minimum=0))


# --------------------------------------------------------------------------
# The adding problem
# --------------------------------------------------------------------------
class AddingBatch(NamedTuple):
    """A batch of the adding problem.

    Attributes:
      inputs: ``(B, T, 2)`` float32: channel 0 the numbers (uniform in
        ``[0, 1)``), channel 1 the markers (exactly two 1s per sequence).
      targets: ``(B,)`` float32, the sum of the two marked numbers.
      positions: ``(B, 2)`` int32, where the markers are (first in the first
        half, second in the second half).
    """

    inputs: np.ndarray
    targets: np.ndarray
    positions: np.ndarray


def adding(batch_size: int, seq_len: int, *, seed: int = 0) -> AddingBatch:
    """The adding problem: a sequence of numbers, two of them marked; the target is their sum.

    The first marker is uniform over the first half ``[0, T//2)`` and the
    second over the second half ``[T//2, T)`` (Le et al. 2015's layout), so
    the dependency spans at least one step and up to ``T - 1``.

    Args:
      batch_size: ``B``.
      seq_len: ``T >= 2``.
      seed: the generator's seed.
    """
    B = check_index(batch_size, "batch_size")
    T = check_index(seq_len, "seq_len", minimum=2)
    rng = _rng(seed)
    values = rng.random((B, T), dtype=np.float32)
    first = rng.integers(0, T // 2, size=B)
    second = rng.integers(T // 2, T, size=B)
    positions = np.stack([first, second], axis=1).astype(np.int32)
    markers = np.zeros((B, T), np.float32)
    rows = np.arange(B)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return AddingBatch(np.stack([values, markers], axis=-1), targets.astype(np.float32), positions)


# --------------------------------------------------------------------------
# The copy (memory) task
# --------------------------------------------------------------------------
class CopyBatch(NamedTuple):
    """A batch of the copy task (token 0 is the blank).

    Attributes:
      inputs: ``(B, T)`` int32, ``T = length + delay``: ``length`` symbols in
        ``1..num_symbols``, then blanks.
      targets: ``(B, T)`` int32, the input shifted right by ``delay``
        (``targets[:, t] = inputs[:, t - delay]``; blank for ``t < delay``).
      target_mask: ``(B, T)`` bool, the positions whose target is a symbol
        (``delay <= t < delay + length``).
    """

    inputs: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray


def copy_task(batch_size: int, length: int, delay: int, *, num_symbols: int = 8, seed: int = 0) -> CopyBatch:
    """Read ``length`` symbols, then reproduce each one ``delay`` steps after it was seen.

    Args:
      batch_size: ``B``.
      length: how many symbols to copy (``>= 1``).
      delay: how many steps each symbol must be remembered (``>= 0``).
      num_symbols: ``K``: symbols are ``1..K`` (0 is the blank).
      seed: the generator's seed.
    """
    B = check_index(batch_size, "batch_size")
    L = check_index(length, "length")
    D = check_index(delay, "delay", minimum=0)
    K = check_index(num_symbols, "num_symbols")
    T = L + D
    inputs = np.zeros((B, T), np.int32)
    inputs[:, :L] = _rng(seed).integers(1, K + 1, size=(B, L))
    targets = np.zeros((B, T), np.int32)
    targets[:, D:] = inputs[:, : T - D]
    mask = np.zeros((B, T), bool)
    mask[:, D : D + L] = True
    return CopyBatch(inputs, targets, mask)


# --------------------------------------------------------------------------
# Counting languages: aⁿbⁿ and aⁿbⁿcⁿ
# --------------------------------------------------------------------------
#: The counting languages' symbols by token id; ``$`` marks both ends (and pads).
COUNTING_SYMBOLS = ("$", "a", "b", "c")


class CountingBatch(NamedTuple):
    """Next-symbol prediction on ``$ a^n b^n`` (or ``$ a^n b^n c^n``), padded with ``$`` (0).

    Position ``t`` reads ``inputs[:, t]`` and is asked about the symbol after it.

    Attributes:
      inputs: ``(B, T)`` int32, ``$`` followed by the string; ``T = letters·max(n) + 1``.
      targets: ``(B, T, 4)`` bool, the set of symbols allowed next (indexed by
        :data:`COUNTING_SYMBOLS`); all False at padded positions.
      next_tokens: ``(B, T)`` int32, the symbol that does come next (``$`` at
        the end of the string).
      deterministic: ``(B, T)`` bool, the positions where exactly one symbol
        is allowed (the part of the string a recogniser must predict exactly:
        every ``b`` after the first, every ``c``, the final ``$``).
      seq_lengths: ``(B,)`` int32, ``letters·n + 1``.
      ns: ``(B,)`` int32, the ``n`` of each string.
    """

    inputs: np.ndarray
    targets: np.ndarray
    next_tokens: np.ndarray
    deterministic: np.ndarray
    seq_lengths: np.ndarray
    ns: np.ndarray


def _check_ns(ns) -> np.ndarray:
    arr = np.asarray(ns)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ns: expected a non-empty 1-D sequence of ints, got {ns!r}")
    if arr.min() < 1:
        raise ValueError(f"ns: expected every n >= 1, got min {int(arr.min())}")
    return arr.astype(np.int32)


def counting_strings(ns: Sequence[int], letters: int = 2, *, length: int = None) -> CountingBatch:
    """The batch of ``a^n b^n`` (``letters=2``) or ``a^n b^n c^n`` (``letters=3``) strings, one per ``n``.

    ``length`` pads every row to that many tokens (default ``letters·max(n) + 1``,
    the longest row; a fixed ``length`` keeps the shape of every batch the same).

    Allowed next symbols, for ``n >= 1``: after ``$``: ``{a}``; after each
    ``a``: ``{a, b}``; inside a later block (``b``'s, then ``c``'s) ``{same
    letter}`` until its ``n``-th symbol, after which the next letter's block
    begins (``{next letter}``), or after the last block ``{$}``.
    """
    ns = _check_ns(ns)
    letters = int(letters)
    if letters not in (2, 3):
        raise ValueError(f"letters: expected 2 (a^n b^n) or 3 (a^n b^n c^n), got {letters!r}")
    B, V = len(ns), len(COUNTING_SYMBOLS)
    T = letters * int(ns.max()) + 1
    if length is not None:
        T = check_index(length, "length", minimum=T)
    inputs = np.zeros((B, T), np.int32)
    targets = np.zeros((B, T, V), bool)
    next_tokens = np.zeros((B, T), np.int32)
    for row, n in enumerate(ns):
        n = int(n)
        string = np.repeat(np.arange(1, letters + 1, dtype=np.int32), n)  # a..a b..b (c..c)
        inputs[row, 1 : 1 + letters * n] = string
        next_tokens[row, : letters * n] = string  # the final $ stays 0
        targets[row, 0, 1] = True  # after $: a
        targets[row, 1 : 1 + n, 1:3] = True  # after each a: a or b
        for k in range(2, letters + 1):  # after the j-th symbol of block k: that letter, or the next block's
            start = 1 + (k - 1) * n
            targets[row, start : start + n - 1, k] = True
            targets[row, start + n - 1, k + 1 if k < letters else 0] = True
    deterministic = targets.sum(-1) == 1
    return CountingBatch(inputs, targets, next_tokens, deterministic, (letters * ns + 1).astype(np.int32), ns)


def anbn(ns: Sequence[int], *, length: int = None) -> CountingBatch:
    """:func:`counting_strings` for ``a^n b^n``, one string per ``n`` of ``ns``."""
    return counting_strings(ns, 2, length=length)


def anbncn(ns: Sequence[int], *, length: int = None) -> CountingBatch:
    """:func:`counting_strings` for ``a^n b^n c^n``, one string per ``n`` of ``ns``."""
    return counting_strings(ns, 3, length=length)


def sample_ns(batch_size: int, max_n: int, *, min_n: int = 1, seed: int = 0) -> np.ndarray:
    """``(B,)`` int32 values of ``n`` uniform in ``[min_n, max_n]`` (training strings for :func:`counting_strings`)."""
    B = check_index(batch_size, "batch_size")
    lo = check_index(min_n, "min_n")
    hi = check_index(max_n, "max_n", minimum=lo)
    return _rng(seed).integers(lo, hi + 1, size=B).astype(np.int32)


def decode_counting(tokens, length=None) -> str:
    """The string of a row of :attr:`CountingBatch.inputs` (its first ``length`` tokens) as text, e.g. ``"$aabb"``."""
    tokens = np.asarray(tokens)[: len(tokens) if length is None else int(length)]
    return "".join(COUNTING_SYMBOLS[int(t)] for t in tokens)


def in_counting_language(string: str, letters: int = 2) -> bool:
    """Whether ``string`` (without ``$``) is ``a^n b^n`` (``letters=2``) or ``a^n b^n c^n`` (3) for some ``n >= 1``."""
    n, rest = divmod(len(string), letters)
    return rest == 0 and n >= 1 and string == "".join(c * n for c in "abc"[:letters])


# --------------------------------------------------------------------------
# Number agreement across attractors
# --------------------------------------------------------------------------
#: ``(singular, plural)`` nouns of the agreement grammar.
AGREEMENT_NOUNS = (
    ("key", "keys"), ("book", "books"), ("table", "tables"), ("cabinet", "cabinets"),
    ("door", "doors"), ("picture", "pictures"), ("box", "boxes"), ("shelf", "shelves"),
)  # fmt: skip
#: The prepositions that attach an attractor (each a tuple of words).
AGREEMENT_PREPOSITIONS = (("next", "to"), ("on", "top", "of"), ("near",), ("behind",), ("under",))
#: The verb to predict, by label: 0 singular, 1 plural.
VERBS = ("is", "are")
#: The agreement vocabulary; token 0 is padding.
AGREEMENT_VOCAB = ("<pad>", "the", *[w for pair in AGREEMENT_NOUNS for w in pair]) + tuple(
    sorted({w for p in AGREEMENT_PREPOSITIONS for w in p})
)
_WORD_ID = {w: i for i, w in enumerate(AGREEMENT_VOCAB)}


class AgreementBatch(NamedTuple):
    """Sentence prefixes ``the N (P the N)*`` whose next word is the verb; padded with 0.

    Attributes:
      tokens: ``(B, T)`` int32 word ids (:data:`AGREEMENT_VOCAB`).
      seq_lengths: ``(B,)`` int32.
      labels: ``(B,)`` int32, the number of the subject (0 singular "is", 1 plural "are").
      num_attractors: ``(B,)`` int32, how many nouns stand between subject and verb.
      attractor_numbers: ``(B, max_attractors)`` int32, each attractor's
        number (0/1), -1 where there is none.
      subject_positions: ``(B,)`` int32, where the subject noun is (always 1).
    """

    tokens: np.ndarray
    seq_lengths: np.ndarray
    labels: np.ndarray
    num_attractors: np.ndarray
    attractor_numbers: np.ndarray
    subject_positions: np.ndarray


def agreement(
    batch_size: int, *, max_attractors: int = 2, mismatch: float = 0.5, min_attractors: int = 0, seed: int = 0
) -> AgreementBatch:
    """Number agreement: predict "is"/"are" after ``the N (P the N)*`` (Linzen et al. 2016).

    The subject's number is uniform; the number of attractors is uniform in
    ``[min_attractors, max_attractors]``; each attractor has the subject's
    opposite number with probability ``mismatch`` (an *agreement attractor*),
    so the nearest noun is no guide to the label.
    """
    B = check_index(batch_size, "batch_size")
    hi = check_index(max_attractors, "max_attractors", minimum=0)
    lo = check_index(min_attractors, "min_attractors", minimum=0)
    if lo > hi:
        raise ValueError(f"min_attractors: expected <= max_attractors ({hi}), got {lo}")
    mismatch = check_rate("mismatch", mismatch, 0.0, 1.0, closed_high=True, what="a probability")
    rng = _rng(seed)
    sentences, labels, counts = [], np.zeros(B, np.int32), np.zeros(B, np.int32)
    numbers = np.full((B, hi), -1, np.int32)
    for b in range(B):
        label = int(rng.integers(2))
        words = ["the", AGREEMENT_NOUNS[rng.integers(len(AGREEMENT_NOUNS))][label]]
        k = int(rng.integers(lo, hi + 1))
        for j in range(k):
            number = 1 - label if rng.random() < mismatch else label
            words += [*AGREEMENT_PREPOSITIONS[rng.integers(len(AGREEMENT_PREPOSITIONS))], "the"]
            words.append(AGREEMENT_NOUNS[rng.integers(len(AGREEMENT_NOUNS))][number])
            numbers[b, j] = number
        sentences.append(words)
        labels[b], counts[b] = label, k
    lengths = np.array([len(s) for s in sentences], np.int32)
    tokens = np.zeros((B, int(lengths.max())), np.int32)
    for b, words in enumerate(sentences):
        tokens[b, : len(words)] = [_WORD_ID[w] for w in words]
    return AgreementBatch(tokens, lengths, labels, counts, numbers, np.ones(B, np.int32))


def decode_agreement(tokens, length=None) -> str:
    """A row of :attr:`AgreementBatch.tokens` (its first ``length`` tokens) as words."""
    tokens = np.asarray(tokens)[: len(tokens) if length is None else int(length)]
    return " ".join(AGREEMENT_VOCAB[int(t)] for t in tokens)


# --------------------------------------------------------------------------
# The distance task
# --------------------------------------------------------------------------
class DistanceBatch(NamedTuple):
    """A batch of the distance task.

    Attributes:
      inputs: ``(B, T)`` int32 symbols in ``[0, num_symbols)``.
      targets: ``(B,)`` int32, ``inputs[:, T - 1 - distance]``.
      distance: the ``ℓ`` of the batch.
    """

    inputs: np.ndarray
    targets: np.ndarray
    distance: int


def distance_task(
    batch_size: int, distance: int, *, seq_len: int = None, num_symbols: int = 4, seed: int = 0
) -> DistanceBatch:
    """Random symbols; the target is the one ``distance`` steps before the last (``ℓ = 0``: the last one).

    Every other symbol is uniform noise, so a model that reads the sequence
    and answers at the last step must carry that one symbol across exactly
    ``ℓ`` steps: accuracy against ``ℓ`` measures how long a dependency it
    learns. ``seq_len`` defaults to ``ℓ + 1`` (the target is the first
    symbol); a fixed ``seq_len`` lets every ``ℓ < seq_len`` share one shape.
    """
    B = check_index(batch_size, "batch_size")
    ell = check_index(distance, "distance", minimum=0)
    T = ell + 1 if seq_len is None else check_index(seq_len, "seq_len")
    if ell >= T:
        raise ValueError(f"distance: expected < seq_len ({T}), got {ell}")
    K = check_index(num_symbols, "num_symbols", minimum=2)
    inputs = _rng(seed).integers(0, K, size=(B, T)).astype(np.int32)
    return DistanceBatch(inputs, inputs[:, T - 1 - ell].copy(), ell)
