r"""A sequence tagger (part-of-speech, named entities): one class per token.

.. math::
    x_t = E[w_t] \text{ (or given features)}, \qquad
    y_t = [\overrightarrow{h}_t; \overleftarrow{h}_t] \text{ (a bidirectional Stack)}, \qquad
    \text{logits}_t = y_t W + b,

    J = \frac{1}{N} \sum_b \sum_{t < n_b} -\log \mathrm{softmax}(\text{logits}_{b,t})[c_{b,t}]

with :math:`N = \sum_b n_b` the number of valid tokens: padding contributes
to neither the loss nor its gradient, whatever token or label it holds.

Inputs are token ids (``vocab_size`` given) or any ``(B, T, F)`` features,
e.g. a biLM's scalar mix (:meth:`jaxrnn.models.BiLM.embed_contextual`).

Example:
  >>> tagger = Tagger(num_classes=17, stack=jaxrnn.Stack(jaxrnn.LSTM(64), bidirectional=True),
  ...                 input_size=32, vocab_size=5000)
  >>> params = tagger.init(jax.random.key(0))
  >>> logits = tagger.apply(params, tokens, lengths)                     # (B, T, 17)
  >>> J = tagger.loss(params, Batch(tokens, tags, lengths))              # for jaxrnn.train.make_train_step
  >>> acc = tagger.accuracy(params, Batch(tokens, tags, lengths))
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxrnn.checks import check_float_dtype, check_key, shape_of
from jaxrnn.models.common import DenseParams, SequenceModel, dense, init_dense
from jaxrnn.scan import where_valid
from jaxrnn.stack import LayerParams

Array = jax.Array

__all__ = ["Tagger", "TaggerParams"]


class TaggerParams(NamedTuple):
    """Tagger parameters.

    Attributes:
      embedding: ``(V, E)`` token embeddings, or ``None`` for a tagger of features.
      layers: the :class:`jaxrnn.Stack`'s parameters (a tuple of ``LayerParams``).
      out: :class:`~jaxrnn.models.DenseParams`, ``w`` ``(D, C)`` and ``b`` ``(C,)``.
    """

    embedding: Optional[Array]
    layers: Tuple[LayerParams, ...]
    out: DenseParams


@dataclasses.dataclass(frozen=True)
class Tagger(SequenceModel):
    """Configuration of a sequence tagger (hashable, static under ``jit``).

    Args:
      num_classes: ``C``, the number of tags.
      stack: the recurrent :class:`~jaxrnn.Stack`, usually bidirectional
        (each tag then sees the whole sentence); output width ``D``.
      input_size: the embedding size ``E`` (with ``vocab_size``), else the feature size ``F``.
      vocab_size: ``V`` for token-id inputs; ``None`` for ``(B, T, F)`` features.
      embedding_stddev: standard deviation of the initial embeddings.
      impl: implementation of the recurrence, see :func:`jaxrnn.rnn`.

    Example:
      >>> tagger = Tagger(9, jaxrnn.Stack(jaxrnn.GRU(32), bidirectional=True), input_size=16, vocab_size=100)
      >>> logits = tagger.apply(tagger.init(jax.random.key(0)), tokens, lengths)  # (B, T, 9)
    """

    def init(self, key: Array, dtype=jnp.float32) -> TaggerParams:
        """Initialise: ``N(0, embedding_stddev²)`` embeddings, ``stack.init`` layers, LeCun-normal output, zero bias.

        Args:
          key: PRNG key.
          dtype: parameter dtype.
        """
        dtype = check_float_dtype("dtype", dtype)
        k_enc, k_out = jax.random.split(key)
        embedding, layers = self.init_encoder(k_enc, dtype)
        return TaggerParams(embedding, layers, init_dense(k_out, self.stack.output_size, self.num_classes, dtype))

    def check_params(self, params: TaggerParams) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field when ``params`` does not fit this tagger."""
        self.check_encoder_params(params, TaggerParams)
        want = ((self.stack.output_size, self.num_classes), (self.num_classes,))
        if (shape_of(params.out.w), shape_of(params.out.b)) != want:
            raise ValueError(
                f"params.out: expected w {want[0]} and b {want[1]}, got {shape_of(params.out.w)} and {shape_of(params.out.b)}"
            )

    def scores(self, params: TaggerParams, inputs, seq_lengths=None, *, dropout_key: Optional[Array] = None):
        """``(logits, mask)``: :meth:`apply`'s logits and the ``(B, T)`` validity mask (where a tag counts)."""
        self.check_params(params)
        check_key("dropout_key", dropout_key)
        ys, _, mask = self.encode(params, inputs, seq_lengths, dropout_key=dropout_key)
        return where_valid(mask, dense(params.out, ys)), mask

    # apply(params, inputs, seq_lengths), loss(params, batch), accuracy(params, batch) and counts(...)
    # come from SequenceModel:
    # labels (B, T), mean cross-entropy over valid tokens.
