r"""A sentence classifier: a recurrent encoder, one vector per sentence, then an MLP.

The sentence vector is one of the lectures' encodings of the hidden states
:math:`y_1, \dots, y_n` of a sentence of length :math:`n`:

* ``"last"``: the final hidden state :math:`y_n` (for a bidirectional stack,
  the forward half at :math:`n` and the backward half at 1, where each
  direction has read the whole sentence);
* ``"mean"``: the element-wise mean :math:`\frac1n \sum_t y_t`;
* ``"max"``: the element-wise max :math:`\max_t y_t` ("usually better:
  element-wise max or mean");
* ``"attention"``: :math:`\sum_t \alpha_t y_t`, :math:`\alpha = \mathrm{softmax}_t(y_t \cdot q)`
  with a learned query :math:`q` (:func:`jaxrnn.sequence.attention_pool`).

The first three are :func:`jaxrnn.sequence.pool` (also ``jaxrnn.models.pool``).
Padding never reaches the sentence vector or a gradient.

Example:
  >>> clf = Classifier(num_classes=2, stack=jaxrnn.Stack(jaxrnn.LSTM(64), bidirectional=True),
  ...                  input_size=32, vocab_size=5000, pooling="max", hidden_sizes=(64,))
  >>> params = clf.init(jax.random.key(0))
  >>> logits = clf.apply(params, tokens, lengths)                 # (B, 2)
  >>> J = clf.loss(params, Batch(tokens, labels, lengths))         # labels: (B,)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxrnn.checks import check_float_dtype, check_index, check_key, check_one_of, shape_of
from jaxrnn.models.common import DenseParams, SequenceModel, dense, init_dense
from jaxrnn.sequence import POOL_MODES, attention_pool, pool
from jaxrnn.stack import LayerParams

Array = jax.Array

__all__ = ["ACTIVATIONS", "POOLINGS", "Classifier", "ClassifierParams"]

#: The ``pooling`` names :class:`Classifier` accepts.
POOLINGS = (*POOL_MODES, "attention")
#: The MLP's hidden activations, by name.
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class ClassifierParams(NamedTuple):
    """Classifier parameters.

    Attributes:
      embedding: ``(V, E)`` token embeddings, or ``None`` for a classifier of features.
      layers: the :class:`jaxrnn.Stack`'s parameters (a tuple of ``LayerParams``).
      query: ``(D,)`` the attention query (``pooling="attention"``), else ``None``.
      mlp: a tuple of :class:`~jaxrnn.models.DenseParams`, ``D → hidden_sizes... → C``.
    """

    embedding: Optional[Array]
    layers: Tuple[LayerParams, ...]
    query: Optional[Array]
    mlp: Tuple[DenseParams, ...]


@dataclasses.dataclass(frozen=True)
class Classifier(SequenceModel):
    """Configuration of a sentence classifier (hashable, static under ``jit``).

    Args:
      num_classes: ``C``.
      stack: the recurrent :class:`~jaxrnn.Stack`; output width ``D``.
      input_size: the embedding size ``E`` (with ``vocab_size``), else the feature size ``F``.
      vocab_size: ``V`` for token-id inputs; ``None`` for ``(B, T, F)`` features.
      embedding_stddev: standard deviation of the initial embeddings.
      impl: implementation of the recurrence, see :func:`jaxrnn.rnn`.
      pooling: ``"last"``, ``"mean"``, ``"max"`` or ``"attention"`` (see the module docstring).
      hidden_sizes: widths of the MLP's hidden layers (``()``: a linear classifier).
      activation: the MLP's hidden activation, ``"tanh"`` or ``"relu"``.

    Example:
      >>> clf = Classifier(3, jaxrnn.Stack(jaxrnn.GRU(32)), input_size=8, pooling="mean")
      >>> logits = clf.apply(clf.init(jax.random.key(0)), features, lengths)  # (B, 3)
    """

    pooling: str = "max"
    hidden_sizes: Tuple[int, ...] = ()
    activation: str = "tanh"

    def __post_init__(self):
        super().__post_init__()
        check_one_of("pooling", self.pooling, POOLINGS)
        if not isinstance(self.hidden_sizes, (tuple, list)):
            raise TypeError(f"hidden_sizes: expected a tuple of positive ints, got {type(self.hidden_sizes).__name__}")
        sizes = tuple(check_index(n, f"hidden_sizes[{i}]") for i, n in enumerate(self.hidden_sizes))
        object.__setattr__(self, "hidden_sizes", sizes)
        check_one_of("activation", self.activation, tuple(ACTIVATIONS))

    @property
    def widths(self) -> Tuple[int, ...]:
        """The MLP's widths, ``(D, *hidden_sizes, C)``."""
        return (self.stack.output_size, *self.hidden_sizes, self.num_classes)

    def init(self, key: Array, dtype=jnp.float32) -> ClassifierParams:
        """Initialise: embeddings and stack as :class:`~jaxrnn.models.Tagger`, a ``N(0, 1/D)`` query, LeCun-normal MLP.

        Args:
          key: PRNG key.
          dtype: parameter dtype.
        """
        dtype = check_float_dtype("dtype", dtype)
        k_enc, k_query, k_mlp = jax.random.split(key, 3)
        embedding, layers = self.init_encoder(k_enc, dtype)
        D = self.stack.output_size
        query = jax.random.normal(k_query, (D,), dtype) / jnp.sqrt(D).astype(dtype) if self.pooling == "attention" else None
        widths = self.widths
        keys = jax.random.split(k_mlp, len(widths) - 1)
        mlp = tuple(init_dense(k, n_in, n_out, dtype) for k, n_in, n_out in zip(keys, widths[:-1], widths[1:]))
        return ClassifierParams(embedding, layers, query, mlp)

    def check_params(self, params: ClassifierParams) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field when ``params`` does not fit this classifier."""
        self.check_encoder_params(params, ClassifierParams)
        D = self.stack.output_size
        if self.pooling == "attention" and shape_of(params.query) != (D,):
            raise ValueError(f"params.query: expected shape ({D},) for pooling='attention', got {shape_of(params.query)}")
        if self.pooling != "attention" and params.query is not None:
            raise ValueError(f"params.query: expected None for pooling={self.pooling!r}")
        widths = self.widths
        if not isinstance(params.mlp, (tuple, list)) or len(params.mlp) != len(widths) - 1:
            raise ValueError(f"params.mlp: expected {len(widths) - 1} DenseParams (widths {widths})")
        for i, (p, n_in, n_out) in enumerate(zip(params.mlp, widths[:-1], widths[1:])):
            if (shape_of(p.w), shape_of(p.b)) != ((n_in, n_out), (n_out,)):
                raise ValueError(
                    f"params.mlp[{i}]: expected w {(n_in, n_out)} and b {(n_out,)}, got {shape_of(p.w)} and {shape_of(p.b)}"
                )

    def sentence(self, params: ClassifierParams, inputs, seq_lengths=None, *, dropout_key: Optional[Array] = None) -> Array:
        """The sentence vectors ``(B, D)`` (the MLP's input); arguments as :meth:`apply`."""
        self.check_params(params)
        check_key("dropout_key", dropout_key)
        ys, lengths, _ = self.encode(params, inputs, seq_lengths, dropout_key=dropout_key)
        if self.pooling == "attention":
            return attention_pool(ys, lengths, params.query)
        return pool(ys, lengths, self.pooling, bidirectional=self.stack.bidirectional)

    def scores(self, params: ClassifierParams, inputs, seq_lengths=None, *, dropout_key: Optional[Array] = None):
        """``(logits, valid)``: :meth:`apply`'s logits and an all-True ``(B,)`` mask (every sentence has a label)."""
        h = self.sentence(params, inputs, seq_lengths, dropout_key=dropout_key)
        act = ACTIVATIONS[self.activation]
        for layer in params.mlp[:-1]:
            h = act(dense(layer, h))
        logits = dense(params.mlp[-1], h)
        return logits, jnp.ones(logits.shape[:1], bool)

    # apply(params, inputs, seq_lengths), loss(params, batch), accuracy(params, batch) and counts(...)
    # come from SequenceModel:
    # labels (B,), mean cross-entropy over the sentences.
