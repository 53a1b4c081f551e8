"""flax NNX modules around jaxrnn's functional core.

:class:`RNN` wraps one cell run by :func:`jaxrnn.rnn`; :class:`StackRNN` wraps a
:class:`jaxrnn.Stack`. Parameters are the core's NamedTuples with every array
held in an ``nnx.Param``, so ``nnx.state(model, nnx.Param)``, ``nnx.grad``
and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` work as for any NNX layer,
and :meth:`RNN.get_params` returns the plain parameters for the functional
API (and for :func:`jaxrnn.count_params`).

Example:
  >>> from flax import nnx
  >>> import jaxrnn, jaxrnn.nnx
  >>> stack = jaxrnn.Stack(jaxrnn.LSTM(64), num_layers=2, dropout=0.1)
  >>> model = jaxrnn.nnx.StackRNN(stack, 16, rngs=nnx.Rngs(0))
  >>> ys = model(jnp.ones((8, 100, 16)))  # training mode by default: dropout on
  >>> model.eval()                        # dropout off
  >>> ys = model(jnp.ones((8, 100, 16)))
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrnn.cells import check_cell, check_params
from jaxrnn.runner import check_impl, rnn
from jaxrnn.stack import Stack

__all__ = ["RNN", "StackRNN", "box_params", "params_from_state", "unbox_params"]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def box_params(params):
    """Wrap every array of a parameter pytree in an ``nnx.Param`` (``None`` leaves stay ``None``)."""
    return jax.tree.map(lambda a: nnx.Param(jnp.asarray(a)), params)


def unbox_params(boxed):
    """The plain-array pytree of :func:`box_params`'s output, in the same structure.

    Only for the boxed NamedTuples themselves (``model.params``). An
    ``nnx.State`` (``nnx.state(model, nnx.Param)``, or what ``nnx.grad``
    returns) is a nested dict with sorted keys: its leaves are not in the
    order of :class:`~jaxrnn.LayerParams` leaves; use
    :func:`params_from_state` for it.

    Example:
      >>> params = unbox_params(model.params)  # == model.get_params()
    """
    return jax.tree.map(lambda v: v[...], boxed, is_leaf=_is_variable)


def _state_key(key):
    for attr in ("idx", "name", "key"):  # SequenceKey, GetAttrKey, DictKey
        if hasattr(key, attr):
            return getattr(key, attr)
    raise TypeError(f"unexpected pytree key {key!r}")  # pragma: no cover - jax has no other kinds


def params_from_state(model, state):
    """An ``nnx.State`` of ``model``'s parameters as the functional core's parameters, matched by name.

    ``nnx.grad`` returns (and ``nnx.state(model, nnx.Param)`` gives) a
    ``State``: a nested dict keyed ``['params'][layer]['fwd']['w_ih']``, in
    sorted key order. This looks each parameter up by that name and returns
    the structure :meth:`StackRNN.get_params` returns: a tuple of
    :class:`~jaxrnn.LayerParams` for a :class:`StackRNN`, the cell's
    NamedTuple for an :class:`RNN`. Zipping ``jax.tree.leaves(state)`` with
    the parameters' leaves instead pairs them wrongly (``b`` sorts before
    ``w_ih``, ``bwd`` before ``fwd``).

    Args:
      model: the :class:`RNN` or :class:`StackRNN` whose parameters ``state`` holds.
      state: an ``nnx.State`` or nested dict, with or without the top-level
        ``'params'`` key (``nnx.grad(loss)(model)``, ``nnx.state(model, nnx.Param)``,
        ``nnx.to_pure_dict(...)``); leaves ``nnx.Param`` or arrays, shaped as the parameters.

    Returns:
      The parameters' structure with ``state``'s arrays, e.g. gradients
      equal to ``jax.grad`` of the functional core.

    Raises:
      TypeError: ``model`` is not one of this module's models.
      ValueError: ``state`` lacks one of the model's parameters (the message
        names it and the keys found).

    Example:
      >>> grads = nnx.grad(loss_fn)(model)
      >>> layer_grads = params_from_state(model, grads)  # tuple of LayerParams
      >>> layer_grads[0].fwd.w_ih.shape
      (16, 256)
    """
    if not isinstance(model, (RNN, StackRNN)):
        raise TypeError(f"model: expected a jaxrnn.nnx RNN or StackRNN, got {type(model).__name__}")
    root = state["params"] if isinstance(state, Mapping) and "params" in state else state

    def lookup(path, boxed):
        node = root
        for depth, key in enumerate(path):
            k = _state_key(key)
            if not isinstance(node, Mapping) or k not in node:
                found = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
                raise ValueError(
                    f"state: expected an entry ['params']{jax.tree_util.keystr(path)} for model.params, "
                    f"found {found} at ['params']{jax.tree_util.keystr(path[:depth])}"
                )
            node = node[k]
        value = node[...] if _is_variable(node) else jnp.asarray(node)
        if value.shape != boxed[...].shape:
            raise ValueError(
                f"state['params']{jax.tree_util.keystr(path)}: expected shape {boxed[...].shape}, got {value.shape}"
            )
        return value

    return jax.tree_util.tree_map_with_path(lookup, model.params, is_leaf=_is_variable)


def _check_input_size(input_size):
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size: expected a positive int, got {input_size!r}")


class RNN(nnx.Module):
    """One recurrent layer: ``cell`` run over a sequence by :func:`jaxrnn.rnn`.

    Args:
      cell: a jaxrnn cell (:class:`~jaxrnn.Elman`, :class:`~jaxrnn.LSTM`,
        :class:`~jaxrnn.GRU`), static configuration.
      input_size: ``I``, the feature size of the inputs.
      rngs: ``nnx.Rngs``; the ``params`` stream initialises the weights.
      params: instead of initialising, use these parameters (e.g. from
        :func:`jaxrnn.interop.from_flax`); then ``input_size`` may be ``None``
        and ``rngs`` is not needed.
      param_dtype: dtype of initialised parameters.
      time_major: inputs and outputs are ``(T, B, ·)``.
      impl: implementation, see :func:`jaxrnn.rnn`.

    Attributes:
      params: the cell's parameter NamedTuple, arrays held in ``nnx.Param``.

    Example:
      >>> layer = RNN(jaxrnn.GRU(32), 8, rngs=nnx.Rngs(0))
      >>> ys, carry = layer(jnp.ones((4, 10, 8)), return_carry=True)  # ys: (4, 10, 32)
    """

    def __init__(
        self,
        cell,
        input_size: Optional[int] = None,
        *,
        rngs: Optional[nnx.Rngs] = None,
        params: Any = None,
        param_dtype=jnp.float32,
        time_major: bool = False,
        impl: Any = "auto",
    ):
        check_cell(cell)
        check_impl(impl)
        if params is None:
            _check_input_size(input_size)
            if not isinstance(rngs, nnx.Rngs):
                raise TypeError(f"rngs: expected nnx.Rngs to initialise parameters, got {type(rngs).__name__}")
            params = cell.init(rngs.params(), input_size, param_dtype)
        else:
            got = check_params(cell, params)
            if input_size is not None and input_size != got:
                raise ValueError(
                    f"input_size: {input_size} disagrees with params.w_ih of shape {tuple(params.w_ih.shape)}"
                )
        self.cell = cell
        self.time_major = bool(time_major)
        self.impl = impl
        self.params = nnx.data(box_params(params))

    def get_params(self):
        """The current parameters as a plain NamedTuple of arrays."""
        return unbox_params(self.params)

    def __call__(
        self,
        xs: jax.Array,
        *,
        seq_lengths: Optional[jax.Array] = None,
        initial_carry: Any = None,
        reverse: bool = False,
        return_carry: bool = False,
    ):
        """Run the layer.

        Args:
          xs: ``(B, T, I)`` inputs (``(T, B, I)`` if ``time_major``; ``(T, I)`` unbatched).
          seq_lengths: ``(B,)`` integer valid lengths (see :func:`jaxrnn.rnn`).
          initial_carry: carry with leaves ``(B, H)``; zeros by default.
          reverse: run each sequence's valid part backwards (outputs stay aligned).
          return_carry: also return the final carry.

        Returns:
          ``ys`` of shape ``(B, T, H)``, or ``(ys, final_carry)`` if ``return_carry``.
        """
        ys, carry = rnn(
            self.cell,
            self.get_params(),
            xs,
            initial_carry=initial_carry,
            seq_lengths=seq_lengths,
            reverse=reverse,
            time_major=self.time_major,
            impl=self.impl,
        )
        return (ys, carry) if return_carry else ys


def _dropout_stream(rngs):
    """A fork of the ``dropout`` stream of ``rngs``, else of its ``default`` stream (as ``nnx.Dropout`` does)."""
    for name in ("dropout", "default"):
        try:
            return rngs[name].fork()
        except KeyError:
            continue
    raise ValueError(
        "rngs: the stack has dropout, so rngs needs a 'dropout' (or 'default') stream, "
        "e.g. nnx.Rngs(params=0, dropout=1) or nnx.Rngs(0)"
    )


class StackRNN(nnx.Module):
    """A :class:`jaxrnn.Stack` (deep, bidirectional, connections, dropout) as an NNX module.

    Dropout between layers (rate ``stack.dropout``) is on unless
    ``deterministic`` is True; ``model.eval()`` / ``model.train()`` and
    ``nnx.view(model, deterministic=...)`` set it, as for ``nnx.Dropout``.
    Masks are drawn from the ``dropout`` stream of ``rngs`` (its ``default``
    stream if it has none).

    Args:
      stack: the :class:`~jaxrnn.Stack` configuration (static).
      input_size: ``I``, the feature size of the stack's input.
      rngs: ``nnx.Rngs``; ``params`` initialises, ``dropout`` (else
        ``default``) draws masks: ``nnx.Rngs(0)`` or ``nnx.Rngs(params=0, dropout=1)``.
      params: instead of initialising, use these per-layer parameters (e.g.
        from :func:`jaxrnn.interop.from_torch`); then ``input_size`` may be
        ``None``, and ``rngs`` is needed only for dropout.
      param_dtype: dtype of initialised parameters.
      deterministic: disable dropout.
      time_major: inputs and outputs are ``(T, B, ·)``.
      impl: implementation of every layer, see :func:`jaxrnn.rnn`.

    Attributes:
      params: tuple of :class:`~jaxrnn.LayerParams`, arrays held in ``nnx.Param``.

    Example:
      >>> stack = jaxrnn.Stack(jaxrnn.LSTM(64), num_layers=2, bidirectional=True)
      >>> model = StackRNN(stack, 16, rngs=nnx.Rngs(0))
      >>> ys = model(xs, seq_lengths=lengths)  # (B, T, 128)
    """

    def __init__(
        self,
        stack: Stack,
        input_size: Optional[int] = None,
        *,
        rngs: Optional[nnx.Rngs] = None,
        params: Any = None,
        param_dtype=jnp.float32,
        deterministic: bool = False,
        time_major: bool = False,
        impl: Any = "auto",
    ):
        if not isinstance(stack, Stack):
            raise TypeError(f"stack: expected a jaxrnn.Stack, got {type(stack).__name__}")
        check_impl(impl)
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs: expected nnx.Rngs, got {type(rngs).__name__}")
        if params is None:
            _check_input_size(input_size)
            if rngs is None:
                raise TypeError("rngs: expected nnx.Rngs to initialise parameters, got None")
            params = stack.init(rngs.params(), input_size, param_dtype)
        else:
            stack.check_params(params)  # names wrong structures: a bare LayerParams, a (fwd, bwd) pair, ...
            params = tuple(params)
            got = params[0].fwd.w_ih.shape
            if input_size is not None and input_size != got[0]:
                raise ValueError(f"input_size: {input_size} disagrees with params[0].fwd.w_ih of shape {tuple(got)}")
        self.stack = stack
        self.time_major = bool(time_major)
        self.impl = impl
        self.deterministic = bool(deterministic)
        self.params = nnx.data(box_params(params))
        uses_dropout = stack.uses_dropout
        self.rngs = nnx.data(_dropout_stream(rngs) if uses_dropout and rngs is not None else None)

    def get_params(self):
        """The current parameters as a plain tuple of :class:`~jaxrnn.LayerParams`."""
        return unbox_params(self.params)

    def set_view(self, deterministic: Optional[bool] = None):
        """Hook for ``nnx.view``: ``deterministic=True`` disables dropout."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self,
        xs: jax.Array,
        *,
        seq_lengths: Optional[jax.Array] = None,
        initial_carry: Any = None,
        return_carry: bool = False,
        deterministic: Optional[bool] = None,
    ):
        """Run the stack.

        Args:
          xs: ``(B, T, I)`` inputs (``(T, B, I)`` if ``time_major``; ``(T, I)`` unbatched).
          seq_lengths: ``(B,)`` integer valid lengths.
          initial_carry: per-layer carries as for :meth:`jaxrnn.Stack.apply`.
          return_carry: also return the final carries.
          deterministic: overrides the attribute for this call.

        Returns:
          ``ys`` of shape ``(B, T, D)``, or ``(ys, final_carries)`` if ``return_carry``.
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        dropout_key = None
        if not deterministic and self.stack.uses_dropout:
            if self.rngs is None:
                raise ValueError(
                    "rngs: dropout is on (deterministic=False) but the module was built without nnx.Rngs; "
                    "pass rngs= at construction or call with deterministic=True"
                )
            dropout_key = self.rngs()
        ys, carries = self.stack.apply(
            self.get_params(),
            xs,
            seq_lengths=seq_lengths,
            initial_carry=initial_carry,
            dropout_key=dropout_key,
            time_major=self.time_major,
            impl=self.impl,
        )
        return (ys, carries) if return_carry else ys
