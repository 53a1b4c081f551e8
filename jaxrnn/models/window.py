r"""The fixed-window neural language model of the lecture review (Bengio et al. 2003).

The next token is predicted from the previous ``n`` tokens only:

.. math::
    x_t = [E[w_{t-n+1}]; \dots; E[w_t]] \in \mathbb{R}^{nE}, \qquad
    h_t = \tanh(x_t W_h + b_h), \qquad
    \hat y_t = \mathrm{softmax}(h_t W_o + b_o),

where positions before the start of a sequence hold the padding (BOS) token
``pad_id = V``, an extra row of the embedding that is never predicted. Unlike
the recurrent :class:`~jaxrnn.models.lm.LanguageModel`, its context is fixed:
whatever lies more than ``n`` tokens back is invisible to it, which is the
lectures' motivation for recurrence.

It speaks the language model's conventions: ``apply(params, tokens)`` gives
``logits[b, t]`` scoring the token after ``tokens[b, t]``; ``loss(params,
batch)`` is the masked mean cross-entropy of :func:`jaxrnn.models.lm.loss`
(a ``loss_fn`` for :func:`jaxrnn.train.make_train_step`); and
:meth:`WindowLM.evaluate` returns the :class:`~jaxrnn.models.lm.Evaluation`
of a whole split, as :func:`jaxrnn.models.lm.evaluate` and
:meth:`jaxrnn.models.ngram.KneserNey.evaluate` do.

Example:
  >>> model = WindowLM(vocab_size=65, window=5, embed_size=16, hidden_size=128)
  >>> params = model.init(jax.random.key(0))
  >>> step = jaxrnn.train.make_train_step(model.loss, optax.adam(1e-3))
  >>> params, opt_state, metrics = step(params, step.init(params), windows)  # windows: (B, L) ids
  >>> model.evaluate(params, val_ids).perplexity
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.checks import check_index, check_lengths, shape_of
from jaxrnn.embedded import in_range, lookup
from jaxrnn.models.lm import Evaluation, check_split, check_tokens, target_mask, token_nll

Array = jax.Array

__all__ = ["WindowLM", "WindowParams"]


class WindowParams(NamedTuple):
    """Parameters of a :class:`WindowLM`.

    Attributes:
      embed: ``(V + 1, E)`` embeddings; row ``V`` is the padding (BOS) token.
      w_hidden: ``(n * E, H)`` hidden layer, oldest token's rows first.
      b_hidden: ``(H,)``.
      w_out: ``(H, V)`` output projection.
      b_out: ``(V,)``.
    """

    embed: Array
    w_hidden: Array
    b_hidden: Array
    w_out: Array
    b_out: Array


@dataclasses.dataclass(frozen=True)
class WindowLM:
    """A fixed-window feed-forward language model (hashable, static under ``jit``).

    Args:
      vocab_size: ``V``.
      window: ``n``, the number of previous tokens read.
      embed_size: ``E``.
      hidden_size: ``H``, width of the tanh layer.

    Example:
      >>> model = WindowLM(27, window=3, embed_size=8, hidden_size=64)
      >>> logits = model.apply(model.init(jax.random.key(0)), jnp.zeros((2, 10), jnp.int32))  # (2, 10, 27)
    """

    vocab_size: int
    window: int = 3
    embed_size: int = 32
    hidden_size: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "window", "embed_size", "hidden_size"):
            object.__setattr__(self, name, check_index(getattr(self, name), name))

    @property
    def pad_id(self) -> int:
        """The padding (BOS) id ``V`` that fills the window before a sequence's start."""
        return self.vocab_size

    def init(self, key: Array, dtype=jnp.float32) -> WindowParams:
        """Standard-normal embeddings, LeCun-normal weights, zero biases."""
        k_embed, k_hidden, k_out = jax.random.split(key, 3)
        V, n, E, H = self.vocab_size, self.window, self.embed_size, self.hidden_size
        lecun = jax.nn.initializers.lecun_normal()
        return WindowParams(
            embed=jax.random.normal(k_embed, (V + 1, E), dtype),
            w_hidden=lecun(k_hidden, (n * E, H), dtype),
            b_hidden=jnp.zeros((H,), dtype),
            w_out=lecun(k_out, (H, V), dtype),
            b_out=jnp.zeros((V,), dtype),
        )

    def contexts(self, tokens: Array, context: Optional[Array] = None) -> Array:
        """``(B, T, n)`` windows: ``out[b, t] = tokens[b, t-n+1 .. t]``, oldest first.

        Positions before the start come from ``context`` (``(B, n - 1)``, the
        tokens just before ``tokens``), or are :attr:`pad_id`.
        """
        B, T = tokens.shape
        if context is None:
            context = jnp.full((B, self.window - 1), self.pad_id, tokens.dtype)
        padded = jnp.concatenate([jnp.asarray(context, tokens.dtype), tokens], axis=1)
        return jnp.stack([padded[:, j : j + T] for j in range(self.window)], axis=-1)

    def apply(self, params: WindowParams, tokens: Array, *, context: Optional[Array] = None) -> Array:
        """Next-token logits for every position.

        Args:
          params: from :meth:`init`.
          tokens: ``(B, T)`` ids in ``[0, V]`` (``V``: padding). Concrete ids
            outside raise ``ValueError``; traced ones give NaN logits.
          context: ``(B, n - 1)`` ids preceding ``tokens`` (default: padding).

        Returns:
          ``(B, T, V)`` float32 logits; ``logits[b, t]`` scores the token after ``tokens[b, t]``.
        """
        self.check_params(params)
        check_tokens(tokens, self.vocab_size + 1, "tokens", min_length=1)
        if context is not None:
            if shape_of(context) != (tokens.shape[0], self.window - 1):
                raise ValueError(f"context: expected shape {(tokens.shape[0], self.window - 1)}, got {shape_of(context)}")
            check_tokens(context, self.vocab_size + 1, "context", min_length=0)
        x = lookup(params.embed, self.contexts(tokens, context))  # (B, T, n, E)
        x = x.reshape(*x.shape[:2], self.window * self.embed_size)
        h = jnp.tanh(jnp.matmul(x, params.w_hidden, preferred_element_type=jnp.float32) + params.b_hidden[None, None])
        return jnp.matmul(h, params.w_out.astype(h.dtype), preferred_element_type=jnp.float32) + params.b_out[None, None]

    def loss(self, params: WindowParams, batch) -> Array:
        """Mean cross-entropy (nats per token) of ``tokens[:, 1:]`` given the previous ``n`` tokens of its row.

        Args:
          params: from :meth:`init`.
          batch: ``tokens`` ``(B, L)`` in ``[0, V)``, or ``(tokens, seq_lengths)``
            (a row of length ``m`` contributes its ``m - 1`` predictions).

        Returns:
          A float32 scalar; NaN if (under ``jit``) an id is outside ``[0, V)``.

        Example:
          >>> step = jaxrnn.train.make_train_step(model.loss, optax.adam(1e-3))
        """
        tokens, seq_lengths = batch if isinstance(batch, (tuple, list)) else (batch, None)
        check_tokens(tokens, self.vocab_size, "tokens", min_length=2)
        if seq_lengths is not None:
            seq_lengths = check_lengths(seq_lengths, tokens.shape[:1], tokens.shape[1])
        logits = self.apply(params, tokens[:, :-1])
        mask = target_mask(seq_lengths, tokens.shape[0], tokens.shape[1] - 1)
        mean = jnp.sum(jnp.where(mask, token_nll(logits, tokens[:, 1:]), 0.0)) / jnp.sum(mask)
        return jnp.where(jnp.all(in_range(tokens, self.vocab_size)), mean, jnp.nan)

    def evaluate(self, params: WindowParams, token_ids, *, chunk: int = 4096) -> Evaluation:
        """The :class:`~jaxrnn.models.lm.Evaluation` of every token after the first of ``token_ids``
        given its ``n`` predecessors (padding before the start), computed ``chunk`` predictions per row
        (exact: each row gets the ``n - 1`` tokens before it as ``context``).

        Args:
          params: from :meth:`init`.
          token_ids: ``(N,)`` ids in ``[0, V)``, ``N >= 2``.
          chunk: predictions per row of the computation (memory only).
        """
        chunk = check_index(chunk, "chunk")
        ids = check_split(token_ids, self.vocab_size)
        self.check_params(params)
        count = ids.size - 1
        rows = -(-count // chunk)
        n = self.window
        inputs = np.concatenate([np.full(n - 1, self.pad_id), ids[:-1], np.zeros(rows * chunk - count, ids.dtype)])
        targets = np.concatenate([ids[1:], np.zeros(rows * chunk - count, ids.dtype)]).reshape(rows, chunk)
        starts = np.arange(rows)[:, None] * chunk
        context = inputs[starts + np.arange(n - 1)[None, :]]
        tokens = inputs[n - 1 :].reshape(rows, chunk)
        mask = (np.arange(rows * chunk) < count).reshape(rows, chunk)
        as32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
        totals = _row_nll(self, params, as32(tokens), as32(context), as32(targets), jnp.asarray(mask))
        return Evaluation.from_total(float(np.sum(np.asarray(totals, np.float64))), count)

    def check_params(self, params, name: str = "params") -> None:
        """Check ``params`` is a :class:`WindowParams` of this model's shapes."""
        if not isinstance(params, WindowParams):
            raise TypeError(f"{name}: expected WindowParams (from WindowLM.init), got {type(params).__name__}")
        V, n, E, H = self.vocab_size, self.window, self.embed_size, self.hidden_size
        want = dict(embed=(V + 1, E), w_hidden=(n * E, H), b_hidden=(H,), w_out=(H, V), b_out=(V,))
        for field, shape in want.items():
            got = shape_of(getattr(params, field))
            if got != shape:
                raise ValueError(f"{name}.{field}: expected shape {shape}, got {got}")


@functools.partial(jax.jit, static_argnums=0)
def _row_nll(model, params, tokens, context, targets, mask):
    """Summed NLL of each row of predictions, ``(R,)``."""
    logits = model.apply(params, tokens, context=context)
    return jnp.sum(jnp.where(mask, token_nll(logits, targets), 0.0), axis=-1)
