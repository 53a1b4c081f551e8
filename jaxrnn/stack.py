"""Deep and bidirectional stacks of recurrent layers.

A :class:`Stack` runs ``num_layers`` layers of one cell type; layer ``i``'s
outputs feed layer ``i + 1``. Bidirectional layers have separate forward and
backward weights and concatenate their outputs (``[forward, backward]``,
as PyTorch does). Between layers, the lectures' connections for training
deep (8+ layer) stacks are available:

* ``"residual"``: ``out_i = y_i + in_i`` (He et al. 2016);
* ``"dense"``: layer ``i``'s input is ``[x, out_0, ..., out_{i-1}]``
  (Huang et al. 2017);
* ``"highway"``: ``out_i = T ⊙ y_i + (1 - T) ⊙ in_i`` with the gate
  ``T = σ(in_i W_T + b_T)`` (Srivastava et al. 2015; ``b_T`` starts at -1,
  favouring the identity path).

Residual and highway connections join two tensors of equal width, so they
apply at every layer whose input width equals its output width (every layer
but the first, unless ``input_size`` equals the output width).

Dropout (only when :meth:`Stack.apply` gets a ``dropout_key``) acts on the
stack's input (rate ``input_dropout``) and on each layer's output but the
last (rate ``dropout``), i.e. on the input of every layer. Two kinds of mask:

* ``dropout_mode="per_step"`` (the default): a fresh mask at every time step,
  as ``torch.nn.LSTM(dropout=...)``;
* ``dropout_mode="variational"``: one mask per sequence (and feature), reused
  at every time step (Gal & Ghahramani 2016, "A Theoretically Grounded
  Application of Dropout in Recurrent Neural Networks"). Only the inputs and
  the outputs between layers are masked, not the recurrent state ``h_{t-1}``
  inside a layer's recurrence.

Kept units are scaled by ``1 / (1 - rate)``, so every mask has expectation 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxrnn.cells import check_carry, check_cell, check_params, expand_bias
from jaxrnn.checks import check_index, check_inputs, check_key, check_lengths, check_one_of, check_rate, check_static, shape_of
from jaxrnn.embedded import Embedded, check_embedded
from jaxrnn.runner import check_impl, rnn
from jaxrnn.scan import sequence_mask

Array = jax.Array

__all__ = ["DROPOUT_MODES", "HighwayParams", "LayerParams", "Stack", "apply_dropout"]

CONNECTIONS = (None, "residual", "dense", "highway")
#: The ``dropout_mode`` names :class:`Stack` accepts.
DROPOUT_MODES = ("per_step", "variational")
HIGHWAY_BIAS = -1.0


class HighwayParams(NamedTuple):
    """Highway gate ``T = σ(in @ w + b)``. ``w``: ``(D, D)``, ``b``: ``(D,)``."""

    w: Array
    b: Array


class LayerParams(NamedTuple):
    """One layer's parameters.

    Attributes:
      fwd: the forward cell's parameters.
      bwd: the backward cell's parameters (``None`` unless bidirectional).
      highway: :class:`HighwayParams` where a highway connection applies, else ``None``.
    """

    fwd: Any
    bwd: Any = None
    highway: Optional[HighwayParams] = None


@dataclasses.dataclass(frozen=True)
class Stack:
    """A stack of recurrent layers.

    Args:
      cell: the cell of every layer (``Elman``, ``LSTM`` or ``GRU``).
      num_layers: number of layers ``L``.
      bidirectional: each layer runs forward and backward, outputs concatenated
        (output width ``D = 2H``; ``D = H`` otherwise).
      connection: ``None``, ``"residual"``, ``"dense"`` or ``"highway"``.
      dropout: dropout rate on each layer's output except the last, applied
        only when ``apply`` gets a ``dropout_key``.
      dropout_mode: ``"per_step"`` (a new mask at every step, the default) or
        ``"variational"`` (one mask per sequence, the same at every step).
      input_dropout: dropout rate on the stack's input ``xs`` (the first
        layer's input; 0 by default), drawn in ``dropout_mode`` too.

    Example:
      >>> stack = Stack(jaxrnn.LSTM(128), num_layers=2, bidirectional=True)
      >>> params = stack.init(jax.random.key(0), 32)
      >>> ys, carries = stack.apply(params, xs, seq_lengths=lengths)  # ys: (B, T, 256)
      >>> awd = Stack(jaxrnn.LSTM(128), 3, dropout=0.3, dropout_mode="variational", input_dropout=0.2)
      >>> ys, _ = awd.apply(awd.init(key, 32), xs, dropout_key=jax.random.key(1))  # training
    """

    cell: Any
    num_layers: int = 1
    bidirectional: bool = False
    connection: Optional[str] = None
    dropout: float = 0.0
    dropout_mode: str = "per_step"
    input_dropout: float = 0.0

    def __post_init__(self):
        check_cell(self.cell)
        object.__setattr__(self, "num_layers", check_index(self.num_layers, "num_layers"))
        object.__setattr__(self, "bidirectional", check_static("bidirectional", self.bidirectional))
        check_one_of("connection", self.connection, CONNECTIONS)
        object.__setattr__(self, "dropout", check_rate("dropout", self.dropout))
        check_one_of("dropout_mode", self.dropout_mode, DROPOUT_MODES)
        object.__setattr__(self, "input_dropout", check_rate("input_dropout", self.input_dropout))

    @property
    def uses_dropout(self) -> bool:
        """Whether a ``dropout_key`` changes anything: ``input_dropout > 0``, or ``dropout > 0`` with 2+ layers."""
        return self.input_dropout > 0 or (self.dropout > 0 and self.num_layers > 1)

    # -- shapes -------------------------------------------------------------
    @property
    def output_size(self) -> int:
        """Width ``D`` of each layer's output."""
        return self.cell.hidden_size * (2 if self.bidirectional else 1)

    def layer_input_size(self, layer: int, input_size: int) -> int:
        """Input width of ``layer`` for a stack fed ``input_size`` features."""
        if self.connection == "dense":
            return input_size + layer * self.output_size
        return input_size if layer == 0 else self.output_size

    def _joins(self, layer_input_size: int) -> bool:
        return self.connection in ("residual", "highway") and layer_input_size == self.output_size

    # -- parameters -----------------------------------------------------------
    def init(self, key: Array, input_size: int, dtype=jnp.float32) -> Tuple[LayerParams, ...]:
        """Initialise every layer.

        Args:
          key: PRNG key.
          input_size: feature size ``I`` of the stack's input.
          dtype: parameter dtype.

        Returns:
          A tuple of ``num_layers`` :class:`LayerParams`.
        """
        layers = []
        for layer, k in enumerate(jax.random.split(key, self.num_layers)):
            k_f, k_b, k_h = jax.random.split(k, 3)
            n_in = self.layer_input_size(layer, input_size)
            fwd = self.cell.init(k_f, n_in, dtype)
            bwd = self.cell.init(k_b, n_in, dtype) if self.bidirectional else None
            highway = None
            if self.connection == "highway" and self._joins(n_in):
                D = self.output_size
                w = jax.nn.initializers.lecun_normal()(k_h, (D, D), dtype)
                highway = HighwayParams(w, jnp.full((D,), HIGHWAY_BIAS, dtype))
            layers.append(LayerParams(fwd, bwd, highway))
        return tuple(layers)

    def zero_carry(self, batch_shape=()):
        """Zero initial carries in the structure :meth:`apply` expects and returns."""
        one = lambda: self.cell.zero_carry(batch_shape)  # noqa: E731
        return tuple((one(), one()) if self.bidirectional else one() for _ in range(self.num_layers))

    # -- running -------------------------------------------------------------
    def apply(
        self,
        params,
        xs: Array,
        *,
        seq_lengths: Optional[Array] = None,
        initial_carry: Any = None,
        dropout_key: Optional[Array] = None,
        time_major: bool = False,
        impl: Any = "auto",
        carry_perturbation: Any = None,
    ):
        """Run the stack.

        Args:
          params: from :meth:`init`.
          xs: ``(B, T, I)`` inputs (``(T, B, I)`` with ``time_major``; ``(T, I)``
            unbatched), or a :class:`jaxrnn.Embedded` ``(table, ids)`` for
            ``table[ids]``, which the first layer's recurrence may run without
            forming it (see :func:`jaxrnn.rnn`).
          seq_lengths: ``(B,)`` valid lengths; see :func:`jaxrnn.rnn`. Outputs at
            padded steps are zero in every layer, connections included.
          initial_carry: a tuple with one carry per layer (a ``(forward,
            backward)`` pair per layer when bidirectional); zeros by default.
          dropout_key: enables dropout: rate ``self.input_dropout`` on ``xs``
            and ``self.dropout`` on each layer's output but the last, masks
            per ``self.dropout_mode``. With ``keys = jax.random.split(dropout_key,
            num_layers)``, layer ``i``'s output mask is drawn from ``keys[i]``
            (``i < num_layers - 1``) and the input mask from ``keys[-1]``
            (which no output uses), each by :func:`apply_dropout`.
          time_major: inputs and outputs are time-major.
          impl: implementation of every layer's recurrence; see :func:`jaxrnn.rnn`.
          carry_perturbation: the analysis hook of :func:`jaxrnn.rnn`, per
            layer: the structure of ``initial_carry``, leaves with a time axis
            (``(B, T, H)``, or as ``xs``'s layout). ``None`` by default.

        Returns:
          ``(ys, final_carries)``: the last layer's outputs ``(B, T, D)`` and each
          layer's final carry in the structure of ``initial_carry``.
        """
        check_impl(impl)
        time_major = check_static("time_major", time_major)
        if isinstance(xs, Embedded):
            check_embedded(xs)
            lead, features, what = shape_of(xs.ids), shape_of(xs.table)[-1], ("xs.table", shape_of(xs.table))
        else:
            check_inputs(xs, time_major=time_major)
            lead, features, what = xs.shape[:-1], xs.shape[-1], ("xs", shape_of(xs))
        expected_in = self.check_params(params)
        check_key("dropout_key", dropout_key)
        if features != expected_in:
            raise ValueError(
                f"{what[0]}: expected last dimension {expected_in} (input_size of params[0].fwd.w_ih), "
                f"got shape {what[1]}"
            )
        unbatched = len(lead) == 1
        batch_shape = () if unbatched else (lead[1] if time_major else lead[0],)
        if initial_carry is not None:
            self._check_initial_carry(initial_carry, batch_shape)
        T = lead[0] if (unbatched or time_major) else lead[1]
        mask = None
        if seq_lengths is not None:
            seq_lengths = check_lengths(seq_lengths, batch_shape, T)
            mask = sequence_mask(jnp.clip(jnp.asarray(seq_lengths), 0, T), T, time_major=time_major)[..., None]
        keys = (
            jax.random.split(dropout_key, self.num_layers)
            if dropout_key is not None and self.uses_dropout
            else [None] * self.num_layers
        )
        run = dict(seq_lengths=seq_lengths, time_major=time_major, impl=impl)
        variational = self.dropout_mode == "variational"
        time_axis = 0 if (unbatched or time_major) else 1
        if keys[-1] is not None and self.input_dropout > 0:
            xs = xs.lookup() if isinstance(xs, Embedded) else xs
            xs = apply_dropout(keys[-1], xs, self.input_dropout, variational=variational, time_axis=time_axis)

        if carry_perturbation is not None and (
            not isinstance(carry_perturbation, (tuple, list)) or len(carry_perturbation) != self.num_layers
        ):
            raise TypeError(
                f"carry_perturbation: expected a tuple of {self.num_layers} per-layer perturbations, "
                f"got {type(carry_perturbation).__name__}"
            )

        inputs, finals = xs, []
        for layer, p in enumerate(params):
            carry = None if initial_carry is None else initial_carry[layer]
            delta = None if carry_perturbation is None else carry_perturbation[layer]
            if self.bidirectional:
                c_f, c_b = (None, None) if carry is None else carry
                d_f, d_b = (None, None) if delta is None else delta
                y_f, f_f = rnn(self.cell, p.fwd, inputs, initial_carry=c_f, carry_perturbation=d_f, **run)
                y_b, f_b = rnn(self.cell, p.bwd, inputs, initial_carry=c_b, reverse=True, carry_perturbation=d_b, **run)
                y, final = jnp.concatenate([y_f, y_b], axis=-1), (f_f, f_b)
            else:
                y, final = rnn(self.cell, p.fwd, inputs, initial_carry=carry, carry_perturbation=delta, **run)
            finals.append(final)
            if isinstance(inputs, Embedded):  # the first layer's rows, for a connection that reads them
                inputs = inputs.lookup()
            out = self.connect(p, inputs, y)
            if mask is not None:
                out = jnp.where(mask, out, jnp.zeros((), out.dtype))
            last = layer == self.num_layers - 1
            if keys[layer] is not None and not last and self.dropout > 0:
                out = apply_dropout(keys[layer], out, self.dropout, variational=variational, time_axis=time_axis)
            if self.connection == "dense" and not last:
                inputs = jnp.concatenate([inputs, out], axis=-1)
            else:
                inputs = out
        return inputs, tuple(finals)

    def check_params(self, params, name: str = "params") -> int:
        """Check ``params`` has this stack's structure; return the input size ``I``.

        Recognises the common mistakes and says how to fix them: a bare
        :class:`LayerParams` (wrap it in a tuple), a ``(forward, backward)``
        pair without the outer tuple, a single cell's parameters. Errors name
        the layer (``params[1].bwd.w_hh: ...``).

        Raises:
          TypeError: wrong structure.
          ValueError: a leaf of the wrong shape.
        """
        L = self.num_layers
        if isinstance(params, LayerParams):
            raise TypeError(f"{name}: expected a tuple of {L} LayerParams, got a single LayerParams; wrap it: (params,)")
        if isinstance(params, tuple) and hasattr(params, "w_hh"):
            raise TypeError(
                f"{name}: expected a tuple of {L} LayerParams, got the parameters of a single cell "
                f"({type(params).__name__}); use (jaxrnn.LayerParams(fwd=params),) or run the cell with jaxrnn.rnn"
            )
        if not isinstance(params, (tuple, list)):
            raise TypeError(f"{name}: expected a tuple of {L} LayerParams, got {type(params).__name__}")
        if len(params) == 2 and all(isinstance(p, tuple) and hasattr(p, "w_hh") for p in params):
            raise TypeError(
                f"{name}: expected a tuple of {L} LayerParams, got a pair of cell parameters; "
                "for one bidirectional layer use (jaxrnn.LayerParams(fwd, bwd),)"
            )
        if len(params) != L:
            raise TypeError(f"{name}: expected a tuple of {L} LayerParams, got {len(params)} layers")
        input_size = None
        for layer, p in enumerate(params):
            where = f"{name}[{layer}]"
            if not isinstance(p, LayerParams):
                raise TypeError(f"{where}: expected a LayerParams(fwd, bwd, highway), got {type(p).__name__}")
            n_in = check_params(self.cell, p.fwd, name=f"{where}.fwd")
            if input_size is None:
                input_size = n_in
            want = self.layer_input_size(layer, input_size)
            if n_in != want:
                raise ValueError(f"{where}.fwd.w_ih: expected {want} input rows, got shape {shape_of(p.fwd.w_ih)}")
            if self.bidirectional != (p.bwd is not None):
                expected = "backward-cell parameters" if self.bidirectional else "None"
                raise ValueError(f"{where}.bwd: expected {expected} for bidirectional={self.bidirectional}")
            if p.bwd is not None:
                check_params(self.cell, p.bwd, name=f"{where}.bwd")
                if shape_of(p.bwd.w_ih) != shape_of(p.fwd.w_ih):
                    raise ValueError(
                        f"{where}.bwd.w_ih: expected shape {shape_of(p.fwd.w_ih)} (as fwd), got {shape_of(p.bwd.w_ih)}"
                    )
            joins = self.connection == "highway" and self._joins(want)
            if joins:
                D = self.output_size
                if not isinstance(p.highway, HighwayParams):
                    raise TypeError(f"{where}.highway: expected HighwayParams(w, b), got {type(p.highway).__name__}")
                if shape_of(p.highway.w) != (D, D) or shape_of(p.highway.b) != (D,):
                    raise ValueError(
                        f"{where}.highway: expected w {(D, D)} and b {(D,)}, "
                        f"got {shape_of(p.highway.w)} and {shape_of(p.highway.b)}"
                    )
            elif p.highway is not None:
                raise ValueError(f"{where}.highway: expected None (no highway connection at this layer)")
        return input_size

    def connect(self, p: LayerParams, inputs: Array, y: Array) -> Array:
        """Join a layer's input and its recurrent output per ``self.connection``.

        Args:
          p: the layer's parameters (``p.highway`` for highway connections).
          inputs: ``(..., D_in)`` the layer's input.
          y: ``(..., D)`` the layer's recurrent output.

        Returns:
          ``(..., D)``: ``y`` itself, ``y + inputs`` (residual) or
          ``T ⊙ y + (1 - T) ⊙ inputs`` (highway), the latter two only where
          ``D_in == D``. Dense connections concatenate in :meth:`apply` instead.
        """
        if not self._joins(inputs.shape[-1]):
            return y
        if self.connection == "residual":
            return y + inputs.astype(y.dtype)
        z = jnp.matmul(inputs, p.highway.w.astype(inputs.dtype), preferred_element_type=jnp.float32)
        gate = jax.nn.sigmoid(z + expand_bias(p.highway.b, z))
        mixed = gate * y.astype(jnp.float32) + (1.0 - gate) * inputs.astype(jnp.float32)
        return mixed.astype(y.dtype)

    def _check_initial_carry(self, initial_carry, batch_shape):
        if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != self.num_layers:
            raise TypeError(
                f"initial_carry: expected a tuple of {self.num_layers} per-layer carries, "
                f"got {type(initial_carry).__name__}"
            )
        for layer, carry in enumerate(initial_carry):
            if self.bidirectional:
                if not isinstance(carry, (tuple, list)) or len(carry) != 2 or hasattr(carry, "_fields"):
                    raise TypeError(
                        f"initial_carry[{layer}]: expected a (forward, backward) pair of carries, "
                        f"got {type(carry).__name__}"
                    )
                for d, c in enumerate(carry):
                    check_carry(self.cell, c, batch_shape, name=f"initial_carry[{layer}][{d}]")
            else:
                check_carry(self.cell, carry, batch_shape, name=f"initial_carry[{layer}]")


def apply_dropout(key: Array, x: Array, rate: float, *, variational: bool = False, time_axis: int = 1) -> Array:
    """Inverted dropout: zero each unit with probability ``rate``, scale the kept ones by ``1 / (1 - rate)``.

    Args:
      key: PRNG key.
      x: ``(B, T, D)`` activations (any layout; ``time_axis`` names the time axis).
      rate: drop probability in ``[0, 1)``.
      variational: draw one mask per sequence and feature, ``x.shape`` with
        ``time_axis`` set to 1, and reuse it at every step (Gal & Ghahramani
        2016); otherwise a mask of ``x.shape`` (a new one at every step).
      time_axis: the time axis of ``x`` (1 batch-major, 0 time-major or unbatched).

    Returns:
      ``x * keep / (1 - rate)`` in ``x``'s dtype, ``keep = jax.random.bernoulli(key, 1 - rate, mask_shape)``;
      zeros in ``x`` (padding) stay zero.

    Example:
      >>> ys = apply_dropout(jax.random.key(0), ys, 0.25, variational=True)  # the same units off at every step
    """
    rate = check_rate("rate", rate)
    shape = list(x.shape)
    if variational:
        shape[time_axis] = 1
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
