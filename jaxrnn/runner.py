"""The sequence runner: one function owns every sequence concern.

:func:`rnn` handles layout (batch- or time-major, unbatched), variable
lengths, direction, initial carries, validation and the choice of
implementation. Implementations ("backends") only compute: the input
projection and the recurrence over time-major inputs. They all share one
signature::

    backend(cell, params, xs, carry0, lengths, reverse) -> (hs, final_carry)

    cell:     the cell resolved for the dtype of xs (cell.resolve)
    xs:       (T, B, I) time-major inputs
    carry0:   carry with float32 leaves (B, H)
    lengths:  (B,) int32 in [0, T], or None for full-length sequences
    reverse:  Python bool
    hs:       (T, B, H) float32, zero at padded steps
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn.cells import acc_dtype, check_cell

Array = jax.Array

__all__ = ["IMPLS", "rnn", "rnn_reference", "scan_reference"]

#: Names accepted by ``impl=``.
IMPLS = ("auto", "reference", "xla", "pallas")


# --------------------------------------------------------------------------
# The reference backend: plain lax.scan, differentiated by JAX autodiff.
# --------------------------------------------------------------------------
def mask_step(valid, new, old):
    """Keep ``old`` where ``valid`` (``(B,)`` bool) is False, leaf by leaf."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(valid[:, None], n, o), new, old)


def rnn_reference(cell, params, xs, carry0, lengths, reverse):
    """The ``impl="reference"`` backend: :meth:`~jaxrnn.Cell.input_projection`, then :func:`scan_reference`."""
    return scan_reference(cell, params, cell.input_projection(params, xs), carry0, lengths, reverse)


def scan_reference(cell, params, xp, carry0, lengths, reverse):
    """Ground truth: ``lax.scan`` over ``cell.step_projected``; autodiff gives the VJP.

    With ``lengths``, a step ``t >= lengths[b]`` leaves sequence ``b``'s carry
    unchanged and outputs zeros. Scanning in reverse therefore first walks the
    padding (carry stays at ``carry0``) and then the valid steps
    ``lengths[b]-1, ..., 0``: only the valid part is reversed and each output
    stays aligned with its input position.
    """
    T = xp.shape[0]

    def body(carry, inputs):
        xp_t, t = inputs
        new_carry, h = cell.step_projected(params, carry, xp_t)
        if lengths is not None:
            valid = t < lengths
            new_carry = mask_step(valid, new_carry, carry)
            h = jnp.where(valid[:, None], h, 0.0)
        return new_carry, h

    final, hs = lax.scan(body, carry0, (xp, jnp.arange(T, dtype=jnp.int32)), reverse=reverse)
    return hs, final


# --------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------
def check_impl(impl):
    """Check ``impl`` is a name in :data:`IMPLS` or a backend configuration
    (:class:`jaxrnn.kernels.XLA`, :class:`jaxrnn.kernels.Pallas`)."""
    if isinstance(impl, str) and impl in IMPLS:
        return
    if not isinstance(impl, str):
        from jaxrnn import kernels  # noqa: PLC0415

        if isinstance(impl, (kernels.XLA, kernels.Pallas)):
            return
    raise ValueError(
        f"impl: expected one of {IMPLS} or a jaxrnn.kernels.XLA / jaxrnn.kernels.Pallas configuration, got {impl!r}"
    )


def resolve_backend(impl, cell, platform: Optional[str] = None):
    """Return ``(name, backend_fn)`` for ``impl`` on ``platform`` (trace time)."""
    check_impl(impl)
    if impl == "reference":
        return "reference", rnn_reference
    from jaxrnn import kernels  # noqa: PLC0415  (kernels import Pallas lazily)

    return kernels.resolve(impl, cell, platform or jax.default_backend())


# --------------------------------------------------------------------------
# Validation (raised before tracing reaches XLA)
# --------------------------------------------------------------------------
def _shape(x):
    return tuple(np.shape(x))


def check_params(cell, params, name="params"):
    """Check ``params`` has the cell's structure and consistent shapes; return ``I``."""
    fields = ("w_ih", "w_hh", "b")
    if not all(hasattr(params, f) for f in fields):
        raise TypeError(
            f"{name}: expected the parameter NamedTuple of {type(cell).__name__} "
            f"(fields {fields}), got {type(params).__name__}"
        )
    H, G = cell.hidden_size, cell.gate_size
    w_ih, w_hh, b = (_shape(getattr(params, f)) for f in fields)
    if len(w_ih) != 2 or w_ih[1] != G:
        raise ValueError(f"{name}.w_ih: expected shape (input_size, {G}) for {cell}, got {w_ih}")
    if w_hh != (H, G):
        raise ValueError(f"{name}.w_hh: expected shape {(H, G)} for {cell}, got {w_hh}")
    if b != (G,):
        raise ValueError(f"{name}.b: expected shape {(G,)} for {cell}, got {b}")
    b_hn = getattr(params, "b_hn", None)
    if getattr(cell, "reset", None) == "after" and (b_hn is None or _shape(b_hn) != (H,)):
        got = None if b_hn is None else _shape(b_hn)
        raise ValueError(f"{name}.b_hn: expected shape {(H,)} for reset='after', got {got}")
    if getattr(cell, "reset", None) == "before" and b_hn is not None:
        raise ValueError(f"{name}.b_hn: expected None for reset='before', got shape {_shape(b_hn)}")
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
        if _shape(leaf) != want:
            raise ValueError(f"{name}.{field}: expected shape {want}, got {_shape(leaf)}")


def check_lengths(seq_lengths, batch_shape, T, name="seq_lengths"):
    """Check dtype and shape; with concrete values also the range ``[0, T]``."""
    if isinstance(seq_lengths, (list, tuple)) or np.isscalar(seq_lengths):
        seq_lengths = np.asarray(seq_lengths)
    dtype = getattr(seq_lengths, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array, got dtype {dtype}")
    if _shape(seq_lengths) != tuple(batch_shape):
        raise ValueError(f"{name}: expected shape {tuple(batch_shape)}, got {_shape(seq_lengths)}")
    if not isinstance(seq_lengths, jax.core.Tracer):
        values = np.asarray(seq_lengths)
        if values.size and (values.min() < 0 or values.max() > T):
            raise ValueError(
                f"{name}: expected values in [0, {T}] (the sequence length), "
                f"got min {values.min()} and max {values.max()}"
            )
    return seq_lengths


def check_inputs(xs, name="xs", time_major=False):
    """Check ``xs`` is a floating array of rank 2 (unbatched) or 3."""
    dtype = getattr(xs, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got {type(xs).__name__} of dtype {dtype}")
    layout = "(T, B, input_size)" if time_major else "(B, T, input_size)"
    if xs.ndim not in (2, 3):
        raise ValueError(f"{name}: expected shape {layout} or (T, input_size), got {_shape(xs)}")


# --------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------
def rnn(
    cell,
    params,
    xs: Array,
    *,
    initial_carry: Any = None,
    seq_lengths: Optional[Array] = None,
    reverse: bool = False,
    time_major: bool = False,
    impl: Any = "auto",
):
    """Run ``cell`` over a sequence.

    Args:
      cell: an :class:`~jaxrnn.Elman`, :class:`~jaxrnn.LSTM` or :class:`~jaxrnn.GRU`.
      params: the cell's parameters.
      xs: ``(B, T, I)`` inputs (``(T, B, I)`` with ``time_major=True``; ``(T, I)``
        for a single unbatched sequence).
      initial_carry: carry with leaves ``(B, H)`` (``(H,)`` unbatched); zeros
        by default. It is cast to the accumulation dtype (float32; float64 for
        float64 inputs).
      seq_lengths: ``(B,)`` integer valid lengths (a scalar when unbatched).
        Steps ``t >= seq_lengths[b]`` are padding: their outputs are zero and
        they leave the carry untouched, so the final carry is the carry at each
        sequence's own last valid step. Concrete out-of-range values raise
        ``ValueError``; traced values (under ``jit``) are clamped to ``[0, T]``.
      reverse: run from the end of each sequence's *valid* part to its start.
        Outputs stay aligned with their input positions (``ys[b, t]`` has seen
        ``xs[b, t:seq_lengths[b]]``) and padding stays at the end, so a forward
        and a reverse run concatenate into a correct bidirectional layer.
      time_major: inputs and outputs are ``(T, B, ·)``.
      impl: ``"auto"`` (the fastest available), ``"reference"`` (``lax.scan``
        + autodiff, the ground truth), ``"xla"`` (fused custom-VJP loop) or
        ``"pallas"`` (fused-gate kernel; interpret mode on CPU); or a backend
        with options, :class:`jaxrnn.kernels.XLA` or
        :class:`jaxrnn.kernels.Pallas` (e.g. the kernels' block sizes).

    Returns:
      ``(ys, final_carry)``: outputs ``(B, T, H)`` (layout and batching as
      ``xs``) in the dtype of ``xs``, and the final carry in the accumulation
      dtype (float32 for bf16/f16/f32 inputs).

    Example:
      >>> cell = jaxrnn.LSTM(64)
      >>> params = cell.init(jax.random.key(0), 16)
      >>> ys, (h, c) = jaxrnn.rnn(cell, params, jnp.ones((8, 100, 16)))
    """
    check_cell(cell)
    check_impl(impl)
    check_inputs(xs, time_major=time_major)
    input_size = check_params(cell, params)
    if xs.shape[-1] != input_size:
        raise ValueError(
            f"xs: expected last dimension {input_size} (input_size of params.w_ih "
            f"{_shape(params.w_ih)}), got shape {_shape(xs)}"
        )
    unbatched = xs.ndim == 2
    T = xs.shape[0] if (unbatched or time_major) else xs.shape[1]
    batch_shape = () if unbatched else (xs.shape[1] if time_major else xs.shape[0],)
    if initial_carry is not None:
        check_carry(cell, initial_carry, batch_shape)
    if seq_lengths is not None:
        seq_lengths = check_lengths(seq_lengths, batch_shape, T)
    return _rnn(cell, params, xs, initial_carry, seq_lengths, bool(reverse), bool(time_major), impl)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _rnn(cell, params, xs, initial_carry, seq_lengths, reverse, time_major, impl):
    out_dtype = xs.dtype
    unbatched = xs.ndim == 2
    if unbatched:
        xs = xs[:, None]
        if initial_carry is not None:
            initial_carry = jax.tree_util.tree_map(lambda c: c[None], initial_carry)
        if seq_lengths is not None:
            seq_lengths = jnp.reshape(seq_lengths, (1,))
    elif not time_major:
        xs = jnp.swapaxes(xs, 0, 1)
    T, B = xs.shape[:2]
    if initial_carry is None:
        initial_carry = cell.zero_carry((B,), acc_dtype(out_dtype))
    carry0 = jax.tree_util.tree_map(lambda c: c.astype(acc_dtype(out_dtype)), initial_carry)
    lengths = None if seq_lengths is None else jnp.clip(seq_lengths.astype(jnp.int32), 0, T)

    cell = cell.resolve(out_dtype)
    name, backend = resolve_backend(impl, cell)
    hs, final = backend(cell, params, xs, carry0, lengths, reverse)
    ys = hs.astype(out_dtype)

    if unbatched:
        return ys[:, 0], jax.tree_util.tree_map(lambda c: c[0], final)
    if not time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    return ys, final


def warn_once(message: str, _seen=set()):  # noqa: B006  (deliberate per-process memo)
    """Emit ``message`` as a ``UserWarning`` once per process."""
    if message not in _seen:
        _seen.add(message)
        warnings.warn(message, stacklevel=3)
