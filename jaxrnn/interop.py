r"""Load PyTorch and flax linen recurrent weights into jaxrnn.

Conventions that differ between the libraries, and how they are mapped:

* **Weight layout.** PyTorch stores ``weight_ih_l{k}`` as ``(G, I)`` and
  computes ``x @ W.T``; flax stores one ``(I, H)`` kernel per gate. jaxrnn
  stores one ``(I, G)`` kernel, gates stacked along the last axis.
* **LSTM.** PyTorch's gate order ``i, f, g, o`` is jaxrnn's; flax names the
  same gates ``ii, if, ig, io`` / ``hi, hf, hg, ho``. PyTorch's two biases are
  summed: ``b = b_ih + b_hh``.
* **GRU update gate.** PyTorch and flax interpolate with
  ``h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}``; jaxrnn's update gate is
  ``u = 1 - z``, ``h_t = (1 - u) ⊙ h_{t-1} + u ⊙ n``. Since
  ``σ(-a) = 1 - σ(a)``, negating every parameter feeding ``z`` (its columns of
  ``w_ih`` and ``w_hh`` and its bias) turns ``z`` into ``u`` exactly. Both
  libraries apply the reset gate after the recurrent matmul, so the cell is
  ``GRU(H, reset="after")`` with ``b_hn = b_hh_n`` and
  ``b = b_ih + [b_hh_r, b_hh_z, 0]`` (z part negated).
* **Carries.** PyTorch's ``h_0``/``h_n`` are ``(num_layers * num_directions,
  *batch, H)`` (layer-major, forward before backward): see
  :func:`carry_from_torch` and :func:`carry_to_torch`. flax's LSTM carry is
  ``(c, h)``, jaxrnn's :class:`~jaxrnn.LSTMCarry` is ``(h, c)``: see
  :func:`carry_from_flax` and :func:`carry_to_flax`.
* **Layout.** jaxrnn is batch-major by default, PyTorch time-major by
  default: run a converted module with ``time_major=not module.batch_first``.

Example:
  >>> lstm = torch.nn.LSTM(16, 32, num_layers=2, bidirectional=True)
  >>> stack, params = from_torch(lstm)
  >>> ys, finals = stack.apply(params, xs, time_major=not lstm.batch_first)
  >>> h_n, c_n = carry_to_torch(stack, finals)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.cells import GRU, LSTM, Carry, Elman, ElmanParams, GRUParams, LSTMCarry, LSTMParams
from jaxrnn.stack import LayerParams, Stack

__all__ = [
    "carry_from_flax",
    "carry_from_torch",
    "carry_to_flax",
    "carry_to_torch",
    "from_flax",
    "from_torch",
    "gru_params_from_interpolating",
]


# --------------------------------------------------------------------------
# Shared: the GRU update-gate convention
# --------------------------------------------------------------------------
def _negate_update_gate(a: np.ndarray, hidden_size: int) -> np.ndarray:
    """Negate the ``z`` block (``[H, 2H)`` of the last axis) of an ``r, z, n`` stack."""
    H = hidden_size
    return np.concatenate([a[..., :H], -a[..., H : 2 * H], a[..., 2 * H :]], axis=-1)


def gru_params_from_interpolating(w_ih, w_hh, b, b_hn) -> GRUParams:
    r"""jaxrnn GRU parameters from a GRU that interpolates with ``z`` (PyTorch, flax).

    The source computes, gates stacked ``r, z, n`` (jaxrnn layout):

    .. math::
        r &= \sigma(x W^{ih}_r + h W^{hh}_r + b_r),\quad
        z = \sigma(x W^{ih}_z + h W^{hh}_z + b_z) \\
        n &= \tanh(x W^{ih}_n + b_n + r \odot (h W^{hh}_n + b_{hn})),\quad
        h' = (1 - z) \odot n + z \odot h

    jaxrnn's update gate is :math:`u = 1 - z = \sigma(-(\cdot))`, so the ``z``
    columns of both kernels and the ``z`` bias are negated. The result is for
    ``GRU(H, reset="after")``.

    Args:
      w_ih: ``(I, 3H)`` input kernel.
      w_hh: ``(H, 3H)`` recurrent kernel.
      b: ``(3H,)`` bias of the input part (``r`` and ``z`` entries include any
        recurrent bias).
      b_hn: ``(H,)`` recurrent bias of the candidate (inside ``r ⊙ (·)``).

    Returns:
      :class:`~jaxrnn.GRUParams` with ``b_hn`` set.
    """
    H = np.shape(b_hn)[-1]
    return GRUParams(
        w_ih=jnp.asarray(_negate_update_gate(np.asarray(w_ih), H)),
        w_hh=jnp.asarray(_negate_update_gate(np.asarray(w_hh), H)),
        b=jnp.asarray(_negate_update_gate(np.asarray(b), H)),
        b_hn=jnp.asarray(b_hn),
    )


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------
_TORCH_MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")


def _import_torch(obj, name):
    try:
        import torch  # noqa: PLC0415  (optional dependency)
    except ImportError as e:  # without torch, obj cannot be a torch module
        raise TypeError(
            f"{name}: expected a torch.nn.RNN, LSTM or GRU (PyTorch is not installed), "
            f"got {type(obj).__name__}"
        ) from e
    return torch


def _to_numpy(t) -> np.ndarray:
    """A torch tensor (or array-like) as a NumPy array of the same dtype."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; ml_dtypes (via jnp) does
            return t.float().numpy().astype(jnp.bfloat16)
        return t.numpy()
    return np.asarray(t)


def _torch_cell(module):
    H = module.hidden_size
    if module.mode == "LSTM":
        return LSTM(H)
    if module.mode == "GRU":
        return GRU(H, reset="after")
    return Elman(H, activation="tanh" if module.mode == "RNN_TANH" else "relu")


def _torch_direction(module, cell, layer: int, suffix: str):
    """Parameters of one layer and direction (``suffix`` ``""`` or ``"_reverse"``)."""
    name = f"l{layer}{suffix}"
    w_ih = _to_numpy(getattr(module, f"weight_ih_{name}")).T
    w_hh = _to_numpy(getattr(module, f"weight_hh_{name}")).T
    G = w_ih.shape[1]
    if module.bias:
        b_ih = _to_numpy(getattr(module, f"bias_ih_{name}"))
        b_hh = _to_numpy(getattr(module, f"bias_hh_{name}"))
    else:  # jaxrnn cells always have a bias: zeros compute the same function
        b_ih = b_hh = np.zeros((G,), w_ih.dtype)
    if isinstance(cell, GRU):
        H = cell.hidden_size
        b = b_ih + np.concatenate([b_hh[: 2 * H], np.zeros((H,), b_hh.dtype)])
        return gru_params_from_interpolating(w_ih, w_hh, b, b_hh[2 * H :])
    make = LSTMParams if isinstance(cell, LSTM) else ElmanParams
    return make(jnp.asarray(w_ih), jnp.asarray(w_hh), jnp.asarray(b_ih + b_hh))


def from_torch(module) -> tuple[Stack, tuple[LayerParams, ...]]:
    """Convert a PyTorch ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` into a jaxrnn stack.

    Every ``num_layers``/``bidirectional``/``bias`` configuration is
    supported; ``nn.RNN`` maps to :class:`~jaxrnn.Elman` (``tanh`` or
    ``relu``), ``nn.LSTM`` to :class:`~jaxrnn.LSTM` (biases summed) and
    ``nn.GRU`` to ``GRU(reset="after")`` with the update gate negated (see the
    module docstring). ``bias=False`` gives zero biases (trainable in
    jaxrnn; mask their updates to keep them at zero). The module's
    ``dropout`` becomes the stack's between-layer dropout (applied only when
    :meth:`Stack.apply` gets a ``dropout_key``, i.e. the converted model is in
    eval mode by default).

    The module's layout is **not** part of the result: run the stack with
    ``time_major=not module.batch_first`` (PyTorch is time-major by default,
    jaxrnn batch-major). Initial and final states convert with
    :func:`carry_from_torch` and :func:`carry_to_torch`.

    Args:
      module: a ``torch.nn.RNN``, ``torch.nn.LSTM`` or ``torch.nn.GRU``
        (``proj_size=0``). Its parameters are copied (dtype kept).

    Returns:
      ``(stack, params)``: a :class:`~jaxrnn.Stack` (also for one layer) and a
      tuple of ``num_layers`` :class:`~jaxrnn.LayerParams`, with kernels
      ``w_ih`` ``(I_k, G)`` (``weight_ih_l{k}`` transposed) and ``w_hh``
      ``(H, G)``.

    Raises:
      TypeError: ``module`` is not one of those modules (e.g. ``nn.LSTMCell``).
      ValueError: an LSTM with ``proj_size > 0``.

    Example:
      >>> gru = torch.nn.GRU(8, 16, num_layers=2, batch_first=True)
      >>> stack, params = from_torch(gru)
      >>> ys, finals = stack.apply(params, jnp.ones((4, 10, 8)), time_major=not gru.batch_first)
    """
    torch = _import_torch(module, "module")
    expected = "module: expected a torch.nn.RNN, LSTM or GRU"
    if isinstance(module, torch.nn.RNNCellBase):
        raise TypeError(f"{expected}, got {type(module).__name__} (single cells are not supported)")
    if not isinstance(module, torch.nn.RNNBase) or getattr(module, "mode", None) not in _TORCH_MODES:
        raise TypeError(f"{expected}, got {type(module).__name__}")
    if getattr(module, "proj_size", 0):
        raise ValueError(
            f"module: LSTM projections are not supported (expected proj_size=0, got {module.proj_size})"
        )
    devices = {p.device.type for p in module.parameters()}
    if "meta" in devices:
        raise ValueError(
            "module: its parameters are on the 'meta' device (no values to copy); "
            "materialise them first, e.g. module.to_empty(device='cpu') and load a state dict"
        )
    cell = _torch_cell(module)
    stack = Stack(
        cell, num_layers=module.num_layers, bidirectional=module.bidirectional, dropout=float(module.dropout)
    )
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    layers = []
    for layer in range(module.num_layers):
        directions = [_torch_direction(module, cell, layer, s) for s in suffixes]
        layers.append(LayerParams(*directions))
    return stack, tuple(layers)


def _num_directions(stack: Stack) -> int:
    return 2 if stack.bidirectional else 1


def carry_from_torch(stack: Stack, h0, c0=None):
    """PyTorch's initial state ``h_0`` (and ``c_0``) as a :meth:`Stack.apply` ``initial_carry``.

    Args:
      stack: the stack from :func:`from_torch`.
      h0: ``(num_layers * num_directions, *batch, H)`` torch tensor or array;
        entry ``layer * num_directions + direction`` (direction 0 forward, 1
        backward), as in PyTorch.
      c0: the LSTM cell state, same shape; required for LSTM, else ``None``.

    Returns:
      A tuple of ``num_layers`` carries (``(forward, backward)`` pairs when
      bidirectional).

    Example:
      >>> ys, finals = stack.apply(params, xs, initial_carry=carry_from_torch(stack, h0, c0))
    """
    is_lstm = isinstance(stack.cell, LSTM)
    if is_lstm != (c0 is not None):
        want = "the LSTM cell state c0" if is_lstm else "None (only LSTMs have a cell state)"
        raise ValueError(f"c0: expected {want}, got {'None' if c0 is None else 'an array'}")
    D, H = _num_directions(stack), stack.cell.hidden_size
    states = [jnp.asarray(_to_numpy(s)) for s in ((h0, c0) if is_lstm else (h0,))]
    for name, s in zip(("h0", "c0"), states):
        if s.ndim < 2 or s.shape[0] != stack.num_layers * D or s.shape[-1] != H:
            raise ValueError(
                f"{name}: expected shape ({stack.num_layers * D}, *batch, {H}) "
                f"(num_layers * num_directions, *batch, hidden_size), got {tuple(s.shape)}"
            )
    if is_lstm and states[0].shape != states[1].shape:
        raise ValueError(f"c0: expected the shape of h0 {tuple(states[0].shape)}, got {tuple(states[1].shape)}")

    def carry(index):
        return LSTMCarry(states[0][index], states[1][index]) if is_lstm else Carry(states[0][index])

    layers = []
    for layer in range(stack.num_layers):
        dirs = tuple(carry(layer * D + d) for d in range(D))
        layers.append(dirs if stack.bidirectional else dirs[0])
    return tuple(layers)


def carry_to_torch(stack: Stack, carries):
    """:meth:`Stack.apply`'s final carries in PyTorch's layout.

    Args:
      stack: the stack that produced ``carries``.
      carries: a tuple of ``num_layers`` carries (``(forward, backward)``
        pairs when bidirectional), leaves ``(*batch, H)``.

    Returns:
      ``h_n`` of shape ``(num_layers * num_directions, *batch, H)``, or
      ``(h_n, c_n)`` for an LSTM (PyTorch's output structure).

    Example:
      >>> ys, finals = stack.apply(params, xs)
      >>> h_n, c_n = carry_to_torch(stack, finals)
    """
    ctype = stack.cell.carry_type
    is_carry = lambda c: tuple(getattr(c, "_fields", ())) == ctype._fields  # noqa: E731
    if is_carry(carries) or not isinstance(carries, (tuple, list)) or len(carries) != stack.num_layers:
        raise TypeError(
            f"carries: expected a tuple of {stack.num_layers} per-layer carries, got {type(carries).__name__}"
        )
    flat = [c for layer in carries for c in (layer if stack.bidirectional else (layer,))]
    if len(flat) != stack.num_layers * _num_directions(stack) or not all(map(is_carry, flat)):
        want = f"(forward, backward) pairs of {ctype.__name__}" if stack.bidirectional else ctype.__name__
        raise TypeError(f"carries: expected one {want} per layer, got {[type(c).__name__ for c in carries]}")
    h = jnp.stack([c.h for c in flat])
    if isinstance(stack.cell, LSTM):
        return h, jnp.stack([c.c for c in flat])
    return h


# --------------------------------------------------------------------------
# flax linen
# --------------------------------------------------------------------------
def _param(tree: Mapping, path: tuple, shape: tuple, module_name: str) -> np.ndarray:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            where = "".join(f"[{k!r}]" for k in path)
            raise ValueError(f"variables: no parameter {where} for {module_name}")
        node = node[key]
    value = np.asarray(node)
    if value.shape != shape:
        where = "".join(f"[{k!r}]" for k in path)
        raise ValueError(f"variables{where}: expected shape {shape} for {module_name}, got {value.shape}")
    return value


def _check_fn(module, attr, expected, what):
    fn = getattr(module, attr)
    if fn is not expected:
        raise ValueError(
            f"module.{attr}: jaxrnn's {what} uses {expected.__name__}, got "
            f"{getattr(fn, '__name__', fn)!r}; cells with other nonlinearities cannot be converted"
        )


def from_flax(module, variables: Mapping[str, Any]):
    r"""Convert a flax linen recurrent cell and its variables into a jaxrnn cell.

    Supported cells (flax 0.12):

    * ``LSTMCell`` / ``OptimizedLSTMCell`` → :class:`~jaxrnn.LSTM`: kernels
      ``i{i,f,g,o}`` and ``h{i,f,g,o}`` stacked, ``b`` from the ``h*`` biases.
    * ``GRUCell`` → ``GRU(H, reset="after")``: kernels ``i{r,z,n}`` and
      ``h{r,z,n}``, ``b`` from the ``i*`` biases, ``b_hn`` the ``hn`` bias,
      update gate negated (flax's ``h' = (1 - z) ⊙ n + z ⊙ h``; see the
      module docstring).
    * ``SimpleCell`` → :class:`~jaxrnn.Elman` (``tanh`` or ``relu``). Its
      ``residual=True`` form :math:`\phi(x W_i + b + h W_h + h)` is
      :math:`\phi(x W_i + b + h (W_h + I))`: the identity is folded into
      ``w_hh``.

    flax's ``dtype`` (computation dtype) becomes the cell's ``compute_dtype``;
    jaxrnn keeps gate nonlinearities in float32, so low-precision results are
    close to, not bitwise equal to, flax's. ``carry_init`` is not converted:
    pass carries explicitly (:func:`carry_from_flax`).

    Args:
      module: the flax cell (an unbound ``flax.linen`` module).
      variables: its variables, ``{"params": {...}}`` as returned by
        ``module.init``, or the ``params`` dict itself. Kernels ``(I, H)`` or
        ``(H, H)``, biases ``(H,)``.

    Returns:
      ``(cell, params)`` for :func:`jaxrnn.rnn` and ``cell.step``.

    Raises:
      TypeError: an unsupported module (e.g. ``MGUCell``, ``ConvLSTMCell``,
        ``nn.RNN``: pass its ``.cell`` and ``variables["params"]["cell"]``).
      ValueError: a non-default ``gate_fn``/``activation_fn`` jaxrnn cannot
        represent, or missing or mis-shaped parameters.

    Example:
      >>> flax_cell = flax.linen.LSTMCell(32)
      >>> variables = flax_cell.init(key, flax_cell.initialize_carry(key, (4, 8)), jnp.ones((4, 8)))
      >>> cell, params = from_flax(flax_cell, variables)
      >>> ys, carry = jaxrnn.rnn(cell, params, xs)
    """
    from flax import linen as nn  # noqa: PLC0415  (keeps `import jaxrnn` light)

    supported = (nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.SimpleCell)
    if not isinstance(module, supported):
        raise TypeError(
            "module: expected a flax.linen LSTMCell, OptimizedLSTMCell, GRUCell or SimpleCell, "
            f"got {type(module).__name__}"
        )
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables: expected a mapping of parameters, got {type(variables).__name__}")
    tree = variables["params"] if "params" in variables else variables
    H, name = module.features, type(module).__name__
    first = "i" if isinstance(module, nn.SimpleCell) else ("ir" if isinstance(module, nn.GRUCell) else "ii")
    kernel = tree.get(first, {}).get("kernel") if isinstance(tree, Mapping) else None
    if kernel is None or np.ndim(kernel) != 2:
        raise ValueError(f"variables: expected params[{first!r}]['kernel'] of shape (input_size, {H}) for {name}")
    I = np.shape(kernel)[0]

    def get(path, shape):
        return _param(tree, path, shape, name)

    def stacked(prefix, gates, rows):
        return np.concatenate([get((prefix + g, "kernel"), (rows, H)) for g in gates], axis=-1)

    def biases(prefix, gates):
        return np.concatenate([get((prefix + g, "bias"), (H,)) for g in gates])

    if isinstance(module, (nn.LSTMCell, nn.OptimizedLSTMCell)):
        _check_fn(module, "gate_fn", jax.nn.sigmoid, "LSTM")
        _check_fn(module, "activation_fn", jnp.tanh, "LSTM")
        params = LSTMParams(*map(jnp.asarray, (stacked("i", "ifgo", I), stacked("h", "ifgo", H), biases("h", "ifgo"))))
        return LSTM(H, compute_dtype=module.dtype), params
    if isinstance(module, nn.GRUCell):
        _check_fn(module, "gate_fn", jax.nn.sigmoid, "GRU")
        _check_fn(module, "activation_fn", jnp.tanh, "GRU")
        params = gru_params_from_interpolating(
            stacked("i", "rzn", I), stacked("h", "rzn", H), biases("i", "rzn"), get(("hn", "bias"), (H,))
        )
        return GRU(H, reset="after", compute_dtype=module.dtype), params
    # SimpleCell
    activations = {jnp.tanh: "tanh", jax.nn.relu: "relu"}
    fn = module.activation_fn
    if fn not in activations:
        raise ValueError(
            f"module.activation_fn: jaxrnn's Elman supports tanh and relu, got {getattr(fn, '__name__', fn)!r}"
        )
    w_hh = get(("h", "kernel"), (H, H))
    if module.residual:
        w_hh = w_hh + np.eye(H, dtype=w_hh.dtype)
    params = ElmanParams(*map(jnp.asarray, (get(("i", "kernel"), (I, H)), w_hh, get(("i", "bias"), (H,)))))
    return Elman(H, activation=activations[fn], compute_dtype=module.dtype), params


def carry_from_flax(cell, carry):
    """A flax cell carry as a jaxrnn carry.

    Args:
      cell: the jaxrnn cell from :func:`from_flax`.
      carry: flax's carry: ``(c, h)`` for an LSTM, ``h`` otherwise; leaves
        ``(*batch, H)``.

    Returns:
      :class:`~jaxrnn.LSTMCarry` ``(h, c)`` or :class:`~jaxrnn.Carry` ``(h,)``.
    """
    if isinstance(cell, LSTM):
        if not isinstance(carry, (tuple, list)) or len(carry) != 2:
            raise TypeError(f"carry: expected flax's LSTM carry (c, h), got {type(carry).__name__}")
        c, h = carry
        return LSTMCarry(h=jnp.asarray(h), c=jnp.asarray(c))
    if isinstance(carry, (tuple, list)):
        raise TypeError(
            f"carry: expected flax's single-array carry h for {type(cell).__name__}, got {type(carry).__name__}"
        )
    return Carry(jnp.asarray(carry))


def carry_to_flax(carry):
    """A jaxrnn carry in flax's structure.

    Args:
      carry: :class:`~jaxrnn.LSTMCarry` or :class:`~jaxrnn.Carry`, leaves ``(*batch, H)``.

    Returns:
      ``(c, h)`` for an LSTM carry, ``h`` otherwise.
    """
    if isinstance(carry, LSTMCarry):
        return carry.c, carry.h
    if isinstance(carry, Carry):
        return carry.h
    raise TypeError(f"carry: expected a jaxrnn LSTMCarry or Carry, got {type(carry).__name__}")

