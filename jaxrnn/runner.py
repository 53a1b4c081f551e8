"""The sequence runner: one function owns every sequence concern.

:func:`rnn` handles layout (batch- or time-major, unbatched), variable
lengths, direction, initial carries, validation and the choice of
implementation. Implementations ("backends") only compute: the input
projection and the recurrence over time-major inputs. They all share one
signature::

    backend(cell, params, xs, carry0, lengths, reverse) -> (hs, final_carry)

    cell:     the cell resolved for the dtype of xs (cell.resolve)
    xs:       (T, B, I) time-major inputs; an Embedded (table, ids (T, B)) only
              for a backend whose takes_embedded(cell) is true (else the rows)
    carry0:   carry with float32 leaves (B, H)
    lengths:  (B,) int32 in [0, T], or None for full-length sequences
    reverse:  Python bool
    hs:       (T, B, H) float32, zero at padded steps
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxrnn import kernels
from jaxrnn.cells import acc_dtype, check_carry, check_cell, check_params
from jaxrnn.checks import check_inputs, check_lengths, check_static, in_forward_mode, shape_of
from jaxrnn.checks import warn_once  # noqa: F401  (re-exported: older code imports it from here)
from jaxrnn.embedded import Embedded, check_embedded
from jaxrnn.scan import mask_step  # noqa: F401  (re-exported, likewise)
from jaxrnn.scan import rnn_reference, scan_reference, sequence_mask, vary_like, where_valid

Array = jax.Array

__all__ = ["IMPLS", "rnn", "rnn_reference", "scan_reference"]

#: Names accepted by ``impl=``.
IMPLS = ("auto", "reference", "xla", "ffi", "pallas")

# --------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------
def check_impl(impl):
    """Check ``impl`` is a name in :data:`IMPLS` or a backend configuration
    (:class:`jaxrnn.kernels.XLA`, :class:`jaxrnn.kernels.FFI`, :class:`jaxrnn.kernels.Pallas`)."""
    if isinstance(impl, str) and impl in IMPLS:
        return
    if isinstance(impl, (kernels.XLA, kernels.FFI, kernels.Pallas)):
        return
    raise ValueError(
        f"impl: expected one of {IMPLS} or a jaxrnn.kernels.XLA / FFI / Pallas configuration, got {impl!r}"
    )


def resolve_backend(impl, cell, platform: Optional[str] = None):
    """Return ``(name, backend_fn)`` for ``impl`` on ``platform`` (trace time)."""
    check_impl(impl)
    if impl == "reference":
        return "reference", rnn_reference
    return kernels.resolve(impl, cell, platform or jax.default_backend())


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
    carry_perturbation: Any = None,
):
    """Run ``cell`` over a sequence.

    Args:
      cell: an :class:`~jaxrnn.Elman`, :class:`~jaxrnn.LSTM` or :class:`~jaxrnn.GRU`.
      params: the cell's parameters.
      xs: ``(B, T, I)`` inputs (``(T, B, I)`` with ``time_major=True``; ``(T, I)``
        for a single unbatched sequence); or a :class:`jaxrnn.Embedded`
        ``(table, ids)`` standing for ``xs = table[ids]``, ``table`` ``(V, I)``
        and ``ids`` ``(B, T)`` (``(T, B)``, ``(T,)``), which ``impl="ffi"``'s
        LSTM runs without forming ``xs`` (see :mod:`jaxrnn.embedded`).
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
      carry_perturbation: the analysis hook (``None`` by default): a pytree
        shaped like the carry whose leaves have a time axis, ``(B, T, H)``
        (``(T, B, H)`` with ``time_major``, ``(T, H)`` unbatched), added to
        the carry after each valid step (and so to the output ``h_t``). At
        zero it changes nothing, and its gradient is ``∂J/∂h_t`` (and
        ``∂J/∂c_t``) for every step in one backward pass, which is how
        :mod:`jaxrnn.analysis` measures gradients through time. It runs the
        reference recurrence (``impl`` must be ``"auto"`` or ``"reference"``).

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
    reverse = check_static("reverse", reverse)
    time_major = check_static("time_major", time_major)
    embedded = isinstance(xs, Embedded)
    if embedded:
        check_embedded(xs)
        xs = Embedded(*xs)  # a plain (table, ids) pair of a subclass or namedtuple copy becomes jaxrnn's own
        lead, features, what = shape_of(xs.ids), shape_of(xs.table)[-1], ("xs.table", shape_of(xs.table))
    else:
        check_inputs(xs, time_major=time_major)
        lead, features, what = xs.shape[:-1], xs.shape[-1], ("xs", shape_of(xs))
    input_size = check_params(cell, params)
    if features != input_size:
        raise ValueError(
            f"{what[0]}: expected last dimension {input_size} (input_size of params.w_ih "
            f"{shape_of(params.w_ih)}), got shape {what[1]}"
        )

    unbatched = len(lead) == 1
    T = lead[0] if (unbatched or time_major) else lead[1]
    batch_shape = () if unbatched else (lead[1] if time_major else lead[0],)
    if initial_carry is not None:
        check_carry(cell, initial_carry, batch_shape)
    if seq_lengths is not None:
        seq_lengths = check_lengths(seq_lengths, batch_shape, T)
    if carry_perturbation is not None:
        if impl not in ("auto", "reference"):
            raise ValueError(f"impl: carry_perturbation runs the reference recurrence; expected 'auto' or 'reference', got {impl!r}")
        impl = "reference"
        steps = (T, *batch_shape) if (unbatched or time_major) else (*batch_shape, T)
        check_carry(cell, carry_perturbation, steps, name="carry_perturbation")
    if in_forward_mode((params, xs, initial_carry, carry_perturbation)):
        if impl != "auto" and impl != "reference":
            raise ValueError(
                f"impl: {impl!r} has a custom VJP, which forward-mode autodiff (jax.jvp, jax.jacfwd, "
                "jax.hessian) cannot differentiate; use impl='auto' or 'reference'"
            )
        impl = "reference"
    if embedded and impl == "reference":  # the reference recurrence reads the rows themselves
        xs = xs.lookup()
    return _rnn(run_key(cell), params, xs, initial_carry, seq_lengths, reverse, time_major, impl, carry_perturbation)


def run_key(cell):
    """``cell`` with its initialisers replaced by their defaults: what a run depends on.

    The cell is a static argument of the compiled runner; a callable
    ``kernel_init`` rebuilt for every call (a fresh lambda) would otherwise
    recompile a run that never uses it.
    """
    if callable(cell.kernel_init) or callable(cell.recurrent_init):
        return dataclasses.replace(cell, kernel_init="lecun_normal", recurrent_init="orthogonal")
    return cell


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _rnn(cell, params, xs, initial_carry, seq_lengths, reverse, time_major, impl, perturbation=None):
    if isinstance(xs, Embedded):  # kept as (table, ids) while the layout changes; see _inputs
        out_dtype, unbatched = xs.table.dtype, xs.ids.ndim == 1
        ids = xs.ids[:, None] if unbatched else (xs.ids if time_major else xs.ids.T)
        xs = Embedded(xs.table, ids)
        T, B = ids.shape
        ref = ids[:, :, None]
    else:
        out_dtype, unbatched = xs.dtype, xs.ndim == 2
        xs = xs[:, None] if unbatched else (xs if time_major else jnp.swapaxes(xs, 0, 1))
        T, B = xs.shape[:2]
        ref = xs[:, :, :1]
    if unbatched:
        if initial_carry is not None:
            initial_carry = jax.tree_util.tree_map(lambda c: c[None], initial_carry)
        if seq_lengths is not None:
            seq_lengths = jnp.reshape(seq_lengths, (1,))
        if perturbation is not None:
            perturbation = jax.tree_util.tree_map(lambda p: p[:, None], perturbation)
    elif not time_major:
        if perturbation is not None:
            perturbation = jax.tree_util.tree_map(lambda p: jnp.swapaxes(p, 0, 1), perturbation)
    if initial_carry is None:
        # Zeros built from the inputs, so that under shard_map they vary over the same mesh axes.
        zero = jnp.zeros_like(jnp.sum(ref, axis=0), acc_dtype(out_dtype))
        initial_carry = jax.tree_util.tree_map(
            lambda c: jnp.broadcast_to(zero, c.shape), cell.zero_carry((B,), acc_dtype(out_dtype))
        )
    carry0 = jax.tree_util.tree_map(lambda c: c.astype(acc_dtype(out_dtype)), initial_carry)
    lengths = None if seq_lengths is None else jnp.clip(seq_lengths.astype(jnp.int32), 0, T)
    cell = cell.resolve(out_dtype)
    if perturbation is not None or T == 0 or B == 0:  # nothing to compute: every backend's result is the reference's
        backend = rnn_reference
    else:
        _, backend = resolve_backend(impl, cell)
    xs = _inputs(xs, lengths, backend, cell)
    if perturbation is not None:
        xp = cell.input_projection(params, xs)
        perturbation = jax.tree_util.tree_map(lambda p: p.astype(acc_dtype(out_dtype)), perturbation)
        hs, final = scan_reference(cell, params, xp, carry0, lengths, reverse, perturbation=perturbation)
    else:
        params, carry0 = vary_like((params, carry0), ref)
        hs, final = backend(cell, params, xs, carry0, lengths, reverse)
    ys = hs.astype(out_dtype)

    if unbatched:
        return ys[:, 0], jax.tree_util.tree_map(lambda c: c[0], final)
    if not time_major:
        ys = jnp.swapaxes(ys, 0, 1)
    return ys, final


def _inputs(xs, lengths, backend, cell):
    """A backend's time-major inputs, padding masked: the one masking rule of every backend.

    Padded inputs are zeros before any computation, so nothing in padding
    (NaN, inf) reaches a gradient. An :class:`Embedded` stays one for a
    backend whose ``takes_embedded(cell)`` says so, its padded ids replaced
    by 0 (such a backend holds the carry at a padded step and gives it no
    gradient, whatever row it reads); for any other backend its rows are
    looked up first.
    """
    if isinstance(xs, Embedded):
        takes = getattr(backend, "takes_embedded", None)
        if takes is not None and takes(cell):
            if lengths is None:
                return xs
            return Embedded(xs.table, jnp.where(sequence_mask(lengths, xs.ids.shape[0], time_major=True), xs.ids, 0))
        xs = xs.lookup()
    if lengths is None:
        return xs
    return where_valid(sequence_mask(lengths, xs.shape[0], time_major=True), xs)
