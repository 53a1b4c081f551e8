"""Recurrent cells as pure functions.

A cell is a frozen, hashable configuration object (static under ``jit``) with
pure methods::

    params = cell.init(key, input_size)           # NamedTuple of arrays
    carry = cell.zero_carry(batch_shape)           # NamedTuple of arrays
    carry, y = cell.step(params, carry, x)         # one time step (a scan body)

Every cell splits its pre-activations into an input part, computed for all
time steps at once by :meth:`input_projection` (one large matmul), and a
recurrent part, computed step by step by :meth:`step_projected`. Runners and
kernels rely on that split; ``step`` is their composition.

Each cell's equations are written once, gate by gate, in :meth:`Cell.gate_step`
(every gate its own ``(*batch, H)`` array, the recurrent matmul passed in):
:meth:`step_projected`, :meth:`tanh_sites` and the fused kernels of
:mod:`jaxrnn.kernels.gates` all compute through it. The nonlinearities and
their derivatives are written once too, in :data:`ACTIVATIONS`,
:data:`SIGMOID` and :data:`TANH`.

Shapes: ``I`` input size, ``H`` hidden size, ``G = num_gates * H``.

Dtypes. Parameters are stored in the ``dtype`` given to :meth:`init`
(float32 by default). Matmul operands are cast to the cell's
``compute_dtype`` (``None``: the dtype of the inputs ``x``) and accumulate in
float32 (float64 for float64 inputs); gate nonlinearities and the carry use
that accumulation dtype; outputs ``y`` take the dtype of ``x``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from jaxrnn.checks import check_float_dtype, check_index, check_one_of, is_traced, shape_of

Array = jax.Array
Initializer = Callable[..., Array]
#: ``mm(a, k)``: the per-gate parts of ``a`` times the weights of recurrent matmul ``k`` (:meth:`Cell.recurrent_matmul`).
MatmulFn = Callable[[Array, int], Tuple[Array, ...]]

ACC_DTYPE = jnp.float32


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype for a compute dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(ACC_DTYPE, dtype)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Carry",
    "Cell",
    "Elman",
    "ElmanParams",
    "GRU",
    "GRUParams",
    "LSTM",
    "LSTMCarry",
    "LSTMParams",
    "LINEAR",
    "RELU",
    "SIGMOID",
    "TANH",
    "count_params",
]


# --------------------------------------------------------------------------
# Nonlinearities
# --------------------------------------------------------------------------
class Activation(NamedTuple):
    """An elementwise nonlinearity ``φ`` and its derivative, written once for cells and kernels.

    Attributes:
      value: ``z ↦ φ(z)``.
      deriv: ``y ↦ φ'(z)`` expressed through the output ``y = φ(z)`` (what a
        hand-written backward has saved).
    """

    value: Callable[[Array], Array]
    deriv: Callable[[Array], Array]


TANH = Activation(jnp.tanh, lambda y: 1.0 - y * y)
SIGMOID = Activation(jax.nn.sigmoid, lambda y: y * (1.0 - y))
RELU = Activation(jax.nn.relu, lambda y: (y > 0).astype(y.dtype))
LINEAR = Activation(lambda z: z, jnp.ones_like)

#: The Elman activations by name.
ACTIVATIONS = {"tanh": TANH, "relu": RELU, "linear": LINEAR}


# --------------------------------------------------------------------------
# Parameters and carries
# --------------------------------------------------------------------------
class ElmanParams(NamedTuple):
    """Elman RNN parameters.

    Attributes:
      w_ih: ``(I, H)`` input kernel.
      w_hh: ``(H, H)`` recurrent kernel.
      b: ``(H,)`` bias.
    """

    w_ih: Array
    w_hh: Array
    b: Array


class LSTMParams(NamedTuple):
    """LSTM parameters, gates stacked in PyTorch/cuDNN order ``i, f, g, o``.

    Attributes:
      w_ih: ``(I, 4H)`` input kernel.
      w_hh: ``(H, 4H)`` recurrent kernel.
      b: ``(4H,)`` bias (PyTorch's ``b_ih + b_hh``).
    """

    w_ih: Array
    w_hh: Array
    b: Array


class GRUParams(NamedTuple):
    """GRU parameters, gates stacked as ``r`` (reset), ``u`` (update), ``n`` (candidate).

    Attributes:
      w_ih: ``(I, 3H)`` input kernel.
      w_hh: ``(H, 3H)`` recurrent kernel.
      b: ``(3H,)`` bias of the input part (for ``r`` and ``u`` it also holds
        the recurrent bias, which is indistinguishable there).
      b_hn: ``(H,)`` recurrent bias of the candidate, inside ``r ⊙ (·)``;
        only for ``reset="after"``, ``None`` for ``reset="before"``.
    """

    w_ih: Array
    w_hh: Array
    b: Array
    b_hn: Optional[Array] = None


class Carry(NamedTuple):
    """Carry of single-state cells (Elman, GRU). ``h``: ``(*batch, H)``."""

    h: Array


class LSTMCarry(NamedTuple):
    """LSTM carry. ``h`` (hidden state) and ``c`` (cell state): ``(*batch, H)``."""

    h: Array
    c: Array


def count_params(params: Any) -> int:
    """Exact number of scalars in a parameter pytree (``None`` leaves count 0).

    Example:
      >>> cell = LSTM(512)
      >>> count_params(cell.init(jax.random.key(0), 256))  # 4 * (256*512 + 512*512 + 512)
      1574912
    """
    return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------
# Initialisers
# --------------------------------------------------------------------------
_INPUT_INITS = ("lecun_normal", "lecun_uniform", "glorot_normal", "glorot_uniform", "irnn")
_RECURRENT_INITS = ("orthogonal", "identity")


def _call_initializer(name, fn, key, shape, dtype):
    """``fn(key, shape, dtype)`` (a ``jax.nn.initializers`` signature), checked: errors say what is expected."""
    expected = f"a callable init(key, shape, dtype) -> array of shape {shape}, like jax.nn.initializers.lecun_normal()"
    try:
        value = fn(key, shape, dtype)
    except TypeError as e:
        raise TypeError(f"{name}: expected {expected}; calling it failed: {e}") from e
    if shape_of(value) != shape:
        raise ValueError(f"{name}: expected {expected}, got an array of shape {shape_of(value)}")
    return jnp.asarray(value, dtype)


def _input_kernel(name_or_fn, key, input_size, hidden_size, num_gates, dtype):
    """``(I, G)`` kernel initialised gate by gate (fan_out = H per gate)."""
    if callable(name_or_fn):
        return _call_initializer("kernel_init", name_or_fn, key, (input_size, num_gates * hidden_size), dtype)
    if name_or_fn == "irnn":  # Le et al. 2015: small Gaussian input weights.
        return 1e-3 * jax.random.normal(key, (input_size, num_gates * hidden_size), dtype)
    init = getattr(jax.nn.initializers, name_or_fn)()
    keys = jax.random.split(key, num_gates)
    return jnp.concatenate([init(k, (input_size, hidden_size), dtype) for k in keys], axis=1)


def _recurrent_kernel(name_or_fn, key, hidden_size, num_gates, dtype, scale=1.0):
    """``(H, G)`` kernel; each gate's ``(H, H)`` block is orthogonal or ``scale·I``."""
    shape = (hidden_size, num_gates * hidden_size)
    if callable(name_or_fn):
        return _call_initializer("recurrent_init", name_or_fn, key, shape, dtype)
    if name_or_fn == "identity":
        return jnp.tile(scale * jnp.eye(hidden_size, dtype=dtype), (1, num_gates))
    init = jax.nn.initializers.orthogonal(scale)
    keys = jax.random.split(key, num_gates)
    # One batched draw and QR (the same values as one call per key): a quarter of the program to compile.
    blocks = jax.vmap(lambda k: init(k, (hidden_size, hidden_size), dtype))(keys)  # (n, H, H)
    return jnp.transpose(blocks, (1, 0, 2)).reshape(shape)


def expand_bias(b: Array, like: Array) -> Array:
    """``b`` (shape ``(G,)``) in ``like``'s dtype, reshaped to broadcast against ``like`` (``(..., G)``)."""
    return b.astype(like.dtype).reshape((1,) * (like.ndim - 1) + b.shape)


# --------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
    """Base class of the cells: configuration validation, initialisation and the step split.

    Subclasses set ``num_gates``, ``carry_type`` and ``gate_activations`` and
    implement ``_make_params``, :meth:`gate_step` (the cell's equations, the
    one definition) and :meth:`tanh_sites`.
    """

    hidden_size: int
    compute_dtype: Any = None
    kernel_init: Union[str, Initializer] = "lecun_normal"
    recurrent_init: Union[str, Initializer] = "orthogonal"

    num_gates = 1  # overridden
    carry_type = Carry
    #: Per gate, the :class:`Activation` its pre-activation goes through.
    gate_activations = ()  # overridden

    def __post_init__(self):
        object.__setattr__(self, "hidden_size", check_index(self.hidden_size, "hidden_size"))
        check_one_of("kernel_init", self.kernel_init, _INPUT_INITS, allow_callable=True)
        check_one_of("recurrent_init", self.recurrent_init, _RECURRENT_INITS, allow_callable=True)
        object.__setattr__(self, "compute_dtype", check_float_dtype("compute_dtype", self.compute_dtype, allow_none=True))

    # -- shapes -------------------------------------------------------------
    @property
    def gate_size(self) -> int:
        """``G = num_gates * hidden_size``: width of the stacked pre-activations."""
        return self.num_gates * self.hidden_size

    @property
    def matmul_groups(self) -> Tuple[Tuple[int, int], ...]:
        """The recurrent matmuls of a step: per matmul, the range ``(lo, hi)`` of gates it feeds.

        One matmul ``h_{t-1} @ w_hh`` for all gates, except GRU with
        ``reset="before"``: ``h_{t-1} @ [W_hr, W_hu]`` and ``(r ⊙ h_{t-1}) @ W_hn``.
        """
        return ((0, self.num_gates),)

    def input_size_of(self, params) -> int:
        """Input size ``I`` read off ``params.w_ih``."""
        return params.w_ih.shape[0]

    def split_gates(self, a: Array, n: Optional[int] = None) -> Tuple[Array, ...]:
        """``a``'s last axis ``(..., n·H')`` as a tuple of ``n`` (default ``num_gates``) ``(..., H')`` arrays."""
        n = self.num_gates if n is None else n
        width = a.shape[-1] // n
        return tuple(a[..., k * width : (k + 1) * width] for k in range(n))

    def weight_blocks(self, w_hh: Array) -> Tuple[Array, ...]:
        """The column blocks of ``w_hh`` (``(H, G)``), one per matmul of :attr:`matmul_groups`."""
        H = self.hidden_size
        return tuple(w_hh[:, lo * H : hi * H] for lo, hi in self.matmul_groups)

    # -- initialisation -----------------------------------------------------
    def init(self, key: Array, input_size: int, dtype=jnp.float32):
        """Initialise parameters.

        Args:
          key: PRNG key.
          input_size: ``I``, the feature size of ``x``.
          dtype: parameter dtype (float32 by default; independent of the
            compute dtype).

        Returns:
          The cell's parameter NamedTuple.
        """
        input_size = check_index(input_size, "input_size")
        dtype = check_float_dtype("dtype", dtype)
        if is_traced(key):  # inside the caller's jit, vmap or eval_shape: part of its program
            return _init_traced(self, key, input_size, dtype)
        return _init(self, key, input_size, dtype)

    def _init_params(self, key, input_size, dtype):
        k_in, k_rec = jax.random.split(key)
        H, n, f32 = self.hidden_size, self.num_gates, jnp.float32  # sample in f32 (QR has no bf16), then cast
        w_ih = _input_kernel(self.kernel_init, k_in, input_size, H, n, f32)
        w_hh = _recurrent_kernel(self.recurrent_init, k_rec, H, n, f32, **self._recurrent_kwargs())
        params = self._make_params(w_ih, w_hh, self._init_bias(f32))
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)

    def _recurrent_kwargs(self):
        return {}

    def _init_bias(self, dtype):
        return jnp.zeros((self.gate_size,), dtype)

    def _make_params(self, w_ih, w_hh, b):
        raise NotImplementedError

    def zero_carry(self, batch_shape=(), dtype=ACC_DTYPE):
        """All-zero carry of shape ``(*batch_shape, H)`` per state (float32 by default)."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        zeros = lambda: jnp.zeros((*batch_shape, self.hidden_size), dtype)  # noqa: E731
        return self.carry_type(*(zeros() for _ in self.carry_type._fields))

    # -- computation ----------------------------------------------------------
    def resolve(self, input_dtype):
        """This cell with ``compute_dtype`` fixed (``None`` becomes ``input_dtype``)."""
        if self.compute_dtype is not None:
            return self
        return dataclasses.replace(self, compute_dtype=jnp.dtype(input_dtype))

    def dot(self, a: Array, w: Array) -> Array:
        """``a @ w`` with operands in the compute dtype, accumulated in float32 (float64 for float64).

        The one matmul of cells and kernels (:meth:`dot_t` is its transposed form).

        Args:
          a: ``(..., K)``.
          w: ``(K, N)``.

        Returns:
          ``(..., N)`` in the accumulation dtype.
        """
        return self._contract(a, w, 0)

    def dot_t(self, a: Array, w: Array) -> Array:
        """``a @ wᵀ`` for ``a`` ``(..., N)`` and ``w`` ``(K, N)``: ``(..., K)``, operands and accumulation as in :meth:`dot`."""
        return self._contract(a, w, 1)

    def _contract(self, a, w, w_axis):
        cd = a.dtype if self.compute_dtype is None else self.compute_dtype
        dims = (((a.ndim - 1,), (w_axis,)), ((), ()))
        return lax.dot_general(a.astype(cd), w.astype(cd), dims, preferred_element_type=acc_dtype(cd))

    def recurrent_matmul(self, w: Tuple[Array, ...], per_gate: bool = False) -> MatmulFn:
        """The recurrent matmul in the form :meth:`gate_step` calls it.

        Args:
          w: the weights, either one block per matmul of :attr:`matmul_groups`
            (:meth:`weight_blocks`; multiplied at once, then split per gate)
            or, with ``per_gate``, one ``(H, H')`` block per gate
            (:meth:`split_gates` of ``w_hh``, or column tiles of them).
          per_gate: whether ``w`` holds one block per gate.

        Returns:
          ``mm(a, k)``: the tuple of ``a @ W_j`` for the gates ``j`` of matmul
          ``k``, each ``(*batch, H')`` in the accumulation dtype.
        """
        groups = self.matmul_groups
        if per_gate:
            return lambda a, k: tuple(self.dot(a, w[j]) for j in range(*groups[k]))
        return lambda a, k: self.split_gates(self.dot(a, w[k]), groups[k][1] - groups[k][0])

    def input_projection(self, params, xs: Array) -> Array:
        """Input part of every gate for all steps at once: ``xs @ w_ih + b``.

        Args:
          params: the cell's parameters.
          xs: ``(..., I)`` inputs (any leading shape, e.g. ``(B, T, I)``).

        Returns:
          ``(..., G)`` float32 pre-activations.
        """
        cell = self.resolve(xs.dtype)
        # One 2-D matmul over all leading axes: XLA's CPU dot (and its gradient) is
        # much faster on (T·B, I) than on a 3-D operand.
        z = cell.dot(xs.reshape(-1, xs.shape[-1]), params.w_ih)
        z = z + expand_bias(params.b, z)
        return z.reshape(*xs.shape[:-1], z.shape[-1])

    def gate_step(self, carry, xp: Tuple[Array, ...], mm: MatmulFn, b_hn=None, h_tile=None):
        """One step, gate by gate: the single definition of the cell's equations.

        Every gate is its own array (no slicing or concatenation), so Pallas
        kernels call this too. It also computes a column tile ``J`` of the
        step: with ``mm`` giving the ``J`` columns of each gate, every output
        is the ``J`` columns of the full step's. ``carry.h`` stays the whole
        ``h_{t-1}`` (the matmul's left operand); the other carry leaves,
        ``xp``, ``b_hn`` and ``h_tile`` are the ``J`` columns.

        Args:
          carry: the carry, leaves ``(*batch, H)`` (a tile: ``h`` whole, the
            others ``(*batch, |J|)``).
          xp: tuple of ``num_gates`` projected inputs (bias included),
            ``(*batch, H)`` each (a tile: ``(*batch, |J|)``).
          mm: the recurrent matmul, :meth:`recurrent_matmul`.
          b_hn: GRU ``reset="after"``: the recurrent candidate bias ``(H,)``
            (a tile: ``(|J|,)``), or ``None`` when ``mm``'s candidate output
            already includes it (a kernel that adds a full bias tile to its
            matmul output); ``None`` for the other cells.
          h_tile: ``None``, or the ``J`` columns of ``carry.h``, where a tile's
            gates read ``h_{t-1}`` elementwise (the GRU update).

        Returns:
          ``(new_carry, h, acts)``: the new carry and output (accumulation
          dtype) and ``acts``, the gate activations: Elman ``(h,)``; LSTM
          ``(i, f, g, o)``; GRU ``(r, u, n)``, plus ``m = h_{t-1} W_hn +
          b_hn`` for ``reset="after"``.
        """
        raise NotImplementedError

    def step_activations(self, params, carry, xp: Array):
        """:meth:`step_projected` plus the gate activations: ``(new_carry, h, acts)`` as :meth:`gate_step` returns them.

        The stacked weights and projected input split for :meth:`gate_step`
        (one matmul per entry of :attr:`matmul_groups`). Arguments as
        :meth:`step_projected`.
        """
        mm = self.recurrent_matmul(self.weight_blocks(params.w_hh))
        return self.gate_step(carry, self.split_gates(xp), mm, getattr(params, "b_hn", None))

    def step_projected(self, params, carry, xp: Array):
        """One step given the projected input ``xp = input_projection(params, x)``.

        Args:
          params: the cell's parameters.
          carry: the carry, leaves ``(*batch, H)``.
          xp: ``(*batch, G)`` float32 projected input.

        Returns:
          ``(new_carry, h)`` with float32 leaves ``(*batch, H)``.
        """
        new_carry, h, _ = self.step_activations(params, carry, xp)
        return new_carry, h

    def tanh_sites(self, params, carry, xp: Array) -> Dict[str, Array]:
        """The cell's ``tanh`` outputs at one step: name -> ``(*batch, H)``.

        Elman ``{"h": h_t}`` (whatever the activation); LSTM ``{"g": g_t,
        "c": tanh(c_t)}``; GRU ``{"n": ñ_t}`` (the candidate). Arguments as
        :meth:`step_projected`.
        """
        raise NotImplementedError

    def step(self, params, carry, x: Array):
        """One time step; the signature of a ``lax.scan`` body.

        Args:
          params: the cell's parameters.
          carry: the carry, leaves ``(*batch, H)``.
          x: ``(*batch, I)`` input.

        Returns:
          ``(new_carry, y)``: the float32 carry and the output ``(*batch, H)``
          in the dtype of ``x``.
        """
        cell = self.resolve(x.dtype)
        new_carry, h = cell.step_projected(params, carry, cell.input_projection(params, x))
        return new_carry, h.astype(x.dtype)

    def hidden(self, carry) -> Array:
        """The hidden state ``h`` of a carry."""
        return carry.h


def _pre_activations(xp, mm, h):
    """Per gate of matmul 0, ``xp_k + (h @ W_k)``."""
    return tuple(x + r for x, r in zip(xp, mm(h, 0)))


# --------------------------------------------------------------------------
# The cells
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Elman(Cell):
    r"""Elman ("vanilla") RNN cell.

    .. math::
        h_t = \phi(W_{ih}^\top x_t + W_{hh}^\top h_{t-1} + b)

    with :math:`\phi` = ``tanh`` (default), ``relu`` or ``linear`` (the latter
    for gradient-flow analysis of linear RNNs). ``Elman(H, activation="relu",
    recurrent_init="identity", kernel_init="irnn")`` is Le et al.'s IRNN.

    Args:
      hidden_size: ``H``.
      activation: ``"tanh"``, ``"relu"`` or ``"linear"``.
      compute_dtype: matmul operand dtype (``None``: the input's dtype).
      kernel_init: input-kernel initialiser name or callable.
      recurrent_init: ``"orthogonal"`` or ``"identity"`` (or a callable).
      recurrent_scale: gain of the recurrent initialiser (``λ`` in ``λ·Q``).

    Example:
      >>> cell = Elman(32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> carry, y = cell.step(params, cell.zero_carry(4), jnp.ones((4, 8)))
    """

    activation: str = "tanh"
    recurrent_scale: float = 1.0
    num_gates = 1

    def __post_init__(self):
        super().__post_init__()
        check_one_of("activation", self.activation, tuple(ACTIVATIONS))

    @property
    def gate_activations(self):
        return (ACTIVATIONS[self.activation],)

    def _recurrent_kwargs(self):
        return {"scale": self.recurrent_scale}

    def _make_params(self, w_ih, w_hh, b):
        return ElmanParams(w_ih, w_hh, b)

    def gate_step(self, carry, xp, mm, b_hn=None, h_tile=None):
        (z,) = _pre_activations(xp, mm, carry.h)
        h = self.gate_activations[0].value(z)
        return Carry(h), h, (h,)

    def tanh_sites(self, params, carry, xp):
        _, h, _ = self.step_activations(params, carry, xp)
        return {"h": h}


@dataclasses.dataclass(frozen=True)
class LSTM(Cell):
    r"""Long short-term memory cell (Hochreiter & Schmidhuber 1997, forget gate of Gers et al. 2000).

    Gates are stacked in PyTorch/cuDNN order ``i, f, g, o``:

    .. math::
        i_t &= \sigma(W_{ii} x_t + W_{hi} h_{t-1} + b_i) \\
        f_t &= \sigma(W_{if} x_t + W_{hf} h_{t-1} + b_f) \\
        g_t &= \tanh(W_{ig} x_t + W_{hg} h_{t-1} + b_g) \\
        o_t &= \sigma(W_{io} x_t + W_{ho} h_{t-1} + b_o) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t &= o_t \odot \tanh(c_t)

    The additive update of ``c`` is the lectures' "gradient highway":
    ``∂c_t/∂c_{t-1} = diag(f_t)`` along the cell path.

    Args:
      hidden_size: ``H``.
      forget_bias: initial value of ``b_f`` (1.0, Gers et al. 2000).
      compute_dtype: matmul operand dtype (``None``: the input's dtype).
      kernel_init: input-kernel initialiser name or callable.
      recurrent_init: ``"orthogonal"`` or ``"identity"`` (or a callable).

    Example:
      >>> cell = LSTM(32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> carry, y = cell.step(params, cell.zero_carry(4), jnp.ones((4, 8)))
    """

    forget_bias: float = 1.0
    num_gates = 4
    carry_type = LSTMCarry
    gate_activations = (SIGMOID, SIGMOID, TANH, SIGMOID)

    def _init_bias(self, dtype):
        H = self.hidden_size
        return jnp.zeros((4 * H,), dtype).at[H : 2 * H].set(self.forget_bias)

    def _make_params(self, w_ih, w_hh, b):
        return LSTMParams(w_ih, w_hh, b)

    def gate_step(self, carry, xp, mm, b_hn=None, h_tile=None):
        z = _pre_activations(xp, mm, carry.h)
        acts = tuple(act.value(zk) for act, zk in zip(self.gate_activations, z))
        new = self.state_update(carry, *acts)
        return new, new.h, acts

    def state_update(self, carry, i, f, g, o):
        """The carry update from the gate activations: ``c_t = f ⊙ c_{t-1} + i ⊙ g``, ``h_t = o ⊙ tanh(c_t)``."""
        c = f * carry.c + i * g
        return LSTMCarry(o * TANH.value(c), c)

    def tanh_sites(self, params, carry, xp):
        new, _, (_, _, g, _) = self.step_activations(params, carry, xp)
        return {"g": g, "c": TANH.value(new.c)}


@dataclasses.dataclass(frozen=True)
class GRU(Cell):
    r"""Gated recurrent unit (Cho et al. 2014).

    Gates are stacked ``r`` (reset), ``u`` (update), ``n`` (candidate):

    .. math::
        r_t &= \sigma(W_{ir} x_t + W_{hr} h_{t-1} + b_r) \\
        u_t &= \sigma(W_{iu} x_t + W_{hu} h_{t-1} + b_u) \\
        \tilde h_t &= \tanh(W_{in} x_t + W_{hn}(r_t \odot h_{t-1}) + b_n)
            \quad\text{(reset="before", the lectures' form)} \\
        \tilde h_t &= \tanh(W_{in} x_t + b_n + r_t \odot (W_{hn} h_{t-1} + b_{hn}))
            \quad\text{(reset="after", cuDNN/PyTorch)} \\
        h_t &= (1 - u_t) \odot h_{t-1} + u_t \odot \tilde h_t

    PyTorch's update gate is ``z = 1 - u`` (it interpolates
    ``(1 - z) ⊙ n + z ⊙ h_{t-1}``); :func:`jaxrnn.from_torch` converts.

    Args:
      hidden_size: ``H``.
      reset: ``"before"`` (reset applied to ``h`` before the matmul) or
        ``"after"`` (applied to the matmul's result, with the extra recurrent
        bias ``b_hn``; one fused recurrent matmul per step).
      compute_dtype: matmul operand dtype (``None``: the input's dtype).
      kernel_init: input-kernel initialiser name or callable.
      recurrent_init: ``"orthogonal"`` or ``"identity"`` (or a callable).

    Example:
      >>> cell = GRU(32, reset="after")
      >>> params = cell.init(jax.random.key(0), 8)
      >>> carry, y = cell.step(params, cell.zero_carry(4), jnp.ones((4, 8)))
    """

    reset: str = "before"
    num_gates = 3
    gate_activations = (SIGMOID, SIGMOID, TANH)

    def __post_init__(self):
        super().__post_init__()
        check_one_of("reset", self.reset, ("before", "after"))

    @property
    def matmul_groups(self):
        return ((0, 3),) if self.reset == "after" else ((0, 2), (2, 3))

    def _make_params(self, w_ih, w_hh, b):
        b_hn = jnp.zeros((self.hidden_size,), b.dtype) if self.reset == "after" else None
        return GRUParams(w_ih, w_hh, b, b_hn)

    def gate_step(self, carry, xp, mm, b_hn=None, h_tile=None):
        sig_r, sig_u, tanh_n = self.gate_activations
        h_prev = carry.h if h_tile is None else h_tile
        xr, xu, xn = xp
        if self.reset == "after":
            hr, hu, hn = mm(carry.h, 0)
            m = hn if b_hn is None else hn + expand_bias(b_hn, hn)
            r, u = sig_r.value(xr + hr), sig_u.value(xu + hu)
            n = tanh_n.value(xn + r * m)
            acts = (r, u, n, m)
        else:
            if h_tile is not None:
                raise ValueError(
                    "h_tile: a GRU with reset='before' cannot be computed in column tiles "
                    "(its candidate's matmul reads r ⊙ h_{t-1} for every unit)"
                )
            hr, hu = mm(carry.h, 0)
            r, u = sig_r.value(xr + hr), sig_u.value(xu + hu)
            (hn,) = mm(r * h_prev, 1)
            n = tanh_n.value(xn + hn)
            acts = (r, u, n)
        h = h_prev + u * (n - h_prev)  # = (1 - u) ⊙ h_prev + u ⊙ n
        return Carry(h), h, acts

    def tanh_sites(self, params, carry, xp):
        _, _, acts = self.step_activations(params, carry, xp)
        return {"n": acts[2]}


CELL_TYPES = (Elman, LSTM, GRU)


# An initialisation runs once per model, so what its user waits for is the compilation: without LLVM's
# optimisations (XLA's own passes still run) it compiles in about half the time (measured on 2 cores, an
# LSTM(128) on 16 inputs and four other cells: 0.63-0.91 s against 1.21-1.85 s). The parameters are the same
# draws; the last bits of the normal samples' arithmetic may differ from an optimised build's.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _init_params(cell, key, input_size, dtype):
    """``cell._init_params``, as one program (eager QR is slow)."""
    return cell._init_params(key, input_size, dtype)


# Compiled once per configuration; under an outer transformation (where compiler options cannot be set), traced.
_init = jax.jit(_init_params, static_argnums=(0, 2, 3), compiler_options=_INIT_COMPILER_OPTIONS)
_init_traced = jax.jit(_init_params, static_argnums=(0, 2, 3))


def check_cell(cell, name="cell"):
    """Raise ``TypeError`` unless ``cell`` is one of jaxrnn's cells."""
    if not isinstance(cell, Cell):
        raise TypeError(f"{name}: expected a jaxrnn cell (Elman, LSTM or GRU), got {type(cell).__name__}")



def check_params(cell, params, name="params"):
    """Check ``params`` has ``cell``'s structure and consistent shapes; return the input size ``I``.

    Raises:
      TypeError: ``params`` is not the cell's parameter NamedTuple.
      ValueError: a leaf has the wrong shape (the message names it, e.g.
        ``params.w_hh``, with the expected and actual shapes).
    """
    fields = ("w_ih", "w_hh", "b")
    if not isinstance(params, tuple) or not all(hasattr(params, f) for f in fields):
        raise TypeError(
            f"{name}: expected the parameter NamedTuple of {type(cell).__name__} "
            f"(fields {fields}), got {type(params).__name__}"
        )
    H, G = cell.hidden_size, cell.gate_size
    w_ih, w_hh, b = (shape_of(getattr(params, f)) for f in fields)
    if len(w_ih) != 2 or w_ih[1] != G:
        raise ValueError(f"{name}.w_ih: expected shape (input_size, {G}) for {cell}, got {w_ih}")
    if w_hh != (H, G):
        raise ValueError(f"{name}.w_hh: expected shape {(H, G)} for {cell}, got {w_hh}")
    if b != (G,):
        raise ValueError(f"{name}.b: expected shape {(G,)} for {cell}, got {b}")
    b_hn = getattr(params, "b_hn", None)
    if getattr(cell, "reset", None) == "after" and (b_hn is None or shape_of(b_hn) != (H,)):
        got = None if b_hn is None else shape_of(b_hn)
        raise ValueError(f"{name}.b_hn: expected shape {(H,)} for reset='after', got {got}")
    if getattr(cell, "reset", None) == "before" and b_hn is not None:
        raise ValueError(f"{name}.b_hn: expected None for reset='before', got shape {shape_of(b_hn)}")
    for field in params._fields:
        leaf = getattr(params, field)
        dtype = getattr(leaf, "dtype", None)
        if leaf is not None and (dtype is None or not jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(f"{name}.{field}: expected a floating-point array, got {type(leaf).__name__} of dtype {dtype}")
    return w_ih[0]


def check_carry(cell, carry, batch_shape, name="initial_carry"):
    """Check a carry's type and leaf shapes ``(*batch_shape, H)``."""
    ctype = cell.carry_type
    if not isinstance(carry, tuple) or tuple(getattr(carry, "_fields", ())) != ctype._fields:
        raise TypeError(
            f"{name}: expected {ctype.__name__}{ctype._fields} for {type(cell).__name__}, "
            f"got {type(carry).__name__}"
        )
    want = (*batch_shape, cell.hidden_size)
    for field, leaf in zip(ctype._fields, carry):
        if shape_of(leaf) != want:
            raise ValueError(f"{name}.{field}: expected shape {want}, got {shape_of(leaf)}")
