r"""The ``impl="ffi"`` backend: the LSTM's time loops as C++ custom calls (CPU).

XLA's CPU runtime runs the ops of a loop one at a time, and a step of the
recurrence is a small matmul plus a few elementwise ops: the ``xla`` backend
keeps one core busy per step and pays a dispatch per op. This backend runs
each time loop as one XLA FFI custom call (``kernels/lstm_cpu.cc``) in which a
team (the calling thread and tasks on XLA's intra-op thread pool) splits the
hidden units, keeps its slice of the weights in cache for all steps, and meets
at one barrier per step. The surrounding work
stays in XLA as large matmuls:

* forward: ``jaxrnn_lstm_fwd`` projects each step's input itself (no
  ``(T, B, 4H)`` projection is stored) and saves the gate activations
  ``a = [i, f, g, o]`` and the cell states;
* backward: ``jaxrnn_lstm_bwd`` walks back through time writing the gate
  pre-activation cotangents ``dz`` over ``a``; then
  :math:`\bar W_{hh} = \sum_t h_{t-1}^\top dz_t`,
  :math:`\bar W_{ih} = \sum_t x_t^\top dz_t`, :math:`\bar x_t = dz_t W_{ih}^\top`
  and :math:`\bar b = \sum_t dz_t` are large matmuls and a sum.

Scope: :class:`~jaxrnn.LSTM` in float32 (``xs`` float32, ``compute_dtype``
``None`` or float32; parameters of another float dtype are cast, and their
gradients cast back). ``impl="auto"`` picks this backend on CPU for such
cells when the library builds (see :func:`available`) and one device is
visible; otherwise the ``xla`` backend.

Building: on first use the C++ source is compiled with the system C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``) against the FFI headers
that ship with jaxlib (``jax.ffi.include_dir()``), with ``-O3
-march=native``, into a per-user cache (``$JAXRNN_CACHE_DIR``, else
``$XDG_CACHE_HOME/jaxrnn``, else ``~/.cache/jaxrnn``), keyed by the source,
the jaxlib version, the compiler and the CPU's instruction-set flags. It takes
a few seconds once; nothing is downloaded. ``JAXRNN_FFI=0`` turns the backend
off (``"auto"`` then uses ``xla``; ``impl="ffi"`` raises).

Numerics: float32 throughout; ``exp`` is a degree-7 polynomial after range
reduction and ``tanh`` the rational approximation XLA's CPU backend uses
(Eigen's), so results match ``impl="reference"`` to the float32 tolerance of
the test suite (errors against a float64 run are the same size as the
``xla`` backend's), not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform as _platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.cells import LSTM, LSTMCarry, check_cell
from jaxrnn.scan import rnn_reference, vary_like, where_valid

Array = jax.Array

__all__ = ["BuildError", "available", "build", "library_path", "qualifies", "rnn_ffi", "team_stats", "unavailable_reason"]

#: The C++ source of the custom calls (shipped with the package).
SOURCE = Path(__file__).with_name("lstm_cpu.cc")

#: Compiler flags (the library is built on, and for, the machine that runs it).
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-w")

_FORWARD, _BACKWARD = "jaxrnn_lstm_fwd", "jaxrnn_lstm_bwd"

log = logging.getLogger("jaxrnn")


class BuildError(RuntimeError):
    """The C++ library could not be built or loaded; the message says why."""


# --------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------
def _compiler() -> Optional[str]:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (``-march=native`` depends on them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _platform.processor()


def _cache_dir() -> Path:
    if os.environ.get("JAXRNN_CACHE_DIR"):
        return Path(os.environ["JAXRNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxrnn"


def library_path(compiler: Optional[str] = None) -> Path:
    """Where the built library for this source, jaxlib, compiler and CPU lives (it may not exist yet)."""
    import jaxlib  # noqa: PLC0415

    compiler = compiler or _compiler() or "none"
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (SOURCE.read_text(), jaxlib.__version__, compiler, " ".join(CXXFLAGS), _platform.machine(), _cpu_flags())
        )
    ).hexdigest()[:16]
    return _cache_dir() / f"lstm_cpu-{key}.so"


def build(force: bool = False) -> Path:
    """Compile ``lstm_cpu.cc`` into the cache (once) and return the library's path.

    Raises:
      BuildError: no C++ compiler, or the compiler failed (its output is in the message).

    Example:
      >>> path = jaxrnn.kernels.ffi.build()   # a few seconds the first time, then cached
    """
    compiler = _compiler()
    if compiler is None:
        raise BuildError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    path = library_path(compiler)
    if path.exists() and not force:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out_dir = path.parent
    except OSError:
        out_dir = Path(tempfile.gettempdir())
        path = out_dir / path.name
    log.info("jaxrnn: building the CPU LSTM kernel %s", path)
    # Compile to a private name, then rename: concurrent builds (test workers) never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *CXXFLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.cache
def _load():
    """Build if needed, load the library and register its two custom calls (once per process)."""
    if os.environ.get("JAXRNN_FFI", "1") == "0":
        raise BuildError("turned off by JAXRNN_FFI=0")
    try:
        lib = ctypes.CDLL(str(build()))
    except OSError as e:
        raise BuildError(f"loading the built library failed: {e}") from e
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.JaxrnnLstmForward), platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.JaxrnnLstmBackward), platform="cpu")
    return lib


def unavailable_reason() -> Optional[str]:
    """``None`` when the backend builds and loads here, else why not (builds it on first call)."""
    try:
        _load()
    except BuildError as e:
        return str(e)
    return None


def available() -> bool:
    """Whether the backend builds and loads here (builds it on first call)."""
    return unavailable_reason() is None


def team_stats() -> dict:
    """How the time loops' thread teams formed since the library was loaded (builds it on first call).

    Returns:
      ``{"team_calls": n, "short_handed_calls": m}``: of the ``n`` calls that
      planned more than one member, ``m`` ran with fewer, because XLA's pool
      threads did not join in time (a busy machine); such a call is up to 2x
      slower.

    Example:
      >>> jaxrnn.kernels.ffi.team_stats()
      {'team_calls': 0, 'short_handed_calls': 0}
    """
    out = (ctypes.c_int64 * 2)()
    _load().jaxrnn_lstm_cpu_team_stats(out)
    return {"team_calls": int(out[0]), "short_handed_calls": int(out[1])}


def qualifies(cell) -> bool:
    """Whether ``cell`` (resolved for its input dtype) is one this backend computes: a float32 LSTM."""
    return isinstance(cell, LSTM) and cell.compute_dtype is not None and jnp.dtype(cell.compute_dtype) == jnp.float32


# --------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------
def _shape(x):
    return tuple(np.shape(x))


def _check(cell, params, xs, carry0, lengths, threads):
    check_cell(cell)
    if not isinstance(cell, LSTM):
        raise ValueError(f"cell: impl='ffi' computes LSTM cells only, got {type(cell).__name__} (use impl='xla')")
    if not qualifies(cell) or jnp.dtype(xs.dtype) != jnp.float32:
        raise ValueError(
            "xs: impl='ffi' computes in float32 (xs float32, compute_dtype None or float32), got xs "
            f"{jnp.dtype(xs.dtype).name} and compute_dtype {cell.compute_dtype} (use impl='xla')"
        )
    H = cell.hidden_size
    if _shape(params.w_hh) != (H, 4 * H):
        raise ValueError(f"params.w_hh: expected shape {(H, 4 * H)}, got {_shape(params.w_hh)}")
    if len(_shape(params.w_ih)) != 2 or _shape(params.w_ih)[1] != 4 * H:
        raise ValueError(f"params.w_ih: expected shape (input_size, {4 * H}), got {_shape(params.w_ih)}")
    if _shape(params.b) != (4 * H,):
        raise ValueError(f"params.b: expected shape {(4 * H,)}, got {_shape(params.b)}")
    I = _shape(params.w_ih)[0]
    if xs.ndim != 3 or xs.shape[-1] != I:
        raise ValueError(f"xs: expected shape (T, B, {I}) (time-major inputs), got {_shape(xs)}")
    T, B = xs.shape[:2]
    for field, leaf in zip(LSTMCarry._fields, carry0):
        if _shape(leaf) != (B, H):
            raise ValueError(f"carry0.{field}: expected shape {(B, H)}, got {_shape(leaf)}")
    if lengths is not None and _shape(lengths) != (B,):
        raise ValueError(f"lengths: expected shape {(B,)}, got {_shape(lengths)}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")


def rnn_ffi(cell, params, xs, carry0, lengths, reverse, *, threads: Optional[int] = None):
    """Run an LSTM over a sequence with the C++ time loops; custom VJP.

    The backend contract of :mod:`jaxrnn.runner` (use it through
    ``jaxrnn.rnn(..., impl="ffi")``, or ``impl="auto"`` on CPU).

    Args:
      cell: a resolved float32 :class:`~jaxrnn.LSTM` (see :func:`qualifies`).
      params: ``w_ih`` ``(I, 4H)``, ``w_hh`` ``(H, 4H)``, ``b`` ``(4H,)``.
      xs: ``(T, B, I)`` float32 time-major inputs.
      carry0: initial :class:`~jaxrnn.LSTMCarry`, float32 leaves ``(B, H)``.
      lengths: ``(B,)`` int32 valid lengths in ``[0, T]``, or ``None``. Steps
        ``t >= lengths[b]`` keep the carry and output zeros.
      reverse: walk time backwards (padding first).
      threads: the most threads a time loop uses (``None``: as many as XLA's
        intra-op thread pool has; a small step uses fewer, see ``team_size``
        in ``lstm_cpu.cc``).

    Returns:
      ``(hs, final_carry)``: ``(T, B, H)`` float32 outputs and the final carry.

    Raises:
      BuildError: the library could not be built here (see :func:`build`).

    Example:
      >>> cell = jaxrnn.LSTM(16).resolve(jnp.float32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> hs, carry = rnn_ffi(cell, params, jnp.ones((10, 4, 8)), cell.zero_carry(4), None, False)
    """
    _check(cell, params, xs, carry0, lengths, threads)
    T, B = xs.shape[:2]
    if T == 0 or B == 0:
        return rnn_reference(cell, params, xs, carry0, lengths, reverse)
    _load()
    f32 = jnp.float32
    weights = _Weights(*(params[i].astype(f32) for i in range(3)))
    full = lengths is None
    lens = jnp.full((B,), T, jnp.int32) if full else lengths.astype(jnp.int32)
    carries, final = _lstm(bool(reverse), int(threads or 0), weights, xs, LSTMCarry(*carry0), lens)
    hs = carries if full else where_valid(jnp.arange(T, dtype=jnp.int32)[:, None] < lens[None, :], carries)
    return hs, final


class _Weights(NamedTuple):
    w_ih: Array
    w_hh: Array
    b: Array


def _forward_call(reverse, threads, w, xs, carry0, lengths, save):
    T, B, _ = xs.shape
    H = w.w_hh.shape[0]
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    outs = (
        sd((T * B, 4 * H) if save else (0,), f32),  # a = [i f g o]
        sd((T, B, H), f32),  # h carries
        sd((T, B, H) if save else (0,), f32),  # c carries
        sd((B, H), f32),
        sd((B, H), f32),
    )
    call = jax.ffi.ffi_call(_FORWARD, outs, vmap_method="sequential")
    # Inside shard_map: every operand and result varies over the mesh axes xs varies over.
    args = vary_like((w.w_ih, w.b, w.w_hh, carry0.h, carry0.c, lengths), xs)
    return vary_like(call(xs, *args, reverse=reverse, save=save, threads=np.int32(threads)), xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lstm(reverse, threads, w, xs, carry0, lengths):
    _, hs, _, h_T, c_T = _forward_call(reverse, threads, w, xs, carry0, lengths, save=False)
    return hs, LSTMCarry(h_T, c_T)


def _lstm_fwd(reverse, threads, w, xs, carry0, lengths):
    a, hs, cs, h_T, c_T = _forward_call(reverse, threads, w, xs, carry0, lengths, save=True)
    return (hs, LSTMCarry(h_T, c_T)), (w, xs, carry0, lengths, a, hs, cs)


def _lstm_bwd(reverse, threads, saved, cotangents):
    w, xs, carry0, lengths, a, hs, cs = saved
    dhs, dfinal = cotangents
    T, B, I = xs.shape
    H = hs.shape[-1]
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    call = jax.ffi.ffi_call(
        _BACKWARD, (sd(a.shape, f32), sd((B, H), f32), sd((B, H), f32)), input_output_aliases={0: 0}, vmap_method="sequential"
    )
    args = vary_like((a, cs, carry0.c, dhs.astype(f32), dfinal.h.astype(f32), dfinal.c.astype(f32), w.w_hh, lengths), xs)
    dz, dh0, dc0 = vary_like(call(*args, reverse=reverse, threads=np.int32(threads)), xs)
    # The carry each step started from: the carries shifted one step, carry0 first.
    if reverse:
        prev = jnp.concatenate([hs[1:], carry0.h[None]], 0)
    else:
        prev = jnp.concatenate([carry0.h[None], hs[:-1]], 0)
    dw = _Weights(
        w_ih=xs.reshape(T * B, I).T @ dz,
        w_hh=prev.reshape(T * B, H).T @ dz,
        b=jnp.sum(dz, axis=0),
    )
    dxs = (dz @ w.w_ih.T).reshape(T, B, I)
    return dw, dxs, LSTMCarry(dh0, dc0), None


_lstm.defvjp(_lstm_fwd, _lstm_bwd)
