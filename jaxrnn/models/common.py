"""Pieces every sequence model of :mod:`jaxrnn.models` shares: inputs, dense layers, masked losses, batches.

A model reads either token ids ``(B, T)`` (through an embedding table) or
ready-made features ``(B, T, F)`` (e.g. a biLM's scalar mix), runs a
:class:`jaxrnn.Stack` over them and scores the result. Position
``t >= seq_lengths[b]`` is padding: whatever it holds (any token id, NaN
features, any label), it changes no output, loss or gradient.

Example:
  >>> class MyModel(SequenceModel): ...                      # num_classes, stack, input_size, vocab_size
  >>> ys, lengths, mask = model.encode(params, tokens, seq_lengths)  # ys: (B, T, D), zero at padding
  >>> total, count = masked_cross_entropy(logits, labels, mask)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.checks import (
    check_float_dtype,
    check_index,
    check_inputs,
    check_int_array,
    check_lengths,
    check_rate,
    is_traced,
    shape_of,
)
from jaxrnn.runner import check_impl
from jaxrnn.scan import sequence_mask, where_valid
from jaxrnn.sequence import embed
from jaxrnn.stack import Stack

Array = jax.Array

__all__ = [
    "Batch",
    "DenseParams",
    "SequenceModel",
    "batch_field",
    "check_labels",
    "dense",
    "init_dense",
    "masked_accuracy",
    "masked_cross_entropy",
    "mean_of",
    "reverse_valid",
    "sequence_inputs",
]


class Batch(NamedTuple):
    """A training batch for :meth:`Tagger.loss`, :meth:`Classifier.loss` and :meth:`BiLM.loss`.

    A dict with the same keys works as well (``"features"`` may stand for ``"tokens"``).

    Attributes:
      tokens: ``(B, T)`` integer token ids, or ``(B, T, F)`` float features for
        a model built without ``vocab_size``.
      labels: ``(B, T)`` tag ids (tagger) or ``(B,)`` class ids (classifier); unused by the biLM.
      seq_lengths: ``(B,)`` valid lengths, or ``None`` (all ``T``).
      dropout_key: a PRNG key enabling dropout, or ``None``.
    """

    tokens: Any
    labels: Any = None
    seq_lengths: Any = None
    dropout_key: Any = None


def batch_field(batch, name: str, default: Any = ..., aliases=()):
    """``batch[name]`` (a dict) or ``batch.name`` (a NamedTuple); ``aliases`` are tried next, then ``default``.

    Raises:
      TypeError: ``batch`` is neither, or lacks ``name`` and has no ``default``.
    """
    for key in (name, *aliases):
        if isinstance(batch, dict):
            if key in batch:
                return batch[key]
        elif hasattr(batch, "_fields"):
            if key in batch._fields:
                return getattr(batch, key)
        else:
            raise TypeError(f"batch: expected a dict or a NamedTuple such as jaxrnn.models.Batch, got {type(batch).__name__}")
    if default is ...:
        keys = sorted(batch) if isinstance(batch, dict) else list(batch._fields)
        raise TypeError(f"batch: expected a field {name!r}, got fields {keys}")
    return default


class DenseParams(NamedTuple):
    """An affine layer ``x @ w + b``: ``w`` ``(I, O)``, ``b`` ``(O,)``."""

    w: Array
    b: Array


def init_dense(key: Array, n_in: int, n_out: int, dtype=jnp.float32) -> DenseParams:
    """LeCun-normal ``w`` ``(n_in, n_out)`` and zero ``b`` ``(n_out,)``.

    Example:
      >>> out = init_dense(jax.random.key(0), 64, 10)
    """
    w = jax.nn.initializers.lecun_normal()(key, (n_in, n_out), dtype)
    return DenseParams(w, jnp.zeros((n_out,), dtype))


def dense(params: DenseParams, x: Array) -> Array:
    """``x @ w + b`` in float32 (float64 for float64 ``x``). ``x``: ``(..., I)``; returns ``(..., O)``.

    Example:
      >>> logits = dense(params.out, ys)  # (B, T, C)
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.matmul(x, params.w.astype(x.dtype), preferred_element_type=acc)
    return y + jnp.reshape(params.b.astype(acc), (1,) * (y.ndim - 1) + (-1,))


def reverse_valid(xs: Array, seq_lengths: Array) -> Array:
    """Reverse each sequence's valid part in time; padding stays where it is.

    Args:
      xs: ``(B, T, ...)`` batch-major values.
      seq_lengths: ``(B,)`` integer lengths in ``[0, T]``.

    Returns:
      ``(B, T, ...)``: ``out[b, t] = xs[b, n_b - 1 - t]`` for ``t < n_b``, ``xs[b, t]``
      otherwise. It is its own inverse; a forward run over ``reverse_valid(xs)``,
      reversed back, is a ``reverse=True`` run of :func:`jaxrnn.rnn`.

    Example:
      >>> reverse_valid(jnp.arange(4.0).reshape(1, 4), jnp.array([3]))
      Array([[2., 1., 0., 3.]], dtype=float32)
    """
    T = xs.shape[1]
    t = jnp.arange(T)[None, :]
    n = jnp.asarray(seq_lengths)[:, None]
    index = jnp.where(t < n, n - 1 - t, t)
    index = jnp.reshape(index, index.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, index, axis=1)


def check_labels(labels, shape, num_classes: int, valid=None, name: str = "labels"):
    """Check integer ``labels`` of ``shape``; concrete ids at ``valid`` positions must lie in ``[0, num_classes)``.

    Args:
      labels: integer array.
      shape: the expected shape.
      num_classes: ``C``.
      valid: bool mask of ``shape`` (``None``: every position); ids elsewhere are not checked.
      name: the argument's name in errors.

    Returns:
      ``labels`` as an array.
    """
    labels = check_int_array(labels, shape, name, what="an integer array of class ids")
    if not is_traced(labels) and not is_traced(valid):
        ids = np.asarray(labels)
        if valid is not None:
            ids = ids[np.broadcast_to(np.asarray(valid, bool), ids.shape)]
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(
                f"{name}: expected class ids in [0, {num_classes}) at valid positions, "
                f"got min {ids.min()} and max {ids.max()}"
            )
    return labels


def _label_nll(logits: Array, labels: Array, mask: Array) -> Array:
    """Per-position ``-log softmax(logits)[label]``: zero where ``mask`` is False, NaN for a valid id out of range."""
    C = logits.shape[-1]
    in_range = (labels >= 0) & (labels < C)
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(in_range & mask, labels, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(in_range, -picked, jnp.nan)  # under jit an out-of-range valid label makes the loss NaN
    return jnp.where(mask, nll, 0.0)


def masked_cross_entropy(logits: Array, labels: Array, mask: Array):
    """Summed cross-entropy over the positions where ``mask`` holds, and their number.

    Args:
      logits: ``(..., C)`` unnormalised scores.
      labels: ``(...)`` integer class ids (anything at masked-out positions).
      mask: ``(...)`` bool, True at the positions that count.

    Returns:
      ``(total, count)``: float32 (float64 for float64 logits) ``Σ_mask -log softmax(logits)[label]`` and the
      int32 number of positions; padding contributes nothing to either or to
      the gradient. Divide for the mean (``total / max(count, 1)``).

    Example:
      >>> total, count = masked_cross_entropy(logits, labels, sequence_mask(lengths, T))
    """
    mask = jnp.asarray(mask, bool)
    return jnp.sum(_label_nll(logits, labels, mask)), jnp.sum(mask, dtype=jnp.int32)


def masked_accuracy(logits: Array, labels: Array, mask: Array):
    """Correct argmax predictions where ``mask`` holds, and their number (arguments as :func:`masked_cross_entropy`).

    Returns:
      ``(correct, count)``: int32 scalars.
    """
    mask = jnp.asarray(mask, bool)
    hits = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(hits, dtype=jnp.int32), jnp.sum(mask, dtype=jnp.int32)


def mean_of(total: Array, count: Array) -> Array:
    """``total / count`` in ``total``'s dtype; 0 where ``count`` is 0 (an empty batch has zero loss and gradient)."""
    return total / jnp.maximum(count, 1).astype(total.dtype)


def sequence_inputs(inputs, seq_lengths, input_size: int, *, embedding=None, vocab_size: Optional[int] = None):
    """A model's recurrent input and its padding, checked.

    Args:
      inputs: ``(B, T)`` token ids (with ``vocab_size``), or ``(B, T, input_size)`` float features.
      seq_lengths: ``(B,)`` integer lengths in ``[0, T]``, or ``None`` (all ``T``).
      input_size: the width of the result (the embedding size, or the feature size).
      embedding: the ``(V, input_size)`` table (with ``vocab_size``), else ignored.
      vocab_size: ``V`` for token ids; ``None`` for features.

    Returns:
      ``(xs, lengths, mask)``: ``(B, T, input_size)`` inputs, zero at padding
      (padded token ids are never looked up, so any id may sit there; NaN
      features there never reach a result or a gradient), ``(B,)`` int32
      lengths and the ``(B, T)`` validity mask.

    Example:
      >>> xs, lengths, mask = sequence_inputs(tokens, lengths, 32, embedding=table, vocab_size=100)
    """
    if vocab_size is not None:
        dtype = getattr(inputs, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"tokens: expected an integer array of token ids (the model has vocab_size={vocab_size}), "
                f"got {type(inputs).__name__} of dtype {dtype}"
            )
        if np.ndim(inputs) != 2:
            raise ValueError(f"tokens: expected shape (B, T), got {shape_of(inputs)}")
    else:
        check_inputs(inputs, name="features", ranks=(3,))
        if inputs.shape[-1] != input_size:
            raise ValueError(f"features: expected shape (B, T, {input_size}) (input_size), got {shape_of(inputs)}")
    B, T = inputs.shape[:2]
    if seq_lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    else:
        lengths = jnp.clip(jnp.asarray(check_lengths(seq_lengths, (B,), T)), 0, T).astype(jnp.int32)
    mask = sequence_mask(lengths, T)
    if vocab_size is not None:
        inputs = embed(embedding, jnp.where(mask, inputs, 0))
    return where_valid(mask, inputs), lengths, mask


@dataclasses.dataclass(frozen=True)
class SequenceModel:
    """Inputs → :class:`jaxrnn.Stack` → outputs: the configuration shared by the tagger and the classifier.

    Args:
      num_classes: ``C``, the number of tags or classes.
      stack: the recurrent :class:`~jaxrnn.Stack` (its output width is ``D``).
      input_size: the stack's input width: the embedding size ``E`` when
        ``vocab_size`` is given, else the feature size ``F`` of the inputs.
      vocab_size: ``V``: inputs are token ids ``(B, T)`` looked up in a
        ``(V, E)`` table. ``None``: inputs are float features ``(B, T, F)``.
      embedding_stddev: standard deviation of the initial embeddings.
      impl: implementation of the recurrence, see :func:`jaxrnn.rnn`.
    """

    num_classes: int
    stack: Stack
    input_size: int
    vocab_size: Optional[int] = None
    embedding_stddev: float = 0.1
    impl: Any = "auto"

    def __post_init__(self):
        object.__setattr__(self, "num_classes", check_index(self.num_classes, "num_classes"))
        if not isinstance(self.stack, Stack):
            raise TypeError(f"stack: expected a jaxrnn.Stack, got {type(self.stack).__name__}")
        object.__setattr__(self, "input_size", check_index(self.input_size, "input_size"))
        if self.vocab_size is not None:
            object.__setattr__(self, "vocab_size", check_index(self.vocab_size, "vocab_size"))
        stddev = check_rate("embedding_stddev", self.embedding_stddev, 0.0, float("inf"), closed_low=False, what="a std")
        object.__setattr__(self, "embedding_stddev", stddev)
        check_impl(self.impl)

    def init_encoder(self, key: Array, dtype=jnp.float32):
        """``(embedding, layers)``: a ``(V, E)`` table (``None`` without ``vocab_size``) and ``stack.init``'s layers."""
        dtype = check_float_dtype("dtype", dtype)
        k_emb, k_stack = jax.random.split(key)
        table = None
        if self.vocab_size is not None:
            table = self.embedding_stddev * jax.random.normal(k_emb, (self.vocab_size, self.input_size), dtype)
        return table, self.stack.init(k_stack, self.input_size, dtype)

    def check_encoder_params(self, params, kind: type):
        """Check ``params`` is a ``kind`` whose ``embedding`` and ``layers`` fit this configuration."""
        if not isinstance(params, kind):
            raise TypeError(f"params: expected {kind.__name__} (from {type(self).__name__}.init), got {type(params).__name__}")
        if self.vocab_size is None and params.embedding is not None:
            raise ValueError("params.embedding: expected None (the model reads features, vocab_size=None)")
        if self.vocab_size is not None:
            want = (self.vocab_size, self.input_size)
            if shape_of(params.embedding) != want:
                raise ValueError(f"params.embedding: expected shape {want}, got {shape_of(params.embedding)}")
        n_in = self.stack.check_params(params.layers, "params.layers")
        if n_in != self.input_size:
            raise ValueError(f"params.layers[0].fwd.w_ih: expected {self.input_size} input rows, got {n_in}")

    def inputs(self, embedding, inputs, seq_lengths=None):
        """:func:`sequence_inputs` for this model: ``(xs, lengths, mask)``, ``xs`` ``(B, T, input_size)`` zero at padding."""
        return sequence_inputs(inputs, seq_lengths, self.input_size, embedding=embedding, vocab_size=self.vocab_size)

    def encode(self, params, inputs, seq_lengths=None, *, dropout_key=None):
        """Run the stack over the (embedded) inputs.

        Args:
          params: the model's parameters (with ``embedding`` and ``layers``).
          inputs: ``(B, T)`` token ids or ``(B, T, F)`` features.
          seq_lengths: ``(B,)`` valid lengths, or ``None``.
          dropout_key: enables the stack's dropout.

        Returns:
          ``(ys, lengths, mask)``: ``(B, T, D)`` outputs, zero at padding, and as :meth:`inputs`.
        """
        xs, lengths, mask = self.inputs(params.embedding, inputs, seq_lengths)
        ys, _ = self.stack.apply(params.layers, xs, seq_lengths=lengths, dropout_key=dropout_key, impl=self.impl)
        return ys, lengths, mask

    def scores(self, params, inputs, seq_lengths=None, *, dropout_key=None):
        """``(logits, valid)``: the logits ``(..., C)`` and where a label counts (``(...)`` bool). Subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__}.scores")

    def apply(self, params, inputs, seq_lengths=None, *, dropout_key: Optional[Array] = None) -> Array:
        """The logits: ``(B, T, C)`` per token for the tagger (zero at padded positions), ``(B, C)`` per sentence for the classifier.

        Args:
          params: from ``init``.
          inputs: ``(B, T)`` token ids in ``[0, V)`` (with ``vocab_size``) or
            ``(B, T, F)`` float features; anything at padded positions.
          seq_lengths: ``(B,)`` valid lengths in ``[0, T]``, or ``None`` (all ``T``).
          dropout_key: enables the stack's dropout (training).

        Returns:
          float32 logits (float64 for float64 parameters).

        Example:
          >>> predicted = jnp.argmax(model.apply(params, tokens, lengths), -1)
        """
        return self.scores(params, inputs, seq_lengths, dropout_key=dropout_key)[0]

    def counts(self, params, batch, *, dropout_key: Optional[Array] = None):
        """``(nll_total, correct, count)`` over the labels of ``batch`` that count (sums, for averaging over batches).

        Args:
          params: from ``init``.
          batch: a :class:`Batch` or dict: ``tokens`` ``(B, T)`` (or features
            ``(B, T, F)``), ``labels`` (``(B, T)`` tags or ``(B,)`` classes, ids
            in ``[0, C)``; anything at padding), ``seq_lengths`` ``(B,)`` or ``None``,
            optionally ``dropout_key``.
          dropout_key: enables dropout (else the batch's ``dropout_key``, if any).

        Returns:
          float32 summed cross-entropy, int32 correct argmax predictions, int32 number of labels.
        """
        inputs = batch_field(batch, "tokens", aliases=("features",))
        labels = batch_field(batch, "labels")
        seq_lengths = batch_field(batch, "seq_lengths", None)
        key = batch_field(batch, "dropout_key", None) if dropout_key is None else dropout_key
        logits, valid = self.scores(params, inputs, seq_lengths, dropout_key=key)
        labels = check_labels(labels, valid.shape, self.num_classes, valid)
        total, count = masked_cross_entropy(logits, labels, valid)
        correct, _ = masked_accuracy(logits, labels, valid)
        return total, correct, count

    def loss(self, params, batch, *, dropout_key: Optional[Array] = None) -> Array:
        """Mean cross-entropy over the labels of ``batch`` that count (0 for a batch without any).

        ``loss(params, batch)`` is the ``loss_fn`` of :func:`jaxrnn.train.make_train_step`.
        Arguments as :meth:`counts`.

        Example:
          >>> step = jaxrnn.train.make_train_step(model.loss, optax.adam(1e-3))
        """
        total, _, count = self.counts(params, batch, dropout_key=dropout_key)
        return mean_of(total, count)

    def accuracy(self, params, batch) -> Array:
        """Fraction of the labels that count whose argmax prediction is right (no dropout). Arguments as :meth:`counts`."""
        _, correct, count = self.counts(params, batch)
        return mean_of(correct.astype(jnp.float32), count)
