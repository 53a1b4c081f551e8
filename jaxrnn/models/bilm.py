r"""An ELMo-style deep bidirectional language model and its scalar mix (Peters et al. 2018).

Two separate language models share the token embedding :math:`E` and the
softmax :math:`(W, b)`:

* the forward LM, a unidirectional :math:`L`-layer stack reading
  :math:`w_1 \dots w_t`, predicts :math:`w_{t+1}`;
* the backward LM, another :math:`L`-layer stack reading
  :math:`w_t \dots w_n` (each sequence's valid part, right to left),
  predicts :math:`w_{t-1}`.

They are trained jointly:

.. math::
    J = \tfrac12 \Big( \frac1N \sum_{b,\, t < n_b - 1} -\log p_\to(w_{b,t+1} \mid w_{b,\le t})
      + \frac1N \sum_{b,\, 0 < t < n_b} -\log p_\leftarrow(w_{b,t-1} \mid w_{b,\ge t}) \Big)

with :math:`N = \sum_b (n_b - 1)` (padding never contributes). Position
``t`` of layer ``j`` has the representation :math:`R_j = [\overrightarrow{h}_{j,t};
\overleftarrow{h}_{j,t}]` of width :math:`2H`; layer 0 is the token embedding
repeated for both directions, :math:`[E w_t; E w_t]`, which is why the
embedding size is :math:`H` (the cell's hidden size: no projection is
needed). A downstream model uses the learned scalar mix

.. math::
    \mathrm{ELMo}_t = \gamma \sum_{j=0}^{L} \mathrm{softmax}(s)_j\, R_{j,t}

(:func:`scalar_mix`), e.g. as the features of a :class:`~jaxrnn.models.Tagger`.

Example:
  >>> bilm = BiLM(vocab_size=1000, cell=jaxrnn.LSTM(64), num_layers=2)
  >>> params, mix = bilm.init(jax.random.key(0)), bilm.init_mix()
  >>> J = bilm.loss(params, Batch(tokens, seq_lengths=lengths))        # pre-training
  >>> feats = bilm.embed_contextual(params, mix, tokens, lengths)       # (B, T, 128)
  >>> tagger = Tagger(17, jaxrnn.Stack(jaxrnn.LSTM(32), bidirectional=True), input_size=128)
  >>> logits = tagger.apply(tagger_params, feats, lengths)              # (B, T, 17)
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxrnn.cells import check_cell
from jaxrnn.checks import check_float_dtype, check_index, check_key, check_one_of, check_rate, shape_of
from jaxrnn.models.common import (
    DenseParams,
    batch_field,
    dense,
    init_dense,
    masked_cross_entropy,
    mean_of,
    reverse_valid,
    sequence_inputs,
)
from jaxrnn.runner import check_impl
from jaxrnn.scan import where_valid
from jaxrnn.stack import DROPOUT_MODES, LayerParams, Stack

Array = jax.Array

__all__ = ["BiLM", "BiLMParams", "MixParams", "scalar_mix"]

#: The connections a :class:`BiLM` direction may use between layers (ELMo: residual).
BILM_CONNECTIONS = (None, "residual", "highway")


def scalar_mix(layers: Sequence[Array], weights: Array, gamma: Array) -> Array:
    r"""ELMo's scalar mix :math:`\gamma \sum_j \mathrm{softmax}(w)_j \, \text{layers}_j`.

    Args:
      layers: a non-empty sequence of ``N`` arrays of one shape, e.g. ``(B, T, 2H)``.
      weights: ``(N,)`` unnormalised mixing weights (zeros: the plain average).
      gamma: a scalar scale.

    Returns:
      An array of the layers' shape, in float32 (or wider, as the inputs).

    Raises:
      TypeError: ``layers`` is not a sequence of arrays.
      ValueError: naming ``layers[j]``, ``weights`` or ``gamma`` when its shape is wrong.

    Example:
      >>> scalar_mix([a, b, c], jnp.zeros(3), 1.0)  # == (a + b + c) / 3
    """
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(f"layers: expected a non-empty list of equally shaped arrays, got {type(layers).__name__}"
                        f"{' of length 0' if isinstance(layers, (list, tuple)) else ''}")
    shape = shape_of(layers[0])
    for j, layer in enumerate(layers):
        if getattr(layer, "dtype", None) is None or not jnp.issubdtype(layer.dtype, jnp.floating):
            raise TypeError(f"layers[{j}]: expected a floating-point array, got {type(layer).__name__}")
        if shape_of(layer) != shape:
            raise ValueError(f"layers[{j}]: expected shape {shape} (as layers[0]), got {shape_of(layer)}")
    if shape_of(weights) != (len(layers),):
        raise ValueError(f"weights: expected shape ({len(layers)},) (one per layer), got {shape_of(weights)}")
    if shape_of(gamma) != ():
        raise ValueError(f"gamma: expected a scalar, got shape {shape_of(gamma)}")
    dtype = jnp.result_type(jnp.float32, *layers)
    s = jax.nn.softmax(jnp.asarray(weights, dtype))
    total = sum(s[j] * layers[j].astype(dtype) for j in range(len(layers)))
    return jnp.asarray(gamma, dtype) * total


class MixParams(NamedTuple):
    """The scalar mix's parameters: ``weights`` ``(L + 1,)`` (unnormalised) and ``gamma`` ``()``."""

    weights: Array
    gamma: Array


class BiLMParams(NamedTuple):
    """biLM parameters.

    Attributes:
      embedding: ``(V, H)`` token embeddings, shared by both directions.
      forward: the forward LM's ``L`` layers (a tuple of ``LayerParams``, as ``Stack(cell, L).init``).
      backward: the backward LM's ``L`` layers, same structure.
      softmax: the shared output layer, :class:`~jaxrnn.models.DenseParams` ``w`` ``(H, V)``, ``b`` ``(V,)``.
    """

    embedding: Array
    forward: Tuple[LayerParams, ...]
    backward: Tuple[LayerParams, ...]
    softmax: DenseParams


@dataclasses.dataclass(frozen=True)
class BiLM:
    """Configuration of an ELMo-style biLM (hashable, static under ``jit``).

    Args:
      vocab_size: ``V``.
      cell: the cell of every layer of both directions; its ``hidden_size`` is
        ``H``, which is also the embedding size.
      num_layers: ``L``, layers per direction.
      connection: between layers of a direction: ``None``, ``"residual"``
        (ELMo) or ``"highway"`` (see :class:`jaxrnn.Stack`; with ``E = H``
        they apply at every layer, the first included).
      dropout: dropout rate on the input of every layer (the embedding
        included), applied only with a ``dropout_key``.
      dropout_mode: ``"per_step"`` or ``"variational"`` masks (see :class:`jaxrnn.Stack`).
      embedding_stddev: standard deviation of the initial embeddings.
      impl: implementation of the recurrence, see :func:`jaxrnn.rnn`.

    Example:
      >>> bilm = BiLM(50, jaxrnn.LSTM(32), num_layers=2, connection="residual")
      >>> reps = bilm.representations(bilm.init(jax.random.key(0)), tokens, lengths)  # 3 x (B, T, 64)
    """

    vocab_size: int
    cell: Any
    num_layers: int = 2
    connection: Optional[str] = None
    dropout: float = 0.0
    dropout_mode: str = "per_step"
    embedding_stddev: float = 1.0
    impl: Any = "auto"

    def __post_init__(self):
        object.__setattr__(self, "vocab_size", check_index(self.vocab_size, "vocab_size"))
        check_cell(self.cell)
        object.__setattr__(self, "num_layers", check_index(self.num_layers, "num_layers"))
        check_one_of("connection", self.connection, BILM_CONNECTIONS)
        object.__setattr__(self, "dropout", check_rate("dropout", self.dropout))
        check_one_of("dropout_mode", self.dropout_mode, DROPOUT_MODES)
        stddev = check_rate("embedding_stddev", self.embedding_stddev, 0.0, float("inf"), closed_low=False, what="a std")
        object.__setattr__(self, "embedding_stddev", stddev)
        check_impl(self.impl)

    @property
    def hidden_size(self) -> int:
        """``H``: each direction's width, and the embedding size."""
        return self.cell.hidden_size

    @property
    def stack(self) -> Stack:
        """One direction's structure: ``Stack(cell, L, connection=...)`` (its ``init`` and ``check_params``)."""
        return Stack(self.cell, self.num_layers, connection=self.connection)

    @property
    def layer(self) -> Stack:
        """One layer, run one at a time to keep every layer's output: dropout on its input."""
        return Stack(
            self.cell, 1, connection=self.connection, dropout_mode=self.dropout_mode, input_dropout=self.dropout
        )

    # -- parameters -----------------------------------------------------------
    def init(self, key: Array, dtype=jnp.float32) -> BiLMParams:
        """Initialise: ``N(0, embedding_stddev²)`` embeddings, two ``stack.init(., H)``, LeCun-normal softmax.

        Args:
          key: PRNG key.
          dtype: parameter dtype.
        """
        dtype = check_float_dtype("dtype", dtype)
        k_emb, k_fwd, k_bwd, k_out = jax.random.split(key, 4)
        V, H = self.vocab_size, self.hidden_size
        return BiLMParams(
            embedding=self.embedding_stddev * jax.random.normal(k_emb, (V, H), dtype),
            forward=self.stack.init(k_fwd, H, dtype),
            backward=self.stack.init(k_bwd, H, dtype),
            softmax=init_dense(k_out, H, V, dtype),
        )

    def init_mix(self, dtype=jnp.float32) -> MixParams:
        """A scalar mix that starts as the plain average of the ``L + 1`` layers: zero weights, ``gamma = 1``."""
        dtype = check_float_dtype("dtype", dtype)
        return MixParams(jnp.zeros((self.num_layers + 1,), dtype), jnp.ones((), dtype))

    def check_params(self, params: BiLMParams) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field when ``params`` does not fit this biLM."""
        if not isinstance(params, BiLMParams):
            raise TypeError(f"params: expected BiLMParams (from BiLM.init), got {type(params).__name__}")
        V, H = self.vocab_size, self.hidden_size
        if shape_of(params.embedding) != (V, H):
            raise ValueError(f"params.embedding: expected shape {(V, H)} (vocab_size, hidden_size), got {shape_of(params.embedding)}")
        for name in ("forward", "backward"):
            n_in = self.stack.check_params(getattr(params, name), f"params.{name}")
            if n_in != H:
                raise ValueError(f"params.{name}[0].fwd.w_ih: expected {H} input rows (the embedding size H), got {n_in}")
        if (shape_of(params.softmax.w), shape_of(params.softmax.b)) != ((H, V), (V,)):
            raise ValueError(
                f"params.softmax: expected w {(H, V)} and b {(V,)}, "
                f"got {shape_of(params.softmax.w)} and {shape_of(params.softmax.b)}"
            )

    # -- running --------------------------------------------------------------
    def layer_outputs(self, params: BiLMParams, tokens, seq_lengths=None, *, dropout_key: Optional[Array] = None):
        """Every layer of both directions.

        Args:
          params: from :meth:`init`.
          tokens: ``(B, T)`` token ids in ``[0, V)`` (anything at padding).
          seq_lengths: ``(B,)`` valid lengths in ``[0, T]``, or ``None`` (all ``T``).
          dropout_key: enables dropout (rate ``dropout``) on every layer's input.

        Returns:
          ``(embedded, forward, backward, lengths, mask)``: the ``(B, T, H)``
          embeddings, lists of ``L`` outputs ``(B, T, H)`` of the forward and
          the backward LM (aligned with the tokens: ``backward[j][b, t]`` has read
          ``tokens[b, t:n_b]``), all zero at padding, the ``(B,)`` lengths and
          the ``(B, T)`` mask.
        """
        self.check_params(params)
        check_key("dropout_key", dropout_key)
        xs, lengths, mask = sequence_inputs(
            tokens, seq_lengths, self.hidden_size, embedding=params.embedding, vocab_size=self.vocab_size
        )
        L = self.num_layers
        keys = [None] * (2 * L) if dropout_key is None else list(jax.random.split(dropout_key, 2 * L))
        layer = self.layer

        def run(layers, inputs, keys):
            outputs = []
            for p, key in zip(layers, keys):
                inputs, _ = layer.apply((p,), inputs, seq_lengths=lengths, dropout_key=key, impl=self.impl)
                outputs.append(inputs)
            return outputs

        forward = run(params.forward, xs, keys[:L])
        # The backward LM is a forward run over each sequence's valid part reversed, reversed back.
        backward = [reverse_valid(y, lengths) for y in run(params.backward, reverse_valid(xs, lengths), keys[L:])]
        return xs, forward, backward, lengths, mask

    def apply(self, params: BiLMParams, tokens, seq_lengths=None, *, dropout_key: Optional[Array] = None):
        """Both LMs' logits.

        Args: as :meth:`layer_outputs`.

        Returns:
          ``(forward_logits, backward_logits)``, float32 ``(B, T, V)`` each, zero at
          padding: ``forward_logits[b, t]`` scores ``tokens[b, t + 1]``,
          ``backward_logits[b, t]`` scores ``tokens[b, t - 1]``.

        Example:
          >>> fwd, bwd = bilm.apply(params, tokens, lengths)
        """
        return self._logits(params, tokens, seq_lengths, dropout_key)[:2]

    def _logits(self, params, tokens, seq_lengths, dropout_key):
        _, forward, backward, lengths, mask = self.layer_outputs(params, tokens, seq_lengths, dropout_key=dropout_key)
        f, b = (where_valid(mask, dense(params.softmax, ys[-1])) for ys in (forward, backward))
        return f, b, lengths

    def nll(self, params: BiLMParams, tokens, seq_lengths=None, *, dropout_key: Optional[Array] = None):
        """``(forward_total, backward_total, count)``: summed NLL of each direction and the number of predictions.

        A row of length ``n`` gives ``n - 1`` predictions per direction: tokens
        ``1 .. n-1`` forward, ``0 .. n-2`` backward. Arguments as :meth:`layer_outputs`.
        """
        forward, backward, lengths = self._logits(params, tokens, seq_lengths, dropout_key)
        tokens = jnp.asarray(tokens)
        T = tokens.shape[1]
        # Forward position t predicts t + 1 and backward position t + 1 predicts t: both count where t + 1 < n.
        pairs = jnp.arange(T - 1)[None, :] < (lengths - 1)[:, None]
        f_total, count = masked_cross_entropy(forward[:, :-1], tokens[:, 1:], pairs)
        b_total, _ = masked_cross_entropy(backward[:, 1:], tokens[:, :-1], pairs)
        return f_total, b_total, count

    def loss(self, params: BiLMParams, batch, *, dropout_key: Optional[Array] = None) -> Array:
        """The joint loss: mean of the forward and the backward LM's mean NLL over valid predictions.

        Args:
          params: from :meth:`init`.
          batch: a :class:`~jaxrnn.models.Batch` or dict with ``tokens`` ``(B, T)``
            and ``seq_lengths`` (``labels`` are not used), optionally ``dropout_key``.
          dropout_key: enables dropout (else the batch's ``dropout_key``, if any).

        Returns:
          A float32 scalar (0 when no row has two valid tokens).

        Example:
          >>> step = jaxrnn.train.make_train_step(bilm.loss, optax.adam(1e-3))
        """
        tokens = batch_field(batch, "tokens")
        seq_lengths = batch_field(batch, "seq_lengths", None)
        key = batch_field(batch, "dropout_key", None) if dropout_key is None else dropout_key
        f_total, b_total, count = self.nll(params, tokens, seq_lengths, dropout_key=key)
        return 0.5 * (mean_of(f_total, count) + mean_of(b_total, count))

    def representations(self, params: BiLMParams, tokens, seq_lengths=None, *, dropout_key=None) -> List[Array]:
        """The ``L + 1`` layers ``[(B, T, 2H)] * (L + 1)``: ``[emb; emb]``, then ``[forward_j; backward_j]``.

        Arguments as :meth:`layer_outputs`; every layer is zero at padding.

        Example:
          >>> reps = bilm.representations(params, tokens, lengths)  # list of L + 1 arrays
        """
        xs, forward, backward, _, _ = self.layer_outputs(params, tokens, seq_lengths, dropout_key=dropout_key)
        return [jnp.concatenate([f, b], axis=-1) for f, b in [(xs, xs), *zip(forward, backward)]]

    def embed_contextual(self, params: BiLMParams, mix_params: MixParams, tokens, seq_lengths=None, *, dropout_key=None):
        """ELMo features: :func:`scalar_mix` of :meth:`representations` with ``mix_params``.

        Args:
          params: from :meth:`init`.
          mix_params: :class:`MixParams` (:meth:`init_mix`): ``weights`` ``(L + 1,)``, ``gamma`` ``()``.
          tokens, seq_lengths, dropout_key: as :meth:`layer_outputs`.

        Returns:
          ``(B, T, 2H)`` float32 features, zero at padding.

        Example:
          >>> feats = bilm.embed_contextual(params, mix, tokens, lengths)
          >>> logits = tagger.apply(tagger_params, feats, lengths)
        """
        if not isinstance(mix_params, MixParams):
            raise TypeError(f"mix_params: expected MixParams(weights, gamma), got {type(mix_params).__name__}")
        reps = self.representations(params, tokens, seq_lengths, dropout_key=dropout_key)
        return scalar_mix(reps, mix_params.weights, mix_params.gamma)
