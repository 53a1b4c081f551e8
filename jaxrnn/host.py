"""Settings of the host process that JAX's CPU backend is sensitive to.

XLA's CPU runtime allocates an executable's temporary buffers (combined into
one block) and its outputs afresh at every call, with the C library's
``malloc``, and frees them when the call ends. glibc serves a block above its
mmap threshold (128 KiB, raised as blocks are freed, but never above 32 MiB
on its own) with a fresh ``mmap``, and unmaps it on ``free``: every call then
faults its whole working set in again, page by page, and the kernel zeroes
each page. A training step whose activations are tens of megabytes spends a
large share of its time there, in system time.

Measured on the 2-core development machine (jax 0.10.2, glibc 2.36, five
runs each): the character language model's training step (2-layer LSTM,
hidden 256, batch 32, window 128) takes about 20,000 minor page faults,
40-44 ms of system time and 106-114 ms per step; after
:func:`retain_freed_memory`, 0-6,300 faults (usually under 100), about 10 ms
of system time and 89-106 ms per step. PyTorch gains more from the setting
(its training step of the same model: 96 ms by default, 60 ms with it): its
CPU tensors above the threshold go through the same path.

One limit remains: glibc gives each thread but the main one heaps of at most
64 MiB, and XLA allocates on its own threads, so a single block over 64 MiB
(a step whose temporaries exceed that) is still mapped afresh at every call
(measured: a 64 MiB temporary faults in at every call with or without the
setting, a 32 MiB one about a quarter as often, more under load). Setting the
environment variable ``MALLOC_ARENA_MAX=1`` before Python starts lifts that
limit: every thread then shares the main heap (measured: the 64 MiB
temporary, 16,386 faults per call by default, none after
:func:`retain_freed_memory`). It has to be in the environment at start-up:
glibc fixes its arena limit at the first allocation of a second thread.

The setting is process-wide, so jaxrnn never applies it on import: call
:func:`retain_freed_memory` (``jaxrnn train`` does, on CPU, unless given
``--no-retain-memory``), or set the environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` before Python
starts. The cost is resident memory: freed blocks stay in the process, up
to the largest working set it has had.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["DEFAULT_LIMIT_BYTES", "retain_freed_memory"]

#: :func:`retain_freed_memory`'s default: blocks up to 1 GiB come from the heap and stay there.
DEFAULT_LIMIT_BYTES = 1 << 30

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def _glibc():
    """glibc's ``libc`` through ctypes, or ``None`` on another C library or platform."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: no mallopt with glibc's meaning
    return libc


def retain_freed_memory(limit_bytes: int = DEFAULT_LIMIT_BYTES) -> bool:
    """Keep memory that the process frees for reuse instead of returning it to the OS (glibc only).

    Sets glibc's mmap threshold to ``limit_bytes`` (blocks up to that size
    come from the heap, not from fresh mappings) and its trim threshold to
    twice that (capped at ``2**31 - 1``; free memory at the top of the heap
    stays until it exceeds that). Repeated JAX CPU calls then reuse their
    buffers' pages instead of faulting them in at every call; see the
    module docstring for what that is worth. Process-wide and lasting:
    every later allocation, by any library, follows it.

    Args:
      limit_bytes: the largest block served from the heap, ``1`` to
        ``2**31 - 1`` (default 1 GiB).

    Returns:
      ``True`` if glibc accepted both settings; ``False`` where there is no
      glibc (macOS, Windows, musl), which changes nothing.

    Example:
      >>> import jaxrnn.host
      >>> jaxrnn.host.retain_freed_memory()  # doctest: +SKIP
      True
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes: expected an int, got {type(limit_bytes).__name__}")
    if not 1 <= limit_bytes <= _INT_MAX:
        raise ValueError(f"limit_bytes: expected 1 to {_INT_MAX} (2**31 - 1), got {limit_bytes}")
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, limit_bytes) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, min(2 * limit_bytes, _INT_MAX)) == 1
    return mmap_ok and trim_ok
