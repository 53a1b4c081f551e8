r"""The ``impl="ffi"`` backend: the time loops of the LSTM, GRU and Elman RNN as C++ custom calls (CPU).

XLA's CPU runtime runs the ops of a loop one at a time, and a step of the
recurrence is a small matmul plus a few elementwise ops: the ``xla`` backend
keeps one core busy per step and pays a dispatch per op. This backend runs
each time loop as one XLA FFI custom call (``kernels/rnn_cpu.cc``) whose
threads (the calling thread and tasks on XLA's intra-op thread pool) split it
one of two ways (``split``, see :func:`rnn_ffi`): small models by batch rows,
each thread running whole chunks of rows through all steps with no barrier;
larger ones by hidden units, a team that keeps its slices of the weights in
cache for all steps and meets at one barrier per step. The products over all
``T B`` rows come after the loops:

* forward: ``jaxrnn_{lstm,gru,elman}_fwd`` project each step's input
  themselves (no ``(T, B, G)`` projection is stored) and save what the
  backward needs: the LSTM's gate activations ``a = [i, f, g, o]`` and cell
  states, the GRU's ``a = [r, u, n]`` and ``m = h_{t-1} W_hn + b_hn``, the
  Elman RNN's outputs only. The LSTM's saving forward with weights beyond a
  core's L2 projects every step's input before its loop instead, into the
  rows of ``a`` (``projection``, see :func:`rnn_ffi`);
* backward: ``jaxrnn_{lstm,gru,elman}_bwd`` walk back through time writing
  the gate pre-activation cotangents ``dz`` (over ``a`` where there is one);
  then ``jaxrnn_weight_grads`` computes :math:`\bar W_{ih} = \sum_t x_t^\top dz_t`,
  :math:`\bar b = \sum_t dz_t` and :math:`\bar W_{hh} = \sum_t h_{t-1}^\top dz_t`
  over all ``T B`` rows, reading :math:`h_{t-1}` from the saved carries and
  ``h0`` in place (a small LSTM's or Elman RNN's backward call adds these
  itself, split by rows, a group of steps at a time inside its loop while
  their ``dz`` is in cache), and :math:`\bar x_t = dz_t W_{ih}^\top` is one XLA matmul
  (the GRU's candidate has two cotangents, ``dz_n`` for its input part and
  ``dm = r dz_n`` for its recurrent part, so its backward writes both
  ``dz_x`` and ``dz_h``; with the reset before the matmul its weight
  gradients stay XLA matmuls, as ``dW_hn = qᵀ dz_n`` reads the saved ``q``).
  XLA's CPU dot took these deep, thin products (``T B`` rows deep) more
  slowly; measured over four alternating runs on 2 cores, fwd+bwd was
  1.08–1.5× faster (median) with the call (Elman B=64 T=50 H=64: 1.5×; LSTM
  B=32 T=200 H=64: 1.08×; the base point B=32 T=256 I=128 H=256: 1.08×).

Decoding: ``jaxrnn_lstm_decode`` (:func:`lstm_decode`) samples a stacked
LSTM language model's tokens in one call, feeding each back (the first
layer's input read from a projected table): split by rows, each thread runs
chunks of rows through every step, sampling included, with no barrier; split
by units, a team shares every layer's hidden units and meets after the
sampling and each layer (see :func:`lstm_decode`). ``jaxrnn.lm.generate``
takes it for a plain float32 LSTM stack.

Scope: in float32 (``xs`` float32, ``compute_dtype`` ``None`` or float32;
parameters of another float dtype are cast, and their gradients cast back),
:class:`~jaxrnn.LSTM`, :class:`~jaxrnn.GRU` with either reset (``"before"``
meets twice per step: its candidate's matmul reads ``r ⊙ h`` of every unit;
its backward's ``dz`` is written over ``a``, and ``dW_hn = qᵀ dz_n`` with the
saved ``q = r ⊙ h_{t-1}``) and :class:`~jaxrnn.Elman` with any activation (see :func:`qualifies`).
``impl="auto"`` picks this backend on CPU for such cells when the library
builds (see :func:`available`) and one device is visible; otherwise the
``xla`` backend.

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

from jaxrnn.cells import GRU, LSTM, Carry, Elman, LSTMCarry, check_cell
from jaxrnn.embedded import Embedded, in_range
from jaxrnn.scan import rnn_reference, vary_like, where_valid

Array = jax.Array

__all__ = [
    "SANITIZERS", "SPLITS", "BuildError", "DecodeWeights", "available", "build", "check_loop_options", "compiler_flags",
    "library_path", "lstm_decode", "qualifies", "rnn_ffi", "takes_embedded", "team_stats", "unavailable_reason",
]

#: The C++ source of the custom calls (shipped with the package).
SOURCE = Path(__file__).with_name("rnn_cpu.cc")

#: Compiler flags (the library is built on, and for, the machine that runs it).
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-w")

#: ``JAXRNN_FFI_SANITIZE``'s values: a development build instrumented by GCC's or Clang's sanitizers.
SANITIZERS = ("address", "undefined")


def compiler_flags() -> tuple:
    """:data:`CXXFLAGS`, plus the sanitizers named in ``$JAXRNN_FFI_SANITIZE`` (comma-separated).

    A sanitized build is cached under its own name. Python must load the
    sanitizer's runtime first; for AddressSanitizer (checked this way on
    2026-12-04, with ``tests/core/test_embedded.py`` too: 87 tests, no report)::

        JAXRNN_FFI_SANITIZE=address \\
        LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \\
        ASAN_OPTIONS=detect_leaks=0 python -m pytest tests/kernels/test_ffi*.py

    (libstdc++ preloaded too: jaxlib throws C++ exceptions, which ASan must
    find the real ``__cxa_throw`` for.)

    Raises:
      ValueError: an unknown sanitizer name.
    """
    value = os.environ.get("JAXRNN_FFI_SANITIZE", "").strip()
    if not value:
        return CXXFLAGS
    names = [name.strip() for name in value.split(",")]
    unknown = [name for name in names if name not in SANITIZERS]
    if unknown:
        raise ValueError(f"JAXRNN_FFI_SANITIZE: expected a comma-separated subset of {SANITIZERS}, got {value!r}")
    optimise = tuple(flag for flag in CXXFLAGS if not flag.startswith("-O"))
    return ("-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={','.join(names)}", *optimise)

#: Custom-call targets: (registered name, the library's handler symbol).
_TARGETS = {
    "jaxrnn_lstm_fwd": "JaxrnnLstmForward",
    "jaxrnn_lstm_bwd": "JaxrnnLstmBackward",
    "jaxrnn_gru_fwd": "JaxrnnGruForward",
    "jaxrnn_gru_bwd": "JaxrnnGruBackward",
    "jaxrnn_gru_before_fwd": "JaxrnnGruBeforeForward",
    "jaxrnn_gru_before_bwd": "JaxrnnGruBeforeBackward",
    "jaxrnn_elman_fwd": "JaxrnnElmanForward",
    "jaxrnn_elman_bwd": "JaxrnnElmanBackward",
    "jaxrnn_weight_grads": "JaxrnnWeightGrads",
    "jaxrnn_lstm_decode": "JaxrnnLstmDecode",
}

#: The Elman activations the C++ code knows, by the code it knows them by.
_ELMAN_ACTIVATIONS = {"tanh": 0, "relu": 1, "linear": 2}

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
            for s in (SOURCE.read_text(), jaxlib.__version__, compiler, " ".join(compiler_flags()), _platform.machine(), _cpu_flags())
        )
    ).hexdigest()[:16]
    return _cache_dir() / f"rnn_cpu-{key}.so"


def build(force: bool = False) -> Path:
    """Compile ``rnn_cpu.cc`` into the cache (once) and return the library's path.

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
    log.info("jaxrnn: building the CPU RNN kernels %s", path)
    # Compile to a private name, then rename: concurrent builds (test workers) never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *compiler_flags(), "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
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
    """Build if needed, load the library and register its custom calls (once per process)."""
    if os.environ.get("JAXRNN_FFI", "1") == "0":
        raise BuildError("turned off by JAXRNN_FFI=0")
    try:
        lib = ctypes.CDLL(str(build()))
    except OSError as e:
        raise BuildError(f"loading the built library failed: {e}") from e
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
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
      ``{"team_calls": n, "short_handed_calls": m, "moved_threads": k}``: of
      the ``n`` calls that planned more than one member, ``m`` ran with fewer,
      because XLA's pool threads did not join in time (a busy machine); such a
      call is up to 2x slower. ``k`` counts the threads that a call found
      queued on its own core while its helper had not started, and moved off
      that core until the call's end (Linux; see "Placement" in
      ``rnn_cpu.cc``).

    Example:
      >>> jaxrnn.kernels.ffi.team_stats()
      {'team_calls': 0, 'short_handed_calls': 0, 'moved_threads': 0}
    """
    out = (ctypes.c_int64 * 3)()
    _load().jaxrnn_rnn_cpu_team_stats(out)
    return {"team_calls": int(out[0]), "short_handed_calls": int(out[1]), "moved_threads": int(out[2])}


def qualifies(cell) -> bool:
    """Whether ``cell`` (resolved for its input dtype) is one this backend computes.

    A float32 (``compute_dtype`` float32 once resolved) :class:`~jaxrnn.LSTM`,
    :class:`~jaxrnn.GRU` (either reset; ``reset="before"`` meets twice per
    step, since its candidate's matmul reads ``r ⊙ h`` of every unit), or
    :class:`~jaxrnn.Elman` (any activation).
    """
    return (
        isinstance(cell, (LSTM, GRU, Elman))
        and cell.compute_dtype is not None
        and jnp.dtype(cell.compute_dtype) == jnp.float32
    )
# --------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------
def _shape(x):
    return tuple(np.shape(x))


def _check(cell, params, xs, carry0, lengths, threads, split="auto", projection="auto"):
    check_cell(cell)
    if not qualifies(cell) or jnp.dtype(xs.dtype) != jnp.float32:
        raise ValueError(
            "xs: impl='ffi' computes in float32 (xs float32, compute_dtype None or float32), got xs "
            f"{jnp.dtype(xs.dtype).name} and compute_dtype {cell.compute_dtype} (use impl='xla')"
        )
    H, G = cell.hidden_size, cell.num_gates * cell.hidden_size
    if _shape(params.w_hh) != (H, G):
        raise ValueError(f"params.w_hh: expected shape {(H, G)}, got {_shape(params.w_hh)}")
    if len(_shape(params.w_ih)) != 2 or _shape(params.w_ih)[1] != G:
        raise ValueError(f"params.w_ih: expected shape (input_size, {G}), got {_shape(params.w_ih)}")
    if _shape(params.b) != (G,):
        raise ValueError(f"params.b: expected shape {(G,)}, got {_shape(params.b)}")
    if isinstance(cell, GRU) and cell.reset == "after" and _shape(params.b_hn) != (H,):
        raise ValueError(f"params.b_hn: expected shape {(H,)}, got {_shape(params.b_hn) if params.b_hn is not None else None}")
    I = _shape(params.w_ih)[0]
    if xs.ndim != 3 or xs.shape[-1] != I:
        raise ValueError(f"xs: expected shape (T, B, {I}) (time-major inputs), got {_shape(xs)}")
    T, B = xs.shape[:2]
    for field, leaf in zip(type(carry0)._fields, carry0):
        if _shape(leaf) != (B, H):
            raise ValueError(f"carry0.{field}: expected shape {(B, H)}, got {_shape(leaf)}")
    if lengths is not None and _shape(lengths) != (B,):
        raise ValueError(f"lengths: expected shape {(B,)}, got {_shape(lengths)}")
    check_loop_options(threads, split, projection=projection)


def check_loop_options(threads, split, owner: str = "", projection="auto"):
    """Raise ``ValueError`` unless ``threads`` is a positive int or ``None``, ``split`` one of
    :data:`SPLITS` and ``projection`` one of :data:`PROJECTIONS`.

    ``owner`` prefixes the argument's name in the message (``"FFI."``).
    """
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"{owner}threads: expected a positive int or None, got {threads!r}")
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"{owner}split: expected one of {SPLITS}, got {split!r}")
    if not isinstance(projection, str) or projection not in PROJECTIONS:
        raise ValueError(f"{owner}projection: expected one of {PROJECTIONS}, got {projection!r}")


def rnn_ffi(cell, params, xs, carry0, lengths, reverse, *, threads: Optional[int] = None, split: str = "auto",
            projection: str = "auto"):
    """Run an LSTM, GRU or Elman RNN over a sequence with the C++ time loops; custom VJP.

    The backend contract of :mod:`jaxrnn.runner` (use it through
    ``jaxrnn.rnn(..., impl="ffi")``, or ``impl="auto"`` on CPU).

    Args:
      cell: a resolved float32 :class:`~jaxrnn.LSTM`, :class:`~jaxrnn.GRU`
        or :class:`~jaxrnn.Elman` (see :func:`qualifies`).
      params: ``w_ih`` ``(I, G)``, ``w_hh`` ``(H, G)``, ``b`` ``(G,)`` with
        ``G = num_gates * H``; with ``reset="after"``, the GRU's ``b_hn`` ``(H,)``.
      xs: ``(T, B, I)`` float32 time-major inputs, or an
        :class:`~jaxrnn.Embedded` ``(table, ids)`` with a float32 ``table``
        ``(V, I)`` and ``ids`` ``(T, B)`` standing for ``table[ids]``: the
        LSTM then projects the table once (``V`` rows) and each step adds its
        id's row (see :func:`takes_embedded`); other cells look the rows up.
      carry0: the initial carry, float32 leaves ``(B, H)``
        (:class:`~jaxrnn.LSTMCarry` or :class:`~jaxrnn.cells.Carry`).
      lengths: ``(B,)`` int32 valid lengths in ``[0, T]``, or ``None``. Steps
        ``t >= lengths[b]`` keep the carry and output zeros.
      reverse: walk time backwards (padding first).
      threads: the most threads a time loop uses (``None``: as many as XLA's
        intra-op thread pool has; a small step uses fewer, see ``team_size``
        in ``rnn_cpu.cc``).
      split: how the threads share a loop. ``"rows"``: each takes chunks of
        the batch's rows and runs their whole loop alone, with no barrier
        (rows never meet; every thread reads all of the weights each step);
        ``"units"``: a team splits the hidden units and meets at a barrier
        every step (each member keeps its slice of the weights in its cache);
        ``"auto"`` (default): rows when the packed weights take at most 4 MiB
        (an LSTM up to hidden 256; a barrier every step costs more than
        streaming them from beyond L2), the batch has at least 16 rows and the
        loop's matmuls at least 2 MFLOP, else units (see ``run_split`` in
        ``rnn_cpu.cc``).
      projection: where the LSTM's forward computes ``x_t W_ih`` when it saves
        for the backward (differentiated) and a thread holds every hidden unit
        (rows split, or one thread): ``"hoisted"``, for every step before the
        loop, into the activations it saves, so that the loop streams
        ``W_hh`` alone; ``"in_loop"``, each step with its recurrent product
        (one matmul against ``[W_ih; W_hh]``); ``"auto"`` (default): hoisted
        when ``[W_ih; W_hh]`` take over 1 MiB and ``W_hh`` at most 1 MiB (a
        core's L2 cache; e.g. the character LM's second layer, 1.09x faster
        fwd+bwd). The results are bit-identical either way. Forward-only
        calls, embedded inputs, the GRU and the Elman RNN project in the loop.

    Returns:
      ``(hs, final_carry)``: ``(T, B, H)`` float32 outputs and the final carry.

    Raises:
      BuildError: the library could not be built here (see :func:`build`).

    Example:
      >>> cell = jaxrnn.GRU(16, reset="after").resolve(jnp.float32)
      >>> params = cell.init(jax.random.key(0), 8)
      >>> hs, carry = rnn_ffi(cell, params, jnp.ones((10, 4, 8)), cell.zero_carry(4), None, False)
    """
    embedded = isinstance(xs, Embedded) and takes_embedded(cell)
    if isinstance(xs, Embedded) and not embedded:
        xs = xs.lookup()
    shape = (*xs.ids.shape, xs.table.shape[-1]) if embedded else _shape(xs)
    _check(cell, params, jax.ShapeDtypeStruct(shape, xs.table.dtype if embedded else xs.dtype), carry0, lengths, threads, split,
           projection)
    T, B = shape[:2]
    if T == 0 or B == 0:
        return rnn_reference(cell, params, xs.lookup() if embedded else xs, carry0, lengths, reverse)
    _load()
    f32 = jnp.float32
    full = lengths is None
    lens = jnp.full((B,), T, jnp.int32) if full else lengths.astype(jnp.int32)
    options = (bool(reverse), _Loop(int(threads or 0), SPLITS.index(split), PROJECTIONS.index(projection)))
    if embedded:
        # The projected table (V rows, not T B), a NaN row after it for the ids outside [0, V) (see lookup).
        V, G = xs.table.shape[0], 4 * cell.hidden_size
        rows = jnp.concatenate([cell.input_projection(params, xs.table).astype(f32), jnp.full((1, G), jnp.nan, f32)])
        ids = jnp.where(in_range(xs.ids, V), xs.ids, V).astype(jnp.int32).reshape(T * B)
        carries, final = _lstm_embedded(*options, params.w_hh.astype(f32), rows, ids, LSTMCarry(*carry0), lens)
    elif isinstance(cell, LSTM):
        weights = _Weights(*(params[i].astype(f32) for i in range(3)))
        carries, final = _lstm(*options, weights, xs, LSTMCarry(*carry0), lens)
    elif isinstance(cell, GRU):  # the weights' type picks the reset (b_hn: after the matmul)
        kind = _GRUWeights if cell.reset == "after" else _Weights
        weights = kind(*(params[i].astype(f32) for i in range(len(kind._fields))))
        carries, h_T = _gru(*options, weights, xs, carry0.h, lens)
        final = Carry(h_T)
    else:
        weights = _Weights(*(params[i].astype(f32) for i in range(3)))
        carries, h_T = _elman(*options, _ELMAN_ACTIVATIONS[cell.activation], weights, xs, carry0.h, lens)
        final = Carry(h_T)
    hs = carries if full else where_valid(jnp.arange(T, dtype=jnp.int32)[:, None] < lens[None, :], carries)
    return hs, final


def takes_embedded(cell) -> bool:
    """Whether :func:`rnn_ffi` runs an :class:`~jaxrnn.Embedded` input of ``cell`` as ids into a projected table.

    The LSTM's forward call takes a table of biases with one id per step and
    row (its input ``xs`` is then ``(T, B, 0)``): the projection is ``V`` rows
    instead of ``T B``, and after the backward loop the table's gradient is the
    sum of the gate gradients per id, not two ``(T B, I)`` products (measured
    on the character LM's training step: see ``benchmarks/README.md``).
    """
    return isinstance(cell, LSTM)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lstm_embedded(reverse, loop, w_hh, rows, ids, carry0, lengths):
    _, hs, _, h_T, c_T = _embedded_forward_call(reverse, loop, w_hh, rows, ids, carry0, lengths, save=False)
    return hs, LSTMCarry(h_T, c_T)


def _embedded_forward_call(reverse, loop, w_hh, rows, ids, carry0, lengths, save):
    """The LSTM's forward call with ``xs`` ``(T, B, 0)`` and the bias ``rows[ids]``: ``z_t = h_{t-1} W_hh + rows[id]``."""
    B = lengths.shape[0]
    T = ids.shape[0] // B
    nothing = jnp.zeros_like(ids, jnp.float32).reshape(T, B, 1)[:, :, :0]  # varies as ids do (under shard_map)
    w = _Weights(jnp.zeros((0, w_hh.shape[1]), jnp.float32), w_hh, rows)
    return _forward_call(reverse, loop, w, nothing, carry0, lengths, save, ids=ids)


def _lstm_embedded_fwd(reverse, loop, w_hh, rows, ids, carry0, lengths):
    a, hs, cs, h_T, c_T = _embedded_forward_call(reverse, loop, w_hh, rows, ids, carry0, lengths, save=True)
    return (hs, LSTMCarry(h_T, c_T)), (w_hh, rows, ids, carry0, lengths, a, hs, cs)


def _lstm_embedded_bwd(reverse, loop, saved, cotangents):
    w_hh, rows, ids, carry0, lengths, a, hs, cs = saved
    nothing = hs[:, :, :0]
    dz, dh0, dc0, *done = _lstm_backward_call(reverse, loop, w_hh, a, cs, carry0, lengths, cotangents, nothing, hs)
    _, dw_hh, _, _ = _input_and_weight_grads(loop, reverse, nothing, hs, carry0.h, jnp.zeros((0, dz.shape[1])), dz, dz,
                                             done if _step_grads(4, loop, nothing, hs) else None)
    # The table's gradient: the gate gradients summed per id (padded rows' are zero).
    drows = jax.ops.segment_sum(dz, ids, num_segments=rows.shape[0], indices_are_sorted=False)
    return dw_hh, drows, None, LSTMCarry(dh0, dc0), None


_lstm_embedded.defvjp(_lstm_embedded_fwd, _lstm_embedded_bwd)


class DecodeWeights(NamedTuple):
    """A stacked LSTM language model's weights, as :func:`lstm_decode` reads them (float32).

    Attributes:
      table: ``(V, 4H)`` the first layer's projected input of every token, its bias included
        (``LanguageModel.first_projections``).
      w_hh0: ``(H, 4H)`` the first layer's recurrent kernel.
      upper: per layer above the first, its cell parameters ``(w_ih (H, 4H), w_hh (H, 4H), b (4H,))``
        (the layer's input is the output of the layer below).
      w_out: ``(H, V)`` the output kernel.
      b_out: ``(V,)`` the output bias.
    """

    table: Array
    w_hh0: Array
    upper: tuple
    w_out: Array
    b_out: Array


def lstm_decode(weights: DecodeWeights, carry, logits0, noise, temperature, *, return_logits: bool = False,
                threads: Optional[int] = None, split: str = "auto"):
    r"""Sample ``N`` tokens from a stacked LSTM language model in one custom call (CPU, float32).

    Token :math:`i` of row :math:`b` is :math:`\arg\max_v(\ell_{i,b,v} / \tau + g_{i,b,v})`
    (a draw from :math:`\mathrm{softmax}(\ell_{i,b} / \tau)` by the Gumbel-max trick; for
    :math:`\tau \le 0` the argmax of :math:`\ell_{i,b}`; the lowest id among ties, the first NaN
    if any), where :math:`\ell_0` is given and :math:`\ell_{i+1}` is the model's prediction after
    feeding token :math:`i` through its layers (``h W_out + b_out`` on the top layer's output).
    The weights are packed once per call. With ``split="rows"`` each of the call's threads runs
    chunks of rows through all steps, sampling included, with no barrier (rows never meet); with
    ``split="units"`` a team of threads splits every layer's hidden units (each streams its share
    of the weights at every step; each samples every row) and meets at a barrier after each
    layer: 2x faster than rows at batch 1-8 for the character LM (2 x 256 units; the same tokens
    and logits, bit for bit). ``"auto"`` takes units for weights of 512 KiB or more and fewer
    than 16 rows per thread (``LstmDecode`` in ``kernels/rnn_cpu.cc``). ``jaxrnn.lm.generate``
    calls this for a plain LSTM stack on the ``"ffi"`` backend (see ``benchmarks/README.md`` for
    the measured gains).

    Args:
      weights: :class:`DecodeWeights`, all float32.
      carry: per layer, its :class:`~jaxrnn.LSTMCarry` with leaves ``(B, H)`` (after the prompt).
      logits0: ``(B, V)`` float32, the prediction token 0 is drawn from.
      noise: ``(N, B, V)`` float32 standard Gumbel noise, one draw per step.
      temperature: scalar :math:`\tau` (may be traced).
      return_logits: also return every step's logits.
      threads: the most threads the call uses (``None``: XLA's intra-op pool).
      split: ``"auto"``, ``"units"`` or ``"rows"``: how the threads share the decode (above).

    Returns:
      ``(N, B)`` int32 tokens; with ``return_logits`` also ``(N, B, V)`` float32 logits
      (``logits[0] == logits0``).

    Example:
      >>> w = DecodeWeights(model.first_projections(params), params.rnn[0].fwd.w_hh, (), params.w_out, params.b_out)
      >>> tokens = lstm_decode(w, carry, logits[:, -1], jax.random.gumbel(key, (100, B, V)), 0.8)  # (100, B)
    """
    check_loop_options(threads, split)
    _load()
    f32 = jnp.float32
    N, B, V = noise.shape
    H = weights.w_hh0.shape[0]
    L = 1 + len(weights.upper)
    if len(carry) != L:
        raise ValueError(f"carry: expected {L} per-layer carries (one per layer of weights), got {len(carry)}")
    if weights.upper:
        w_up = jnp.stack([jnp.concatenate([w_ih, w_hh]).astype(f32) for w_ih, w_hh, _ in weights.upper])
        b_up = jnp.stack([b.astype(f32) for _, _, b in weights.upper])
    else:
        w_up, b_up = jnp.zeros((0, 2 * H, 4 * H), f32), jnp.zeros((0, 4 * H), f32)
    h0 = jnp.stack([c.h for c in carry]).astype(f32)
    c0 = jnp.stack([c.c for c in carry]).astype(f32)
    sd = jax.ShapeDtypeStruct
    outs = (sd((N, B), jnp.int32), sd((N, B, V) if return_logits else (0,), f32))
    tokens, logits = _call(
        "jaxrnn_lstm_decode", outs, weights.table.astype(f32), weights.w_hh0.astype(f32), w_up, b_up,
        weights.w_out.astype(f32), weights.b_out.astype(f32), h0, c0, logits0.astype(f32), noise.astype(f32),
        jnp.reshape(jnp.asarray(temperature, f32), (1,)), save_logits=bool(return_logits), threads=int(threads or 0),
        split=SPLITS.index(split),
    )
    return (tokens, logits) if return_logits else tokens


class _Loop(NamedTuple):
    """How a call's time loop runs (the custom calls' attributes; hashable)."""

    threads: int  # 0: as many as XLA's intra-op pool has
    split: int  # 0 auto, 1 hidden units, 2 batch rows (kSplit* in rnn_cpu.cc)
    projection: int = 0  # the LSTM's saving forward: 0 auto, 1 in the loop, 2 hoisted (kProjection*)

    def attrs(self) -> dict:
        """The attributes of every time-loop call (``projection`` is the LSTM forward's alone)."""
        return {"threads": self.threads, "split": self.split}


#: The ``split`` values of :func:`rnn_ffi`; the index is the custom calls' ``split`` attribute.
SPLITS = ("auto", "units", "rows")

#: The ``projection`` values of :func:`rnn_ffi`; the index is ``jaxrnn_lstm_fwd``'s ``projection`` attribute.
PROJECTIONS = ("auto", "in_loop", "hoisted")


class _Weights(NamedTuple):
    w_ih: Array
    w_hh: Array
    b: Array


class _GRUWeights(NamedTuple):
    w_ih: Array
    w_hh: Array
    b: Array
    b_hn: Array


def _previous(hs, h0, reverse):
    """The carry each step started from: the carries shifted one step, ``h0`` first (in walking order)."""
    if reverse:
        return jnp.concatenate([hs[1:], h0[None]], 0)
    return jnp.concatenate([h0[None], hs[:-1]], 0)


def _input_and_weight_grads(loop, reverse, xs, hs, h0, w_ih, dz_x, dz_h, done=None):
    """The products after a backward time loop: ``(dW_ih, dW_hh, db, dxs)``.

    ``xs`` ``(T, B, I)``, ``hs`` ``(T, B, H)`` the forward's carries and ``h0``
    ``(B, H)`` the initial one, ``dz_x`` ``(T*B, G)`` / ``dz_h`` ``(T*B, G_h)``:
    the pre-activation cotangents of the input and recurrent products (the same
    array but for the GRU's candidate). ``dW_ih = Σ x_tᵀ dz_x``, ``db = Σ dz_x``
    and ``dW_hh = Σ h_{t-1}ᵀ dz_h`` are one custom call
    (``jaxrnn_weight_grads``, reading ``h_{t-1}`` from ``hs`` and ``h0`` in
    place); ``dxs = dz_x W_ihᵀ`` is an XLA matmul. ``done``: ``(dW_ih, db, dW_hh)``
    where the backward call computed them already (:func:`_step_grads`); then only ``dxs``.
    """
    T, B, I = xs.shape
    H = hs.shape[-1]
    sd = jax.ShapeDtypeStruct
    f32 = jnp.float32
    if done is not None:
        dw_ih, db, dw_hh = done
    else:
        dw_ih, db, dw_hh = _call(
            "jaxrnn_weight_grads",
            (sd((I, dz_x.shape[1]), f32), sd((dz_x.shape[1],), f32), sd((H, dz_h.shape[1]), f32)),
            xs, hs, h0, dz_x, dz_h, reverse=reverse, threads=loop.threads,
        )
        # XLA's matmul after the call, not beside it: the call's threads are the pool's (measured on 2 cores,
        # the GRU at B=64 T=200 H=128: fwd+bwd median 49-62 ms after, 68-71 ms beside).
        db, dz_x = jax.lax.optimization_barrier((db, dz_x))
    dxs = (dz_x @ w_ih.T).reshape(T, B, I)
    return dw_ih, dw_hh, db, dxs


def _call(name, outs, *args, aliases=None, **attrs):
    """One custom call; inside shard_map every operand and result varies over the axes ``xs`` (args[0]) varies over."""
    call = jax.ffi.ffi_call(name, outs, input_output_aliases=aliases, vmap_method="sequential")
    args = vary_like(args, args[0])
    return vary_like(call(*args, **{k: (np.int32(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in attrs.items()}), args[0])


def _forward_call(reverse, loop, w, xs, carry0, lengths, save, ids=None):
    """The LSTM's forward call; with ``ids`` ``(T B,)``, ``w.b`` is a table of biases, row ``ids[t B + b]`` per step."""
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
    return _call(
        "jaxrnn_lstm_fwd", outs, xs, w.w_ih, w.b, w.w_hh, carry0.h, carry0.c, lengths,
        jnp.zeros((0,), jnp.int32) if ids is None else ids, reverse=reverse, save=save, **loop.attrs(),
        projection=loop.projection,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lstm(reverse, loop, w, xs, carry0, lengths):
    _, hs, _, h_T, c_T = _forward_call(reverse, loop, w, xs, carry0, lengths, save=False)
    return hs, LSTMCarry(h_T, c_T)


def _lstm_fwd(reverse, loop, w, xs, carry0, lengths):
    a, hs, cs, h_T, c_T = _forward_call(reverse, loop, w, xs, carry0, lengths, save=True)
    return (hs, LSTMCarry(h_T, c_T)), (w, xs, carry0, lengths, a, hs, cs)


def _step_grads(gates, loop, xs, hs) -> bool:
    """Whether the backward call of the LSTM (``gates`` 4) or the Elman RNN (1) adds its weight gradients.

    A small model split by batch rows does, inside its loop (each chunk of rows
    a group of steps at a time, while their ``dz`` is in cache); otherwise
    ``jaxrnn_weight_grads`` computes them after the loop (see ``kernels/rnn_cpu.cc``).
    """
    T, B, I = xs.shape
    return bool(_load().jaxrnn_step_grads(gates, T, B, I, hs.shape[-1], loop.split))


def _lstm_backward_call(reverse, loop, w_hh, a, cs, carry0, lengths, cotangents, xs, hs):
    """The LSTM's backward loop: ``(dz, dh0, dc0, dW_ih, db, dW_hh)``, ``dz`` ``(T B, 4H)`` written over ``a``.

    ``xs`` ``(T, B, I)`` (``I = 0`` for ids) and the carries ``hs`` are the
    weight gradients' operands. Where the shapes allow, the call adds
    them inside its loop (:func:`_step_grads`); elsewhere the three are empty (``(0,)``).
    """
    dhs, dfinal = cotangents
    B, H = carry0.h.shape
    I = xs.shape[-1]
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    G = a.shape[1]
    grads = _step_grads(4, loop, xs, hs)
    shapes = ((I, G), (G,), (H, G)) if grads else ((0,), (0,), (0,))
    return _call(
        "jaxrnn_lstm_bwd", (sd(a.shape, f32), sd((B, H), f32), sd((B, H), f32), *(sd(s, f32) for s in shapes)),
        a, cs, carry0.c, dhs.astype(f32), dfinal.h.astype(f32), dfinal.c.astype(f32), w_hh, lengths, xs, hs,
        carry0.h, aliases={0: 0}, reverse=reverse, **loop.attrs(),
    )


def _lstm_bwd(reverse, loop, saved, cotangents):
    w, xs, carry0, lengths, a, hs, cs = saved
    dz, dh0, dc0, *done = _lstm_backward_call(reverse, loop, w.w_hh, a, cs, carry0, lengths, cotangents, xs, hs)
    dw_ih, dw_hh, db, dxs = _input_and_weight_grads(loop, reverse, xs, hs, carry0.h, w.w_ih, dz, dz,
                                                    done if _step_grads(4, loop, xs, hs) else None)
    return _Weights(dw_ih, dw_hh, db), dxs, LSTMCarry(dh0, dc0), None


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def _gru_forward_call(reverse, loop, w, xs, h0, lengths, save):
    """The GRU's forward custom call: ``w`` with ``b_hn`` (:class:`_GRUWeights`) is the reset after the matmul,
    which saves ``a = [r u n]`` and ``m = h_{t-1} W_hn + b_hn``; without (:class:`_Weights`), the reset before,
    which saves ``a`` and ``q = r ⊙ h_{t-1}``."""
    T, B, _ = xs.shape
    H = w.w_hh.shape[0]
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    outs = (
        sd((T * B, 3 * H) if save else (0,), f32),  # a = [r u n]
        sd((T * B, H) if save else (0,), f32),  # m (reset after) or q (reset before)
        sd((T, B, H), f32),  # h carries
        sd((B, H), f32),
    )
    name = "jaxrnn_gru_fwd" if isinstance(w, _GRUWeights) else "jaxrnn_gru_before_fwd"
    w_ih, w_hh, b, *b_hn = w
    return _call(name, outs, xs, w_ih, b, w_hh, *b_hn, h0, lengths, reverse=reverse, save=save, **loop.attrs())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gru(reverse, loop, w, xs, h0, lengths):
    """The GRU, either reset: ``w`` a :class:`_GRUWeights` (with ``b_hn``) is the reset after the matmul, a
    :class:`_Weights` the reset before (see :func:`_gru_forward_call`)."""
    _, _, hs, h_T = _gru_forward_call(reverse, loop, w, xs, h0, lengths, save=False)
    return hs, h_T


def _gru_fwd(reverse, loop, w, xs, h0, lengths):
    a, m_or_q, hs, h_T = _gru_forward_call(reverse, loop, w, xs, h0, lengths, save=True)
    return (hs, h_T), (w, xs, h0, lengths, a, m_or_q, hs)


def _gru_bwd(reverse, loop, saved, cotangents):
    w, xs, h0, lengths, a, m_or_q, hs = saved
    dhs, dh_T = cotangents
    T, B, I = xs.shape
    H = h0.shape[-1]
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    rest = (dhs.astype(f32), dh_T.astype(f32), w.w_hh, lengths)  # the operands both backward calls end with
    if isinstance(w, _GRUWeights):  # reset after: dz_h = [dz_r dz_u dm] beside dz_x
        dz_x, dz_h, dh0 = _call(
            "jaxrnn_gru_bwd", (sd(a.shape, f32), sd(a.shape, f32), sd((B, H), f32)),
            a, m_or_q, hs, h0, *rest, aliases={0: 0}, reverse=reverse, **loop.attrs(),
        )
        dw_ih, dw_hh, db, dxs = _input_and_weight_grads(loop, reverse, xs, hs, h0, w.w_ih, dz_x, dz_h)
        return _GRUWeights(dw_ih, dw_hh, db, jnp.sum(dz_h[:, 2 * H:], axis=0)), dxs, dh0, None
    # Reset before: one dz; the recurrent products are [h_{t-1} w_h{r,u}, q_t w_hn] with q = r ⊙ h_{t-1}.
    dz, dh0 = _call(
        "jaxrnn_gru_before_bwd", (sd(a.shape, f32), sd((B, H), f32)),
        a, hs, h0, *rest, aliases={0: 0}, reverse=reverse, **loop.attrs(),
    )
    prev = _previous(hs, h0, reverse).reshape(T * B, H)
    dw_hh = jnp.concatenate([prev.T @ dz[:, : 2 * H], m_or_q.T @ dz[:, 2 * H :]], axis=1)
    dw_ih = xs.reshape(T * B, I).T @ dz
    dxs = (dz @ w.w_ih.T).reshape(T, B, I)
    return _Weights(dw_ih, dw_hh, jnp.sum(dz, axis=0)), dxs, dh0, None


_gru.defvjp(_gru_fwd, _gru_bwd)


def _elman_forward_call(reverse, loop, activation, w, xs, h0, lengths, save):
    T, B, _ = xs.shape
    H = w.w_hh.shape[0]
    sd = jax.ShapeDtypeStruct
    outs = (sd((T, B, H), jnp.float32), sd((B, H), jnp.float32))
    return _call(
        "jaxrnn_elman_fwd", outs, xs, w.w_ih, w.b, w.w_hh, h0, lengths,
        reverse=reverse, save=save, activation=activation, **loop.attrs(),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _elman(reverse, loop, activation, w, xs, h0, lengths):
    return tuple(_elman_forward_call(reverse, loop, activation, w, xs, h0, lengths, save=False))


def _elman_fwd(reverse, loop, activation, w, xs, h0, lengths):
    hs, h_T = _elman_forward_call(reverse, loop, activation, w, xs, h0, lengths, save=True)
    return (hs, h_T), (w, xs, h0, lengths, hs)


def _elman_bwd(reverse, loop, activation, saved, cotangents):
    w, xs, h0, lengths, hs = saved
    dhs, dh_T = cotangents
    T, B, H = hs.shape
    f32 = jnp.float32
    sd = jax.ShapeDtypeStruct
    I = xs.shape[-1]
    grads = _step_grads(1, loop, xs, hs)
    shapes = ((I, H), (H,), (H, H)) if grads else ((0,), (0,), (0,))
    dz, dh0, *done = _call(
        "jaxrnn_elman_bwd", (sd((T * B, H), f32), sd((B, H), f32), *(sd(s, f32) for s in shapes)),
        hs, dhs.astype(f32), dh_T.astype(f32), w.w_hh, lengths, xs, h0,
        reverse=reverse, activation=activation, **loop.attrs(),
    )
    dw_ih, dw_hh, db, dxs = _input_and_weight_grads(loop, reverse, xs, hs, h0, w.w_ih, dz, dz, done if grads else None)
    return _Weights(dw_ih, dw_hh, db), dxs, dh0, None


_elman.defvjp(_elman_fwd, _elman_bwd)
