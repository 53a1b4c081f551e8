r"""A small recurrent language model: embedding → :class:`jaxrnn.Stack` → output projection.

Given tokens :math:`x_1, \dots, x_L`, the model reads :math:`x_1 \dots x_{L-1}`
and predicts each next token (teacher forcing: the true previous token is
always the input, never the model's own guess):

.. math::
    e_t = E[x_t], \qquad h_t = \mathrm{RNN}(h_{t-1}, e_t), \qquad
    \hat y_t = \mathrm{softmax}(W_o^\top h_t + b_o),

    J = \frac{1}{L - 1} \sum_{t=1}^{L-1} -\log \hat y_t[x_{t+1}], \qquad
    \mathrm{perplexity} = \exp(J).

Everything is a pure function of explicit parameters. :func:`generate`
samples text by carrying the recurrent state one step at a time (the prompt
is read once by :func:`jaxrnn.rnn`, then every new token costs one
``cell.step`` per layer). :func:`make_train_step` is :func:`jaxrnn.train.make_train_step`
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
  >>> lm.generate(model, params, jax.random.key(1), tokens[0, :5], 100)  # (100,) ids
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.cells import check_cell
from jaxrnn.checks import check_lengths, check_rate, shape_of
from jaxrnn.runner import check_impl
from jaxrnn.stack import Stack
from jaxrnn import train
from jaxrnn.train.clipping import ClippedOptimizer, split_clipping

Array = jax.Array

__all__ = [
    "LMParams",
    "LMTrainStep",
    "LanguageModel",
    "METRICS",
    "generate",
    "loss",
    "make_optimizer",
    "make_train_step",
    "nll",
    "perplexity",
    "unigram_perplexity",
]


class LMParams(NamedTuple):
    """Language-model parameters.

    Attributes:
      embed: ``(V, E)`` token embeddings.
      rnn: the :class:`jaxrnn.Stack`'s parameters (a tuple of ``LayerParams``).
      w_out: ``(H, V)`` output projection.
      b_out: ``(V,)`` output bias.
    """

    embed: Array
    rnn: Tuple[Any, ...]
    w_out: Array
    b_out: Array


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Configuration of a recurrent language model (hashable, static under ``jit``).

    Args:
      vocab_size: number of tokens ``V``.
      cell: the recurrent cell of every layer (``jaxrnn.LSTM``, ``GRU`` or
        ``Elman``); its ``hidden_size`` is ``H``.
      num_layers: stacked (unidirectional) layers.
      embed_size: embedding width ``E``.
      impl: implementation of the recurrence, see :func:`jaxrnn.rnn`.

    Example:
      >>> model = LanguageModel(vocab_size=50, cell=jaxrnn.GRU(64), num_layers=2)
      >>> params = model.init(jax.random.key(0))
      >>> logits, carry = model.apply(params, jnp.zeros((4, 16), jnp.int32))  # (4, 16, 50)
    """

    vocab_size: int
    cell: Any
    num_layers: int = 1
    embed_size: int = 32
    impl: Any = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "embed_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        check_cell(self.cell)
        check_impl(self.impl)
        self.stack  # validates num_layers  # noqa: B018

    @property
    def stack(self) -> Stack:
        """The recurrent part: ``Stack(cell, num_layers)``."""
        return Stack(self.cell, self.num_layers)

    @property
    def hidden_size(self) -> int:
        """``H``, the width of the last layer's output."""
        return self.cell.hidden_size

    # -- parameters -----------------------------------------------------------
    def init(self, key: Array, dtype=jnp.float32) -> LMParams:
        """Initialise parameters.

        Embeddings are standard normal (unit-variance inputs for the cell's
        LeCun-initialised input kernel), the output projection is LeCun
        normal and its bias zero, so the initial prediction is close to
        uniform (perplexity close to ``V``).
        """
        k_embed, k_rnn, k_out = jax.random.split(key, 3)
        V, E, H = self.vocab_size, self.embed_size, self.hidden_size
        return LMParams(
            embed=jax.random.normal(k_embed, (V, E), dtype),
            rnn=self.stack.init(k_rnn, E, dtype),
            w_out=jax.nn.initializers.lecun_normal()(k_out, (H, V), dtype),
            b_out=jnp.zeros((V,), dtype),
        )

    def zero_carry(self, batch_shape=()):
        """Zero recurrent state: one carry per layer, leaves ``(*batch_shape, H)``."""
        return self.stack.zero_carry(batch_shape)

    # -- running --------------------------------------------------------------
    def apply(self, params: LMParams, tokens: Array, *, seq_lengths=None, initial_carry=None):
        """Next-token logits for every position.

        Args:
          params: from :meth:`init`.
          tokens: ``(B, T)`` integer token ids in ``[0, V)``, padding
            included: concrete ids outside raise ``ValueError``; traced ones
            (under ``jit``) get NaN logits from their position on.
          seq_lengths: ``(B,)`` valid lengths (steps at or after them are
            padding; their logits are meaningless).
          initial_carry: per-layer carries, leaves ``(B, H)``; zeros by default.

        Returns:
          ``(logits, carry)``: float32 logits ``(B, T, V)``, where
          ``logits[b, t]`` scores the token after ``tokens[b, t]``, and the
          per-layer final carries (at each sequence's last valid step).
        """
        self._check_params(params)
        _check_tokens(tokens, self.vocab_size, "tokens", min_length=1)
        ys, carry = self.stack.apply(
            params.rnn, _embed(params.embed, tokens), seq_lengths=seq_lengths, initial_carry=initial_carry, impl=self.impl
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
        _check_tokens(tokens, self.vocab_size, "tokens")
        x = _embed(params.embed, tokens)
        new_carry = []
        for layer, c in zip(params.rnn, carry):
            c, x = self.cell.step(layer.fwd, c, x)
            new_carry.append(c)
        return tuple(new_carry), _project(params, x)

    def _check_params(self, params):
        if not isinstance(params, LMParams):
            raise TypeError(f"params: expected LMParams (from LanguageModel.init), got {type(params).__name__}")
        V, E, H = self.vocab_size, self.embed_size, self.hidden_size
        for name, want in (("embed", (V, E)), ("w_out", (H, V)), ("b_out", (V,))):
            got = shape_of(getattr(params, name))
            if got != want:
                raise ValueError(f"params.{name}: expected shape {want}, got {got}")


def _project(params: LMParams, h: Array) -> Array:
    """``h @ w_out + b_out`` in float32; ``h``: ``(..., H)``."""
    logits = jnp.matmul(h, params.w_out.astype(h.dtype), preferred_element_type=jnp.float32)
    return logits + jnp.expand_dims(params.b_out.astype(jnp.float32), tuple(range(h.ndim - 1)))


def _in_range(tokens, vocab_size):
    return (tokens >= 0) & (tokens < vocab_size)


def _embed(embed: Array, tokens: Array) -> Array:
    """Rows ``embed[tokens]``; an id outside ``[0, V)`` gets a NaN row (a plain gather would clamp it)."""
    valid = _in_range(tokens, embed.shape[0])
    rows = jnp.take(embed, jnp.where(valid, tokens, 0), axis=0)
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, embed.dtype))


def _check_tokens(tokens, vocab_size, name, min_length=None):
    """Dtype and shape, ``(batch, length >= min_length)`` or ``(batch,)`` without ``min_length``, always;
    the range ``[0, vocab_size)`` where the values are concrete."""
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


# --------------------------------------------------------------------------
# Loss and perplexity
# --------------------------------------------------------------------------
def _target_mask(seq_lengths, batch, steps):
    """``(B, T)`` bool: position ``t`` predicts a real token (``t + 1 < length``)."""
    if seq_lengths is None:
        return jnp.ones((batch, steps), bool)
    return jnp.arange(steps)[None, :] < (jnp.asarray(seq_lengths) - 1)[:, None]


@functools.partial(jax.jit, static_argnums=0)
def _nll(model, params, tokens, seq_lengths):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    in_lengths = None if seq_lengths is None else jnp.maximum(seq_lengths - 1, 0)
    logits, _ = model.apply(params, inputs, seq_lengths=in_lengths)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1, mode="clip")[..., 0]
    mask = _target_mask(seq_lengths, *targets.shape)
    total = jnp.sum(jnp.where(mask, token_nll, 0.0))
    # An id outside [0, V) anywhere (padding included) makes the total NaN: never a silently clamped id.
    return jnp.where(jnp.all(_in_range(tokens, model.vocab_size)), total, jnp.nan), jnp.sum(mask)


def nll(model: LanguageModel, params: LMParams, tokens: Array, seq_lengths: Optional[Array] = None):
    """Summed negative log-likelihood of every predicted token, and their count.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      tokens: ``(B, L)`` token ids in ``[0, V)``; positions ``0 .. L-2`` are
        inputs and ``1 .. L-1`` targets. Concrete ids outside the range raise
        ``ValueError``; traced ones (under ``jit``) make ``total`` NaN.
      seq_lengths: ``(B,)`` numbers of valid tokens per row; a row of length
        ``n`` contributes its ``n - 1`` predictions and nothing after them.

    Returns:
      ``(total, count)``: float32 :math:`\\sum -\\log p(x_{t+1} \\mid x_{\\le t})`
      and the int32 number of terms.
    """
    _check_tokens(tokens, model.vocab_size, "tokens", min_length=2)
    if seq_lengths is not None:
        seq_lengths = check_lengths(seq_lengths, tokens.shape[:1], tokens.shape[1])
    return _nll(model, params, tokens, seq_lengths)


def loss(model: LanguageModel, params: LMParams, tokens: Array, seq_lengths: Optional[Array] = None) -> Array:
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

    Returns:
      A float32 scalar (NaN if no row has two valid tokens, or, under ``jit``,
      if an id is outside ``[0, V)``).

    Example:
      >>> J = lm.loss(model, params, windows)            # windows: (B, L) ids
      >>> grads = jax.grad(lambda p: lm.loss(model, p, windows))(params)
    """
    total, count = nll(model, params, tokens, seq_lengths)
    return total / count


def perplexity(
    model: LanguageModel,
    params: LMParams,
    tokens,
    seq_lengths=None,
    batch_size: int = 256,
) -> float:
    r"""Perplexity :math:`\exp(\text{total NLL} / \text{number of predictions})` over many rows.

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      tokens: ``(N, L)`` token ids, e.g. from :func:`jaxrnn.data.split_windows`.
      seq_lengths: ``(N,)`` numbers of valid tokens per row.
      batch_size: rows evaluated per call.

    Returns:
      A Python float; the uniform model over ``V`` tokens scores exactly ``V``.
    """
    tokens = np.asarray(tokens)
    lengths = None if seq_lengths is None else np.asarray(seq_lengths)
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        t, n = nll(model, params, tokens[chunk], None if lengths is None else lengths[chunk])
        total, count = total + float(t), count + int(n)
    if count == 0:
        raise ValueError("tokens: expected at least one row with 2 or more valid tokens, got no predictions")
    return float(np.exp(total / count))


def unigram_perplexity(train_ids, eval_ids, vocab_size: int, smoothing: float = 1.0) -> float:
    """Perplexity on ``eval_ids`` of the add-``smoothing`` unigram model fitted on ``train_ids``.

    The baseline a language model must beat: it knows how often each token
    occurs but nothing about context.
    """
    counts = np.bincount(np.asarray(train_ids), minlength=vocab_size) + smoothing
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-np.mean(log_p[np.asarray(eval_ids)])))


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
    """What :func:`make_train_step` returns: call it as ``train_step(params, opt_state, tokens, seq_lengths=None)``.

    Attributes:
      init: ``init(params) -> opt_state``.
      step: the :class:`jaxrnn.train.TrainStep` on batches ``(tokens, seq_lengths)``.
    """

    init: Callable[[Any], Any]
    step: train.TrainStep

    def __call__(self, params, opt_state, tokens, seq_lengths=None):
        params, opt_state, metrics = self.step(params, opt_state, (tokens, seq_lengths))
        return params, opt_state, {name: getattr(metrics, name) for name in METRICS}


def make_train_step(model: LanguageModel, optimizer: optax.GradientTransformation) -> LMTrainStep:
    """A jitted training step ``(params, opt_state, tokens, seq_lengths=None) -> (params, opt_state, metrics)``.

    It is :func:`jaxrnn.train.make_train_step` on :func:`loss`. The clipping of
    an optimizer from :func:`make_optimizer` is done, and measured, by the step.

    Args:
      model: the :class:`LanguageModel`.
      optimizer: an optax transformation, e.g. from :func:`make_optimizer`.

    Returns:
      An :class:`LMTrainStep`. ``opt_state``: ``train_step.init(params)``
      (for an optimizer from :func:`make_optimizer`, ``optimizer.init(params)``
      is the same state). ``tokens``: ``(B, L)`` token ids. ``metrics``:
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
        tokens, seq_lengths = batch
        return loss(model, params, tokens, seq_lengths)

    step = train.make_train_step(batch_loss, inner, max_grad_norm=max_grad_norm)
    return LMTrainStep(step.init, step)


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 4))
def _generate(model, params, key, prompt, length, temperature):
    logits, carry = model.apply(params, prompt)

    def body(state, key_t):
        carry, logits = state
        sampled = jax.random.categorical(key_t, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(prompt.dtype)
        carry, next_logits = model.step(params, carry, token)
        return (carry, next_logits), (token, logits)

    _, (tokens, step_logits) = jax.lax.scan(body, (carry, logits[:, -1]), jax.random.split(key, length))
    return tokens.T, jnp.swapaxes(step_logits, 0, 1)


def generate(
    model: LanguageModel,
    params: LMParams,
    key: Array,
    prompt,
    length: int,
    temperature: float = 1.0,
    return_logits: bool = False,
):
    r"""Sample ``length`` tokens after ``prompt``, feeding each sample back as the next input.

    The prompt is read once by :meth:`LanguageModel.apply`; each new token
    then costs one ``cell.step`` per layer on the carried state (no prefix is
    re-run). Token :math:`i` is drawn from
    :math:`\mathrm{softmax}(\text{logits}_i / \tau)` (greedy for :math:`\tau = 0`).

    Args:
      model: the :class:`LanguageModel`.
      params: its parameters.
      key: PRNG key.
      prompt: ``(P,)`` or ``(B, P)`` token ids, ``P >= 1``.
      length: number of new tokens (static).
      temperature: :math:`\tau \ge 0`; below 1 is more conservative, 0 is greedy.
      return_logits: also return the logits each token was drawn from.

    Returns:
      ``(length,)`` (or ``(B, length)``) int token ids; with ``return_logits``
      also ``(length, V)`` (or ``(B, length, V)``) float32 logits, where
      ``logits[..., i, :]`` is the model's prediction after the prompt and
      the first ``i`` new tokens.

    Example:
      >>> ids = lm.generate(model, params, jax.random.key(0), vocab.encode("The "), 200, temperature=0.8)
      >>> print(vocab.decode(ids))
    """
    prompt = jnp.asarray(prompt)
    unbatched = prompt.ndim == 1
    _check_tokens(prompt[None] if unbatched else prompt, model.vocab_size, "prompt", min_length=1)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected a positive int, got {length!r}")
    if not float(temperature) >= 0.0:
        raise ValueError(f"temperature: expected a value >= 0, got {temperature!r}")
    model._check_params(params)
    tokens, logits = _generate(model, params, key, prompt[None] if unbatched else prompt, length, float(temperature))
    if unbatched:
        tokens, logits = tokens[0], logits[0]
    return (tokens, logits) if return_logits else tokens
