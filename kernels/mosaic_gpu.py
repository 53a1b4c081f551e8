r"""A persistent Mosaic GPU recurrence: the whole sequence in one kernel, the weight split across CTAs.

The third kernel family of the Pallas backend, for GPUs with JAX >= 0.11
(where the Triton lowering of :mod:`jaxrnn.kernels.pallas` and
:mod:`jaxrnn.kernels.pallas_split` is deprecated). It splits the recurrent
weight by hidden units as :mod:`~jaxrnn.kernels.pallas_split` does, but runs
the time loop *inside* one kernel: each CTA ``j`` owns ``block.hidden`` units
``J`` and a batch tile, copies the columns ``J`` of every gate's block of
``W_hh`` into its shared memory once (K-major: ``(|J|, H)`` tiles holding
the columns' transpose, rows of ``W_hhᵀ``, which the wrapper transposes once),
and then, per step:

1. copies ``h_{t-1}`` of every unit (the batch tile's rows) from a global
   exchange buffer into shared memory (TMA),
2. computes its units' gate pre-activations with one ``wgmma`` per gate
   (``h_{t-1} W^{(k)}_{hh}[:, J]``, float32 accumulator),
3. runs the cell's own equations on the tile (:meth:`jaxrnn.cells.Cell.gate_step`,
   the per-gate math every kernel shares), masks padded steps,
4. writes ``h_t``, the carry and the residuals of its units, publishes its
   slice of ``h_t`` (in the compute dtype, the matmul's operand) to the other
   slot of the ping-pong exchange buffer,
5. meets every other CTA of its batch tile at a barrier before step ``t + 1``.

The backward kernel has the same structure in reverse time: CTA ``j`` reads
step ``t + 1``'s recurrent-matmul cotangents ``m̄`` of every unit from the
exchange buffer, adds ``Σ_k m̄_k W_k[J, :]ᵀ`` (``wgmma`` against its columns
of the per-gate transposes, resident in shared memory K-major, i.e. the rows
``W_k[J, :]``) to its units' ``dh``,
computes the gate cotangents elementwise
(:func:`~jaxrnn.kernels.gates.backward_gates_local`), writes ``dxp_{t,J}``
and publishes ``m̄_{t,J}``. The weight gradient stays one large matmul after
the loop, in the custom VJP of :mod:`jaxrnn.kernels.pallas`, which calls
:func:`forward_loop` and :func:`backward_loop` in place of its other loops.

The barrier (:data:`SYNCS`):

* ``"cluster"``: the CTAs of a batch tile form one thread-block cluster and
  meet at a :class:`~jax.experimental.pallas.mosaic_gpu.ClusterBarrier`.
  Runs in Mosaic GPU's interpreter (``InterpretGPUParams``, with race
  detection) on CPU; on hardware a cluster holds at most 16 CTAs (8 portably).
* ``"grid"``: the CTAs are grid points and meet at a grid-wide barrier built
  from global ``plgpu.SemaphoreType.REGULAR`` semaphores
  (``pl.semaphore_signal`` / ``plgpu.semaphore_wait``): a monotone arrival
  counter, reset at the end of the kernel. Every CTA must be resident at
  once (at most one per SM). This is the form for large weights (the
  FlashRNN configuration needs 48 CTAs). The interpreter of JAX 0.12 cannot
  run it: it does not allocate semaphores (``pl.get_global`` of one fails,
  "No ir_type_handler for aval type: AbstractRef") and runs grid points one
  after another, so a grid-wide barrier cannot be interpreted.

Limits: the matmul is a ``wgmma`` (Hopper; the interpreter runs it, and
Mosaic GPU cannot lower a ``jnp.dot`` of values: "Unimplemented primitive
in Pallas Mosaic GPU lowering: dot_general"); compiled, a CTA's batch tile
is a multiple of 64 rows (``wgmma``'s M). Every tile a CTA reads or writes
per step goes through shared memory with TMA (Mosaic GPU moves registers to
and from global memory only in whole 128-byte lines), and the length mask
is a ``(rows, |J|)`` tile (layout inference rejects broadcasting a
``(rows, 1)`` column). Not for a GRU with ``reset="before"`` (its candidate
needs ``r`` of every unit before its matmul). With JAX 0.12.0.1, Elman,
LSTM and GRU (``reset="after"``: ``b_hn`` is added to the candidate's matmul
output as a full ``(rows, |J|)`` tile, and :meth:`~jaxrnn.cells.Cell.gate_step`
gets ``b_hn=None``, since layout inference rejects a broadcast ``(1, |J|)``
row), in bf16 and in float32, lower for CUDA (``jax.export``, no GPU
needed). Both ``wgmma`` operands sit K-major in shared memory (``h_{t-1}``
or ``m̄`` as ``(rows, H)``, the weight as ``(|J|, H)`` tiles passed
transposed, ``b.transpose((1, 0))``): TF32 ``wgmma`` accepts no other layout
("Only f16 WGMMA supports transposes"), and bf16 uses the same one. Float32
matmuls run in TF32 on the GPU (10-bit mantissa, like float16; the
interpreter computes them in float32), and float32 tiles take twice the
shared memory: with one 64-row batch tile and 16-unit tiles a CTA fits up to
H = 384 for an LSTM (768 in bf16), 448 for a GRU (896), 672 for an Elman
cell (1344). Verified only in the interpreter: no GPU ran these kernels
(``VERIFIED_PLATFORMS`` of :mod:`jaxrnn.kernels.pallas` is unchanged), so
:data:`LOWERS` keeps them off the GPU default.

FlashRNN configuration (bf16 LSTM, H = 768, B = 16, T = 1024) on an H100 /
H200 (132 SMs, 227 KB of shared memory per block): ``W_hh`` is 768 × 3072 ×
2 B = 4.7 MB. :func:`gpu_block` gives 48 CTAs of 16 units (one 64-row batch
tile, 16 rows real). Each holds 768 × (4 · 16) × 2 B = 98 KB of weight
columns (forward: of ``W_hh``; backward: of the per-gate ``W_kᵀ``; K-major), a
64 × 768 × 2 B = 98 KB tile of ``h_{t-1}`` (forward) or of one gate's ``m̄``
(backward, reused gate by gate), and 64 × 16 staging tiles:
:func:`smem_bytes` = 227,336 B (the backward's; Mosaic GPU allows 232,448),
and the configuration lowers. 32-unit tiles (24 CTAs) would need 196 KB of
weight alone and do not fit. Per step a CTA does 4 ``wgmma`` of
64 × 768 × 16 (≈ 6 MFLOP, well under a microsecond), reads the ``h_{t-1}``
of every unit (24.6 KB of real rows) from L2 and writes its 16 × 16 slice;
the step time is bounded by the grid-wide barrier (a round trip of atomics
through L2, about 1 µs) and the ``h_t`` exchange through L2 that it orders,
plus the serial TMA round trips of the step's tiles — not by the matmul.
FlashRNN's measured floor is ≈ 2 µs per step. A transposed ``wgmma``
(M = 4 gates × 16 units, N = the 16 batch rows) would cut the 98 KB tile to
24.6 KB.

Example:
  >>> from jaxrnn.kernels import Pallas
  >>> from jaxrnn.kernels.pallas import BlockSizes
  >>> impl = Pallas(block=BlockSizes(batch=2, hidden=8), backend="mosaic_gpu", interpret=True)
  >>> ys, carry = jaxrnn.rnn(jaxrnn.LSTM(16), params, xs, impl=impl)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrnn.kernels import common, gates
from jaxrnn.scan import where_valid

try:  # jax 0.10 has the module, not its interpreter
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

__all__ = [
    "AVAILABLE",
    "INTERPRETABLE",
    "LOWERS",
    "MAX_CTAS",
    "PREFERRED",
    "SMEM_BYTES",
    "SYNCS",
    "backward_loop",
    "forward_loop",
    "gpu_block",
    "grid_barrier",
    "padded_block",
    "smem_bytes",
]

#: The barriers between steps (see the module docstring).
SYNCS = ("cluster", "grid")

#: The largest cluster on a Hopper GPU (non-portable size; 8 portably).
MAX_CLUSTER = 16

#: ``wgmma``'s M: compiled, a CTA's batch tile is a multiple of this.
WGMMA_ROWS = 64


def _jax_version():
    return tuple(int(p) for p in jax.__version__.split(".")[:2])


#: Whether this JAX has the Mosaic GPU Pallas API the kernels use.
AVAILABLE = plgpu is not None and hasattr(plgpu, "ClusterBarrier") and hasattr(plgpu, "wgmma")
def _interpreter_raises_on_races():
    """Whether Mosaic GPU's interpreter takes ``on_race`` (JAX >= 0.12; 0.11's records races without raising)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        return False
    try:
        return "on_race" in inspect.signature(params).parameters
    except (TypeError, ValueError):
        return False


#: Whether this JAX can run the kernels on CPU: Mosaic GPU's interpreter with race
#: detection that raises (``InterpretGPUParams(on_race="raise")``, JAX >= 0.12).
INTERPRETABLE = AVAILABLE and _interpreter_raises_on_races()
#: Whether every configuration the compiled kernels accept lowers for CUDA.
#: ``False``: with JAX 0.12.0.1 Elman, LSTM and GRU (``reset="after"``) lower
#: in bf16 and float32 (within the shared memory of :func:`smem_bytes`; see the
#: module docstring), but nothing ran on a GPU; so ``impl="pallas"`` on a GPU
#: keeps the (deprecated but working) Triton kernels.
LOWERS = False
#: Whether ``impl="pallas"`` on a GPU picks these kernels: JAX >= 0.11 (where
#: Triton is deprecated), once they lower (:data:`LOWERS`).
PREFERRED = AVAILABLE and _jax_version() >= (0, 11) and LOWERS


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------
def padded_block(block, interpret: bool):
    """``block`` as these kernels pad it: compiled, batch tiles of a multiple
    of 64 rows (``wgmma``'s M), hidden tiles and lanes of a multiple of 16
    (``wgmma``'s N and K, and the shared-memory tiling of 16-bit operands);
    interpreted, as given.

    ``block.hidden`` must be set (:func:`gpu_block` gives the GPU default).
    """
    if interpret:
        return block
    return dataclasses.replace(
        block,
        batch=common.round_up(block.batch, WGMMA_ROWS),
        lanes=math.lcm(block.lanes, 16),
        hidden=common.round_up(block.hidden, 16),
    )


#: Shared memory a CTA may use on an H100 / H200 (227 KB; Mosaic GPU's ``max_smem_bytes``).
SMEM_BYTES = 232448

#: The most CTAs :func:`gpu_block` spreads the weight over (an H100 SXM's SMs).
MAX_CTAS = 132

#: Mosaic GPU starts every shared-memory buffer at a multiple of 1024 bytes.
SMEM_ALIGNMENT = 1024


def smem_bytes(cell, rows: int, Hp: int, tile: int, compute_dtype, masked: bool = True) -> int:
    """Shared memory one CTA of the forward or the backward kernel (the larger) uses.

    The resident weight columns (``num_gates`` tiles ``tile × Hp``, K-major,
    in the compute dtype: float32 twice bf16's), the staging tile of
    ``h_{t-1}`` (forward) or of one gate's ``m̄`` (backward), ``rows × Hp``,
    and the ``(rows, tile)`` tiles of :func:`_staging`, each buffer rounded
    up to :data:`SMEM_ALIGNMENT`; Mosaic GPU adds 8 bytes of barriers. It
    equals what Mosaic GPU reports when it lowers (e.g. 227,336 B for the
    backward of a bf16 LSTM, Hp = 768, 64 rows, tile 16).
    """
    cd, n = jnp.dtype(compute_dtype).itemsize, cell.num_gates
    carry = len(cell.zero_carry(1))
    res = len(common.residual_layout(dataclasses.replace(cell, hidden_size=1), 1, jnp.float32)[0])

    def buffer(*shape, itemsize):
        return common.round_up(math.prod(shape) * itemsize, SMEM_ALIGNMENT)

    # weight, h (or m̄), exchange tile, barriers
    fixed = n * buffer(tile, Hp, itemsize=cd) + buffer(rows, Hp, itemsize=cd) + buffer(rows, tile, itemsize=cd) + 8
    pool_forward = max(carry + masked + common.has_b_hn(cell), n, 1 + (carry - 1) + res)
    pool_backward = max(carry + masked, carry + res + 1, n)
    return fixed + max(pool_forward, pool_backward) * buffer(rows, tile, itemsize=4)


def gpu_block(cell, batch: int = WGMMA_ROWS, compute_dtype=jnp.bfloat16):
    """The GPU's default :class:`~jaxrnn.kernels.common.BlockSizes` for ``cell``:
    the widest hidden tile (16, 32, ... units) whose CTA fits
    :data:`SMEM_BYTES` (:func:`smem_bytes`, with the units padded to whole
    tiles and the weight in ``compute_dtype``), at least as wide as needed
    for :data:`MAX_CTAS` CTAs; fewer, wider CTAs make the barrier cheaper.
    16 units is the narrowest tile: whether it fits is for Mosaic GPU to say
    when the kernels lower (e.g. a float32 LSTM beyond H = 384 does not).

    Example:
      >>> gpu_block(jaxrnn.LSTM(768)).hidden  # 48 CTAs of 16 units, 222 KiB each
      16
    """
    Hp = common.round_up(cell.hidden_size, 16)
    rows = common.round_up(batch, WGMMA_ROWS)
    tile = 16
    while -(-Hp // tile) > MAX_CTAS:
        tile *= 2

    def fits(tile):  # the hidden units are padded to whole tiles
        return smem_bytes(cell, rows, common.round_up(Hp, tile), tile, compute_dtype) <= SMEM_BYTES

    while tile * 2 <= Hp and fits(tile * 2):
        tile *= 2
    return common.BlockSizes(batch=batch, lanes=16, hidden=tile)


def _params(cfg, sync):
    """``(interpret, compiler_params)`` of the kernels for ``cfg``."""
    if cfg.interpret:
        if not INTERPRETABLE:
            raise NotImplementedError(
                f"the Mosaic GPU kernels run on CPU in Mosaic GPU's interpreter "
                f"with race detection that raises (jax.experimental.pallas.mosaic_gpu.InterpretGPUParams(on_race=...), "
                f"JAX >= 0.12); jax {jax.__version__} lacks it"
            )
        if sync != "cluster":
            raise NotImplementedError(
                "sync='grid' cannot be interpreted: JAX 0.12's Mosaic GPU interpreter allocates no semaphores "
                "and runs grid points one after another; use sync='cluster'"
            )
        return plgpu.InterpretGPUParams(detect_races=True, on_race="raise", uninitialized_memory="nan"), None
    return None, plgpu.CompilerParams()


def _mesh(sync, n_tiles, n_cta):
    """``plgpu.kernel``'s mesh keywords: batch tiles on the grid, the CTAs of
    a tile in a cluster (``"cluster"``) or on the grid (``"grid"``)."""
    if sync == "cluster":
        if n_cta > MAX_CLUSTER:
            raise ValueError(
                f"sync='cluster': {n_cta} CTAs per batch tile, a cluster holds at most {MAX_CLUSTER}; "
                f"use wider block.hidden or sync='grid'"
            )
        return dict(grid=(n_tiles,), grid_names=("batch",), cluster=(n_cta,), cluster_names=("cta",))
    if n_tiles * n_cta > MAX_CTAS:  # a grid-wide barrier needs every CTA resident at once
        raise ValueError(
            f"sync='grid': {n_tiles} batch tiles × {n_cta} CTAs = {n_tiles * n_cta} CTAs must all be resident "
            f"(at most {MAX_CTAS}, one per SM); use larger block.batch or block.hidden"
        )
    return dict(grid=(n_tiles, n_cta), grid_names=("batch", "cta"))


# --------------------------------------------------------------------------
# The barrier between steps
# --------------------------------------------------------------------------
def grid_barrier(sync, sync_ref, n_arrivals, phase):
    """All CTAs (of a batch tile: ``"cluster"``; of the grid: ``"grid"``) meet here.

    ``"cluster"``: arrive at and wait on the cluster barrier ``sync_ref``.
    ``"grid"``: add one to the global arrival counter ``sync_ref`` and wait
    until it reaches ``n_arrivals · (phase + 1)`` (without decrementing it);
    :func:`_release_counter` resets it at the end.
    """
    if sync == "cluster":
        plgpu.barrier_arrive(sync_ref)
        plgpu.barrier_wait(sync_ref)
        return
    pl.semaphore_signal(sync_ref, 1)
    plgpu.semaphore_wait(sync_ref, n_arrivals * (phase + 1), decrement=False)


def _sync_refs(sync):
    """The barrier's refs: a cluster barrier scratch, or two global semaphores."""
    if sync == "cluster":
        return None
    return pl.get_global(plgpu.SemaphoreType.REGULAR), pl.get_global(plgpu.SemaphoreType.REGULAR)


def _release_counter(sems, n_arrivals, phases):
    """Return the grid barrier's counter to zero for the next launch: every CTA
    reports it is past its last wait; CTA ``(0, 0)`` then subtracts all arrivals."""
    counter, done = sems
    pl.semaphore_signal(done, 1)

    @pl.when((lax.axis_index("batch") == 0) & (lax.axis_index("cta") == 0))
    def _():
        plgpu.semaphore_wait(done, n_arrivals)
        plgpu.semaphore_wait(counter, n_arrivals * phases)


def _barrier(sync, cluster_barrier, sems, n_arrivals):
    """``barrier(phase)``: :func:`grid_barrier` with this kernel's refs (looked
    up when traced, so tests may replace it)."""
    ref = cluster_barrier if sync == "cluster" else (None if sems is None else sems[0])
    return lambda phase: grid_barrier(sync, ref, n_arrivals, phase)


# --------------------------------------------------------------------------
# The time loops: the contracts of jaxrnn.kernels.pallas' loops
# --------------------------------------------------------------------------
def forward_loop(cfg, rec, xp, carry0, lens, save_residuals, *, sync="cluster"):
    """The forward recurrence in one persistent kernel.

    Same contract as the other forward loops of :mod:`jaxrnn.kernels.pallas`:
    ``(hs, carry_seq, res_seq, final_carry)``; ``carry_seq`` and ``res_seq``
    empty without ``save_residuals``.

    Args:
      cfg: the padded problem's :class:`~jaxrnn.kernels.common.Config`
        (``cfg.hidden`` units per CTA, ``cfg.batch`` rows per batch tile).
      rec: :class:`~jaxrnn.kernels.common.Recurrent`, ``w_hh`` ``(Hp, Gp)`` in the compute dtype.
      xp: ``(Tp, Bp, Gp)`` float32 projected inputs.
      carry0: leaves ``(Bp, Hp)`` float32.
      lens: ``(Bp, 1)`` int32 valid lengths (read when ``cfg.masked``).
      save_residuals: also return what the backward pass needs.
      sync: the barrier between steps, one of :data:`SYNCS`.
    """
    cell = cfg.cell
    Tp, Bp, _ = xp.shape
    Hp, hT, rows, n_gates = cell.hidden_size, cfg.hidden, cfg.batch, cell.num_gates
    n_cta, n_tiles = Hp // hT, Bp // rows
    cd, acc = jnp.dtype(cell.compute_dtype), xp.dtype
    interpret, compiler_params = _params(cfg, sync)
    if save_residuals:
        res_shapes, keep_res = common.residual_layout(cell, rows, acc)
        n_seq = len(carry0) - 1
    else:
        res_shapes, keep_res, n_seq = (), (), 0
    n_res = sum(keep_res)
    seq = jax.ShapeDtypeStruct((Tp, Bp, Hp), acc)
    # b_hn as a (Bp, Hp) array: a CTA adds its (rows, |J|) tile to the candidate's
    # matmul output (m = h W_hn + b_hn); layout inference rejects broadcasting a row.
    bhn = () if rec.b_hn is None else (jnp.broadcast_to(rec.b_hn.astype(acc), (Bp, Hp)),)
    # W_hhᵀ (Gp, Hp): gate k's columns J are its rows k·Hp + J, the K-major tile a CTA keeps.
    inputs = (xp, rec.w_hh.T, tuple(carry0)) + _lens_tiles(cfg, lens, Bp, Hp) + bhn
    counts = (max(len(carry0) + cfg.masked + len(bhn), n_gates, 1 + n_seq + n_res), _ONE)
    kernel = plgpu.kernel(
        _forward_body(cfg, sync, keep_res, n_seq, len(carry0), bool(bhn), counts, n_cta * n_tiles),
        out_type=(
            seq,
            (seq,) * n_seq,
            (seq,) * n_res,
            tuple(jax.ShapeDtypeStruct((Bp, Hp), acc) for _ in carry0),
            jax.ShapeDtypeStruct((2, Bp, Hp), cd),  # the h exchange (ping-pong)
        ),
        scratch_types=(
            tuple(plgpu.SMEM((hT, Hp), cd) for _ in range(n_gates)),  # resident weight columns, K-major
            plgpu.SMEM((rows, Hp), cd),  # h_{t-1} of every unit
            plgpu.Barrier(),  # TMA completion
            _staging(rows, hT, acc, cd, counts),
        )
        + ((plgpu.ClusterBarrier(collective_axes=("cta",)),) if sync == "cluster" else ()),
        compiler_params=compiler_params,
        interpret=interpret,
        kernel_name="rnn_forward_mosaic",
        **_mesh(sync, n_tiles, n_cta),
    )
    hs, carry_seq, res_kept, carry, _ = kernel(*inputs)
    if not save_residuals:
        return hs, (), (), cell.carry_type(*carry)
    return hs, carry_seq, common.unselect(res_kept, keep_res, itertools.repeat(hs)), cell.carry_type(*carry)


def backward_loop(cfg, w, dhs, prev, res_seq, dcarry_t, lens, *, sync="cluster"):
    """The backward recurrence in one persistent kernel, then the first step's matmul cotangent.

    Same contract as the other backward loops of :mod:`jaxrnn.kernels.pallas`:
    ``(dxp, dcarry0)``, ``dxp`` ``(Tp, Bp, Gp)``.
    """
    cell = cfg.cell
    Tp, Bp, Hp = dhs.shape
    hT, rows, n_gates = cfg.hidden, cfg.batch, cell.num_gates
    n_cta, n_tiles = Hp // hT, Bp // rows
    cd, acc = jnp.dtype(cell.compute_dtype), dhs.dtype
    interpret, compiler_params = _params(cfg, sync)
    w_gates = gates.split_gates(cell, w)
    # (Gp, Hp): the columns J of W_kᵀ, K-major, are the rows J of W_k, rows k·Hp + J here.
    wt = jnp.concatenate(w_gates, axis=0)
    inputs = (wt, dhs, tuple(prev), tuple(res_seq), tuple(dcarry_t)) + _lens_tiles(cfg, lens, Bp, Hp)
    out = jax.ShapeDtypeStruct((Tp, Bp, Hp), acc)
    counts = (max(len(prev) + cfg.masked, len(prev) + len(res_seq) + 1, n_gates), _ONE)
    kernel = plgpu.kernel(
        _backward_body(cfg, sync, len(prev), len(res_seq), counts, n_cta * n_tiles),
        out_type=(
            (out,) * n_gates,
            tuple(jax.ShapeDtypeStruct((Bp, Hp), acc) for _ in dcarry_t),
            jax.ShapeDtypeStruct((2, n_gates, Bp, Hp), cd),  # the m̄ exchange (ping-pong)
        ),
        scratch_types=(
            tuple(plgpu.SMEM((hT, Hp), cd) for _ in range(n_gates)),  # resident columns of W_kᵀ, K-major
            plgpu.SMEM((rows, Hp), cd),  # m̄_{t+1} of every unit, one gate at a time
            plgpu.Barrier(),
            _staging(rows, hT, acc, cd, counts),
        )
        + ((plgpu.ClusterBarrier(collective_axes=("cta",)),) if sync == "cluster" else ()),
        compiler_params=compiler_params,
        interpret=interpret,
        kernel_name="rnn_backward_mosaic",
        **_mesh(sync, n_tiles, n_cta),
    )
    dxp, dprev, dmx = kernel(*inputs)
    # The first step's matmul cotangents reach the initial carry: one matmul here.
    dmm_first = tuple(dmx[Tp % 2, k] for k in range(n_gates))
    dprev = cell.carry_type(*dprev)
    dcarry0 = dprev._replace(h=dprev.h + gates.recurrent_vjp(cell, w_gates, dmm_first))
    return common.join_gates(dxp), dcarry0


def _lens_tiles(cfg, lens, Bp, Hp):
    """``(lens,)`` broadcast to ``(Bp, Hp)`` when ``cfg.masked``, else ``()``:
    a CTA reads its ``(rows, |J|)`` tile (Mosaic GPU's layout inference rejects
    broadcasting a ``(rows, 1)`` column), in float32 (exact up to 2^24 steps)
    to share the staging tiles."""
    return (jnp.broadcast_to(lens, (Bp, Hp)).astype(jnp.float32),) if cfg.masked else ()


# --------------------------------------------------------------------------
# Kernel bodies: CTA (batch tile b, units J = tile j)
# --------------------------------------------------------------------------
def _tile(cfg):
    """``(rows, cols, gate_cols)``: this CTA's batch rows, its units ``J`` and gate ``k``'s columns ``J``."""
    Hp, hT, bB = cfg.cell.hidden_size, cfg.hidden, cfg.batch
    b, j = lax.axis_index("batch"), lax.axis_index("cta")
    return pl.ds(b * bB, bB), pl.ds(j * hT, hT), lambda k: pl.ds(k * Hp + j * hT, hT)


def _load_columns(src_ref, dst_refs, gate_cols, tma):
    """Copy gate ``k``'s columns ``J`` into ``dst_refs[k]`` (TMA), once per kernel,
    K-major: ``src_ref`` holds the weight transposed, ``(n·Hp, Hp)``, so the
    columns are its rows ``gate_cols(k)`` and ``dst_refs[k]`` is ``(|J|, Hp)``."""
    for k, dst in enumerate(dst_refs):
        plgpu.copy_gmem_to_smem(src_ref.at[gate_cols(k)], dst, tma)
        plgpu.barrier_wait(tma)


def _wgmma(pairs, shape):
    """``Σ a @ bᵀ`` over the ``(a, b)`` pairs of shared-memory refs, ``a``
    ``(M, K)`` and ``b`` ``(N, K)`` (both K-major: TF32 ``wgmma`` accepts no
    other layout, "Only f16 WGMMA supports transposes"): ``wgmma`` into one
    float32 accumulator of ``shape``, then its value."""

    def body(acc_ref):
        for a, b in pairs:
            # b.transpose is plgpu.transpose_ref(b, (1, 0)), whose check of b.memory_space
            # fails on a kernel's ref in JAX 0.12.0.1 ("not available on traced array")
            plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _recurrent_vjp(dmx_ref, dmm_smem, wt_smem, rows_b, tma):
    """``Σ_k m̄_k W_k[J, :]ᵀ`` for this CTA's units: per gate, ``m̄_k`` of every
    unit into the one staging buffer ``dmm_smem`` (TMA), then a ``wgmma``
    against the resident columns ``J`` of ``W_kᵀ`` (K-major: rows ``J`` of
    ``W_k``); float32 ``(rows, |J|)``."""
    total = None
    for k, wt in enumerate(wt_smem):
        plgpu.copy_gmem_to_smem(dmx_ref.at[k, rows_b], dmm_smem, tma)
        plgpu.barrier_wait(tma)
        part = _wgmma([(dmm_smem, wt)], (dmm_smem.shape[0], wt.shape[0]))
        total = part if total is None else total + part
    return total


def _setup(cfg, sync, cluster_barrier, n_arrivals, staging, counts, tma):
    """A kernel body's ``(semaphores, barrier, tiles, (rows, cols, gate_cols))``."""
    sems = _sync_refs(sync)
    return sems, _barrier(sync, cluster_barrier, sems, n_arrivals), _Tiles(staging, counts, tma), _tile(cfg)


def _run(step, init, n_steps, io, final_refs, at, sems, n_arrivals):
    """The time loop, then the final carry's tiles to ``final_refs[at]``; resets the grid barrier."""
    final = lax.fori_loop(0, n_steps, step, init)
    for ref, value in zip(final_refs, final):
        io.store(value, ref.at[at])
    io.flush()
    if sems is not None:
        _release_counter(sems, n_arrivals, n_steps + 1)


def _staging(rows, hT, acc, cd, counts):
    """Shared-memory tiles that stage a CTA's global-memory traffic (TMA both
    ways: Mosaic GPU moves registers to and from global memory only in whole
    128-byte lines): ``n_pool`` ``(rows, |J|)`` acc tiles that a step's loads
    and then its stores take in turn, and one tile in the compute dtype for
    the exchange (``counts``: ``(n_pool, _ONE)``; see :class:`_Tiles`)."""
    return tuple(plgpu.SMEM((rows, hT), acc) for _ in range(counts[0])), plgpu.SMEM((rows, hT), cd)


class _Tiles:
    """A CTA's tile loads and stores through the shared-memory tiles of :func:`_staging`.

    Loads take the pool's tiles in turn (the value is read out at once), then
    stores take them again from the first; :meth:`publish` reuses its one
    tile once the previous copy has left it; :meth:`flush` waits for every
    store and starts the pool over (at the end of each step).
    """

    def __init__(self, staging, counts, tma):
        self.pool, self.exchange = _groups(staging, *counts)
        self.tma, self.n_load, self.n_store, self.published = tma, 0, 0, False

    def _fetch(self, src, dst):
        plgpu.copy_gmem_to_smem(src, dst, self.tma)
        plgpu.barrier_wait(self.tma)
        return dst[...]

    def load(self, src):
        """The acc tile ``src`` (a global-memory view) as a value."""
        self.n_load += 1
        return self._fetch(src, self.pool[self.n_load - 1])

    def _put(self, tile, value, dst):
        tile[...] = value.astype(tile.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tile, dst)

    def store(self, value, dst):
        """Write ``value`` to the global-memory view ``dst``."""
        self.n_store += 1
        self._put(self.pool[self.n_store - 1], value, dst)

    def publish(self, value, dst):
        """Write ``value`` in the compute dtype to the exchange buffer's view ``dst``."""
        if self.published:
            plgpu.wait_smem_to_gmem(0)
        self.published = True
        self._put(self.exchange, value, dst)

    def flush(self):
        plgpu.wait_smem_to_gmem(0)
        self.n_load, self.n_store, self.published = 0, 0, False


def _groups(refs, *sizes):
    """The kernel's refs (nested tuples, flattened in order) in groups of ``sizes``.

    ``None`` gives one ref; a bool (an optional ref) the ref or ``None``;
    an int a list of that many refs.
    """
    flat = iter(_flat(refs))
    out = []
    for size in sizes:
        if size is None:
            out.append(next(flat))
        elif isinstance(size, bool):
            out.append(next(flat) if size else None)
        else:
            out.append([next(flat) for _ in range(size)])
    return out


def _flat(tree) -> list:
    """The refs of a kernel's arguments (tuples of refs, nested), in order."""
    if isinstance(tree, (tuple, list)):
        return [leaf for sub in tree for leaf in _flat(sub)]
    return [tree]


_ONE = None  # _groups: one ref


def _forward_body(cfg, sync, keep_res, n_seq, n_carry, has_bhn, counts, n_arrivals):
    cell, masked, reverse = cfg.cell, cfg.masked, cfg.reverse
    n_gates, rows, hT = cell.num_gates, cfg.batch, cfg.hidden

    def body(*refs):
        (xp_ref, w_ref, carry0_refs, lens_ref, bhn_ref, hs_ref, seq_refs, res_refs, carry_refs, hx_ref, w_smem, h_smem,
         tma, staging, cluster_barrier) = _groups(
            refs, _ONE, _ONE, n_carry, masked, has_bhn, _ONE, n_seq, sum(keep_res), n_carry, _ONE, n_gates, _ONE, _ONE,
            counts[0] + 1, sync == "cluster",
        )
        sems, barrier, io, tile = _setup(cfg, sync, cluster_barrier, n_arrivals, staging, counts, tma)
        rows_b, cols, gate_cols = tile
        Tp = xp_ref.shape[0]
        _load_columns(w_ref, w_smem, gate_cols, tma)
        lens = io.load(lens_ref.at[rows_b, cols]) if masked else None
        b_tile = io.load(bhn_ref.at[rows_b, cols]) if has_bhn else None
        carry = cell.carry_type(*(io.load(r.at[rows_b, cols]) for r in carry0_refs))
        io.publish(carry.h, hx_ref.at[0, rows_b, cols])
        io.flush()
        barrier(0)

        def step(s, carry):
            t = Tp - 1 - s if reverse else s
            slot = s % 2
            plgpu.copy_gmem_to_smem(hx_ref.at[slot, rows_b], h_smem, tma)
            plgpu.barrier_wait(tma)
            z = tuple(_wgmma([(h_smem, w)], (rows, hT)) for w in w_smem)
            if has_bhn:  # the candidate's m = h W_hn + b_hn
                z = z[:-1] + (z[-1] + b_tile,)
            xp_t = tuple(io.load(xp_ref.at[t, rows_b, gate_cols(k)]) for k in range(n_gates))
            new, h, res = cell.gate_step(carry, xp_t, lambda _, k: z, None, h_tile=carry.h)  # b_hn is in z
            if masked:
                valid = t.astype(lens.dtype) < lens
                new = common.select_carry(valid, new, carry)
                h = where_valid(valid, h)
            io.store(h, hs_ref.at[t, rows_b, cols])
            for ref, value in zip(seq_refs, new[1:]):
                io.store(value, ref.at[t, rows_b, cols])
            for ref, value in zip(res_refs, itertools.compress(res, keep_res)):
                io.store(value, ref.at[t, rows_b, cols])
            io.publish(new.h, hx_ref.at[1 - slot, rows_b, cols])
            io.flush()  # h_t is in global memory before the barrier
            barrier(s + 1)
            return new

        _run(step, carry, Tp, io, carry_refs, (rows_b, cols), sems, n_arrivals)

    return body


def _backward_body(cfg, sync, n_prev, n_res, counts, n_arrivals):
    cell, masked, reverse = cfg.cell, cfg.masked, cfg.reverse
    n_gates, rows, hT = cell.num_gates, cfg.batch, cfg.hidden

    def body(*refs):
        (wt_ref, dhs_ref, prev_refs, res_refs, dcarry_t_refs, lens_ref, dxp_refs, dprev_refs, dmx_ref, wt_smem,
         dmm_smem, tma, staging, cluster_barrier) = _groups(
            refs, _ONE, _ONE, n_prev, n_res, n_prev, masked, n_gates, n_prev, _ONE, n_gates, _ONE, _ONE,
            counts[0] + 1, sync == "cluster",
        )
        sems, barrier, io, tile = _setup(cfg, sync, cluster_barrier, n_arrivals, staging, counts, tma)
        rows_b, cols, gate_cols = tile
        Tp = dhs_ref.shape[0]
        _load_columns(wt_ref, wt_smem, gate_cols, tma)
        lens = io.load(lens_ref.at[rows_b, cols]) if masked else None
        dcarry = cell.carry_type(*(io.load(r.at[rows_b, cols]) for r in dcarry_t_refs))
        for k in range(n_gates):
            io.publish(jnp.zeros((rows, hT), jnp.float32), dmx_ref.at[0, k, rows_b, cols])
        io.flush()
        barrier(0)

        def step(s, dcarry):
            t = s if reverse else Tp - 1 - s  # opposite to the forward pass
            slot = s % 2
            dcarry = dcarry._replace(h=dcarry.h + _recurrent_vjp(dmx_ref.at[slot], dmm_smem, wt_smem, rows_b, tma))
            prev = cell.carry_type(*(io.load(r.at[t, rows_b, cols]) for r in prev_refs))
            res = tuple(io.load(r.at[t, rows_b, cols]) for r in res_refs)
            dh = dcarry.h + io.load(dhs_ref.at[t, rows_b, cols])
            dxp, dmm, dprev = gates.backward_gates_local(cell, prev, res, dcarry._replace(h=dh))
            if masked:  # a padded step passes the carry's cotangent through
                valid = t.astype(lens.dtype) < lens
                dprev = common.select_carry(valid, dprev, dcarry)
                dxp, dmm = where_valid(valid, (dxp, dmm))
            for k in range(n_gates):
                io.store(dxp[k], dxp_refs[k].at[t, rows_b, cols])
                io.publish(dmm[k], dmx_ref.at[1 - slot, k, rows_b, cols])
            io.flush()  # m̄_t is in global memory before the barrier
            barrier(s + 1)
            return dprev

        _run(step, dcarry, Tp, io, dprev_refs, (rows_b, cols), sems, n_arrivals)

    return body
