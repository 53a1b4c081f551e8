r"""The n-gram baseline of the lectures: interpolated Kneser–Ney smoothing, in NumPy.

For an order-:math:`n` model with discount :math:`D \in (0, 1)` and a history
:math:`h` of the last :math:`k - 1` tokens (:math:`h'` drops its oldest token):

.. math::
    P_k(w \mid h) = \frac{\max(c_k(h w) - D, 0)}{\sum_v c_k(h v)}
      + \frac{D \, N_{1+}(h \,\bullet)}{\sum_v c_k(h v)} \, P_{k-1}(w \mid h'),
    \qquad
    P_0(w) = \frac{1}{V},

where :math:`c_n` is the raw count of the n-gram in the training data, and for
:math:`k < n` :math:`c_k(h w) = N_{1+}(\bullet\, h w)` is its *continuation*
count: the number of distinct tokens seen before :math:`h w`.
:math:`N_{1+}(h \,\bullet)` is the number of distinct :math:`w` with
:math:`c_k(h w) > 0`. A history with :math:`\sum_v c_k(h v) = 0` (unseen)
backs off entirely: :math:`P_k(w \mid h) = P_{k-1}(w \mid h')`. Every
:math:`P_k(\cdot \mid h)` sums to 1 over the vocabulary and is positive.

n-grams are counted within each training sequence (none spans two).
A context shorter than :math:`n - 1` tokens (the start of a sequence) starts
the recursion at order ``len(context) + 1``, with that order's (continuation)
counts. Counting and scoring are vectorised: n-grams are integer keys
(``id of the history * V + token``), counted with :func:`numpy.unique` and
looked up with :func:`numpy.searchsorted`, so a million characters at order 5
fit and score in seconds.

:meth:`KneserNey.evaluate` scores the same ``N - 1`` predictions as
:func:`jaxrnn.models.lm.evaluate` and returns the same
:class:`~jaxrnn.models.lm.Evaluation`, so one table compares them.

Example:
  >>> model = KneserNey(order=5).fit(train_ids, vocab_size=vocab.size)
  >>> model.logprob(vocab.encode("hell"), vocab.encode("o")[0])
  >>> model.evaluate(val_ids)  # Evaluation(nll=..., perplexity=..., bits_per_token=..., count=...)
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxrnn.checks import check_index, check_rate
from jaxrnn.models.lm import Evaluation

__all__ = ["KneserNey"]


class KneserNey:
    """An interpolated Kneser–Ney n-gram language model.

    Args:
      order: ``n``, the length of the longest n-gram (context of ``n - 1`` tokens).
      discount: ``D`` in ``(0, 1)``, subtracted from every nonzero count.

    Example:
      >>> lm = KneserNey(order=3, discount=0.75).fit([0, 1, 0, 1, 2])
      >>> lm.probs([0, 1])  # (V,) distribution of the token after "0 1"
      >>> lm.perplexity([0, 1, 0, 1, 2])
    """

    def __init__(self, order: int = 3, discount: float = 0.75):
        self.order = check_index(order, "order")
        self.discount = check_rate("discount", discount, 0.0, 1.0, closed_low=False, what="a discount")
        self.vocab_size: Optional[int] = None
        self._tables: List[np.ndarray] = []

    def __repr__(self):
        return f"KneserNey(order={self.order}, discount={self.discount}, vocab_size={self.vocab_size})"

    # -- fitting ---------------------------------------------------------------
    def fit(self, data, vocab_size: Optional[int] = None) -> "KneserNey":
        """Count the n-grams of ``data``.

        Args:
          data: ``(N,)`` token ids, ``(R, N)`` rows, or a list of 1-D sequences
            of ids (n-grams never span two sequences).
          vocab_size: ``V`` (default: the largest id + 1).

        Returns:
          ``self``.
        """
        sequences = _sequences(data)
        x = np.concatenate(sequences)
        high = int(x.max()) + 1
        V = high if vocab_size is None else check_index(vocab_size, "vocab_size")
        if V < high:
            raise ValueError(f"vocab_size: expected at least {high} (the largest id + 1), got {V}")
        pos = np.concatenate([np.arange(s.size) for s in sequences])
        n, D = self.order, self.discount
        # ids[k][i]: compact id of the k-gram ending at position i (-1 where it would cross a sequence start).
        ids = [None, x]
        keys = [None, np.arange(V, dtype=np.int64)]  # order-1 "keys" are the tokens themselves
        for k in range(2, n + 1):
            valid = np.flatnonzero(pos >= k - 1)
            key = ids[k - 1][valid - 1] * V + x[valid]
            uniq, inverse = np.unique(key, return_inverse=True)
            ids_k = np.full(x.size, -1, np.int64)
            ids_k[valid] = inverse
            ids.append(ids_k)
            keys.append(uniq)
        self._tables = []
        for k in range(1, n + 1):
            G = keys[k].size
            if k == n:  # raw counts
                counts = np.bincount(ids[k][ids[k] >= 0], minlength=G)
            else:  # continuation counts: distinct (k+1)-grams whose last k tokens are this k-gram
                _, first = np.unique(ids[k + 1], return_index=True)
                first = first[ids[k + 1][first] >= 0]
                counts = np.bincount(ids[k][first], minlength=G)
            history = keys[k] // V if k > 1 else np.zeros(G, np.int64)
            H = keys[k - 1].size if k > 1 else 1
            total = np.bincount(history, weights=counts, minlength=H)
            types = np.bincount(history, weights=counts > 0, minlength=H)
            self._tables.append((keys[k], counts.astype(np.float64), total, D * types))
        self.vocab_size = V
        return self

    # -- scoring ---------------------------------------------------------------
    def _check_fitted(self):
        if self.vocab_size is None:
            raise ValueError("model: expected a fitted KneserNey (call fit first), got an unfitted one")

    def _check_ids(self, ids, name):
        ids = np.asarray(ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"{name}: expected token ids in [0, {self.vocab_size}), got min {ids.min()} and max {ids.max()}"
            )
        return ids

    def _logprobs(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``(Q,)`` natural-log probabilities of ``targets`` after ``(Q, n - 1)`` contexts (``-1``: no token)."""
        V, n = self.vocab_size, self.order
        keys1, counts1, total1, weight1 = self._tables[0]
        uniform = 1.0 / V
        if total1[0] > 0:
            p = (np.maximum(counts1[targets] - self.discount, 0.0) + weight1[0] * uniform) / total1[0]
        else:
            p = np.full(targets.shape, uniform)
        for k in range(2, n + 1):
            keys, counts, total, weight = self._tables[k - 1]
            history = contexts[:, n - k :]  # the last k - 1 tokens
            hist, found = history[:, 0], history[:, 0] >= 0  # an order-1 id is the token
            for j in range(1, k - 1):
                hist, ok = _lookup(self._tables[j][0], hist * V + history[:, j])
                found &= ok & (history[:, j] >= 0)
            hist = np.where(found, hist, 0)
            gram, seen = _lookup(keys, hist * V + targets)
            count = np.where(found & seen, counts[gram], 0.0)
            denom = np.where(found, total[hist], 0.0)
            backed = (np.maximum(count - self.discount, 0.0) + weight[hist] * p) / np.where(denom > 0, denom, 1.0)
            p = np.where(denom > 0, backed, p)
        return np.log(p)

    def logprob(self, context, token: int) -> float:
        """``log P(token | context)`` in nats; only the last ``order - 1`` tokens of ``context`` count.

        Args:
          context: a sequence of token ids (possibly empty).
          token: the predicted token id.
        """
        self._check_fitted()
        token = int(self._check_ids(np.asarray([token]), "token")[0])
        return float(self._logprobs(self._context_rows(context), np.asarray([token]))[0])

    def probs(self, context) -> np.ndarray:
        """``(V,)`` float64 :math:`P(w \\mid \\text{context})` for every token ``w`` (sums to 1)."""
        self._check_fitted()
        row = self._context_rows(context)
        return np.exp(self._logprobs(np.repeat(row, self.vocab_size, axis=0), np.arange(self.vocab_size)))

    def _context_rows(self, context) -> np.ndarray:
        context = self._check_ids(np.asarray(context, np.int64).reshape(-1), "context")
        width = self.order - 1
        last = context[context.size - width :] if width else context[:0]
        return np.concatenate([np.full(width - last.size, -1, np.int64), last])[None]

    def token_logprobs(self, token_ids) -> np.ndarray:
        """``(N - 1,)`` :math:`\\log P(x_t \\mid x_{<t})` for ``t = 1 .. N-1`` of one sequence ``(N,)``."""
        self._check_fitted()
        ids = self._check_ids(token_ids, "token_ids")
        if ids.ndim != 1 or ids.size < 2:
            raise ValueError(f"token_ids: expected a 1-D sequence of at least 2 ids, got shape {ids.shape}")
        width = self.order - 1
        padded = np.concatenate([np.full(width, -1, np.int64), ids])
        contexts = sliding_window_view(padded, width)[1 : ids.size] if width else np.zeros((ids.size - 1, 0), np.int64)
        return self._logprobs(contexts, ids[1:])

    def evaluate(self, token_ids) -> Evaluation:
        """:class:`~jaxrnn.models.lm.Evaluation` of every token after the first of ``token_ids``, given all before it."""
        logp = self.token_logprobs(token_ids)
        return Evaluation.from_total(-float(np.sum(logp)), logp.size)

    def nll(self, token_ids) -> float:
        """Mean negative log-likelihood, nats per token, of ``token_ids[1:]`` (see :meth:`evaluate`)."""
        return self.evaluate(token_ids).nll

    def perplexity(self, token_ids) -> float:
        """``exp(nll(token_ids))``."""
        return self.evaluate(token_ids).perplexity

    def bits_per_token(self, token_ids) -> float:
        """``nll(token_ids) / ln 2``."""
        return self.evaluate(token_ids).bits_per_token


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray):
    """Index of each key in ``sorted_keys`` (0 where absent) and whether it is there."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, np.int64), np.zeros(keys.shape, bool)
    index = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    found = sorted_keys[index] == keys
    return np.where(found, index, 0), found


def _sequences(data) -> List[np.ndarray]:
    """``data`` as a list of non-empty 1-D int64 sequences."""
    if isinstance(data, (list, tuple)) and data and all(np.ndim(s) == 1 for s in data):
        sequences = [np.asarray(s) for s in data]
    else:
        array = np.asarray(data)
        if array.ndim not in (1, 2):
            raise ValueError(f"data: expected token ids (N,), rows (R, N) or a list of sequences, got shape {array.shape}")
        sequences = list(array) if array.ndim == 2 else [array]
    sequences = [s for s in sequences if s.size]
    if not sequences:
        raise ValueError("data: expected at least one token, got none")
    for s in sequences:
        if not np.issubdtype(s.dtype, np.integer):
            raise TypeError(f"data: expected integer token ids, got dtype {s.dtype}")
        if s.min() < 0:
            raise ValueError(f"data: expected token ids >= 0, got min {s.min()}")
    return [s.astype(np.int64) for s in sequences]
