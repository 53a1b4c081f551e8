"""Padded-batch utilities around a recurrent encoder: masks, pooling, attention, token inputs.

Every function here takes batch-major outputs ``ys`` of shape ``(B, T, D)``
and ``seq_lengths`` of shape ``(B,)`` (``None``: every sequence has length
``T``), and treats a position ``t >= seq_lengths[b]`` as padding:

* padding never changes a result, whatever it holds (even NaN or inf);
* the gradient with respect to a padded position is exactly zero;
* a zero-length sequence pools to zeros (never NaN or ``-inf``).

jaxrnn's runner already outputs zeros at padded steps; flax's ``nn.RNN`` and a
hand-rolled ``lax.scan`` do not, and these functions do not rely on it.

Example:
  >>> stack = jaxrnn.Stack(jaxrnn.LSTM(32), bidirectional=True)
  >>> ys, _ = stack.apply(params, xs, seq_lengths=lengths)          # (B, T, 64)
  >>> sentence = pool(ys, lengths, "last", bidirectional=True)      # (B, 64)
  >>> context = attention_pool(ys, lengths, query)                  # (B, 64)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.checks import check_float_dtype, check_index, check_lengths, check_one_of, is_traced, shape_of
from jaxrnn.scan import sequence_mask, where_valid
from jaxrnn.stack import LayerParams, Stack

__all__ = [
    "POOL_MODES",
    "Encoder",
    "EncoderParams",
    "attention_pool",
    "embed",
    "last_valid",
    "pool",
    "sequence_mask",
]

#: The ``mode`` names :func:`pool` accepts.
POOL_MODES = ("last", "mean", "max")


def _check_outputs(ys, name: str = "ys"):
    dtype = getattr(ys, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array (B, T, D), got {type(ys).__name__} of dtype {dtype}")
    if np.ndim(ys) != 3:
        raise ValueError(f"{name}: expected shape (B, T, D), got {shape_of(ys)}")


def _valid(ys, seq_lengths):
    """``(lengths, mask)``: ``(B,)`` int32 lengths clipped to ``[0, T]`` and the ``(B, T)`` validity mask."""
    B, T = ys.shape[0], ys.shape[1]
    if seq_lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    else:
        lengths = jnp.clip(jnp.asarray(check_lengths(seq_lengths, (B,), T)), 0, T).astype(jnp.int32)
    return lengths, sequence_mask(lengths, T)


def last_valid(ys, seq_lengths=None):
    """The output at each sequence's last valid step.

    Args:
      ys: ``(B, T, D)`` outputs.
      seq_lengths: ``(B,)`` integer lengths in ``[0, T]``, or ``None`` (all ``T``).

    Returns:
      ``(B, D)``: ``ys[b, seq_lengths[b] - 1]``; zeros where ``seq_lengths[b] == 0``.

    Example:
      >>> last_valid(jnp.arange(6.0).reshape(2, 3, 1), jnp.array([2, 0]))
      Array([[1.],
             [0.]], dtype=float32)
    """
    _check_outputs(ys)
    lengths, _ = _valid(ys, seq_lengths)
    index = jnp.maximum(lengths - 1, 0)[:, None, None]
    last = jnp.take_along_axis(ys, index, axis=1)[:, 0]
    return where_valid(lengths > 0, last)


def pool(ys, seq_lengths, mode, *, bidirectional=False):
    """Pool each sequence's valid outputs into one vector.

    Args:
      ys: ``(B, T, D)`` outputs.
      seq_lengths: ``(B,)`` integer lengths in ``[0, T]``, or ``None`` (all ``T``).
      mode: ``"last"`` (the last valid output), ``"mean"`` or ``"max"`` (over
        the valid steps).
      bidirectional: ``ys`` is ``[forward, backward]`` (``D`` even, as a
        bidirectional :class:`~jaxrnn.Stack` outputs): ``"last"`` then takes
        the forward half at the last valid step and the backward half at step
        0, where each direction has seen the whole sequence. ``"mean"`` and
        ``"max"`` are unaffected.

    Returns:
      ``(B, D)``; zeros for a zero-length sequence.

    Raises:
      ValueError: an unknown ``mode``; an odd ``D`` with ``bidirectional``.

    Example:
      >>> ys, _ = stack.apply(params, xs, seq_lengths=lengths)
      >>> features = pool(ys, lengths, "max")  # (B, D)
    """
    check_one_of("mode", mode, POOL_MODES)
    _check_outputs(ys)
    lengths, mask = _valid(ys, seq_lengths)
    if mode == "last":
        if not bidirectional:
            return last_valid(ys, lengths)
        D = ys.shape[-1]
        if D % 2:
            raise ValueError(f"ys: expected an even feature size [forward, backward] for bidirectional=True, got {D}")
        forward = last_valid(ys[..., : D // 2], lengths)
        backward = where_valid(lengths > 0, ys[:, 0, D // 2 :])
        return jnp.concatenate([forward, backward], axis=-1)
    if mode == "mean":
        total = jnp.sum(where_valid(mask, ys), axis=1)
        return total / jnp.maximum(lengths, 1)[:, None].astype(ys.dtype)
    peak = jnp.max(where_valid(mask, ys, -jnp.inf), axis=1)
    return where_valid(lengths > 0, peak)


def attention_pool(ys, seq_lengths, query, *, keys=None, return_weights=False):
    r"""Masked dot-product attention pooling with a (learned) query vector.

    .. math::
        s_{bt} = k_{bt} \cdot q, \quad
        w_{bt} = \frac{[t < L_b]\, e^{s_{bt}}}{\sum_{t'} [t' < L_b]\, e^{s_{bt'}}}, \quad
        \text{out}_b = \sum_t w_{bt}\, y_{bt}

    Padded positions get exactly zero weight (and zero gradient); a
    zero-length sequence gets all-zero weights and a zero output. flax's sst2
    example scores keys with an MLP (``v · tanh(W y)``); that is
    ``keys=jnp.tanh(ys @ W)`` with ``query=v``.

    Args:
      ys: ``(B, T, D)`` the values pooled.
      seq_lengths: ``(B,)`` integer lengths in ``[0, T]``, or ``None`` (all ``T``).
      query: ``(K,)`` the query vector (``K = D`` unless ``keys`` is given).
      keys: ``(B, T, K)`` the keys scored against ``query``; ``ys`` by default.
      return_weights: also return the ``(B, T)`` attention weights.

    Returns:
      ``(B, D)`` the weighted sum of ``ys``, or ``(pooled, weights)``.

    Example:
      >>> query = jax.random.normal(key, (ys.shape[-1],))
      >>> context = attention_pool(ys, lengths, query)  # (B, D)
    """
    _check_outputs(ys)
    keys = ys if keys is None else keys
    _check_outputs(keys, "keys")
    if shape_of(keys)[:2] != shape_of(ys)[:2]:
        raise ValueError(
            f"keys: expected shape {shape_of(ys)[:2] + ('K',)} (as ys's first two axes), got {shape_of(keys)}"
        )
    if np.ndim(query) != 1 or shape_of(query)[0] != keys.shape[-1]:
        raise ValueError(f"query: expected shape ({keys.shape[-1]},) (the keys' feature size), got {shape_of(query)}")
    lengths, mask = _valid(ys, seq_lengths)
    scores = jnp.einsum("btk,k->bt", where_valid(mask, keys), jnp.asarray(query, keys.dtype))
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = where_valid(mask, jnp.exp(scores - top))
    weights = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)
    pooled = jnp.einsum("bt,btd->bd", weights, where_valid(mask, ys))
    return (pooled, weights) if return_weights else pooled


def embed(table, tokens):
    """Look up token embeddings.

    Args:
      table: ``(V, E)`` embedding table.
      tokens: ``(B, T)`` (or any shape) integer token ids in ``[0, V)``.
        Concrete ids outside that range raise; traced ids are clamped.

    Returns:
      ``(*tokens.shape, E)`` embeddings, ``table[tokens]``.

    Example:
      >>> xs = embed(table, tokens)  # (B, T, E)
    """
    if np.ndim(table) != 2:
        raise ValueError(f"table: expected shape (vocab_size, embedding_size), got {shape_of(table)}")
    dtype = getattr(tokens, "dtype", None) if not isinstance(tokens, (list, tuple)) else np.asarray(tokens).dtype
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens: expected an integer array of token ids, got dtype {dtype}")
    V = shape_of(table)[0]
    if not is_traced(tokens):
        ids = np.asarray(tokens)
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(
                f"tokens: expected ids in [0, {V}) (the table's rows), got min {ids.min()} and max {ids.max()}"
            )
    return jnp.take(jnp.asarray(table), jnp.asarray(tokens), axis=0, mode="clip")


class EncoderParams(NamedTuple):
    """Parameters of an :class:`Encoder`: ``embedding`` ``(V, E)`` and the stack's ``layers``."""

    embedding: jax.Array
    layers: Tuple[LayerParams, ...]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Token ids → embedding → :class:`~jaxrnn.Stack`: the encoder of a text classifier.

    Args:
      vocab_size: ``V``.
      embedding_size: ``E``, the stack's input size.
      stack: the recurrent :class:`~jaxrnn.Stack`.
      embedding_stddev: standard deviation of the initial embeddings (0.1, as flax's sst2 example).

    Example:
      >>> enc = Encoder(1000, 32, jaxrnn.Stack(jaxrnn.LSTM(64), bidirectional=True))
      >>> params = enc.init(jax.random.key(0))
      >>> ys, finals = enc.apply(params, tokens, seq_lengths=lengths)  # ys: (B, T, 128)
    """

    vocab_size: int
    embedding_size: int
    stack: Stack
    embedding_stddev: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "vocab_size", check_index(self.vocab_size, "vocab_size"))
        object.__setattr__(self, "embedding_size", check_index(self.embedding_size, "embedding_size"))
        if not isinstance(self.stack, Stack):
            raise TypeError(f"stack: expected a jaxrnn.Stack, got {type(self.stack).__name__}")

    def init(self, key, dtype=jnp.float32) -> EncoderParams:
        """``EncoderParams`` with ``N(0, embedding_stddev²)`` embeddings and ``stack.init`` layers.

        Args:
          key: PRNG key.
          dtype: parameter dtype.
        """
        dtype = check_float_dtype("dtype", dtype)
        k_emb, k_stack = jax.random.split(key)
        table = self.embedding_stddev * jax.random.normal(k_emb, (self.vocab_size, self.embedding_size), dtype)
        return EncoderParams(table, self.stack.init(k_stack, self.embedding_size, dtype))

    def apply(self, params: EncoderParams, tokens, **stack_kwargs: Any):
        """Embed ``tokens`` ``(B, T)`` and run the stack.

        Args:
          params: from :meth:`init`.
          tokens: ``(B, T)`` integer ids.
          **stack_kwargs: passed to :meth:`jaxrnn.Stack.apply` (``seq_lengths``,
            ``dropout_key``, ``impl``, ...).

        Returns:
          ``(ys, final_carries)`` as :meth:`jaxrnn.Stack.apply`, ``ys`` ``(B, T, D)``.
        """
        if not isinstance(params, EncoderParams):
            raise TypeError(f"params: expected EncoderParams(embedding, layers), got {type(params).__name__}")
        return self.stack.apply(params.layers, embed(params.embedding, tokens), **stack_kwargs)

