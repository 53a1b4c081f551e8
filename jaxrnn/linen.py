"""flax linen modules around jaxrnn's functional core.

:class:`RNN` runs one cell with :func:`jaxrnn.rnn`; :class:`StackRNN` runs a
:class:`jaxrnn.Stack` with :meth:`jaxrnn.Stack.apply`. Their ``params``
collection holds the functional parameters themselves (``{"cell": LSTMParams}``
and ``{"layers": (LayerParams, ...)}``), so parameters move freely between the
module, :func:`jaxrnn.rnn`/:meth:`Stack.apply`, optax and
``flax.training.train_state.TrainState``. Padded positions (``seq_lengths``)
give zero outputs, as everywhere in jaxrnn.

:class:`RNNSequence` is the other direction: flax's own ``nn.RNN`` /
``nn.Bidirectional`` layers run in order with ``seq_lengths`` passed to each;
:func:`jaxrnn.to_flax` returns one for a multi-layer stack.

Example (the one-line swap of a flax bidirectional LSTM):
  >>> import jaxrnn, jaxrnn.linen
  >>> # before: nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(64)), nn.RNN(nn.OptimizedLSTMCell(64)))
  >>> encoder = jaxrnn.linen.StackRNN(jaxrnn.Stack(jaxrnn.LSTM(64), bidirectional=True))
  >>> variables = encoder.init(jax.random.key(0), xs, seq_lengths=lengths)
  >>> ys = encoder.apply(variables, xs, seq_lengths=lengths)  # (B, T, 128)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxrnn.cells import check_cell, check_params
from jaxrnn.checks import check_rate
from jaxrnn.runner import check_impl, rnn
from jaxrnn.scan import sequence_mask, where_valid
from jaxrnn.stack import Stack

__all__ = ["RNN", "RNNSequence", "StackRNN"]


class RNN(nn.Module):
    """One recurrent layer: ``cell`` run over a sequence by :func:`jaxrnn.rnn`.

    Variables: ``{"params": {"cell": <the cell's parameter NamedTuple>}}``,
    initialised by ``cell.init`` (so an LSTM starts with forget bias
    ``cell.forget_bias``, 1 by default).

    Attributes:
      cell: a jaxrnn cell (:class:`~jaxrnn.Elman`, :class:`~jaxrnn.LSTM`, :class:`~jaxrnn.GRU`).
      time_major: inputs and outputs are ``(T, B, ·)``.
      reverse: run each sequence's valid part backwards (outputs stay aligned).
      impl: implementation, see :func:`jaxrnn.rnn`.
      param_dtype: dtype of initialised parameters.

    Example:
      >>> layer = jaxrnn.linen.RNN(jaxrnn.GRU(32))
      >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 10, 8)))
      >>> ys = layer.apply(variables, jnp.ones((4, 10, 8)), seq_lengths=jnp.array([10, 3, 0, 7]))
    """

    cell: Any
    time_major: bool = False
    reverse: bool = False
    impl: Any = "auto"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs, *, seq_lengths=None, initial_carry=None, return_carry: bool = False):
        """Run the layer.

        Args:
          xs: ``(B, T, I)`` inputs (``(T, B, I)`` if ``time_major``; ``(T, I)`` unbatched).
          seq_lengths: ``(B,)`` integer valid lengths.
          initial_carry: carry with leaves ``(B, H)``; zeros by default.
          return_carry: also return the final carry.

        Returns:
          ``ys`` ``(B, T, H)``, or ``(ys, final_carry)`` with ``return_carry``.
        """
        check_cell(self.cell)
        check_impl(self.impl)
        if self.has_variable("params", "cell"):  # loaded parameters: our message, before flax's shape check
            check_params(self.cell, self.get_variable("params", "cell"), name="params['cell']")
        params = self.param("cell", lambda key: self.cell.init(key, xs.shape[-1], self.param_dtype))
        ys, carry = rnn(
            self.cell,
            params,
            xs,
            initial_carry=initial_carry,
            seq_lengths=seq_lengths,
            reverse=self.reverse,
            time_major=self.time_major,
            impl=self.impl,
        )
        return (ys, carry) if return_carry else ys


class StackRNN(nn.Module):
    """A :class:`jaxrnn.Stack` (deep, bidirectional, connections, dropout) as a linen module.

    Variables: ``{"params": {"layers": (LayerParams, ...)}}``, exactly what
    :meth:`Stack.init` returns and :meth:`Stack.apply` takes; load converted
    weights with ``{"params": {"layers": params}}``. Dropout between layers
    (rate ``stack.dropout``) is on unless ``deterministic``; its key comes
    from the ``'dropout'`` rng stream (``apply(..., rngs={"dropout": key})``),
    as for ``nn.Dropout``.

    Attributes:
      stack: the :class:`~jaxrnn.Stack` configuration.
      deterministic: disable dropout (also a call argument; one of the two must be set
        when the stack has dropout).
      time_major: inputs and outputs are ``(T, B, ·)``.
      impl: implementation of every layer, see :func:`jaxrnn.rnn`.
      param_dtype: dtype of initialised parameters.

    Example:
      >>> encoder = StackRNN(jaxrnn.Stack(jaxrnn.LSTM(64), num_layers=2, bidirectional=True, dropout=0.2))
      >>> variables = encoder.init(jax.random.key(0), xs, seq_lengths=lengths, deterministic=True)
      >>> ys = encoder.apply(variables, xs, seq_lengths=lengths, deterministic=False,
      ...                    rngs={"dropout": jax.random.key(1)})  # (B, T, 128)
    """

    stack: Stack
    deterministic: Optional[bool] = None
    time_major: bool = False
    impl: Any = "auto"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        xs,
        *,
        seq_lengths=None,
        initial_carry=None,
        return_carry: bool = False,
        deterministic: Optional[bool] = None,
    ):
        """Run the stack.

        Args:
          xs: ``(B, T, I)`` inputs (``(T, B, I)`` if ``time_major``; ``(T, I)`` unbatched).
          seq_lengths: ``(B,)`` integer valid lengths.
          initial_carry: per-layer carries as for :meth:`jaxrnn.Stack.apply`.
          return_carry: also return the final carries.
          deterministic: disable dropout (overrides the attribute).

        Returns:
          ``ys`` ``(B, T, D)``, or ``(ys, final_carries)`` with ``return_carry``.
        """
        if not isinstance(self.stack, Stack):
            raise TypeError(f"stack: expected a jaxrnn.Stack, got {type(self.stack).__name__}")
        check_impl(self.impl)
        if self.has_variable("params", "layers"):  # loaded parameters: our message, before flax's shape check
            self.stack.check_params(self.get_variable("params", "layers"), name="params['layers']")
        params = self.param("layers", lambda key: self.stack.init(key, xs.shape[-1], self.param_dtype))
        dropout_key = None
        if self.stack.uses_dropout:
            if not nn.module.merge_param("deterministic", self.deterministic, deterministic):
                dropout_key = self.make_rng("dropout")
        ys, carries = self.stack.apply(
            params,
            xs,
            seq_lengths=seq_lengths,
            initial_carry=initial_carry,
            dropout_key=dropout_key,
            time_major=self.time_major,
            impl=self.impl,
        )
        return (ys, carries) if return_carry else ys


class RNNSequence(nn.Module):
    """flax recurrent layers (``nn.RNN`` / ``nn.Bidirectional``) run in order, each given ``seq_lengths``.

    ``nn.Sequential`` passes keyword arguments to its first layer only; this
    passes ``seq_lengths`` (and ``time_major``) to every layer and zeroes the
    outputs at padded positions after each layer (flax's layers do not), so
    its outputs equal :meth:`jaxrnn.Stack.apply`'s everywhere.
    :func:`jaxrnn.to_flax` returns one for a multi-layer stack, and
    :func:`jaxrnn.from_flax` converts it back. Variables:
    ``{"params": {"layers_0": ..., "layers_1": ...}}``.

    Attributes:
      layers: the flax layers (all of one cell type and direction for :func:`jaxrnn.from_flax`).
      dropout_rate: ``nn.Dropout`` rate between layers (not after the last).
      deterministic: disable dropout (also a call argument, which wins). Unset
        in both places, dropout is off, as :meth:`jaxrnn.Stack.apply` without
        a ``dropout_key``; ``deterministic=False`` needs a ``'dropout'`` rng.
      time_major: inputs and outputs are ``(T, B, ·)``.

    Example:
      >>> module = RNNSequence([nn.RNN(nn.GRUCell(32)), nn.RNN(nn.GRUCell(32))])
      >>> variables = module.init(jax.random.key(0), xs, seq_lengths=lengths)
      >>> carries, ys = module.apply(variables, xs, seq_lengths=lengths, return_carry=True)
    """

    layers: Sequence[nn.Module]
    dropout_rate: float = 0.0
    deterministic: Optional[bool] = None
    time_major: bool = False

    @nn.compact
    def __call__(self, xs, *, seq_lengths=None, initial_carry=None, return_carry: bool = False, deterministic=None):
        """Run the layers.

        Args:
          xs: ``(B, T, I)`` inputs (``(T, B, I)`` if ``time_major``).
          seq_lengths: ``(B,)`` integer valid lengths.
          initial_carry: a tuple with each layer's flax carry, or ``None``.
          return_carry: return ``(carries, ys)`` (flax's order), carries a tuple per layer.
          deterministic: disable dropout (overrides the attribute; off if neither is set).

        Returns:
          ``ys`` ``(B, T, D)`` (zero at padded positions), or ``(carries, ys)``.
        """
        rate = check_rate("dropout_rate", self.dropout_rate)
        mask = None
        if seq_lengths is not None:
            T = xs.shape[0] if self.time_major else xs.shape[1]
            mask = sequence_mask(jnp.asarray(seq_lengths), T, time_major=self.time_major)
        carries = []
        for k, layer in enumerate(self.layers):
            carry = None if initial_carry is None else initial_carry[k]
            final, xs = layer(
                xs, seq_lengths=seq_lengths, initial_carry=carry, return_carry=True, time_major=self.time_major
            )
            carries.append(final)
            if mask is not None:
                xs = where_valid(mask, xs)
            if rate > 0 and k < len(self.layers) - 1:
                off = self.deterministic if deterministic is None else deterministic
                xs = nn.Dropout(rate)(xs, deterministic=True if off is None else off)
        return (tuple(carries), xs) if return_carry else xs
