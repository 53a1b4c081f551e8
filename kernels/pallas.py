r"""Fused-gate recurrence in Pallas: the whole time loop inside one kernel.

One ``pallas_call`` runs a recurrent cell over a sequence. Its grid is
``(batch tiles, time chunks)``: each program owns ``block.batch`` sequences,
the chunks of a tile run in order, and inside a chunk a ``lax.fori_loop``
walks ``block.time`` steps (by default the whole sequence is one chunk). Per
step the kernel does the recurrent matmul, the gate nonlinearities and the
state update on chip (:func:`jaxrnn.kernels.gates.forward_gates`):

.. math::
    z_t = x^p_t + h_{t-1} W_{hh}, \qquad (h_t, c_t) = \mathrm{cell}(z_t, c_{t-1})

where ``x^p = x W_{ih} + b`` is hoisted out of the loop by the caller (one
large matmul, ``cell.input_projection``). The recurrent weight's block has a
constant ``index_map``, so it is fetched once and stays resident for the
whole sequence; across chunks the carry lives in the final-carry output
block, whose ``index_map`` ignores time. The kernel writes only what the
backward pass needs: ``h_t``, the other carry leaves (an LSTM's ``c_t``) and
the gate residuals of :func:`~jaxrnn.kernels.gates.forward_gates`.

The backward pass (a :func:`jax.custom_vjp`) is a second kernel that walks
time the other way, propagates ``(dh, dc)`` with
:func:`~jaxrnn.kernels.gates.backward_gates` and writes ``dxp_t``, the cotangent
of the projected input. The recurrent weight's gradient is one large matmul
over all ``T·B`` rows after the loop
(:func:`~jaxrnn.kernels.gates.weight_grads`):

.. math::
    \frac{\partial L}{\partial W_{hh}} = \sum_{t,b} h_{t-1}^\top \bar z_t

and ``W_ih``, ``b`` and ``x`` get theirs from JAX's autodiff of the input
projection, from ``dxp``.

Semantics are those of :func:`jaxrnn.scan.scan_reference`: with
``lengths``, steps ``t >= lengths[b]`` keep the carry and output zeros, and
``reverse`` walks that padding first, so only the valid part is reversed.

A recurrent weight too large for one program (``BlockSizes(hidden=...)``,
and on GPU by default above :data:`GPU_RESIDENT_BYTES`) is split across
programs by hidden units instead: the custom VJP here then runs the time
loops of :mod:`jaxrnn.kernels.pallas_split`, one fused kernel per step
(:func:`_loops`), with the same padding, residuals and weight gradient.

Layout: sizes that do not fit the blocks are padded and sliced back
(:func:`jaxrnn.kernels.common.padded_sizes`): the batch to whole tiles
(padded rows get length 0), time to whole chunks (padded steps are masked
out), and each gate's hidden units to a multiple of ``block.lanes`` (zero
weights keep padded units exactly zero). Every block is a 2-D ``(rows,
lanes)`` tile, with a leading time axis for sequences. No value is sliced or
concatenated on chip (Triton can do neither): every gate-stacked array is
passed once per gate, with that gate's column block as its ``BlockSpec``,
and the kernel bodies run the per-gate step of :mod:`~jaxrnn.kernels.gates`
on one ``(rows, Hp)`` tile per gate. Compiled for GPU the kernels request
the Triton lowering (:func:`jaxrnn.kernels.common.compiler_params`).

Modules: :mod:`jaxrnn.kernels.common` holds what both kernel families share
(:class:`BlockSizes`, padding, the static configuration, the residual
layout); this module imports it and :mod:`~jaxrnn.kernels.pallas_split`,
which imports only ``common``. Read top to bottom: the wrapper, when
``impl="auto"`` may pick it, the custom VJP, the ``pallas_call``\ s, the
kernel bodies, the reference.

Example:
  >>> cell = jaxrnn.LSTM(32)
  >>> params = cell.init(jax.random.key(0), 16)
  >>> ys, carry = jaxrnn.rnn(cell, params, jnp.ones((4, 10, 16)), impl="pallas")
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrnn.cells import acc_dtype, check_carry, check_params
from jaxrnn.checks import check_lengths
from jaxrnn.kernels import common, gates, mosaic_gpu, pallas_split
from jaxrnn.kernels.common import BlockSizes
from jaxrnn.scan import scan_reference, sequence_mask, where_valid

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "GPU_RESIDENT_BYTES",
    "VERIFIED_PLATFORMS",
    "gpu_hidden_tile",
    "qualifies",
    "reference",
    "resolve_backend",
    "rnn_pallas",
]

#: The kernel families :func:`rnn_pallas` may run (``backend=None``: :func:`resolve_backend` picks).
#: ``"portable"``: the resident kernels here and the step kernels of
#: :mod:`~jaxrnn.kernels.pallas_split` (plain interpret mode on CPU, Mosaic TPU,
#: Triton on GPU); ``"mosaic_gpu"``: the persistent kernels of
#: :mod:`~jaxrnn.kernels.mosaic_gpu` (GPU; on CPU, Mosaic GPU's interpreter).
BACKENDS = ("portable", "mosaic_gpu")

#: The resident kernels' grid: batch tiles parallel, time chunks in order.
_GRID_AXES = ("parallel", "arbitrary")


# --------------------------------------------------------------------------
# The public wrapper (BlockSizes: jaxrnn.kernels.common, re-exported here)
# --------------------------------------------------------------------------
def rnn_pallas(cell, params, xp, carry0, lengths, reverse, *, interpret=None, block=None, platform=None, backend=None):
    """Run ``cell`` over projected inputs with the fused Pallas kernels.

    The backend contract of :mod:`jaxrnn.runner` (``impl="pallas"``),
    differentiable in ``params``, ``xp`` and ``carry0`` (custom VJP).

    Args:
      cell: an Elman, LSTM or GRU cell; ``cell.compute_dtype`` (``None``:
        ``xp``'s dtype) is the recurrent matmul's operand dtype.
      params: the cell's parameters; read here: ``w_hh`` ``(H, G)`` and, for
        GRU ``reset="after"``, ``b_hn`` ``(H,)``.
      xp: ``(T, B, G)`` time-major projected inputs ``x W_ih + b``, float32
        (float64 with a float64 compute dtype).
      carry0: the initial carry, leaves ``(B, H)``.
      lengths: ``(B,)`` int32 valid lengths in ``[0, T]``, or ``None``.
      reverse: Python bool; walk each sequence's valid part backwards.
      interpret: run in Pallas interpret mode (``None``: on CPU only).
      block: :class:`BlockSizes` (``None``: :meth:`BlockSizes.get_default`;
        compiled for GPU, a recurrent weight larger than
        :data:`GPU_RESIDENT_BYTES` is then split across programs, each with
        the widest power-of-two tile of hidden units whose weight columns
        fit :data:`GPU_RESIDENT_BYTES`; a GRU with ``reset="before"`` stays
        resident).
      platform: the platform to build the kernels for (``None``:
        ``jax.default_backend()``); set it to lower for another one, e.g.
        ``"tpu"`` under ``jax.export``.
      backend: the kernel family, one of :data:`BACKENDS` (``None``:
        :func:`resolve_backend`). ``"mosaic_gpu"`` splits the weight across
        CTAs by ``block.hidden`` units (default :func:`mosaic_gpu.gpu_block`
        compiled, all units in one CTA interpreted); interpreted it runs in
        Mosaic GPU's interpreter (JAX >= 0.12).

    Returns:
      ``(hs, final_carry)``: ``(T, B, H)`` outputs, zero at padded steps, and
      the final carry, both in the accumulation dtype (float32; float64 for
      float64).

    Raises:
      TypeError, ValueError: a wrong type or shape, naming the argument;
        ``block.hidden`` with a GRU whose ``reset="before"``.

    Example:
      >>> cell = jaxrnn.GRU(8, compute_dtype=jnp.float32)
      >>> params = cell.init(jax.random.key(0), 4)
      >>> xp = cell.input_projection(params, jnp.ones((5, 3, 4)))
      >>> hs, carry = rnn_pallas(cell, params, xp, cell.zero_carry(3), None, False,
      ...                        block=BlockSizes(batch=2))
    """
    check_params(cell, params)
    _check_xp(cell, xp)
    T, B, _ = xp.shape
    check_carry(cell, carry0, (B,), name="carry0")
    if lengths is not None:
        lengths = check_lengths(lengths, (B,), T, name="lengths")
    platform = jax.default_backend() if platform is None else platform
    interpret = platform == "cpu" if interpret is None else bool(interpret)
    compute_dtype = jnp.dtype(xp.dtype if cell.compute_dtype is None else cell.compute_dtype)
    backend = resolve_backend(cell, platform, interpret) if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if backend == "mosaic_gpu":
        block = _mosaic_block(cell, block, interpret, compute_dtype)
    if block is None:
        block = BlockSizes.get_default(platform)
        if common.is_gpu(platform) and not interpret:
            block = dataclasses.replace(block, hidden=gpu_hidden_tile(cell, compute_dtype))
    if not isinstance(block, BlockSizes):
        raise TypeError(f"block: expected a BlockSizes, got {type(block).__name__}")
    if block.hidden is not None and not common.can_split(cell):
        raise ValueError(
            f"block.hidden: a GRU with reset='before' cannot split its recurrent weight across programs "
            f"(its candidate multiplies r ⊙ h_(t-1), and r needs every unit); got hidden={block.hidden}. "
            f"Use block.hidden=None, GRU(reset='after') or impl='xla'"
        )

    H, n_gates = cell.hidden_size, cell.num_gates
    if backend == "mosaic_gpu":  # no Triton rules: one chunk, tiles as mosaic_gpu pads them
        block = mosaic_gpu.padded_block(block, interpret)
        Tp, Bp, Hp, rows, steps, tile = common.padded_sizes(T, B, H, block, "cpu", True)
    else:
        Tp, Bp, Hp, rows, steps, tile = common.padded_sizes(T, B, H, block, platform, interpret)
    acc = acc_dtype(compute_dtype)
    masked = lengths is not None or Tp != T
    cfg = common.Config(
        cell=dataclasses.replace(cell, hidden_size=Hp, compute_dtype=compute_dtype),
        reverse=bool(reverse),
        masked=masked,
        batch=rows,
        steps=steps,
        interpret=interpret,
        platform=platform,
        hidden=tile,
    )

    xp = common.pad_gates(xp.astype(acc), n_gates, H, Hp)
    xp = jnp.pad(xp, ((0, Tp - T), (0, Bp - B), (0, 0)))
    w_hh = common.pad_gates(params.w_hh, n_gates, H, Hp, pad_rows=True)
    b_hn = common.pad_gates(params.b_hn, 1, H, Hp) if common.has_b_hn(cell) else None
    carry0 = jax.tree_util.tree_map(lambda c: jnp.pad(c.astype(acc), ((0, Bp - B), (0, Hp - H))), carry0)
    if masked:
        lens = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        lens = jnp.pad(lens, (0, Bp - B))[:, None]  # padded rows: length 0
    else:
        lens = jnp.zeros((Bp, 1), jnp.int32)  # never read

    hs, carry = _recurrence(cfg, backend, w_hh, b_hn, xp, carry0, lens)
    return hs[:T, :B, :H], jax.tree_util.tree_map(lambda c: c[:B, :H], carry)


def resolve_backend(cell, platform: str, interpret: bool) -> str:
    """The kernel family ``backend=None`` runs: ``"mosaic_gpu"`` compiled for a
    GPU when :data:`mosaic_gpu.PREFERRED` (JAX >= 0.11, where Triton is
    deprecated, and the kernels lower: not yet, see :data:`mosaic_gpu.LOWERS`)
    and the cell's weight can split (not a GRU with ``reset="before"``), else
    ``"portable"``.

    Example:
      >>> resolve_backend(jaxrnn.LSTM(8), "cpu", True)
      'portable'
    """
    if common.is_gpu(platform) and not interpret and mosaic_gpu.PREFERRED and common.can_split(cell):
        return "mosaic_gpu"
    return "portable"


def _mosaic_block(cell, block, interpret, compute_dtype):
    """The Mosaic GPU kernels' block sizes: ``block`` with ``hidden`` set."""
    if not common.can_split(cell):
        raise ValueError(
            "backend='mosaic_gpu': a GRU with reset='before' cannot split its recurrent weight across CTAs "
            "(its candidate multiplies r ⊙ h_(t-1)); use GRU(reset='after') or backend='portable'"
        )
    default = BlockSizes(hidden=cell.hidden_size) if interpret else mosaic_gpu.gpu_block(cell, compute_dtype=compute_dtype)
    if block is None:
        return default
    if not isinstance(block, BlockSizes):
        raise TypeError(f"block: expected a BlockSizes, got {type(block).__name__}")
    return dataclasses.replace(block, hidden=default.hidden) if block.hidden is None else block


def _check_xp(cell, xp):
    dtype = getattr(xp, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"xp: expected a floating-point array, got {type(xp).__name__} of dtype {dtype}")
    if xp.ndim != 3 or xp.shape[-1] != cell.gate_size:
        raise ValueError(
            f"xp: expected shape (T, B, {cell.gate_size}) (time-major projected inputs, "
            f"G = gate_size of {cell}), got {tuple(xp.shape)}"
        )


# --------------------------------------------------------------------------
# When the automatic choice may use it
# --------------------------------------------------------------------------
#: Platforms on which the compiled kernels have been run and checked against
#: :func:`reference`. Empty: developed without a GPU or TPU.
VERIFIED_PLATFORMS: tuple = ()

#: The largest recurrent weight (bytes, compute dtype) that ``qualifies`` on
#: GPU: a quarter of an SM's on-chip memory, leaving room for the tiles.
#: Larger weights are split across programs by default (see :func:`rnn_pallas`).
GPU_RESIDENT_BYTES = 128 * 2**10


def gpu_hidden_tile(cell, compute_dtype) -> Optional[int]:
    """The GPU's default ``block.hidden`` for ``cell``: ``None`` (resident) when
    the recurrent weight fits :data:`GPU_RESIDENT_BYTES` or the cell is a GRU
    with ``reset="before"`` (which cannot split), else the widest power-of-two
    tile, at least 16, whose columns of every gate fit it.

    Args:
      cell: an Elman, LSTM or GRU cell.
      compute_dtype: the recurrent matmul's operand dtype.

    Example:
      >>> gpu_hidden_tile(jaxrnn.LSTM(768), jnp.bfloat16)  # Hp = 1024: 1024·4·16·2 B = 128 KiB
      16
    """
    itemsize = jnp.dtype(compute_dtype).itemsize
    if cell.hidden_size * cell.gate_size * itemsize <= GPU_RESIDENT_BYTES:
        return None
    if not common.can_split(cell):
        return None
    Hp = max(16, pl.next_power_of_2(cell.hidden_size))
    tile = 16
    while tile * 2 <= Hp and Hp * cell.num_gates * tile * 2 * itemsize <= GPU_RESIDENT_BYTES:
        tile *= 2
    return tile


def qualifies(cell, platform: str) -> bool:
    """Whether ``impl="auto"`` should run ``cell`` with these kernels on ``platform``.

    Conservative: ``False`` unless ``platform`` is in
    :data:`VERIFIED_PLATFORMS`, so until then GPU and TPU users get the XLA
    backend from ``"auto"`` and opt in with ``impl="pallas"``. On a verified
    platform, a cell qualifies when its resident recurrent weight ``(H, G)``
    fits on chip in the compute dtype: 8 MiB on TPU (VMEM), and on GPU
    :data:`GPU_RESIDENT_BYTES`, since one Triton program holds the whole
    weight in registers and shared memory (a Hopper SM has 228 KiB of shared
    memory and 256 KiB of registers).

    Args:
      cell: the (resolved) cell.
      platform: ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``.

    Returns:
      Whether to pick Pallas.

    Example:
      >>> qualifies(jaxrnn.LSTM(256), "tpu")
      False
    """
    if platform not in VERIFIED_PLATFORMS:
        return False
    itemsize = jnp.dtype(jnp.float32 if cell.compute_dtype is None else cell.compute_dtype).itemsize
    limit = GPU_RESIDENT_BYTES if common.is_gpu(platform) else 8 * 2**20
    return cell.hidden_size * cell.gate_size * itemsize <= limit


# --------------------------------------------------------------------------
# The custom VJP (on padded arrays), for both kernel families
# --------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(cfg, backend, w_hh, b_hn, xp, carry0, lens):
    """``(hs, final_carry)`` of the padded problem; differentiable in
    ``w_hh``, ``b_hn``, ``xp`` and ``carry0``."""
    rec = _recurrent(cfg, w_hh, b_hn, xp.dtype)
    hs, _, _, carry = _loops(cfg, backend)[0](cfg, rec, xp, carry0, lens, save_residuals=False)
    return hs, carry


def _recurrent(cfg, w_hh, b_hn, acc):
    return common.Recurrent(w_hh.astype(cfg.cell.compute_dtype), None if b_hn is None else b_hn.astype(acc))


def _recurrence_fwd(cfg, backend, w_hh, b_hn, xp, carry0, lens):
    rec = _recurrent(cfg, w_hh, b_hn, xp.dtype)
    hs, carry_seq, res_seq, carry = _loops(cfg, backend)[0](cfg, rec, xp, carry0, lens, save_residuals=True)
    carry_seq = cfg.cell.carry_type(hs, *carry_seq)
    return (hs, carry), (w_hh, b_hn, rec.w_hh, carry_seq, res_seq, carry0, lens)


def _recurrence_bwd(cfg, backend, residuals, cotangents):
    w_hh, b_hn, w_compute, carry_seq, res_seq, carry0, lens = residuals
    dhs, dcarry_t = cotangents
    prev = _previous_carries(carry_seq, carry0, lens if cfg.masked else None, cfg.reverse)
    dxp, dcarry0 = _loops(cfg, backend)[1](cfg, w_compute, dhs, prev, res_seq, dcarry_t, lens)
    res_flat = gates.flat_residuals(cfg.cell, res_seq)
    dw, db_hn = gates.weight_grads(cfg.cell, *gates.matmul_operands(cfg.cell, prev, res_flat, dxp))
    db_hn = None if b_hn is None else db_hn.astype(b_hn.dtype)
    return dw.astype(w_hh.dtype), db_hn, dxp, dcarry0, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _loops(cfg, backend="portable"):
    """``(forward, backward)``: the single resident kernels, or
    :mod:`~jaxrnn.kernels.pallas_split`'s per-step kernels when ``cfg.hidden``
    splits the weight, or with ``backend="mosaic_gpu"`` the persistent
    kernels of :mod:`~jaxrnn.kernels.mosaic_gpu` (grid-wide barrier between
    steps: CTAs in a cluster when interpreted, semaphores compiled). All
    pairs have the contracts of :func:`_forward_call` and :func:`_backward_call`."""
    if backend == "mosaic_gpu":
        sync = "cluster" if cfg.interpret else "grid"
        return (
            functools.partial(mosaic_gpu.forward_loop, sync=sync),
            functools.partial(mosaic_gpu.backward_loop, sync=sync),
        )
    if cfg.hidden is None:
        return _forward_call, _backward_call
    return pallas_split.forward_scan, pallas_split.backward_scan


def _previous_carries(carry_seq, carry0, lens, reverse):
    """The carry each step started from, ``(Tp, Bp, Hp)`` per leaf.

    Forward: ``carry_{t-1}``, ``carry0`` at ``t = 0``. Reverse: ``carry_{t+1}``
    while ``t + 1`` is a valid step, else ``carry0`` (the padding, walked
    first, kept it). Only valid steps' values are used. ``lens``: ``(Bp, 1)``
    or ``None``.
    """

    def shift(seq, c0):
        if not reverse:
            return jnp.concatenate([c0[None], seq[:-1]], axis=0)
        shifted = jnp.concatenate([seq[1:], c0[None]], axis=0)
        if lens is None:
            return shifted
        next_valid = sequence_mask(lens[:, 0] - 1, seq.shape[0], time_major=True)[..., None]  # t + 1 < lens
        return jnp.where(next_valid, shifted, c0[None])

    return jax.tree_util.tree_map(shift, carry_seq, carry0)


# --------------------------------------------------------------------------
# The pallas_calls (on padded arrays: (Tp, Bp, ·), lanes Hp and Gp)
# --------------------------------------------------------------------------
def _specs(cfg, n_chunks):
    """BlockSpec makers for the grid ``(tile b, chunk c)``.

    A gate-stacked array (``xp``, ``w_hh``) is passed once per gate, each time
    with the block index ``k`` of that gate's ``Hp`` columns: the kernel gets
    one ref per gate, and no value is ever sliced on chip.
    """
    bB, Tc = cfg.batch, cfg.steps
    single_buffer = cfg.platform == "tpu" and not cfg.interpret

    def rows(width):  # (Bp, width): a program's tile, the same for all its chunks
        return pl.BlockSpec((bB, width), lambda b, c: (b, 0))

    def resident(shape, k=0):  # constant index_map: fetched once; one VMEM buffer on TPU
        index = lambda b, c: (0,) * (len(shape) - 1) + (k,)  # noqa: E731
        if single_buffer:
            return pl.BlockSpec(shape, index, pipeline_mode=pl.Buffered(1))
        return pl.BlockSpec(shape, index)

    def seq(width, walk_back, k=0):  # (Tp, Bp, ·): chunk c (or n - 1 - c), column block k
        return pl.BlockSpec((Tc, bB, width), lambda b, c: (n_chunks - 1 - c if walk_back else c, b, k))

    return rows, resident, seq


def _bind(kernel, cfg, n_chunks, **static):
    """``kernel`` with its static keyword arguments bound (``cfg``'s and ``static``)."""
    return functools.partial(
        kernel,
        cell=cfg.cell,
        steps=cfg.steps,
        reverse=cfg.reverse,
        masked=cfg.masked,
        single_chunk=n_chunks == 1,
        **static,
    )


def _forward_call(cfg, rec, xp, carry0, lens, save_residuals):
    """Run :func:`_forward_kernel`: ``(hs, carry_seq, res_seq, final_carry)``.

    Without ``save_residuals`` (no gradient needed) only ``hs`` and the final
    carry are written; ``carry_seq`` and ``res_seq`` are empty.
    """
    Tp, Bp, Gp = xp.shape
    Hp, acc, n_chunks = cfg.cell.hidden_size, xp.dtype, Tp // cfg.steps
    n_gates = cfg.cell.num_gates
    rows, resident, seq = _specs(cfg, n_chunks)
    if save_residuals:
        res_shapes, keep_res = common.residual_layout(cfg.cell, cfg.batch, acc)
        n_seq = len(carry0) - 1
    else:
        res_shapes, keep_res, n_seq = (), (), 0
    kept = list(itertools.compress(res_shapes, keep_res))
    bhn = rec.b_hn_row()
    kernel = _bind(_forward_kernel, cfg, n_chunks, keep_res=keep_res)
    step_spec = seq(Hp, cfg.reverse)
    hs, carry_seq, res_kept, carry = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((Tp, Bp, Hp), acc),
            tuple(jax.ShapeDtypeStruct((Tp, Bp, Hp), acc) for _ in range(n_seq)),
            tuple(jax.ShapeDtypeStruct((Tp, Bp, r.shape[-1]), r.dtype) for r in kept),
            tuple(jax.ShapeDtypeStruct((Bp, Hp), acc) for _ in carry0),
        ),
        grid=(Bp // cfg.batch, n_chunks),
        in_specs=(
            rows(1),
            tuple(seq(Hp, cfg.reverse, k) for k in range(n_gates)),
            tuple(resident((Hp, Hp), k) for k in range(n_gates)),
            None if bhn is None else resident((1, Hp)),
            tuple(rows(Hp) for _ in carry0),
        ),
        out_specs=(
            step_spec,
            tuple(step_spec for _ in range(n_seq)),
            tuple(seq(r.shape[-1], cfg.reverse) for r in kept),
            tuple(rows(Hp) for _ in carry0),
        ),
        interpret=cfg.interpret,
        compiler_params=common.compiler_params(cfg, _GRID_AXES),
        name="rnn_forward",
    )(lens, (xp,) * n_gates, (rec.w_hh,) * n_gates, bhn, tuple(carry0))
    res_seq = common.unselect(res_kept, keep_res, itertools.repeat(hs))
    return hs, carry_seq, res_seq, cfg.cell.carry_type(*carry)


def _backward_call(cfg, w, dhs, prev, res_seq, dcarry_t, lens):
    """Run :func:`_backward_kernel`: ``(dxp, dcarry0)``, ``dxp`` ``(Tp, Bp, Gp)``."""
    Tp, Bp, Hp = dhs.shape
    n_gates, n_chunks = cfg.cell.num_gates, Tp // cfg.steps
    rows, resident, seq = _specs(cfg, n_chunks)
    back = not cfg.reverse  # chunks are visited opposite to the forward pass
    kernel = _bind(_backward_kernel, cfg, n_chunks)
    dxp, dcarry0 = pl.pallas_call(
        kernel,
        out_shape=(
            tuple(jax.ShapeDtypeStruct((Tp, Bp, Hp), dhs.dtype) for _ in range(n_gates)),
            tuple(jax.ShapeDtypeStruct((Bp, Hp), dhs.dtype) for _ in dcarry_t),
        ),
        grid=(Bp // cfg.batch, n_chunks),
        in_specs=(
            rows(1),
            tuple(resident((Hp, Hp), k) for k in range(n_gates)),
            seq(Hp, back),
            tuple(seq(Hp, back) for _ in prev),
            tuple(seq(r.shape[-1], back) for r in res_seq),
            tuple(rows(Hp) for _ in dcarry_t),
        ),
        out_specs=(tuple(seq(Hp, back) for _ in range(n_gates)), tuple(rows(Hp) for _ in dcarry_t)),
        interpret=cfg.interpret,
        compiler_params=common.compiler_params(cfg, _GRID_AXES),
        name="rnn_backward",
    )(lens, (w,) * n_gates, dhs, tuple(prev), tuple(res_seq), tuple(dcarry_t))
    return common.join_gates(dxp), cfg.cell.carry_type(*dcarry0)


# --------------------------------------------------------------------------
# Kernel bodies: program (batch tile, time chunk)
# --------------------------------------------------------------------------
def _load_carry(cell, init_refs, running_refs, chunk, single_chunk):
    """The carry (or carry cotangent) a chunk starts from.

    With several chunks it lives in the revisited output block
    ``running_refs``, which the first chunk seeds from ``init_refs``. With
    one chunk the kernel reads ``init_refs`` directly: no output is written
    and read back (which a GPU program would not order across its threads).
    """
    if single_chunk:
        return common.read_carry(cell, init_refs)

    @pl.when(chunk == 0)
    def _():
        common.write(running_refs, common.read(init_refs))

    return common.read_carry(cell, running_refs)


def _forward_kernel(
    lens_ref, xp_refs, w_refs, bhn_ref, carry0_refs, hs_ref, seq_refs, res_refs, carry_refs,
    *, cell, steps, reverse, masked, keep_res, single_chunk,
):
    """One ``(batch tile, time chunk)`` program of the forward pass.

    Refs (``bB`` rows per tile, ``Tc = steps``; "acc" is the accumulation
    dtype, float32 unless the inputs are float64):
      lens_ref: ``(bB, 1)`` int32 valid lengths (read only when ``masked``).
      xp_refs: per gate ``(Tc, bB, Hp)`` acc, projected inputs of this chunk.
      w_refs: per gate ``(Hp, Hp)`` compute dtype, that gate's columns of the
        recurrent weight (resident).
      bhn_ref: ``(1, Hp)`` acc ``b_hn`` (GRU ``reset="after"``), else ``None``.
      carry0_refs: ``(bB, Hp)`` acc per carry leaf, the initial carry.
      hs_ref: out ``(Tc, bB, Hp)`` acc, outputs ``h_t`` (zero at padded steps).
      seq_refs: out ``(Tc, bB, Hp)`` per carry leaf after ``h`` (LSTM:
        ``c_t``); empty when no residuals are saved.
      res_refs: out ``(Tc, bB, Hp)`` per residual of ``gates.forward_gates``
        with ``keep_res`` set.
      carry_refs: out ``(bB, Hp)`` per carry leaf: the running carry, final
        after the last chunk.
    """
    chunk, n_chunks = pl.program_id(1), pl.num_programs(1)
    t0 = ((n_chunks - 1 - chunk) if reverse else chunk) * steps
    carry = _load_carry(cell, carry0_refs, carry_refs, chunk, single_chunk)
    w = common.read(w_refs)
    b_hn = common.read_b_hn(bhn_ref)
    lens = lens_ref[...] if masked else None

    def body(s, carry):
        j = steps - 1 - s if reverse else s
        new, h, res = gates.forward_gates(cell, w, b_hn, carry, common.read(xp_refs, j))
        if masked:
            valid = t0 + j < lens
            new = common.select_carry(valid, new, carry)
            h = where_valid(valid, h)
        hs_ref[j] = h
        common.write(seq_refs, new[1:], j)
        common.write(res_refs, itertools.compress(res, keep_res), j)
        return new

    carry = lax.fori_loop(0, steps, body, carry)
    common.write(carry_refs, carry)


def _backward_kernel(
    lens_ref, w_refs, dhs_ref, prev_refs, res_refs, dcarry_t_refs, dxp_refs, dcarry_refs,
    *, cell, steps, reverse, masked, single_chunk,
):
    """One ``(batch tile, time chunk)`` program of the backward pass.

    Walks time opposite to the forward pass. At each valid step, with the
    output's cotangent added to the carry's (``dh += dhs_t``)::

        dxp_t, dcarry = gates.backward_gates(cell, W, carry_{t-1}, res_t, dcarry)

    A padded step passes ``dcarry`` through and gets ``dxp_t = 0``.

    Refs (as in :func:`_forward_kernel`):
      lens_ref: ``(bB, 1)`` int32 valid lengths (read only when ``masked``).
      w_refs: per gate ``(Hp, Hp)`` compute dtype, recurrent weight blocks (resident).
      dhs_ref: ``(Tc, bB, Hp)`` acc, cotangents of the outputs.
      prev_refs: ``(Tc, bB, Hp)`` per carry leaf: the carry each step started from.
      res_refs: ``(Tc, bB, Hp)`` per residual of ``gates.forward_gates``.
      dcarry_t_refs: ``(bB, Hp)`` per carry leaf, cotangent of the final carry.
      dxp_refs: out per gate ``(Tc, bB, Hp)`` acc, cotangents of the projected inputs.
      dcarry_refs: out ``(bB, Hp)`` per carry leaf: the running carry
        cotangent, the initial carry's after the last chunk.
    """
    chunk, n_chunks = pl.program_id(1), pl.num_programs(1)
    t0 = (chunk if reverse else n_chunks - 1 - chunk) * steps
    dcarry = _load_carry(cell, dcarry_t_refs, dcarry_refs, chunk, single_chunk)
    w = common.read(w_refs)
    lens = lens_ref[...] if masked else None

    def body(s, dcarry):
        j = s if reverse else steps - 1 - s
        prev, res = common.read_carry(cell, prev_refs, j), common.read(res_refs, j)
        dxp, dprev = gates.backward_gates(cell, w, prev, res, dcarry._replace(h=dcarry.h + dhs_ref[j]))
        if masked:
            valid = t0 + j < lens
            dprev = common.select_carry(valid, dprev, dcarry)
            dxp = where_valid(valid, dxp)
        common.write(dxp_refs, dxp, j)
        return dprev

    dcarry = lax.fori_loop(0, steps, body, dcarry)
    common.write(dcarry_refs, dcarry)


# --------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------
def reference(cell, params, xp, carry0, lengths, reverse):
    """What the kernels are tested against: :func:`jaxrnn.scan.scan_reference`.

    Same contract as :func:`rnn_pallas`: a ``lax.scan`` over
    ``cell.step_projected``, differentiated by JAX's autodiff.
    """
    return scan_reference(cell, params, xp, carry0, lengths, reverse)
