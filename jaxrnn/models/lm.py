r"""A small recurrent language model: embedding → :class:`jaxrnn.Stack` → output projection.

Given tokens :math:`x_1, \dots, x_L`, the model reads :math:`x_1 \dots x_{L-1}`
and predicts each next token (teacher forcing: the true previous token is
always the input, never the model's own guess):

.. math::
    e_t = E[x_t], \qquad h_t = \mathrm{RNN}(h_{t-1}, e_t), \qquad
    \hat y_t = \mathrm{softmax}(W_o^\top h_t + b_o),

    J = \frac{1}{L - 1} \sum_{t=1}^{L-1} -\log \hat y_t[x_{t+1}], \qquad
    \mathrm{perplexity} = \exp(J).

With ``tie_weights=True`` the output matrix is the embedding itself
(:math:`W_o = E^\top`, Press & Wolf 2017; needs ``embed_size == hidden_size``),
and ``embedding_dropout`` drops entries of :math:`e_t` during training (when a
``dropout_key`` is given). The model is level-agnostic: characters or words,
the :class:`jaxrnn.data.Vocab` decides.

Everything is a pure function of explicit parameters. :func:`generate`
samples text by carrying the recurrent state one step at a time (the prompt
is read once by :func:`jaxrnn.rnn`, then every new token costs one
``cell.step`` per layer), greedily or with temperature, top-k and top-p
(nucleus) sampling, in one compiled ``lax.scan``. :func:`evaluate` scores a
whole split with the carry kept across windows and reports the
:class:`Evaluation` (nats per token, perplexity, bits per token) that the
baselines of :mod:`jaxrnn.models.ngram` and :mod:`jaxrnn.models.window`
report too. :func:`make_train_step` is :func:`jaxrnn.train.make_train_step`
on :func:`loss`: a jitted Adam step with global-norm gradient clipping (the
lectures' fix for exploding gradients) that measures the gradient norm before
clipping and never applies a non-finite step.

Token ids must lie in ``[0, V)``. Where they are concrete (eager calls) an id
outside raises ``ValueError``; under ``jit``, where they cannot be checked,
an id outside gets a NaN embedding and makes the loss NaN (never the silent
clamp of a plain gather), so the train step rejects that step.

Example:
  >>> import jax, jaxrnn
  >>> from jaxrnn import lm
  >>> model = lm.LanguageModel(vocab_size=50, cell=jaxrnn.LSTM(128))
  >>> params = model.init(jax.random.key(0))
  >>> optimizer = lm.make_optimizer(3e-3)
  >>> step = lm.make_train_step(model, optimizer)
  >>> opt_state = step.init(params)
  >>> params, opt_state, metrics = step(params, opt_state, tokens)  # tokens: (B, L) int
  >>> lm.generate(model, params, jax.random.key(1), tokens[0, :5], 100, top_p=0.9)  # (100,) ids
  >>> lm.evaluate(model, params, val_ids).perplexity  # the whole split, carry kept across windows
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.cells import LSTM, check_cell
from jaxrnn.checks import check_index, check_key, check_lengths, check_rate, shape_of
from jaxrnn.embedded import Embedded, in_range, lookup
from jaxrnn.kernels.ffi import DecodeWeights
from jaxrnn.runner import check_impl, resolve_backend
from jaxrnn.stack import Stack
from jaxrnn import train
from jaxrnn.train.clipping import ClippedOptimizer, split_clipping

Array = jax.Array

__all__ = [
    "Evaluation",
    "LMParams",
    "LMTrainStep",
    "LanguageModel",
    "METRICS",
    "bits_per_token",
    "evaluate",
    "filter_logits",
    "generate",
    "loss",
    "make_optimizer",
    "make_train_step",
    "nll",
    "perplexity",
    "sample_logits",
    "unigram_perplexity",
]


class LMParams(NamedTuple):
    """Language-model parameters.

    Attributes:
      embed: ``(V, E)`` token embeddings.
      rnn: the :class:`jaxrnn.Stack`'s parameters (a tuple of ``LayerParams``).
      w_out: ``(H, V)`` output projection, or ``None`` with tied weights
        (the projection is then ``embed.T``).
      b_out: ``(V,)`` output bias.
    """

    embed: Array
    rnn: Tuple[Any, ...]
    w_out: Optional[Array]
    b_out: Array


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Configuration of a recurrent language model (hashable, static under ``jit``).

    Args:
      vocab_size: number of tokens ``V`` (characters or words: the vocabulary decides).
      cell: the recurrent cell of every layer (``jaxrnn.LSTM``, ``GRU`` or
        ``Elman``; its ``hidden_size`` is ``H``), or a unidirectional
        :class:`jaxrnn.Stack` (its connections and inter-layer dropout
        included; ``H`` is its output width).
      num_layers: stacked (unidirectional) layers of ``cell``; with a
        ``Stack``, 1 or the stack's own ``num_layers``.
      embed_size: embedding width ``E``.
      impl: implementation of the recurrence, see :func:`jaxrnn.rnn`.
      tie_weights: use the embedding as the output matrix,
        ``logits = h @ embed.T + b_out`` (``params.w_out`` is ``None``);
        needs ``embed_size == H``.
      embedding_dropout: rate of (inverted) dropout on the embedded inputs
        :math:`e_t`, applied only when a ``dropout_key`` is given.

    Example:
      >>> model = LanguageModel(vocab_size=50, cell=jaxrnn.GRU(64), num_layers=2)
      >>> params = model.init(jax.random.key(0))
      >>> logits, carry = model.apply(params, jnp.zeros((4, 16), jnp.int32))  # (4, 16, 50)
      >>> tied = LanguageModel(50, jaxrnn.LSTM(64), embed_size=64, tie_weights=True, embedding_dropout=0.1)
    """

    vocab_size: int
    cell: Any
    num_layers: int = 1
    embed_size: int = 32
    impl: Any = "auto"
    tie_weights: bool = False
    embedding_dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "embed_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(self.cell, Stack):
            if self.cell.bidirectional:
                raise ValueError("cell: expected a unidirectional Stack (a language model may not read ahead), "
                                 "got bidirectional=True")
            layers = check_index(self.num_layers, "num_layers")
            if layers not in (1, self.cell.num_layers):
                raise ValueError(
                    f"num_layers: expected 1 or the Stack's num_layers {self.cell.num_layers}, got {layers}"
                )
            object.__setattr__(self, "num_layers", self.cell.num_layers)
        else:
            check_cell(self.cell)
        check_impl(self.impl)
        self.stack  # validates num_layers  # noqa: B018
        if not isinstance(self.tie_weights, (bool, np.bool_)):
            raise TypeError(f"tie_weights: expected a bool, got {type(self.tie_weights).__name__} {self.tie_weights!r}")
        if self.tie_weights and self.embed_size != self.hidden_size:
            raise ValueError(
                "tie_weights: expected embed_size == hidden_size (the output matrix is the embedding), "
                f"got embed_size={self.embed_size} and hidden_size={self.hidden_size}"
            )
        object.__setattr__(self, "embedding_dropout", check_rate("embedding_dropout", self.embedding_dropout))

    @property
    def stack(self) -> Stack:
        """The recurrent part: ``Stack(cell, num_layers)`` (or the ``Stack`` given as ``cell``)."""
        return self.cell if isinstance(self.cell, Stack) else Stack(self.cell, self.num_layers)

    @property
    def hidden_size(self) -> int:
        """``H``, the width of the last layer's output."""
        return self.stack.output_size

    # -- parameters -----------------------------------------------------------
    def init(self, key: Array, dtype=jnp.float32) -> LMParams:
        """Initialise parameters.

        Embeddings are standard normal (unit-variance inputs for the cell's
        LeCun-initialised input kernel), the output projection is LeCun
        normal (absent with tied weights) and its bias zero, so the initial
        prediction is close to uniform (perplexity close to ``V``).
        """
        k_embed, k_rnn, k_out = jax.random.split(key, 3)
        V, E, H = self.vocab_size, self.embed_size, self.hidden_size
        return LMParams(
            embed=jax.random.normal(k_embed, (V, E), dtype),
            rnn=self.stack.init(k_rnn, E, dtype),
            w_out=None if self.tie_weights else jax.nn.initializers.lecun_normal()(k_out, (H, V), dtype),
            b_out=jnp.zeros((V,), dtype),
        )

    def zero_carry(self, batch_shape=()):
        """Zero recurrent state: one carry per layer, leaves ``(*batch_shape, H)``."""
        return self.stack.zero_carry(batch_shape)

    # -- running --------------------------------------------------------------
    def apply(self, params: LMParams, tokens: Array, *, seq_lengths=None, initial_carry=None, dropout_key=None):
        """Next-token logits for every position.

        Args:
          params: from :meth:`init`.
          tokens: ``(B, T)`` integer token ids in ``[0, V)``, padding
            included: concrete ids outside raise ``ValueError``; traced ones
            (under ``jit``) get NaN logits from their position on.
          seq_lengths: ``(B,)`` valid lengths (steps at or after them are
            padding; their logits are meaningless).
          initial_carry: per-layer carries, leaves ``(B, H)``; zeros by default.
          dropout_key: PRNG key enabling dropout (training): ``k_embed, k_stack
            = jax.random.split(dropout_key)``; the embedded inputs are
            multiplied by ``bernoulli(k_embed, 1 - embedding_dropout, (B, T, E)) / (1 - embedding_dropout)``
            and ``k_stack`` is the stack's own ``dropout_key``. ``None``: no dropout.

        Returns:
          ``(logits, carry)``: float32 logits ``(B, T, V)``, where
          ``logits[b, t]`` scores the token after ``tokens[b, t]``, and the
          per-layer final carries (at each sequence's last valid step).
        """
        self._check_params(params)
        check_tokens(tokens, self.vocab_size, "tokens", min_length=1)
        check_key("dropout_key", dropout_key)
        # Token ids into the embedding (a backend may project the table instead of every position: see
        # jaxrnn.embedded); looked up here when the embedded rows are dropped out.
        xs = Embedded(params.embed, tokens)
        stack_key = None
        if dropout_key is not None:
            embed_key, stack_key = jax.random.split(dropout_key)
            if self.embedding_dropout > 0:
                xs = dropout(embed_key, xs.lookup(), self.embedding_dropout)
        ys, carry = self.stack.apply(
            params.rnn, xs, seq_lengths=seq_lengths, initial_carry=initial_carry, dropout_key=stack_key, impl=self.impl
        )
        return _project(params, ys), carry

    def step(self, params: LMParams, carry, tokens: Array):
        """One step of every layer with ``cell.step``: read ``tokens``, score the next.

        Args:
          params: from :meth:`init`.
          carry: per-layer carries, leaves ``(B, H)`` (see :meth:`zero_carry`).
          tokens: ``(B,)`` integer token ids in ``[0, V)`` (checked like
            :meth:`apply`'s).

        Returns:
          ``(carry, logits)``: the new carries and float32 logits ``(B, V)``.
        """
        check_tokens(tokens, self.vocab_size, "tokens")
        return self._step(params, carry, tokens)

    def first_projections(self, params: LMParams) -> Array:
        """The first layer's projected input for every token, ``(V, G)`` float32.

        Row ``v`` is ``cell.input_projection(params.rnn[0].fwd, params.embed[v])``, the
        first matmul of :meth:`step` for token ``v``; a decode that reads this table
        (:func:`generate`, when it is cheaper than projecting every step) skips that matmul.

        Args:
          params: from :meth:`init`.

        Returns:
          ``(V, G)`` float32, ``G`` the cell's gate width (``4H`` for an LSTM).

        Example:
          >>> table = model.first_projections(params)  # table[v]: token v's projected input to layer 0
        """
        self._check_params(params)
        self.stack.check_params(params.rnn, name="params.rnn")
        cell = self.stack.cell.resolve(params.embed.dtype)
        return cell.input_projection(params.rnn[0].fwd, params.embed)

    def _step(self, params, carry, tokens, first_xp=None):
        """:meth:`step` without checks; ``first_xp`` ``(B, G)``: the first layer's projected input, if known."""
        stack = self.stack
        x = lookup(params.embed, tokens)
        new_carry = []
        for i, (layer, c) in enumerate(zip(params.rnn, carry)):
            if i == 0 and first_xp is not None:  # what cell.step does after its input projection
                c, h = stack.cell.resolve(x.dtype).step_projected(layer.fwd, c, first_xp)
                y = h.astype(x.dtype)
            else:
                c, y = stack.cell.step(layer.fwd, c, x)
            out = stack.connect(layer, x, y)
            new_carry.append(c)
            dense = stack.connection == "dense" and i < stack.num_layers - 1
            x = jnp.concatenate([x, out], axis=-1) if dense else out
        return tuple(new_carry), _project(params, x)

    def _check_params(self, params):
        if not isinstance(params, LMParams):
            raise TypeError(f"params: expected LMParams (from LanguageModel.init), got {type(params).__name__}")
        V, E, H = self.vocab_size, self.embed_size, self.hidden_size
        if self.tie_weights and params.w_out is not None:
            raise ValueError(f"params.w_out: expected None (tie_weights=True), got shape {shape_of(params.w_out)}")
        shapes = (("embed", (V, E)), ("b_out", (V,))) + (() if self.tie_weights else (("w_out", (H, V)),))
        for name, want in shapes:
            got = shape_of(getattr(params, name))
            if got != want:
                raise ValueError(f"params.{name}: expected shape {want}, got {got}")


def _project(params: LMParams, h: Array) -> Array:
    """``h @ w_out + b_out`` (``h @ embed.T + b_out`` when tied) in float32; ``h``: ``(..., H)``."""
    w = params.embed.T if params.w_out is None else params.w_out
    logits = jnp.matmul(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return logits + jnp.expand_dims(params.b_out.astype(jnp.float32), tuple(range(h.ndim - 1)))


def dropout(key: Array, x: Array, rate: float) -> Array:
    """Inverted dropout: ``x * bernoulli(key, 1 - rate, x.shape) / (1 - rate)`` (``x`` itself for ``rate == 0``).

    A product, not a select, so a NaN (an out-of-range id's embedding) stays NaN.
    """
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return x * (keep / (1.0 - rate)).astype(x.dtype)


def check_tokens(tokens, vocab_size, name, min_length=None):
    """Dtype and shape, ``(batch, length >= min_length)`` or ``(batch,)`` without ``min_length``, always;
    the range ``[0, vocab_size)`` where the values are concrete.

    Raises:
      TypeError: not an integer array.
      ValueError: wrong shape, or a concrete id outside ``[0, vocab_size)``.
    """
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array of token ids, got {type(tokens).__name__} of dtype {dtype}")
    if min_length is None and tokens.ndim != 1:
        raise ValueError(f"{name}: expected shape (batch,), got {shape_of(tokens)}")
    if min_length is not None and (tokens.ndim != 2 or tokens.shape[1] < min_length):
        raise ValueError(f"{name}: expected shape (batch, length) with length >= {min_length}, got {shape_of(tokens)}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        values = np.asarray(tokens)
        if values.min() < 0 or values.max() >= vocab_size:
            raise ValueError(
                f"{name}: expected token ids in [0, {vocab_size}), got min {values.min()} and max {values.max()}"
            )


def token_nll(logits: Array, targets: Array) -> Array:
    """``-log softmax(logits)[target]`` per position: ``(..., V)`` logits, ``(...)`` ids → ``(...)`` float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1, mode="clip")[..., 0]


# --------------------------------------------------------------------------
# Loss, perplexity and bits per token
# --------------------------------------------------------------------------
class Evaluation(NamedTuple):
    """Scores of a model on a token sequence, in the units every model of :mod:`jaxrnn.models` reports.

    Attributes:
      nll: mean negative log-likelihood, nats per predicted token.
      perplexity: ``exp(nll)``.
      bits_per_token: ``nll / ln 2`` (bits per character for a character model).
      count: number of predicted tokens.

    Example:
      >>> Evaluation.from_total(total_nats, count).perplexity
    """

    nll: float
    perplexity: float
    bits_per_token: float
    count: int

    @classmethod
    def from_total(cls, total: float, count: int) -> "Evaluation":
        """From the summed NLL (nats) of ``count`` predictions."""
        if count <= 0:
            raise ValueError(f"count: expected at least one prediction, got {count}")
        mean = float(total) / int(count)
        return cls(mean, float(np.exp(mean)), mean / math.log(2.0), int(count))


def target_mask(seq_lengths, batch, steps):
    """``(B, T)`` bool: position ``t`` predicts a real token (``t + 1 < length``); all ``True`` without lengths."""
    if seq_lengths is None:
        return jnp.ones((batch, steps), bool)
    return jnp.arange(steps)[None, :] < (jnp.asarray(seq_lengths) - 1)[:, None]


@functools.partial(jax.jit, static_argnums=0)
def _nll(model, params, tokens, seq_lengths, dropout_key):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    in_lengths = None if seq_lengths is None else jnp.maximum(seq_lengths - 1, 0)
    logits, _ = model.apply(params, inputs, seq_lengths=in_lengths, dropout_key=dropout_key)
    mask = target_mask(seq_lengths, *targets.shape)
    total = jnp.sum(jnp.where(mask, token_nll(logits, targets), 0.0))
    # An id outside [0, V) anywhere (padding included) makes the total NaN: never a silently clamped id.
    return jnp.where(jnp.all(in_range(tokens, model.vocab_size)), total, jnp.nan), jnp.sum(mask)


def nll(
    model: LanguageModel,
    params: LMParams,
    tokens: Array,
    seq_lengths: Optional[Array] = None,
    *,
    dropout_key: Optional[Array] = None,
):
    """Summed negative log-likelihood of every predicted token, and their count.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      tokens: ``(B, L)`` token ids in ``[0, V)``; positions ``0 .. L-2`` are
        inputs and ``1 .. L-1`` targets. Concrete ids outside the range raise
        ``ValueError``; traced ones (under ``jit``) make ``total`` NaN.
      seq_lengths: ``(B,)`` numbers of valid tokens per row; a row of length
        ``n`` contributes its ``n - 1`` predictions and nothing after them.
      dropout_key: enables the model's dropout (training); see :meth:`LanguageModel.apply`.

    Returns:
      ``(total, count)``: float32 :math:`\\sum -\\log p(x_{t+1} \\mid x_{\\le t})`
      and the int32 number of terms.
    """
    check_tokens(tokens, model.vocab_size, "tokens", min_length=2)
    if seq_lengths is not None:
        seq_lengths = check_lengths(seq_lengths, tokens.shape[:1], tokens.shape[1])
    check_key("dropout_key", dropout_key)
    return _nll(model, params, tokens, seq_lengths, dropout_key)


def loss(
    model: LanguageModel,
    params: LMParams,
    tokens: Array,
    seq_lengths: Optional[Array] = None,
    *,
    dropout_key: Optional[Array] = None,
) -> Array:
    r"""Mean cross-entropy of next-token prediction with teacher forcing (nats per token).

    .. math::
        J(\theta) = \frac{1}{N} \sum_{b} \sum_{t < n_b - 1} -\log \hat y_{b,t}[x_{b,t+1}]

    with :math:`n_b` = ``seq_lengths[b]`` (``L`` by default) and :math:`N` the
    number of terms. Padded targets do not contribute.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      tokens: ``(B, L)`` integer token ids, ``L >= 2``.
      seq_lengths: ``(B,)`` numbers of valid tokens per row.
      dropout_key: enables the model's dropout (training only).

    Returns:
      A float32 scalar (NaN if no row has two valid tokens, or, under ``jit``,
      if an id is outside ``[0, V)``).

    Example:
      >>> J = lm.loss(model, params, windows)            # windows: (B, L) ids
      >>> grads = jax.grad(lambda p: lm.loss(model, p, windows))(params)
    """
    total, count = nll(model, params, tokens, seq_lengths, dropout_key=dropout_key)
    return total / count


def _evaluate_rows(model, params, tokens, seq_lengths, batch_size) -> Evaluation:
    """:class:`Evaluation` of independent rows (each from a zero carry), ``batch_size`` rows per call."""
    batch_size = check_index(batch_size, "batch_size")
    tokens = np.asarray(tokens)
    lengths = None if seq_lengths is None else np.asarray(seq_lengths)
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        t, n = nll(model, params, tokens[chunk], None if lengths is None else lengths[chunk])
        total, count = total + float(t), count + int(n)
    if count == 0:
        raise ValueError("tokens: expected at least one row with 2 or more valid tokens, got no predictions")
    return Evaluation.from_total(total, count)


def perplexity(
    model: LanguageModel,
    params: LMParams,
    tokens,
    seq_lengths=None,
    batch_size: int = 256,
) -> float:
    r"""Perplexity :math:`\exp(\text{total NLL} / \text{number of predictions})` over many rows.

    Each row is read from a zero carry; for a whole split read with its full
    context use :func:`evaluate`.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      tokens: ``(N, L)`` token ids, e.g. from :func:`jaxrnn.data.split_windows`.
      seq_lengths: ``(N,)`` numbers of valid tokens per row.
      batch_size: rows evaluated per call.

    Returns:
      A Python float; the uniform model over ``V`` tokens scores exactly ``V``.
    """
    return _evaluate_rows(model, params, tokens, seq_lengths, batch_size).perplexity


def bits_per_token(
    model: LanguageModel,
    params: LMParams,
    tokens,
    seq_lengths=None,
    batch_size: int = 256,
) -> float:
    r"""Bits per token (bits per character for a character model): mean NLL / :math:`\ln 2` over many rows.

    Arguments as :func:`perplexity`; ``2 ** bits_per_token == perplexity``.

    Example:
      >>> lm.bits_per_token(model, params, data.split_windows(val_ids, 65))  # e.g. 1.9 bpc
    """
    return _evaluate_rows(model, params, tokens, seq_lengths, batch_size).bits_per_token


def unigram_perplexity(train_ids, eval_ids, vocab_size: int, smoothing: float = 1.0) -> float:
    """Perplexity on ``eval_ids`` of the add-``smoothing`` unigram model fitted on ``train_ids``.

    The baseline a language model must beat: it knows how often each token
    occurs but nothing about context. It scores every id of ``eval_ids``;
    :func:`evaluate` and :meth:`jaxrnn.models.KneserNey.evaluate` predict every
    id but the first, so pass ``eval_ids[1:]`` to score the same predictions.
    """
    counts = np.bincount(np.asarray(train_ids), minlength=vocab_size) + smoothing
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-np.mean(log_p[np.asarray(eval_ids)])))


# --------------------------------------------------------------------------
# A whole split, with the carry kept across windows
# --------------------------------------------------------------------------
def check_split(token_ids, vocab_size: int, name: str = "token_ids") -> np.ndarray:
    """``token_ids`` as a NumPy array, checked: 1-D, integer, at least 2 ids, all in ``[0, vocab_size)``.

    Raises:
      ValueError: naming ``name``, with the expected and actual shape, dtype or range.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size < 2:
        raise ValueError(f"{name}: expected a 1-D integer array of at least 2 ids, got shape {ids.shape} of {ids.dtype}")
    check_tokens(ids[None], vocab_size, name, min_length=2)
    return ids


@functools.partial(jax.jit, static_argnums=0)
def _stream_nll(model, params, inputs, targets, mask):
    """Summed NLL per window of ``(W, B, window)`` inputs, the carry passed from window to window."""

    def body(carry, chunk):
        x, y, m = chunk
        logits, carry = model.apply(params, x, initial_carry=carry)
        return carry, jnp.sum(jnp.where(m, token_nll(logits, y), 0.0))

    _, totals = jax.lax.scan(body, model.zero_carry(inputs.shape[1:2]), (inputs, targets, mask))
    return totals


def evaluate(model: LanguageModel, params: LMParams, token_ids, *, window: int = 256, batch: int = 1) -> Evaluation:
    r"""NLL per token of a **whole** split: every token after the first, given everything before it.

    The ``N - 1`` predictions :math:`p(x_t \mid x_{<t})`, :math:`t = 1 \dots N-1`,
    are cut into ``batch`` contiguous streams of ``S = ceil((N - 1) / batch)``
    predictions; each stream is read ``window`` tokens at a time with the
    recurrent carry kept from one window to the next (truncation of the
    gradient does not matter here: nothing is differentiated), all windows in
    one compiled ``lax.scan``. With ``batch=1`` this is exactly one pass over
    the whole split (every token sees its full history); with ``batch > 1``
    the first input of each of the streams after the first is read from a
    zero carry (``batch - 1`` context resets, negligible for ``batch << N``)
    in exchange for ``batch``-fold parallelism. The numbers are those the
    baselines report (:meth:`jaxrnn.models.ngram.KneserNey.evaluate`,
    :meth:`jaxrnn.models.window.WindowLM.evaluate`) on the same ``N - 1``
    predictions, so one table can compare them.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      token_ids: ``(N,)`` token ids in ``[0, V)``, ``N >= 2`` (e.g. the validation split).
      window: tokens read per step of the scan (memory, not context: the carry runs on).
      batch: number of parallel streams ``B``.

    Returns:
      An :class:`Evaluation`: ``nll`` (nats/token), ``perplexity``, ``bits_per_token``, ``count = N - 1``.

    Example:
      >>> result = lm.evaluate(model, params, val_ids, window=256, batch=16)
      >>> result.nll, result.perplexity, result.bits_per_token
    """
    window, batch = check_index(window, "window"), check_index(batch, "batch")
    ids = check_split(token_ids, model.vocab_size)
    model._check_params(params)
    count = ids.size - 1
    stream = -(-count // batch)
    steps = -(-stream // window) * window
    pad = batch * steps - count

    def layout(x):  # (count,) -> (W, B, window): stream b holds predictions b*S .. (b+1)*S - 1
        x = np.concatenate([x, np.zeros(batch * stream - count, x.dtype)]).reshape(batch, stream)
        x = np.pad(x, ((0, 0), (0, steps - stream)))
        return np.ascontiguousarray(x.reshape(batch, steps // window, window).transpose(1, 0, 2))

    mask = layout(np.ones(count, bool))
    assert int(mask.sum()) == count and mask.size == count + pad
    totals = _stream_nll(model, params, layout(ids[:-1].astype(np.int32)), layout(ids[1:].astype(np.int32)), mask)
    return Evaluation.from_total(np.sum(np.asarray(totals, np.float64)), count)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------
def make_optimizer(learning_rate: float = 3e-3, clip_norm: float = 1.0) -> ClippedOptimizer:
    r"""Adam after global-norm gradient clipping:

    .. math::
        \hat g \leftarrow \hat g \cdot \min\left(1, \frac{\text{clip\_norm}}{\lVert \hat g \rVert}\right)

    Clipping keeps the direction of an exploding gradient and bounds the step.
    The result is ``optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))``
    as a :class:`jaxrnn.train.clipping.ClippedOptimizer`: an ordinary optax
    transformation whose clipping :func:`make_train_step` takes over, to
    measure it.
    """
    clip_norm = check_rate("clip_norm", clip_norm, 0.0, float("inf"), closed_low=False)
    return ClippedOptimizer(optax.adam(learning_rate), clip_norm)


METRICS = ("loss", "grad_norm", "clipped", "finite")
"""The keys of the metrics of :func:`make_train_step` (fields of :class:`jaxrnn.train.StepMetrics`)."""


class LMTrainStep(NamedTuple):
    """What :func:`make_train_step` returns: call it as
    ``train_step(params, opt_state, tokens, seq_lengths=None, dropout_key=None)``.

    Attributes:
      init: ``init(params) -> opt_state``.
      step: the :class:`jaxrnn.train.TrainStep` on batches ``(tokens, seq_lengths)`` or
        ``(tokens, seq_lengths, dropout_key)``.
    """

    init: Callable[[Any], Any]
    step: train.TrainStep

    def __call__(self, params, opt_state, tokens, seq_lengths=None, dropout_key=None):
        check_key("dropout_key", dropout_key)
        params, opt_state, metrics = self.step(params, opt_state, (tokens, seq_lengths, dropout_key))
        return params, opt_state, {name: getattr(metrics, name) for name in METRICS}


def make_train_step(model: LanguageModel, optimizer: optax.GradientTransformation) -> LMTrainStep:
    """A jitted training step ``(params, opt_state, tokens, seq_lengths=None, dropout_key=None) -> (params, opt_state, metrics)``.

    It is :func:`jaxrnn.train.make_train_step` on :func:`loss`. The clipping of
    an optimizer from :func:`make_optimizer` is done, and measured, by the step.

    Args:
      model: the :class:`LanguageModel`.
      optimizer: an optax transformation, e.g. from :func:`make_optimizer`.

    Returns:
      An :class:`LMTrainStep`. ``opt_state``: ``train_step.init(params)``
      (for an optimizer from :func:`make_optimizer`, ``optimizer.init(params)``
      is the same state). ``tokens``: ``(B, L)`` token ids. ``dropout_key``:
      a fresh key per step enables the model's dropout. ``metrics``:
      ``{"loss": J, "grad_norm": ‖∇J‖, "clipped": bool, "finite": bool}``,
      the loss at the parameters the step started from, the global gradient
      norm before clipping, whether it was clipped, and whether the loss and
      gradient were finite. A non-finite step is not applied (``params`` and
      ``opt_state`` come back unchanged): an id outside ``[0, V)`` in
      ``tokens`` makes the loss NaN, so such a batch is never learned from.

    Example:
      >>> optimizer = lm.make_optimizer(3e-3, clip_norm=1.0)
      >>> train_step = lm.make_train_step(model, optimizer)
      >>> opt_state = train_step.init(params)
      >>> params, opt_state, metrics = train_step(params, opt_state, windows)
    """
    if not isinstance(model, LanguageModel):
        raise TypeError(f"model: expected a LanguageModel, got {type(model).__name__}")
    inner, max_grad_norm = split_clipping(optimizer)

    def batch_loss(params, batch):
        tokens, seq_lengths, *key = batch  # (tokens, seq_lengths) or (tokens, seq_lengths, dropout_key)
        return loss(model, params, tokens, seq_lengths, dropout_key=key[0] if key else None)

    step = train.make_train_step(batch_loss, inner, max_grad_norm=max_grad_norm)
    return LMTrainStep(step.init, step)



# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------
TOP_P_TOLERANCE = 1e-6
"""Float32 slack of the top-p cut: a sorted prefix whose probability reaches ``top_p - TOP_P_TOLERANCE`` suffices."""


def filter_logits(logits: Array, *, top_k=None, top_p=None) -> Array:
    r"""``logits`` with every token outside the top-k / top-p (nucleus) set set to ``-inf``.

    Tokens are ranked by logit, highest first, ties broken by the lower id
    (a stable sort). ``top_k`` keeps the first ``k`` of them. ``top_p`` then
    keeps the **smallest** prefix of that ranking whose probability
    (softmax of the logits left by ``top_k``) is at least ``p``: token ``i`` of
    the ranking stays iff the probability of the tokens ranked above it is
    below ``p`` (up to :data:`TOP_P_TOLERANCE` of float32 slack); the top
    token always stays, and ``top_p=1`` keeps every token. Among tokens tied at
    the cut the lower ids are kept, so exactly the smallest set is kept.
    Sampling from the result samples the truncated, renormalised softmax.

    Args:
      logits: ``(..., V)`` scores.
      top_k: ``None`` or an int in ``[1, V]`` (may be traced).
      top_p: ``None`` or a float in ``(0, 1]`` (may be traced).

    Returns:
      ``(..., V)`` float logits, ``-inf`` outside the kept set.

    Example:
      >>> filter_logits(jnp.log(jnp.array([0.1, 0.4, 0.2, 0.2, 0.1])), top_p=0.5)  # keeps ids 1 and 2
    """
    if top_k is None and top_p is None:
        return logits
    order = jnp.argsort(-logits, axis=-1, stable=True)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.broadcast_to(jnp.arange(ranked.shape[-1]), ranked.shape)
    keep = rank < (ranked.shape[-1] if top_k is None else top_k)
    if top_p is not None:
        probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf).astype(jnp.float32), axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        keep = keep & ((above < top_p - TOP_P_TOLERANCE) | (rank == 0) | (top_p >= 1.0))
    keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def sample_logits(key: Array, logits: Array, temperature=1.0, *, top_k=None, top_p=None) -> Array:
    r"""One token per row from :math:`\mathrm{softmax}(\text{logits} / \tau)`, truncated by
    :func:`filter_logits` (temperature first, then top-k, then top-p) and renormalised;
    the argmax (lowest id among ties) for :math:`\tau = 0`.

    Args:
      key: PRNG key.
      logits: ``(..., V)`` scores.
      temperature: :math:`\tau \ge 0` (may be traced).
      top_k, top_p: see :func:`filter_logits`.

    Returns:
      ``(...)`` int32 token ids.

    Example:
      >>> sample_logits(jax.random.key(0), logits, 0.8, top_p=0.9)  # logits: (B, V) -> (B,)
    """
    return _sample_with_noise(jax.random.gumbel(key, jnp.shape(logits), jnp.float32), logits, temperature, top_k, top_p)


def _sample_with_noise(noise, logits, temperature, top_k, top_p):
    """:func:`sample_logits` given its Gumbel noise ``noise`` (the shape of ``logits``, float32).

    ``jax.random.categorical(key, l)`` is ``argmax(l + jax.random.gumbel(key, l.shape))``;
    with the noise drawn apart, a decode can draw every step's noise at once.
    """
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    sampled = jnp.argmax(filter_logits(scaled, top_k=top_k, top_p=top_p) + noise, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


#: :func:`generate` draws the Gumbel noise of every step before the decode loop
#: (one vectorised draw, the same numbers as a draw per step) when it takes at most
#: this many bytes (``length * B * V * 4``); above, each step draws its own. At
#: batch 32 (vocabulary 65) a draw per step was 12% of the decode's time.
NOISE_PREDRAW_BYTES = 32 * 2**20

#: :func:`generate` reads the first layer's projected inputs from
#: :meth:`LanguageModel.first_projections` (``(V, G)``) when the table takes at most
#: this many bytes and ``V <= length * B``; 19% faster per token at batch 32 for a
#: character LSTM (V = 65, embedding 64, 2 x 256).
FIRST_PROJECTIONS_MAX_BYTES = 64 * 2**20


def _decode_kernel(model, params, table, plain_sampling):
    """The backend's whole-decode kernel (``lstm_decode``) where it computes this model's decode, else ``None``.

    It does for a float32 LSTM stack without connections between layers on a backend that has one (the
    ``"ffi"`` backend on CPU), when the first layer reads the projected table and the sampling is plain
    (predrawn noise, no top-k or top-p).
    """
    stack = model.stack
    if table is None or not plain_sampling or stack.connection is not None or not isinstance(stack.cell, LSTM):
        return None
    leaves = (params.embed, params.b_out, *jax.tree_util.tree_leaves(params.rnn))
    if any(leaf.dtype != jnp.float32 for leaf in leaves) or (params.w_out is not None and params.w_out.dtype != jnp.float32):
        return None
    _, backend = resolve_backend(model.impl, stack.cell.resolve(jnp.float32))
    return getattr(backend, "lstm_decode", None)


@functools.partial(jax.jit, static_argnums=(0, 4, 8))
def _generate(model, params, key, prompt, length, temperature, top_k, top_p, return_logits):
    logits, carry = model.apply(params, prompt)
    keys = jax.random.split(key, length)
    noise_shape = logits[:, -1].shape
    if length * math.prod(noise_shape) * 4 <= NOISE_PREDRAW_BYTES:
        # vmap draws each key's numbers exactly as a call per step would.
        xs = jax.vmap(lambda k: jax.random.gumbel(k, noise_shape, jnp.float32))(keys)
        noise_of = lambda x: x  # noqa: E731
    else:
        xs = keys
        noise_of = lambda k: jax.random.gumbel(k, noise_shape, jnp.float32)  # noqa: E731

    # The first layer's projection of every token, once, when that is no more matmul work than
    # projecting each step's tokens (and the table is not large): each step then gathers a row.
    V, B = model.vocab_size, prompt.shape[0]
    table = None
    if V <= length * B and V * model.stack.cell.gate_size * 4 <= FIRST_PROJECTIONS_MAX_BYTES:
        table = model.first_projections(params)

    decode = _decode_kernel(model, params, table, xs is not keys and top_k is None and top_p is None)
    if decode is not None:
        weights = DecodeWeights(table, params.rnn[0].fwd.w_hh, tuple(tuple(layer.fwd[:3]) for layer in params.rnn[1:]),
                                params.embed.T if params.w_out is None else params.w_out, params.b_out)
        out = decode(weights, carry, logits[:, -1], xs, temperature, return_logits=return_logits)
        if not return_logits:
            return out.T.astype(prompt.dtype), None
        tokens, step_logits = out
        return tokens.T.astype(prompt.dtype), jnp.swapaxes(step_logits, 0, 1)

    def body(state, x_t):
        carry, logits = state
        token = _sample_with_noise(noise_of(x_t), logits, temperature, top_k, top_p).astype(prompt.dtype)
        first_xp = None if table is None else jnp.take(table, token, axis=0, mode="clip")
        carry, next_logits = model._step(params, carry, token, first_xp)
        return (carry, next_logits), ((token, logits) if return_logits else token)

    _, outs = jax.lax.scan(body, (carry, logits[:, -1]), xs)
    if not return_logits:
        return outs.T, None
    tokens, step_logits = outs
    return tokens.T, jnp.swapaxes(step_logits, 0, 1)


def generate(
    model: LanguageModel,
    params: LMParams,
    key: Array,
    prompt,
    length: int,
    temperature: float = 1.0,
    return_logits: bool = False,
    *,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
):
    r"""Sample ``length`` tokens after ``prompt``, feeding each sample back as the next input.

    The prompt is read once by :meth:`LanguageModel.apply` (it primes the
    carry); each new token then costs one ``cell.step`` per layer on the
    carried state (no prefix is re-run). Token :math:`i` is drawn by
    :func:`sample_logits`: from :math:`\mathrm{softmax}(\text{logits}_i / \tau)`
    truncated to the top-k and then top-p (nucleus) set of :func:`filter_logits`
    and renormalised; greedy (argmax) for :math:`\tau = 0`. The whole decode is
    one ``lax.scan`` inside one ``jit``, its steps' Gumbel noise drawn before
    the loop in one vectorised call (the numbers a draw per step would give;
    per step above :data:`NOISE_PREDRAW_BYTES`), the first layer's input
    projection read from :meth:`LanguageModel.first_projections` where that
    saves work: a second call with the same model, shapes, ``length`` and
    ``return_logits`` (and the same choice of ``None`` or not for
    ``top_k`` / ``top_p``) does not recompile, whatever the key, temperature,
    ``top_k`` or ``top_p`` values.

    On the ``"ffi"`` backend (``impl="auto"`` on CPU), a float32 LSTM stack
    without connections between its layers, sampled with neither ``top_k`` nor
    ``top_p``, decodes in one C++ call (:func:`jaxrnn.kernels.ffi.lstm_decode`:
    each thread runs its rows through every step and samples them itself;
    1.5x the scan's tokens/s at batch 32 for the character LSTM, see
    ``benchmarks/README.md``). It draws from the same noise and logits to
    float32 rounding, so the tokens are the scan's but where two candidates'
    scores tie to within that rounding.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      key: PRNG key (the seed: the same key gives the same tokens).
      prompt: ``(P,)`` or ``(B, P)`` token ids in ``[0, V)``, ``P >= 1``.
      length: number of new tokens (static).
      temperature: :math:`\tau \ge 0`; below 1 is more conservative, 0 is greedy.
      return_logits: also return the (raw, untempered) logits each token was drawn from.
      top_k: sample among the ``k`` most likely tokens only, ``1 <= k <= V``
        (``top_k=1`` is greedy); ``None``: no limit.
      top_p: sample from the smallest set of most likely tokens whose
        probability is at least ``p``, ``0 < p <= 1``; ``None``: no limit.

    Returns:
      ``(length,)`` (or ``(B, length)``) int token ids; with ``return_logits``
      also ``(length, V)`` (or ``(B, length, V)``) float32 logits, where
      ``logits[..., i, :]`` is the model's prediction after the prompt and
      the first ``i`` new tokens.

    Example:
      >>> ids = lm.generate(model, params, jax.random.key(0), vocab.encode("The "), 200, temperature=0.8, top_p=0.9)
      >>> print(vocab.decode(ids))
    """
    check_key("key", key, allow_none=False)
    prompt = jnp.asarray(prompt)
    unbatched = prompt.ndim == 1
    if unbatched and prompt.size == 0:
        raise ValueError("prompt: expected at least one token, got shape (0,)")
    check_tokens(prompt[None] if unbatched else prompt, model.vocab_size, "prompt", min_length=1)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")
    if isinstance(temperature, (bool, str)) or not float(temperature) >= 0.0:
        raise ValueError(f"temperature: expected a value >= 0, got {temperature!r}")
    if top_k is not None:
        top_k = check_index(top_k, "top_k")
        if top_k > model.vocab_size:
            raise ValueError(f"top_k: expected an int in [1, {model.vocab_size}] (the vocabulary size), got {top_k}")
    if top_p is not None:
        top_p = check_rate("top_p", top_p, 0.0, 1.0, closed_low=False, closed_high=True, what="a probability")
    model._check_params(params)
    batched = prompt[None] if unbatched else prompt
    return_logits = bool(return_logits)
    tokens, logits = _generate(model, params, key, batched, length, float(temperature), top_k, top_p, return_logits)
    if unbatched:
        tokens, logits = tokens[0], (None if logits is None else logits[0])
    return (tokens, logits) if return_logits else tokens
