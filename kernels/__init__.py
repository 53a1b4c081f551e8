"""Fused recurrence backends for :func:`jaxrnn.rnn`, installed as ``jaxrnn.kernels``.

Every backend has the signature documented in :mod:`jaxrnn.runner`::

    backend(cell, params, xs, carry0, lengths, reverse) -> (hs, final_carry)

* ``xla``: :func:`jaxrnn.kernels.xla.rnn_xla`, a time loop with a
  hand-written custom VJP (stored gates, batched weight gradients).
* ``ffi`` (CPU, float32 LSTM, GRU, Elman):
  :func:`jaxrnn.kernels.ffi.rnn_ffi`, the time
  loops as C++ XLA FFI custom calls run by a team of threads
  (``kernels/rnn_cpu.cc``, built on first use), in the same custom-VJP
  structure: the recurrences, and the weight gradients over all T B rows
  after a backward loop, in custom calls; the input gradient an XLA matmul.
* ``pallas``: the input projection (one large matmul), then
  :func:`jaxrnn.kernels.pallas.rnn_pallas`, a fused-gate Pallas kernel that
  loops over time on chip (interpret mode on CPU); with ``BlockSizes(hidden=...)``
  (the GPU default for weights over 128 KiB) the weight is split across
  programs, one fused step kernel per time step
  (:mod:`jaxrnn.kernels.pallas_split`). What both kernel families share
  (block sizes, padding, configuration) is in :mod:`jaxrnn.kernels.common`;
  imports run ``common`` <- ``pallas_split``, ``mosaic_gpu`` <- ``pallas``.
  ``Pallas(backend="mosaic_gpu")`` runs the persistent Mosaic GPU kernels of
  :mod:`jaxrnn.kernels.mosaic_gpu` instead (the GPU default on JAX >= 0.11
  once they lower for CUDA).

``impl`` is resolved here, at trace time. ``"auto"`` picks ``ffi`` on CPU for
a float32 cell it computes when its library builds and one device is visible (a custom
call cannot be split over devices by XLA's partitioner), Pallas on GPU/TPU
when the cell qualifies, and ``xla`` otherwise. Besides the names, ``impl``
takes a backend with options, :class:`XLA`, :class:`FFI` or :class:`Pallas`: frozen, hashable
configurations (static under ``jit``), e.g.
``jaxrnn.rnn(cell, params, xs, impl=Pallas(block=BlockSizes(batch=16)))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax

from jaxrnn.checks import warn_once
from jaxrnn.kernels import ffi, pallas, xla
from jaxrnn.kernels.pallas import BlockSizes

__all__ = ["FFI", "XLA", "Pallas", "resolve"]

_PALLAS_ON_CPU = "impl='pallas' on CPU runs the kernel in Pallas interpret mode (slow; for testing)."


@dataclasses.dataclass(frozen=True)
class XLA:
    """The ``"xla"`` backend with options (``impl=XLA()`` is ``impl="xla"``).

    Attributes:
      projection: where the forward-only pass computes ``xs @ w_ih + b``:
        ``"auto"``, ``"hoisted"`` or ``"in_loop"``; see
        :func:`jaxrnn.kernels.xla.rnn_xla`.

    Example:
      >>> ys, carry = jaxrnn.rnn(cell, params, xs, impl=XLA(projection="hoisted"))
    """

    projection: str = "auto"
    name: ClassVar[str] = "xla"

    def __post_init__(self):

        if self.projection not in xla.PROJECTIONS:
            raise ValueError(f"XLA.projection: expected one of {xla.PROJECTIONS}, got {self.projection!r}")

    def __call__(self, cell, params, xs, carry0, lengths, reverse):

        return xla.rnn_xla(cell, params, xs, carry0, lengths, reverse, projection=self.projection)


@dataclasses.dataclass(frozen=True)
class FFI:
    """The ``"ffi"`` backend with options (``impl=FFI()`` is ``impl="ffi"``): CPU, float32 LSTM, GRU, Elman.

    Attributes:
      threads: the most threads a time loop uses (``None``: every core).
      split: how those threads share a loop: ``"rows"`` (chunks of the
        batch, no barrier), ``"units"`` (a team over the hidden units, one
        barrier per step) or ``"auto"`` (rows when the weights take at most a
        few MiB; see :func:`~jaxrnn.kernels.ffi.rnn_ffi`). The language
        model's decode (:func:`~jaxrnn.kernels.ffi.lstm_decode`) reads it too.
      projection: where the LSTM's saving forward computes ``x_t W_ih``:
        ``"hoisted"`` (every step before the loop), ``"in_loop"`` or
        ``"auto"`` (hoisted for weights beyond a core's L2; see
        :func:`~jaxrnn.kernels.ffi.rnn_ffi`). Bit-identical results.

    Example:
      >>> ys, carry = jaxrnn.rnn(jaxrnn.LSTM(16), params, xs, impl=FFI(threads=1))
    """

    threads: Optional[int] = None
    split: str = "auto"
    projection: str = "auto"
    name: ClassVar[str] = "ffi"

    def __post_init__(self):

        ffi.check_loop_options(self.threads, self.split, owner="FFI.", projection=self.projection)

    def __call__(self, cell, params, xs, carry0, lengths, reverse):

        return ffi.rnn_ffi(cell, params, xs, carry0, lengths, reverse, threads=self.threads, split=self.split,
                           projection=self.projection)

    def takes_embedded(self, cell) -> bool:
        """Whether this backend runs :class:`~jaxrnn.Embedded` inputs of ``cell`` without looking them up."""
        return ffi.takes_embedded(cell)

    def lstm_decode(self, weights, carry, logits0, noise, temperature, *, return_logits=False):
        """:func:`jaxrnn.kernels.ffi.lstm_decode` with this configuration's ``threads`` and ``split``."""
        return ffi.lstm_decode(weights, carry, logits0, noise, temperature, return_logits=return_logits,
                               threads=self.threads, split=self.split)


def _ffi_is_default(cell, platform):
    """``impl="auto"`` on CPU: a cell :func:`ffi.qualifies` accepts, one visible device, and the library builds here."""
    if platform != "cpu" or not ffi.qualifies(cell) or jax.device_count() != 1:
        return False
    reason = ffi.unavailable_reason()
    if reason is not None and not reason.startswith(("no C++ compiler", "turned off")):
        warn_once(f"impl='auto' uses impl='xla' on CPU: the C++ kernels did not build ({reason[:300]})")
    return reason is None


@dataclasses.dataclass(frozen=True)
class Pallas:
    """The ``"pallas"`` backend with options (``impl=Pallas()`` is ``impl="pallas"``).

    Attributes:
      block: the kernels' :class:`~jaxrnn.kernels.pallas.BlockSizes`
        (``None``: ``BlockSizes.get_default(platform)``).
      interpret: run in Pallas interpret mode (``None``: on CPU only).
      backend: the kernel family, one of :data:`jaxrnn.kernels.pallas.BACKENDS`
        (``None``: :func:`jaxrnn.kernels.pallas.resolve_backend`, ``"mosaic_gpu"``
        compiled for a GPU with JAX >= 0.11 once those kernels lower, else
        ``"portable"``); ``Pallas(backend="mosaic_gpu", interpret=True)`` runs
        the Mosaic GPU kernels in Mosaic GPU's interpreter on CPU (JAX >= 0.12).

    Example:
      >>> from jaxrnn.kernels.pallas import BlockSizes
      >>> ys, carry = jaxrnn.rnn(cell, params, xs, impl=Pallas(block=BlockSizes(batch=16)))
    """

    block: Optional[Any] = None
    interpret: Optional[bool] = None
    backend: Optional[str] = None
    name: ClassVar[str] = "pallas"

    def __post_init__(self):

        if self.block is not None and not isinstance(self.block, BlockSizes):
            raise TypeError(f"Pallas.block: expected a BlockSizes or None, got {type(self.block).__name__}")
        if self.interpret is not None and not isinstance(self.interpret, bool):
            raise TypeError(f"Pallas.interpret: expected a bool or None, got {type(self.interpret).__name__}")
        if self.backend is not None and self.backend not in pallas.BACKENDS:
            raise ValueError(f"Pallas.backend: expected one of {pallas.BACKENDS} or None, got {self.backend!r}")

    def __call__(self, cell, params, xs, carry0, lengths, reverse):
        """Project all steps with one large matmul, then run the kernels on ``xp``."""

        xp = cell.input_projection(params, xs)
        chosen = {} if self.backend is None else {"backend": self.backend}  # None: rnn_pallas resolves it
        return pallas.rnn_pallas(
            cell, params, xp, carry0, lengths, reverse, block=self.block, interpret=self.interpret, **chosen
        )


def resolve(impl, cell, platform):
    """Return ``(name, backend)`` for ``impl`` on ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``).

    ``impl`` is ``"xla"``, ``"ffi"``, ``"pallas"``, ``"auto"`` or an
    :class:`XLA` / :class:`FFI` / :class:`Pallas` configuration. ``"auto"``
    picks ``ffi`` on CPU for a float32 cell it computes (LSTM, GRU,
    Elman) when its library builds and one
    device is visible, Pallas on GPU/TPU when the cell qualifies, the XLA path
    otherwise; Pallas on CPU runs in interpret mode and warns once (unless
    ``interpret`` was asked for).
    """
    if impl == "xla":
        impl = XLA()
    elif impl == "ffi":
        impl = FFI()
    elif impl == "pallas":
        impl = Pallas()
    elif impl == "auto":
        impl = FFI() if _ffi_is_default(cell, platform) else XLA()
        if platform != "cpu":
            if pallas.qualifies(cell, platform):
                impl = Pallas()
    if isinstance(impl, Pallas):
        if platform == "cpu" and impl.interpret is None:
            warn_once(_PALLAS_ON_CPU)
        return impl.name, impl
    if isinstance(impl, (XLA, FFI)):
        return impl.name, impl
    raise ValueError(f"impl: unknown implementation {impl!r}")
