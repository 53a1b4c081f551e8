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
* **flax modules.** :func:`from_flax` takes cells, ``nn.RNN`` and
  ``nn.Bidirectional``; :func:`to_flax` is its inverse. flax's bidirectional
  layer reverses each padded sequence's valid part correctly
  (``flip_sequences`` with ``seq_lengths``), so its outputs equal jaxrnn's at
  valid positions; flax does not zero the outputs at padded positions, jaxrnn
  does.
* **Layout.** jaxrnn is batch-major by default, PyTorch time-major by
  default: run a converted module with ``time_major=not module.batch_first``.

Example:
  >>> lstm = torch.nn.LSTM(16, 32, num_layers=2, bidirectional=True)
  >>> stack, params = from_torch(lstm)
  >>> ys, finals = stack.apply(params, xs, time_major=not lstm.batch_first)
  >>> h_n, c_n = carry_to_torch(stack, finals)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.cells import GRU, LSTM, Carry, Cell, Elman, ElmanParams, GRUParams, LSTMCarry, LSTMParams, check_params
from jaxrnn.stack import LayerParams, Stack

__all__ = [
    "carry_from_flax",
    "carry_from_torch",
    "carry_to_flax",
    "carry_to_torch",
    "from_flax",
    "from_torch",
    "gru_params_from_interpolating",
    "to_flax",
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
_FLAX_CELLS = "a flax.linen LSTMCell, OptimizedLSTMCell, GRUCell or SimpleCell"
#: The gate names of flax's LSTM and GRU cells, in jaxrnn's stacking order.
_LSTM_GATES, _GRU_GATES = "ifgo", "rzn"


def _where(path: tuple) -> str:
    """``params['a']['b']``: where a subtree sits in the variables."""
    return "params" + "".join(f"[{k!r}]" for k in path)


def _found(node) -> str:
    if isinstance(node, Mapping):
        return f"found keys {sorted(map(str, node))}"
    return f"found {type(node).__name__}"


def _param(tree: Mapping, path: tuple, shape: tuple, module_name: str, at: tuple = ()) -> np.ndarray:
    node = tree
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "".join(f"[{k!r}]" for k in path)
            raise ValueError(
                f"variables: no parameter {where} for {module_name} at {_where(at)} "
                f"({_found(node)} at {_where(at + path[:depth])})"
            )
        node = node[key]
    value = np.asarray(node)
    if value.shape != shape:
        where = "".join(f"[{k!r}]" for k in at + path)
        raise ValueError(f"variables{where}: expected shape {shape} for {module_name}, got {value.shape}")
    return value


def _check_fn(module, attr, expected, what):
    fn = getattr(module, attr)
    if fn is not expected:
        raise ValueError(
            f"module.{attr}: jaxrnn's {what} uses {expected.__name__}, got "
            f"{getattr(fn, '__name__', fn)!r}; cells with other nonlinearities cannot be converted"
        )


def _first_kernel(module, nn) -> str:
    """The name of the flax cell's first input kernel (present in every one of its parameter trees)."""
    return "i" if isinstance(module, nn.SimpleCell) else ("ir" if isinstance(module, nn.GRUCell) else "ii")


def _numbered(node: Mapping, class_name: str) -> list:
    """Keys ``{class_name}_0, _1, ...`` (flax's automatic names in a compact parent), in index order."""
    pattern = re.compile(rf"^{re.escape(class_name)}_(\d+)$")
    keys = [k for k in node if isinstance(k, str) and pattern.match(k)]
    return sorted(keys, key=lambda k: int(pattern.match(k).group(1)))


def _find_cell(node, cell, path: tuple, nn) -> tuple:
    """``(cell_tree, path)``: a cell's parameters at ``node``, under ``['cell']``, under a
    ``{Class}_N`` key, or below a chain of single-key mappings."""
    first = _first_kernel(cell, nn)
    name = type(cell).__name__
    while isinstance(node, Mapping):
        if first in node:
            return node, path
        if "cell" in node:
            node, path = node["cell"], path + ("cell",)
            continue
        named = _numbered(node, name)
        if len(named) == 1:
            node, path = node[named[0]], path + (named[0],)
            continue
        if len(node) == 1:
            key = next(iter(node))
            node, path = node[key], path + (key,)
            continue
        break
    raise ValueError(
        f"variables: expected {_where(path + (first, 'kernel'))} for {name} (its parameters at "
        f"{_where(path)}, or under {_where(path + ('cell',))} or {_where(path + (name + '_0',))}); "
        f"{_found(node)} at {_where(path)}"
    )


def _flax_cell_params(module, tree: Mapping, path: tuple, nn):
    """``(jaxrnn_cell, params)`` from a flax cell and its own parameter dict at ``path``."""
    H, name = module.features, type(module).__name__
    first = _first_kernel(module, nn)
    kernel = tree.get(first, {}).get("kernel") if isinstance(tree.get(first), Mapping) else None
    if kernel is None or np.ndim(kernel) != 2:
        raise ValueError(
            f"variables: expected {_where(path + (first, 'kernel'))} of shape (input_size, {H}) for {name}; "
            f"{_found(tree.get(first, tree))} at {_where(path + ((first,) if first in tree else ()))}"
        )
    I = np.shape(kernel)[0]

    def get(p, shape):
        return _param(tree, p, shape, name, path)

    def stacked(prefix, gates, rows):
        return np.concatenate([get((prefix + g, "kernel"), (rows, H)) for g in gates], axis=-1)

    def biases(prefix, gates):
        return np.concatenate([get((prefix + g, "bias"), (H,)) for g in gates])

    if isinstance(module, (nn.LSTMCell, nn.OptimizedLSTMCell)):
        _check_fn(module, "gate_fn", jax.nn.sigmoid, "LSTM")
        _check_fn(module, "activation_fn", jnp.tanh, "LSTM")
        params = LSTMParams(
            *map(jnp.asarray, (stacked("i", _LSTM_GATES, I), stacked("h", _LSTM_GATES, H), biases("h", _LSTM_GATES)))
        )
        return LSTM(H, compute_dtype=module.dtype), params
    if isinstance(module, nn.GRUCell):
        _check_fn(module, "gate_fn", jax.nn.sigmoid, "GRU")
        _check_fn(module, "activation_fn", jnp.tanh, "GRU")
        params = gru_params_from_interpolating(
            stacked("i", _GRU_GATES, I), stacked("h", _GRU_GATES, H), biases("i", _GRU_GATES), get(("hn", "bias"), (H,))
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


def _flax_layers(module, nn, linen, name="module"):
    """The layers of a supported flax module: a list of per-layer lists of ``(flax_cell, path)``.

    ``path`` is where the cell's parameters sit in the module's own variables
    (``('forward_rnn', 'cell')``); ``None`` for a bare cell.
    """
    cells = (nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.SimpleCell)
    expected = f"{name}: expected {_FLAX_CELLS}, nn.RNN, nn.Bidirectional or jaxrnn.linen.RNNSequence"

    def check_cell(cell, where):
        if not isinstance(cell, cells):
            raise TypeError(f"{where}: expected {_FLAX_CELLS}, got {type(cell).__name__}")
        return cell

    def rnn_cell(rnn, where):
        if not isinstance(rnn, nn.RNN):
            raise TypeError(f"{where}: expected a flax.linen.RNN, got {type(rnn).__name__}")
        return check_cell(rnn.cell, f"{where}.cell")

    def layer(m, where, prefix):
        if isinstance(m, nn.RNN):
            if m.reverse:
                raise ValueError(
                    f"{where}.reverse: expected False (a backward-only layer has no Stack equivalent; "
                    "use nn.Bidirectional), got True"
                )
            return [(rnn_cell(m, where), prefix + ("cell",))]
        if isinstance(m, nn.Bidirectional):
            merged = np.asarray(m.merge_fn(jnp.zeros((1, 1)), jnp.ones((1, 1))))
            if merged.shape != (1, 2) or not np.array_equal(merged, [[0.0, 1.0]]):
                raise ValueError(f"{where}.merge_fn: expected concatenation [forward, backward] (the default)")
            fwd = rnn_cell(m.forward_rnn, f"{where}.forward_rnn")
            bwd = rnn_cell(m.backward_rnn, f"{where}.backward_rnn")
            return [(fwd, prefix + ("forward_rnn", "cell")), (bwd, prefix + ("backward_rnn", "cell"))]
        raise TypeError(f"{where}: expected nn.RNN or nn.Bidirectional, got {type(m).__name__}")

    if isinstance(module, cells):
        return [[(module, None)]]
    if isinstance(module, (nn.RNN, nn.Bidirectional)):
        return [layer(module, name, ())]
    if isinstance(module, linen.RNNSequence):
        if not module.layers:
            raise ValueError(f"{name}.layers: expected at least one layer, got none")
        layers = [layer(m, f"{name}.layers[{k}]", (f"layers_{k}",)) for k, m in enumerate(module.layers)]
        for k, cells_k in enumerate(layers[1:], 1):
            if len(cells_k) != len(layers[0]):
                raise ValueError(
                    f"{name}.layers[{k}]: expected the direction of layer 0 (one jaxrnn.Stack): "
                    f"{len(layers[0])} RNN(s), got {len(cells_k)}"
                )
        return layers
    raise TypeError(f"{expected}, got {type(module).__name__}")


def _child(node: Mapping, key: str):
    """``key``, or for ``forward_rnn``/``backward_rnn`` the one ``forward*``/``backward*`` key
    (a hand-written bidirectional module's ``forward_lstm``); ``None`` if neither is there."""
    if key in node:
        return key
    if key in ("forward_rnn", "backward_rnn"):
        alike = [k for k in node if isinstance(k, str) and k.startswith(key.split("_")[0])]
        return alike[0] if len(alike) == 1 else None
    return None


def _locate(tree, path: tuple, cell, at: tuple, nn):
    """The cell's parameter dict at ``path`` below ``tree`` (itself at ``at``), allowing flax's naming variants."""
    node = tree
    for key in path[:-1]:  # the last key ('cell') is handled by _find_cell
        found = _child(node, key) if isinstance(node, Mapping) else None
        if found is None:
            raise ValueError(
                f"variables: expected {_where(at + (key,))} for {type(cell).__name__} "
                f"(its parameters at {_where(at + path)}); {_found(node)} at {_where(at)}"
            )
        node, at = node[found], at + (found,)
    return _find_cell(node, cell, at, nn)


def _unwrap(tree, layers, cell_name: str):
    """``(subtree, path)``: ``tree`` below any chain of single-key mappings that hold none of
    the keys ``layers`` expects (e.g. a parent's ``{'encoder': {...}}``)."""
    heads = {path[0] for layer in layers for _, path in layer}
    at = ()
    while isinstance(tree, Mapping) and len(tree) == 1:
        key = next(iter(tree))
        if any(_child(tree, h) is not None for h in heads) or _numbered(tree, cell_name):
            break
        tree, at = tree[key], at + (key,)
    return tree, at


def from_flax(module, variables: Mapping[str, Any]):
    r"""Convert a flax linen recurrent cell, ``nn.RNN`` or ``nn.Bidirectional`` and its variables.

    Supported modules (flax 0.12):

    * a cell → ``(cell, params)`` for :func:`jaxrnn.rnn`:

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

    * ``nn.RNN(cell)`` → ``(Stack(cell), params)``, one unidirectional layer;
    * ``nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))`` (concatenating merge,
      the default) → ``(Stack(cell, bidirectional=True), params)``;
    * :class:`jaxrnn.linen.RNNSequence` of such layers → a multi-layer stack.

    The parameter values are copied exactly: a converted LSTM keeps flax's
    biases (flax initialises the forget-gate bias to 0). Re-initialising the
    converted cell (``cell.init``) uses jaxrnn's defaults instead, e.g. an
    LSTM forget bias of 1 (``LSTM(H, forget_bias=0.0)`` reproduces flax's).
    flax's ``dtype`` (computation dtype) becomes the cell's ``compute_dtype``;
    jaxrnn keeps gate nonlinearities in float32, so low-precision results are
    close to, not bitwise equal to, flax's. ``carry_init`` is not converted:
    pass carries explicitly (:func:`carry_from_flax`). The layout is not part
    of the result: run the stack with ``time_major=module.time_major``.

    ``variables`` may be what ``module.init`` returns, the ``params`` dict, or
    the module's variables as they appear inside a parent module's params:

    * under an attribute name (``params['encoder']``, then ``['cell']``,
      ``['forward_rnn']``/``['backward_rnn']``; a hand-written bidirectional
      module's ``forward_*``/``backward_*`` children are accepted too);
    * under flax's automatic names in a ``@nn.compact`` parent, where the
      cells are registered directly: ``{'OptimizedLSTMCell_0': ...,
      'OptimizedLSTMCell_1': ...}`` (forward first, as constructed), also as
      lifted by ``nn.scan`` inside a wrapper module.

    Args:
      module: the flax module (unbound): a cell, ``nn.RNN``, ``nn.Bidirectional``
        or :class:`jaxrnn.linen.RNNSequence`.
      variables: its variables (see above). Kernels ``(I, H)`` or ``(H, H)``,
        biases ``(H,)``.

    Returns:
      ``(cell, params)`` for a cell; ``(stack, params)`` otherwise, ``params``
      a tuple of :class:`~jaxrnn.LayerParams` for :meth:`Stack.apply`.

    Raises:
      TypeError: an unsupported module (e.g. ``MGUCell``, ``ConvLSTMCell``).
      ValueError: a non-default ``gate_fn``/``activation_fn``/``merge_fn``
        jaxrnn cannot represent, an ``nn.RNN(reverse=True)`` on its own, or a
        parameter tree that does not fit: the message gives the path it
        expected and the keys it found.

    Example:
      >>> bilstm = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(64)), nn.RNN(nn.OptimizedLSTMCell(64)))
      >>> variables = bilstm.init(key, xs, seq_lengths=lengths)
      >>> stack, params = from_flax(bilstm, variables)
      >>> ys, finals = stack.apply(params, xs, seq_lengths=lengths)  # equals flax at valid positions
    """
    from flax import linen as nn  # noqa: PLC0415  (keeps `import jaxrnn` light)

    from jaxrnn import linen  # noqa: PLC0415  (imports flax: keeps `import jaxrnn` light)

    layers = _flax_layers(module, nn, linen)
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables: expected a mapping of parameters, got {type(variables).__name__}")
    tree = variables["params"] if "params" in variables else variables
    if layers[0][0][1] is None:  # a bare cell
        cell_tree, path = _find_cell(tree, module, (), nn)
        return _flax_cell_params(module, cell_tree, path, nn)

    all_cells = [c for layer in layers for c, _ in layer]
    tree, base = _unwrap(tree, layers, type(all_cells[0]).__name__)
    flat = _numbered(tree, type(all_cells[0]).__name__) if isinstance(tree, Mapping) else []
    heads = {p[0] for layer in layers for _, p in layer}
    structured = isinstance(tree, Mapping) and any(_child(tree, h) is not None for h in heads)
    converted = []
    for k, layer in enumerate(layers):
        directions = []
        for d, (cell, path) in enumerate(layer):
            if len(flat) == len(all_cells) and not structured:  # cells registered in a compact parent
                index = sum(len(x) for x in layers[:k]) + d
                sub, at = tree[flat[index]], base + (flat[index],)
            elif len(layers) == 1 and len(layer) == 1:  # nn.RNN: the cell anywhere _find_cell looks
                sub, at = _find_cell(tree, cell, base, nn)
            elif len(flat) > len(all_cells) and not structured:
                raise ValueError(
                    f"variables: expected {len(all_cells)} {type(cell).__name__}_N entries (forward, backward per "
                    f"layer) at {_where(base)}, found {len(flat)}: {flat}; pass only this module's entries, "
                    f"e.g. {{k: tree[k] for k in {flat[: len(all_cells)]}}}"
                )
            else:
                sub, at = _locate(tree, path, cell, base, nn)
            directions.append(_flax_cell_params(cell, sub, at, nn))
        converted.append(directions)
    cell = converted[0][0][0]
    for k, directions in enumerate(converted):
        for d, (other, _) in enumerate(directions):
            if other != cell:
                raise ValueError(
                    f"module: expected one cell configuration in every layer and direction (one jaxrnn.Stack), "
                    f"got {cell} and, in layer {k} direction {d}, {other}"
                )
    dropout = float(getattr(module, "dropout_rate", 0.0))
    stack = Stack(cell, num_layers=len(layers), bidirectional=len(layers[0]) == 2, dropout=dropout)
    params = tuple(LayerParams(*(p for _, p in directions)) for directions in converted)
    stack.check_params(params, name="variables")
    return stack, params


def _cell_to_flax(cell, params, nn, name="cell_or_stack"):
    """``(flax_cell, cell_params_dict)`` for one jaxrnn cell."""
    check_params(cell, params, name="params")
    H = cell.hidden_size
    dtype = {} if cell.compute_dtype is None else {"dtype": cell.compute_dtype}
    param_dtype = {"param_dtype": jnp.asarray(params.w_ih).dtype}

    def split(a):
        return [jnp.asarray(a)[..., k * H : (k + 1) * H] for k in range(np.shape(a)[-1] // H)]

    if isinstance(cell, LSTM):
        tree = {}
        for g, w_i, w_h, b in zip(_LSTM_GATES, split(params.w_ih), split(params.w_hh), split(params.b)):
            tree["i" + g] = {"kernel": w_i}
            tree["h" + g] = {"kernel": w_h, "bias": b}
        return nn.OptimizedLSTMCell(H, **dtype, **param_dtype), tree
    if isinstance(cell, GRU):
        if cell.reset != "after":
            raise ValueError(
                f"{name}: expected GRU(reset='after') (flax's GRUCell resets after the recurrent matmul), "
                f"got reset={cell.reset!r}"
            )
        negate = lambda a: jnp.asarray(_negate_update_gate(np.asarray(a), H))  # noqa: E731  (its own inverse)
        tree = {}
        w_ih, w_hh, b_all = (split(negate(a)) for a in (params.w_ih, params.w_hh, params.b))
        for g, w_i, w_h, b in zip(_GRU_GATES, w_ih, w_hh, b_all):
            tree["i" + g] = {"kernel": w_i, "bias": b}
            tree["h" + g] = {"kernel": w_h}
        tree["hn"]["bias"] = jnp.asarray(params.b_hn)
        return nn.GRUCell(H, **dtype, **param_dtype), tree
    if cell.activation not in ("tanh", "relu"):
        raise ValueError(
            f"{name}: expected an Elman activation flax's SimpleCell has (tanh, relu), got {cell.activation!r}"
        )
    fn = jnp.tanh if cell.activation == "tanh" else jax.nn.relu
    tree = {
        "i": {"kernel": jnp.asarray(params.w_ih), "bias": jnp.asarray(params.b)},
        "h": {"kernel": jnp.asarray(params.w_hh)},
    }
    return nn.SimpleCell(H, activation_fn=fn, **dtype, **param_dtype), tree


def to_flax(cell_or_stack, params):
    """The flax linen module and variables that compute what a jaxrnn cell or stack computes.

    The inverse of :func:`from_flax`: ``to_flax(*from_flax(m, v))`` gives
    ``v``'s values exactly (for ``SimpleCell(residual=True)`` the identity
    stays folded into ``h``'s kernel: a plain ``SimpleCell``).

    * a cell → the flax cell (``LSTM`` → ``OptimizedLSTMCell``, whose
      variables are also ``LSTMCell``'s; ``GRU(reset="after")`` →
      ``GRUCell`` with the update gate negated back; ``Elman`` →
      ``SimpleCell``) and ``{"params": <its parameter dict>}``;
    * a one-layer :class:`~jaxrnn.Stack` → ``nn.RNN(cell)``, or
      ``nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))`` when bidirectional;
    * a deeper stack → :class:`jaxrnn.linen.RNNSequence` of those layers
      (``dropout_rate=stack.dropout``), which passes ``seq_lengths`` to every
      layer and zeroes padded outputs between layers.

    flax's ``nn.RNN`` does not zero outputs at padded positions: compare with
    jaxrnn at valid positions (``t < seq_lengths[b]``). Final carries convert
    with :func:`carry_to_flax`.

    Args:
      cell_or_stack: a jaxrnn cell, or a :class:`~jaxrnn.Stack` without
        connections (``connection=None``).
      params: the cell's parameters, or the stack's tuple of
        :class:`~jaxrnn.LayerParams`; kernels ``(I, G)`` and ``(H, G)``.

    Returns:
      ``(module, variables)``, ``variables = {"params": ...}`` for ``module.apply``.

    Raises:
      TypeError: not a jaxrnn cell or stack, or parameters of the wrong structure.
      ValueError: something flax cannot express (``GRU(reset="before")``,
        ``Elman(activation="linear")``, a stack with connections).

    Example:
      >>> stack = jaxrnn.Stack(jaxrnn.LSTM(64), bidirectional=True)
      >>> module, variables = to_flax(stack, stack.init(key, 16))  # nn.Bidirectional
      >>> ys = module.apply(variables, xs, seq_lengths=lengths)
    """
    from flax import linen as nn  # noqa: PLC0415  (keeps `import jaxrnn` light)

    from jaxrnn import linen  # noqa: PLC0415  (imports flax: keeps `import jaxrnn` light)

    if isinstance(cell_or_stack, Cell):
        module, tree = _cell_to_flax(cell_or_stack, params, nn)
        return module, {"params": tree}
    if not isinstance(cell_or_stack, Stack):
        raise TypeError(f"cell_or_stack: expected a jaxrnn cell or Stack, got {type(cell_or_stack).__name__}")
    stack = cell_or_stack
    if stack.connection is not None:
        raise ValueError(
            f"cell_or_stack.connection: expected None (flax has no {stack.connection} connections), "
            f"got {stack.connection!r}"
        )
    stack.check_params(params)
    layers, trees = [], []
    for p in params:
        fwd, fwd_tree = _cell_to_flax(stack.cell, p.fwd, nn)
        if stack.bidirectional:
            bwd, bwd_tree = _cell_to_flax(stack.cell, p.bwd, nn)
            layers.append(nn.Bidirectional(nn.RNN(fwd), nn.RNN(bwd)))
            trees.append({"forward_rnn": {"cell": fwd_tree}, "backward_rnn": {"cell": bwd_tree}})
        else:
            layers.append(nn.RNN(fwd))
            trees.append({"cell": fwd_tree})
    if stack.num_layers == 1:
        return layers[0], {"params": trees[0]}
    module = linen.RNNSequence(tuple(layers), dropout_rate=stack.dropout)
    return module, {"params": {f"layers_{k}": tree for k, tree in enumerate(trees)}}


def _carry_one_from_flax(cell, carry, name="carry"):
    if isinstance(cell, LSTM):
        if not isinstance(carry, (tuple, list)) or len(carry) != 2:
            raise TypeError(f"{name}: expected flax's LSTM carry (c, h), got {type(carry).__name__}")
        c, h = carry
        return LSTMCarry(h=jnp.asarray(h), c=jnp.asarray(c))
    if isinstance(carry, (tuple, list)):
        raise TypeError(
            f"{name}: expected flax's single-array carry h for {type(cell).__name__}, got {type(carry).__name__}"
        )
    return Carry(jnp.asarray(carry))


def _carry_one_to_flax(carry, name="carry"):
    if isinstance(carry, LSTMCarry):
        return carry.c, carry.h
    if isinstance(carry, Carry):
        return carry.h
    raise TypeError(f"{name}: expected a jaxrnn LSTMCarry or Carry, got {type(carry).__name__}")


def _per_layer(stack: Stack, layers, name: str, convert, wrapped: bool):
    """``convert(carry, name)`` for every layer and direction of ``layers`` (one entry per layer).

    ``wrapped``: a one-layer stack's entry was not in a tuple (flax's structure),
    so error messages name it without an index.
    """
    if not isinstance(layers, (tuple, list)) or hasattr(layers, "_fields") or len(layers) != stack.num_layers:
        raise TypeError(
            f"{name}: expected a tuple of {stack.num_layers} per-layer carries, got {type(layers).__name__}"
        )
    out = []
    for k, layer in enumerate(layers):
        where = name if wrapped else f"{name}[{k}]"
        if stack.bidirectional:
            if not isinstance(layer, (tuple, list)) or len(layer) != 2 or hasattr(layer, "_fields"):
                raise TypeError(f"{where}: expected a (forward, backward) pair of carries, got {type(layer).__name__}")
            out.append(tuple(convert(c, f"{where}[{d}]") for d, c in enumerate(layer)))
        else:
            out.append(convert(layer, where))
    return tuple(out)


def carry_from_flax(cell_or_stack, carry):
    """A flax carry as a jaxrnn carry.

    Args:
      cell_or_stack: the jaxrnn cell or :class:`~jaxrnn.Stack` from :func:`from_flax`.
      carry: flax's carry, leaves ``(*batch, H)``: for a cell, ``(c, h)`` for
        an LSTM and ``h`` otherwise; for a stack, what the flax module takes
        as ``initial_carry``: one layer's carry (a ``(forward, backward)``
        pair for ``nn.Bidirectional``), or a tuple of them for
        :class:`jaxrnn.linen.RNNSequence`.

    Returns:
      :class:`~jaxrnn.LSTMCarry` ``(h, c)`` or :class:`~jaxrnn.Carry` ``(h,)``;
      for a stack, :meth:`Stack.apply`'s ``initial_carry`` (a tuple per layer).

    Example:
      >>> stack, params = from_flax(bilstm, variables)
      >>> ys, finals = stack.apply(params, xs, initial_carry=carry_from_flax(stack, (fwd_carry, bwd_carry)))
    """
    if isinstance(cell_or_stack, Stack):
        stack, one = cell_or_stack, cell_or_stack.num_layers == 1
        convert = lambda c, n: _carry_one_from_flax(stack.cell, c, n)  # noqa: E731
        return _per_layer(stack, (carry,) if one else carry, "carry", convert, wrapped=one)
    return _carry_one_from_flax(cell_or_stack, carry)


def carry_to_flax(carry_or_stack, carries=None):
    """A jaxrnn carry, or a :class:`~jaxrnn.Stack`'s final carries, in flax's structure.

    Args:
      carry_or_stack: a :class:`~jaxrnn.LSTMCarry` or :class:`~jaxrnn.Carry`
        (leaves ``(*batch, H)``), or the stack that produced ``carries``
        (as :func:`carry_to_torch` takes it).
      carries: with a stack: :meth:`Stack.apply`'s final carries (a tuple of
        ``num_layers`` carries, ``(forward, backward)`` pairs when bidirectional).

    Returns:
      For a carry: ``(c, h)`` for an LSTM carry, ``h`` otherwise. For a stack:
      what the module of :func:`to_flax` returns with ``return_carry=True``:
      one layer's carry (a ``(forward, backward)`` pair when bidirectional),
      or a tuple of them for several layers.

    Example:
      >>> ys, finals = stack.apply(params, xs, seq_lengths=lengths)
      >>> fwd_carry, bwd_carry = carry_to_flax(stack, finals)  # as nn.Bidirectional(..., return_carry=True)
    """
    if isinstance(carry_or_stack, Stack):
        stack = carry_or_stack
        converted = _per_layer(stack, carries, "carries", _carry_one_to_flax, wrapped=False)
        return converted[0] if stack.num_layers == 1 else converted
    if carries is not None:
        raise TypeError(
            f"carry_or_stack: expected a jaxrnn Stack when carries are given, got {type(carry_or_stack).__name__}"
        )
    return _carry_one_to_flax(carry_or_stack)
