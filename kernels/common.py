"""What both Pallas kernel families share: block sizes, padding, configuration, layouts.

The Pallas backend has two kernel families, as JAX's megablox splits
``common.py`` from ``gmm.py`` and ``ops.py``:

* :mod:`jaxrnn.kernels.pallas_split`, the split-weight step kernels (one
  ``pallas_call`` per time step, the recurrent weight split across programs
  by hidden units);
* :mod:`jaxrnn.kernels.pallas`, the public wrapper, the custom VJP and the
  resident-weight kernels (the whole time loop in one ``pallas_call``); its
  custom VJP picks the resident loops or :mod:`~jaxrnn.kernels.pallas_split`'s.

Imports run one way: ``common`` ← ``pallas_split`` ← ``pallas``. This module
imports neither family; ``pallas_split`` imports only this one (and
:mod:`~jaxrnn.kernels.gates`); ``pallas`` imports both.

Everything here works on the padded problem: sizes that do not fit the
blocks are padded (:func:`padded_sizes`, :func:`pad_gates`), and the kernels
see every gate-stacked array once per gate, as 2-D ``(rows, lanes)`` tiles.
Inside kernel bodies, a step's validity is a ``(rows, 1)`` column:
:func:`select_carry` holds the carry where it is False and
:func:`jaxrnn.scan.where_valid` zeroes outputs and cotangents there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxrnn.cells import GRU
from jaxrnn.kernels import gates

Array = jax.Array

__all__ = [
    "BlockSizes",
    "Config",
    "Recurrent",
    "Sizes",
    "can_split",
    "compiler_params",
    "has_b_hn",
    "is_gpu",
    "join_gates",
    "pad_gates",
    "padded_sizes",
    "read",
    "read_b_hn",
    "read_carry",
    "residual_layout",
    "round_up",
    "select_carry",
    "unselect",
    "write",
]


# --------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the recurrence kernels (hashable, so static under ``jit``).

    They change performance and on-chip memory use, not the math.

    Attributes:
      batch: sequences per program (the rows of every tile); the batch is
        padded to a multiple. TPU wants multiples of 8 (sublanes); compiled
        for GPU it is rounded up to a power of two, at least 16.
      time: steps per time chunk (``None``: the whole sequence in one chunk).
        A chunk of ``x^p``, ``h`` and the residuals must fit on chip next to
        the resident weight; time is padded to a multiple. GPU: must be
        ``None`` (one chunk). Unused when ``hidden`` splits the weight.
      lanes: each gate's hidden size is padded to a multiple of this (TPU:
        128; 1: no padding). Compiled for GPU, also to a power of two, at
        least 16.
      hidden: ``None``: one program holds the whole recurrent weight and the
        time loop runs inside the kernel. An int splits the weight across
        programs (:mod:`jaxrnn.kernels.pallas_split`): each owns this many
        hidden units of every gate, and each time step is one kernel call.
        Each gate's hidden size is padded to a multiple (compiled for GPU:
        a power of two, at least 16). Not for a GRU with ``reset="before"``.

    Example:
      >>> BlockSizes(batch=8, time=64, lanes=128)
      BlockSizes(batch=8, time=64, lanes=128, hidden=None)
    """

    batch: int = 8
    time: Optional[int] = None
    lanes: int = 1
    hidden: Optional[int] = None

    def __post_init__(self):
        for name in ("batch", "time", "lanes", "hidden"):
            value = getattr(self, name)
            if name in ("time", "hidden") and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BlockSizes.{name}: expected a positive int, got {value!r}")
            if value <= 0:
                raise ValueError(f"BlockSizes.{name}: expected a positive int, got {value}")

    @classmethod
    def get_default(cls, platform: str) -> "BlockSizes":
        """Defaults for ``platform`` (``"cpu"``, ``"gpu"``/``"cuda"``/``"rocm"``, ``"tpu"``).

        CPU (interpret mode): one chunk, no lane padding. TPU: ``(8, 128)``
        tiles and 32-step chunks. GPU: 16-row tiles, one chunk. None of
        them splits the weight (see :func:`jaxrnn.kernels.pallas.rnn_pallas`
        for the GPU's automatic split).
        """
        if platform == "tpu":
            return cls(batch=8, time=32, lanes=128)
        if is_gpu(platform):
            return cls(batch=16, time=None, lanes=16)
        return cls(batch=8, time=None, lanes=1)


def is_gpu(platform: str) -> bool:
    """Whether ``platform`` names a GPU (``"gpu"``, ``"cuda"`` or ``"rocm"``)."""
    return platform in ("gpu", "cuda", "rocm")


# --------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------
def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is at least ``n``."""
    return -(-n // m) * m


class Sizes(NamedTuple):
    """The padded problem: ``(Tp, Bp, Hp)``, rows per tile, steps per chunk,
    hidden units per program (``None``: all, the weight resident)."""

    Tp: int
    Bp: int
    Hp: int
    rows: int
    steps: int
    tile: Optional[int]


def padded_sizes(T: int, B: int, H: int, block: BlockSizes, platform: str, interpret: bool) -> Sizes:
    """The :class:`Sizes` of the padded problem.

    Time is padded to whole chunks, the batch to whole tiles and each gate's
    hidden units to a multiple of ``block.lanes`` (and of ``block.hidden``
    when it splits the weight; a tile wider than the padded units is all of
    them). Compiled for GPU (Triton), tiles and gates are rounded up to
    powers of two, at least 16 (the smallest ``tl.dot``), and time is one
    chunk: Triton runs grid programs in parallel, so a chunked time axis
    would lose its order. With ``block.hidden`` the time loop is outside
    the kernels: one chunk, no time padding.

    Raises:
      ValueError: compiled for GPU, a ``block.time`` shorter than ``T``.
    """
    bB, tile = block.batch, block.hidden
    time = block.time if tile is None else None
    steps = max(1, T if time is None else min(time, T))
    if is_gpu(platform) and not interpret:
        if time is not None and time < T:
            raise ValueError(
                f"block.time: the GPU (Triton) lowering runs the whole sequence in one chunk; "
                f"expected None or >= T = {T}, got {time}"
            )
        bB = max(16, pl.next_power_of_2(bB))
        Hp = max(16, pl.next_power_of_2(round_up(H, block.lanes)))
        if tile is not None:
            tile = min(max(16, pl.next_power_of_2(tile)), Hp)
    else:
        Hp = round_up(H, block.lanes)
        if tile is not None:
            tile = min(tile, Hp)
            Hp = round_up(H, math.lcm(block.lanes, tile))
    return Sizes(round_up(max(T, 1), steps), round_up(B, bB), Hp, bB, steps, tile)


def pad_gates(a: Array, n_gates: int, H: int, Hp: int, pad_rows: bool = False) -> Array:
    """Pad each of the ``n_gates`` blocks of ``a``'s last axis from ``H`` to
    ``Hp`` columns (and, with ``pad_rows``, axis 0 from ``H`` to ``Hp``).

    Zero weights keep padded units exactly zero.
    """
    if Hp == H:
        return a
    a = a.reshape(*a.shape[:-1], n_gates, H)
    pads = [(0, 0)] * (a.ndim - 1) + [(0, Hp - H)]
    if pad_rows:
        pads[0] = (0, Hp - H)
    a = jnp.pad(a, pads)
    return a.reshape(*a.shape[:-2], n_gates * Hp)


def join_gates(parts) -> Array:
    """Per-gate ``(..., Hp)`` arrays as one gate-stacked ``(..., n·Hp)`` array."""
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


# --------------------------------------------------------------------------
# The static configuration and the recurrent parameters
# --------------------------------------------------------------------------
class Config(NamedTuple):
    """Static configuration of one padded problem (hashable, a ``nondiff_argnums``)."""

    cell: Any  # the cell with hidden_size = Hp and compute_dtype resolved
    reverse: bool
    masked: bool  # lengths given, or time padded: mask steps t >= lens
    batch: int  # rows per tile
    steps: int  # steps per time chunk
    interpret: bool
    platform: str
    hidden: Optional[int] = None  # hidden units per program; None: the weight resident in one


class Recurrent(NamedTuple):
    """The recurrent parameters a kernel body holds (all that ``gates`` reads)."""

    w_hh: Array  # (Hp, Gp), compute dtype; kernels see it per gate
    b_hn: Optional[Array]  # (Hp,), GRU reset="after" only

    def b_hn_row(self) -> Optional[Array]:
        """``b_hn`` as a ``(1, Hp)`` block (kernels see 2-D tiles), or ``None``."""
        return None if self.b_hn is None else self.b_hn.reshape(1, -1)


def has_b_hn(cell) -> bool:
    """Whether ``cell`` has the recurrent bias ``b_hn`` (a GRU with ``reset="after"``)."""
    return isinstance(cell, GRU) and cell.reset == "after"


def can_split(cell) -> bool:
    """Whether ``cell``'s recurrent weight may be split across programs by
    hidden units: all cells but a GRU with ``reset="before"``, whose candidate
    multiplies ``r ⊙ h_{t-1}`` (and ``r`` needs every unit's matmul first)."""
    return not (isinstance(cell, GRU) and cell.reset == "before")


def compiler_params(cfg: Config, grid_axes: tuple):
    """The ``pallas_call``'s ``compiler_params`` for ``cfg.platform``.

    TPU: the grid axes' ``dimension_semantics`` (``"parallel"`` or
    ``"arbitrary"``, i.e. sequential). GPU: the Triton lowering (Mosaic GPU
    cannot lower a matmul of values). Interpret mode and CPU: ``None``.
    """
    if cfg.interpret:
        return None
    if cfg.platform == "tpu":
        # A platform's module, imported only when compiling for it.
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        return pltpu.CompilerParams(dimension_semantics=grid_axes)
    if is_gpu(cfg.platform):
        # Deprecated in jax 0.11: imported only when compiling for a GPU.
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

        return pltriton.CompilerParams(num_warps=4, num_stages=1)
    return None


# --------------------------------------------------------------------------
# Residuals
# --------------------------------------------------------------------------
def residual_layout(cell, rows: int, acc) -> tuple:
    """Shapes of ``gates.forward_gates``' residuals for one tile, and which to store.

    ``cell`` is the padded cell (``hidden_size = Hp``). A residual that *is*
    the step's output ``h`` (an Elman cell's) is not written twice: the
    backward pass reads it from ``hs``.

    Returns:
      ``(shapes, keep)``: a ``jax.ShapeDtypeStruct`` per residual, and per
      residual whether the kernels store it.
    """
    Hp = cell.hidden_size
    b_hn = jnp.zeros((Hp,), acc) if has_b_hn(cell) else None
    same_as_h = []

    w = (jnp.zeros((Hp, Hp), cell.compute_dtype),) * cell.num_gates

    def step(carry, xp):
        _, h, res = gates.forward_gates(cell, w, b_hn, carry, xp)
        same_as_h.extend(r is h for r in res)
        return res

    xp = (jax.ShapeDtypeStruct((rows, Hp), acc),) * cell.num_gates
    shapes = jax.eval_shape(step, cell.zero_carry((rows,), acc), xp)
    return tuple(shapes), tuple(not same for same in same_as_h)


def unselect(selected, flags, others) -> tuple:
    """The inverse of ``itertools.compress(values, flags)``: per flag, the next
    of ``selected`` where it is set, else the entry of ``others``.

    Example:
      >>> unselect(["a"], (False, True), ("x", "y"))
      ('x', 'a')
    """
    selected = iter(selected)
    return tuple(next(selected) if flag else other for flag, other in zip(flags, others))


# --------------------------------------------------------------------------
# Inside kernel bodies
# --------------------------------------------------------------------------
def read(refs, at=...) -> tuple:
    """``ref[at]`` of every ref (``at=...``: the whole block; an int: one step
    of a ``(Tc, rows, lanes)`` block)."""
    return tuple(ref[at] for ref in refs)


def read_carry(cell, refs, at=...):
    """A ``cell.carry_type`` of :func:`read`'s values, one ref per carry leaf."""
    return cell.carry_type(*read(refs, at))


def write(refs, values, at=...) -> None:
    """``ref[at] = value`` for the refs and values in turn (as many as there are refs)."""
    for ref, value in zip(refs, values):
        ref[at] = value


def read_b_hn(ref) -> Optional[Array]:
    """``b_hn`` ``(lanes,)`` from its ``(1, lanes)`` block, or ``None`` without one."""
    return None if ref is None else ref[...][0]


def select_carry(valid: Array, new, old):
    """Leafwise ``where(valid, new, old)``: the carry held at padded steps.

    The kernels' form of :func:`jaxrnn.scan.mask_step`: ``valid`` is a
    ``(rows, 1)`` column that broadcasts over the lanes as it is (a kernel
    compiled with Triton cannot slice it to ``mask_step``'s ``(B,)``).
    """
    return jax.tree_util.tree_map(lambda n, o: jnp.where(valid, n, o), new, old)
