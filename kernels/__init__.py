"""Fused recurrence backends for :func:`jaxrnn.rnn`, installed as ``jaxrnn.kernels``.

Every backend has the signature documented in :mod:`jaxrnn.runner`::

    backend(cell, params, xs, carry0, lengths, reverse) -> (hs, final_carry)

* ``xla``: :func:`jaxrnn.kernels.xla.rnn_xla`, a time loop with a
  hand-written custom VJP (stored gates, batched weight gradients).
* ``pallas``: the input projection (one large matmul), then
  :func:`jaxrnn.kernels.pallas.rnn_pallas`, a fused-gate Pallas kernel that
  loops over time on chip (interpret mode on CPU).

``impl`` is resolved here, at trace time.
"""

import functools

from jaxrnn.runner import warn_once

__all__ = ["resolve"]


def resolve(impl, cell, platform):
    """Return ``(name, backend)`` for ``impl`` on ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``).

    ``"auto"`` picks Pallas on GPU/TPU when the cell qualifies, the XLA path
    otherwise; ``"pallas"`` on CPU runs in interpret mode and warns once.
    """
    if impl == "xla":
        from jaxrnn.kernels.xla import rnn_xla  # noqa: PLC0415

        return "xla", rnn_xla
    if impl == "pallas":
        from jaxrnn.kernels import pallas  # noqa: PLC0415

        if platform == "cpu":
            warn_once("impl='pallas' on CPU runs the kernel in Pallas interpret mode (slow; for testing).")
        return "pallas", _projecting(pallas.rnn_pallas)
    if impl == "auto":
        if platform != "cpu":
            from jaxrnn.kernels import pallas  # noqa: PLC0415

            if pallas.qualifies(cell, platform):
                return "pallas", _projecting(pallas.rnn_pallas)
        from jaxrnn.kernels.xla import rnn_xla  # noqa: PLC0415

        return "xla", rnn_xla
    raise ValueError(f"impl: unknown implementation {impl!r}")


def _projecting(kernel):
    """The backend that projects ``xs`` with one large matmul, then runs ``kernel`` on ``xp``."""

    @functools.wraps(kernel)
    def backend(cell, params, xs, carry0, lengths, reverse):
        return kernel(cell, params, cell.input_projection(params, xs), carry0, lengths, reverse)

    return backend
