"""The implementations under test: jaxrnn's backends and the peers.

Each builder takes a :class:`~benchmarks.suites.Case` and a :class:`Context`
and returns either

* a :class:`JaxWork` (a pure function and its arguments; the runner jits,
  compiles and times it the same way for every JAX library), or
* a :class:`TorchWork` (an eager callable that returns with the device idle),

or raises :class:`Unavailable` with the reason the row is skipped (no GPU, no
such cell in the library, ...). ``ImportError`` and ``NotImplementedError``
raised while building or compiling are also reported as skipped.

Every implementation stores its parameters and inputs in the case's dtype and
draws them at random (never zeros). jaxrnn's GRU uses ``reset="after"``, the
form of cuDNN, PyTorch and flax's ``GRUCell``; Elman is tanh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import zlib
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "IMPLEMENTATIONS",
    "JAXRNN_IMPLS",
    "Context",
    "JaxWork",
    "TorchWork",
    "Unavailable",
    "cudnn_algorithm",
    "jaxrnn_builder",
    "jaxrnn_cell",
    "jaxrnn_setup",
    "mode_fn",
    "torch_kernels",
]


class Unavailable(Exception):
    """This implementation cannot run this case here; the message is the reason."""


@dataclasses.dataclass
class Context:
    """Where the suite runs.

    Attributes:
      platform: JAX's default backend (``"cpu"``, ``"gpu"``, ``"tpu"``).
      pallas_interpret: time ``impl="pallas"`` on CPU in interpret mode anyway.
      seed: base seed for parameters and inputs.
    """

    platform: str
    pallas_interpret: bool = False
    seed: int = 0


@dataclasses.dataclass
class JaxWork:
    """``fn(*args)`` is one call; ``library`` names the code path, ``notes`` any facts about it."""

    fn: Callable
    args: Tuple[Any, ...]
    library: str
    notes: dict = dataclasses.field(default_factory=dict)

    def compile(self):
        """``jax.jit(fn).lower(*args).compile()``; returns ``(compiled, run)``.

        ``run()`` is one call of the compiled function that returns with the
        device idle (``jax.block_until_ready``).
        """
        compiled = jax.jit(self.fn).lower(*self.args).compile()
        args = self.args

        def run():
            return jax.block_until_ready(compiled(*args))

        return compiled, run


@dataclasses.dataclass
class TorchWork:
    """``run()`` is one call and returns with the device idle."""

    run: Callable[[], Any]
    library: str
    #: eager libraries build kernels/primitives lazily over the first calls (oneDNN takes several)
    min_warmup: int = 2
    notes: dict = dataclasses.field(default_factory=dict)
    peak_memory: Optional[Callable[[], Optional[int]]] = None
    memory_method: str = ""


# --------------------------------------------------------------------------
# Shared JAX helpers
# --------------------------------------------------------------------------
# Parameters are drawn from abstract shapes (``jax.eval_shape``) with NumPy, so
# building a row compiles nothing but the function under test. Every library
# gets PyTorch's default RNN initialisation, U(-1/sqrt(H), 1/sqrt(H)), for every
# parameter; inputs and carries are standard normal (0.5 scale for carries).


def _rng(case, ctx):
    """A NumPy generator seeded by the case (the same draws for every implementation)."""
    return np.random.default_rng(ctx.seed + zlib.crc32(case.id.encode()) % (2**31))


def _normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape, dtype=np.float32)).astype(jnp.dtype(dtype)))


def _inputs(case, rng):
    """``(B, T, I)`` inputs for sequence modes, ``(B, I)`` for ``step``."""
    if case.mode == "step":
        return _normal(rng, (case.batch, case.input_size), case.dtype)
    return _normal(rng, (case.batch, case.seq_len, case.input_size), case.dtype)


def _carry(case, n_states, rng):
    """A random carry: one ``(B, H)`` array, or a tuple of ``n_states`` of them."""
    leaves = tuple(_normal(rng, (case.batch, case.hidden_size), case.dtype, 0.5) for _ in range(n_states))
    return leaves if n_states > 1 else leaves[0]


def _fill(abstract, case, rng):
    """Concrete parameters for an abstract pytree (``ShapeDtypeStruct`` leaves)."""
    bound = 1.0 / math.sqrt(case.hidden_size)

    def draw(leaf):
        values = rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        return jnp.asarray(values.astype(jnp.dtype(case.dtype)))

    return jax.tree_util.tree_map(draw, abstract)


def mode_fn(forward: Callable, mode: str) -> Callable:
    """``forward(params, xs) -> ys`` for ``fwd``; its gradient for ``fwdbwd``.

    For ``fwdbwd`` the loss is ``sum(ys)`` (in float32) and the function returns
    the gradients with respect to the parameters and the inputs.
    """
    if mode == "fwd":
        return forward
    if mode == "fwdbwd":

        def loss(params, xs):
            return jnp.sum(forward(params, xs).astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1))
    raise ValueError(f"mode: expected 'fwd' or 'fwdbwd', got {mode!r}")


def _sequence(case, forward, params, xs, library, notes=None):
    return JaxWork(mode_fn(forward, case.mode), (params, xs), library, notes or {})


def _lengths(case):
    """``case.seq_lengths()`` as an int32 array, or ``None``."""
    lengths = case.seq_lengths()
    return None if lengths is None else jnp.asarray(lengths, jnp.int32)


def _unpadded(case, library):
    if case.padded:
        raise Unavailable(f"padded batches are timed for jaxrnn, flax.linen and PyTorch only, not {library}")


def _abstract_key():
    """An abstract PRNG key, for ``jax.eval_shape`` of initialisers."""
    return jax.eval_shape(jax.random.key, 0)


# --------------------------------------------------------------------------
# jaxrnn
# --------------------------------------------------------------------------
JAXRNN_IMPLS = ("reference", "xla", "ffi", "pallas")


def jaxrnn_cell(case):
    """jaxrnn's cell for ``case`` (GRU with ``reset="after"``, Elman tanh)."""
    import jaxrnn  # noqa: PLC0415

    H = case.hidden_size
    return {"lstm": lambda: jaxrnn.LSTM(H), "gru": lambda: jaxrnn.GRU(H, reset="after"), "elman": lambda: jaxrnn.Elman(H)}[
        case.cell
    ]()


def jaxrnn_setup(case, ctx):
    """jaxrnn's model, parameters and inputs for ``case``, drawn as every row draws them.

    Returns ``(cell, model, params, xs, rng)``: ``model`` is the cell, or a
    bidirectional two-layer :class:`jaxrnn.Stack` for ``bidir2``; ``rng``
    continues the case's draws (e.g. for a carry).
    """
    import jaxrnn  # noqa: PLC0415

    cell = jaxrnn_cell(case)
    rng = _rng(case, ctx)
    xs = _inputs(case, rng)
    model = jaxrnn.Stack(cell, num_layers=2, bidirectional=True) if case.structure == "bidir2" else cell
    init = functools.partial(model.init, input_size=case.input_size, dtype=jnp.dtype(case.dtype))
    params = _fill(jax.eval_shape(init, _abstract_key()), case, rng)
    return cell, model, params, xs, rng


def jaxrnn_builder(impl):
    """The builder of ``jaxrnn.rnn(..., impl=impl)`` rows.

    ``impl``: a name of :data:`JAXRNN_IMPLS` or a backend configuration
    (``jaxrnn.kernels.XLA(projection="hoisted")``, ``jaxrnn.kernels.Pallas(...)``).
    """

    def build(case, ctx):
        import jaxrnn  # noqa: PLC0415
        from jaxrnn import kernels  # noqa: PLC0415

        name = impl if isinstance(impl, str) else impl.name
        if case.mode == "step" and name != "reference":
            raise Unavailable("single-step inference has one implementation, cell.step (timed as jaxrnn:reference)")
        if name == "pallas" and ctx.platform == "cpu" and not ctx.pallas_interpret:
            raise Unavailable(
                "Pallas on CPU runs in interpret mode (a correctness path, orders of magnitude slower); "
                "pass --pallas-interpret to time it anyway"
            )
        cell, model, params, xs, rng = jaxrnn_setup(case, ctx)
        dt = jnp.dtype(case.dtype)
        if name == "ffi":
            from jaxrnn.kernels import ffi  # noqa: PLC0415

            if ctx.platform != "cpu" or not ffi.qualifies(cell.resolve(dt)):
                raise Unavailable("impl='ffi' computes float32 LSTMs on CPU only")
            if ffi.unavailable_reason() is not None:
                raise Unavailable(f"impl='ffi': {ffi.unavailable_reason()}")
        resolved = "reference" if name == "reference" else kernels.resolve(impl, cell.resolve(dt), ctx.platform)[0]
        notes = {"backend": resolved}
        if case.mode == "step":
            carry = _carry(case, len(cell.carry_type._fields), rng)
            carry = cell.carry_type(*(carry if isinstance(carry, tuple) else (carry,)))
            carry = jax.tree_util.tree_map(lambda c: c.astype(jnp.float32), carry)  # jaxrnn carries are float32
            return JaxWork(cell.step, (params, carry, xs), "jaxrnn cell.step (jit)", notes)
        lengths = _lengths(case)
        if case.structure == "bidir2":

            def forward(p, x):
                return model.apply(p, x, seq_lengths=lengths, impl=impl)[0]

            return _sequence(case, forward, params, xs, f"jaxrnn.Stack(impl={impl!r})", notes)

        def forward(p, x):
            return jaxrnn.rnn(cell, p, x, seq_lengths=lengths, impl=impl)[0]

        return _sequence(case, forward, params, xs, f"jaxrnn.rnn(impl={impl!r})", notes)

    return build


# --------------------------------------------------------------------------
# flax (linen and nnx)
# --------------------------------------------------------------------------
def _flax_linen(case, ctx):
    import flax.linen as nn  # noqa: PLC0415

    dt = jnp.dtype(case.dtype)
    cls = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "elman": nn.SimpleCell}[case.cell]

    def make():
        return cls(features=case.hidden_size, dtype=dt, param_dtype=dt)

    rng = _rng(case, ctx)
    xs = _inputs(case, rng)
    if case.mode == "step":
        cell = make()
        carry = _carry(case, 2 if case.cell == "lstm" else 1, rng)
        params = _fill(jax.eval_shape(cell.init, _abstract_key(), carry, xs), case, rng)
        return JaxWork(cell.apply, (params, carry, xs), f"flax.linen.{cls.__name__} (jit)")
    lengths = _lengths(case)
    if case.structure == "bidir2":
        layers = [nn.Bidirectional(nn.RNN(make()), nn.RNN(make())) for _ in range(case.num_layers)]
        library = f"flax.linen.Bidirectional(RNN({cls.__name__})) x{case.num_layers}"
    else:
        layers = [nn.RNN(make())]
        library = f"flax.linen.RNN({cls.__name__})"
    model = _linen_layers()(tuple(layers))
    params = _fill(jax.eval_shape(model.init, _abstract_key(), xs), case, rng)
    if lengths is not None:
        library += " with seq_lengths"
    return _sequence(case, lambda p, x: model.apply(p, x, lengths), params, xs, library)


@functools.lru_cache(maxsize=None)
def _linen_layers():
    """A linen module class applying its layers in turn, each given ``seq_lengths`` (made on first use:
    importing this file needs no flax)."""
    import flax.linen as nn  # noqa: PLC0415

    class LinenLayers(nn.Module):
        layers: Tuple[Any, ...]

        def __call__(self, x, seq_lengths=None):
            for layer in self.layers:
                x = layer(x, seq_lengths=seq_lengths)
            return x

    return LinenLayers


def _flax_nnx(case, ctx):
    from flax import nnx  # noqa: PLC0415

    _unpadded(case, "flax.nnx")
    if not hasattr(nnx, "RNN"):
        raise Unavailable("this flax has no nnx.RNN")
    dt = jnp.dtype(case.dtype)
    cls = {"lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell, "elman": nnx.SimpleCell}[case.cell]

    def make(n_in):
        return cls(n_in, case.hidden_size, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(ctx.seed))

    rng = _rng(case, ctx)
    xs = _inputs(case, rng)
    n_states = 2 if case.cell == "lstm" else 1
    if case.mode == "step":
        graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: make(case.input_size)), nnx.Param, ...)
        carry = _carry(case, n_states, rng)
        params = _fill(abstract, case, rng)

        def step(p, c, x):
            return nnx.merge(graphdef, p, rest)(c, x)

        return JaxWork(step, (params, carry, xs), f"flax.nnx.{cls.__name__} (jit)")

    # Zero initial carries are passed in, so no RNG state is touched inside jit.
    widths = [case.input_size] + [2 * case.hidden_size] * (case.num_layers - 1)
    if case.structure == "bidir2":

        def layers():
            return [
                nnx.Bidirectional(nnx.RNN(make(w), rngs=False), nnx.RNN(make(w), rngs=False), rngs=False) for w in widths
            ]

        library = f"flax.nnx.Bidirectional(RNN({cls.__name__})) x{case.num_layers}"
    else:

        def layers():
            return [nnx.RNN(make(case.input_size), rngs=False)]

        library = f"flax.nnx.RNN({cls.__name__})"
    graphdef, abstract, rest = nnx.split(nnx.eval_shape(layers), nnx.Param, ...)
    params = _fill(abstract, case, rng)
    zeros = jnp.zeros((case.batch, case.hidden_size), dt)
    zero = (zeros, zeros) if n_states == 2 else zeros
    carries = [(zero, zero) if case.bidirectional else zero for _ in widths]

    def forward(p, x):
        for layer, carry in zip(nnx.merge(graphdef, p, rest), carries):
            x = layer(x, initial_carry=carry)
        return x

    return _sequence(case, forward, params, xs, library)


# --------------------------------------------------------------------------
# equinox
# --------------------------------------------------------------------------
def _equinox(case, ctx):
    _unpadded(case, "equinox")
    try:
        import equinox as eqx  # noqa: PLC0415
    except ImportError as e:
        raise Unavailable(f"equinox is not installed ({e})") from None
    if case.cell == "elman":
        raise Unavailable("equinox has no Elman (simple RNN) cell")
    if case.structure != "single":
        raise Unavailable("equinox has no multi-layer or bidirectional RNN module")
    dt = jnp.dtype(case.dtype)
    cls = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[case.cell]
    rng = _rng(case, ctx)
    xs = _inputs(case, rng)
    abstract = eqx.filter_eval_shape(cls, case.input_size, case.hidden_size, dtype=dt, key=jax.random.key(0))
    abstract, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    params = _fill(abstract, case, rng)
    zeros = jnp.zeros((case.batch, case.hidden_size), dt)
    carry0 = (zeros, zeros) if case.cell == "lstm" else zeros

    def step(p, carry, x):
        new = jax.vmap(eqx.combine(p, static))(x, carry)
        return new, (new[0] if case.cell == "lstm" else new)

    if case.mode == "step":
        carry = _carry(case, 2 if case.cell == "lstm" else 1, rng)
        return JaxWork(step, (params, carry, xs), f"equinox.nn.{cls.__name__} under vmap (jit)")

    def forward(p, x):
        _, hs = lax.scan(lambda c, x_t: step(p, c, x_t), carry0, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(hs, 0, 1)

    return _sequence(case, forward, params, xs, f"equinox.nn.{cls.__name__} under vmap + lax.scan")


# --------------------------------------------------------------------------
# jax.experimental.rnn (cuDNN LSTM)
# --------------------------------------------------------------------------
def _jax_cudnn(case, ctx):
    _unpadded(case, "jax.cudnn")
    if ctx.platform != "gpu":
        raise Unavailable(f"jax.experimental.rnn.lstm calls cuDNN and runs only on GPU (platform: {ctx.platform})")
    if case.cell != "lstm":
        raise Unavailable("jax.experimental.rnn implements LSTM only")
    if case.mode == "step":
        raise Unavailable("jax.experimental.rnn has a sequence API only (no single-step call)")
    from jax.experimental import rnn as jrnn  # noqa: PLC0415

    dt = jnp.dtype(case.dtype)
    rng = _rng(case, ctx)
    xs = _inputs(case, rng)
    L, bidir, H, I = case.num_layers, case.bidirectional, case.hidden_size, case.input_size
    n = jrnn.get_num_params_in_lstm(I, H, L, bidir)
    weights = _fill(jax.ShapeDtypeStruct((n,), dt), case, rng)
    state0 = jnp.zeros((L * (2 if bidir else 1), case.batch, H), dt)
    lengths = jnp.full((case.batch,), case.seq_len, jnp.int32)

    def forward(w, x):
        return jrnn.lstm(x, state0, state0, w, lengths, I, H, L, 0.0, bidir)[0]

    return _sequence(case, forward, weights, xs, f"jax.experimental.rnn.lstm (cuDNN, layers={L}, bidirectional={bidir})")


# --------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------
def cudnn_algorithm(cell, dtype, batch, seq_len, input_size, hidden_size, num_layers, bidirectional, forward, props):
    """cuDNN RNN algorithm PyTorch picks, per its ``get_algo`` heuristic.

    Mirrors ``aten/src/ATen/native/cudnn/RNN.cpp`` (PyTorch 2.x, cuDNN >= 8.2.1):
    ``PERSIST_STATIC_SMALL_H`` for small hidden sizes (any dtype but double);
    ``PERSIST_STATIC`` only for float16 with one unidirectional layer, hidden
    ≤ 1024 and a multiple of 128, input a multiple of 128, and a device rule
    (on sm_80+ with ≥ 98 SMs, not sm_86: LSTM batch % 8 == 0 and ≤ 128; tanh
    RNN the same and not (batch ≥ 96 and hidden ≥ 896); never GRU);
    ``STANDARD`` otherwise. Computed here, not observed.

    Args:
      cell: ``"lstm"``, ``"gru"`` or ``"elman"``.
      dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
      forward: the forward call (``False``: the backward one).
      props: ``(major, minor, multiprocessor_count)`` of the device.
    """
    major, minor, sms = props
    H, B = hidden_size, batch
    if major >= 6:
        small = {True: (384, 192), False: (256, 128)}[bool(forward)]
        if H <= (small[0] if cell == "elman" else small[1]):
            return "PERSIST_STATIC_SMALL_H"
    if dtype != "float16":
        return "STANDARD"
    common = num_layers == 1 and H <= 1024 and not bidirectional and H % 128 == 0 and input_size % 128 == 0
    if not common:
        return "STANDARD"
    if major == 7:
        ok = minor != 5 and ((B % 16 == 0 and B not in (80, 112)) or B == 8) and (
            (seq_len >= 40 and B <= 128) or (seq_len >= 20 and B <= 96) or (seq_len >= 10 and B <= 32)
        )
    elif major >= 8 and sms >= 98 and minor != 6:
        ok = {
            "gru": False,
            "lstm": B % 8 == 0 and B <= 128,
            "elman": B % 8 == 0 and B <= 128 and (B < 96 or H < 896),
        }[cell]
    else:
        ok = False
    return "PERSIST_STATIC" if ok else "STANDARD"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side prints there)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def torch_kernels(run, cuda):
    """Operator and kernel names of one call of ``run`` (torch profiler), or ``None``."""
    try:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with _quiet_stderr(), profile(activities=activities) as prof:
            run()
        ops, kernels = set(), {}
        for e in prof.events():
            if cuda and str(getattr(e, "device_type", "")).endswith("CUDA"):
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0) or 0.0
                kernels[e.name] = kernels.get(e.name, 0.0) + float(t)
            elif e.name.startswith("aten::") and any(k in e.name for k in ("rnn", "lstm", "gru", "cudnn", "mkldnn", "cell")):
                ops.add(e.name)
        top = sorted(kernels, key=kernels.get, reverse=True)[:5]
        return {"ops": sorted(ops), "top_kernels": top}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def _torch(variant):
    def build(case, ctx):
        try:
            import torch  # noqa: PLC0415
        except ImportError as e:
            raise Unavailable(f"torch is not installed ({e})") from None
        on_gpu = ctx.platform == "gpu"
        if on_gpu and not torch.cuda.is_available():
            raise Unavailable("JAX runs on GPU but this torch has no CUDA")
        if variant == "1thread" and on_gpu:
            raise Unavailable("the single-thread variant is a CPU comparison (robust on a shared, oversubscribed machine)")
        threads = 1 if variant == "1thread" else (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        if variant == "fp16":
            if not on_gpu:
                raise Unavailable("the float16 variant is the cuDNN (persistent-kernel) comparison; GPU only")
            if case.dtype != "bfloat16":
                raise Unavailable(f"the float16 variant runs only for bfloat16 cases (case dtype {case.dtype})")
            dtype_name = "float16"
        else:
            dtype_name = case.dtype
        device = "cuda" if on_gpu else "cpu"
        tdt = getattr(torch, dtype_name)
        torch.manual_seed(ctx.seed)
        nn = torch.nn

        def sync():
            if on_gpu:
                torch.cuda.synchronize()

        def use_threads():  # torch and torch:1thread alternate within the timed rounds
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

        base = 0
        if on_gpu:
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        B, T, I, H = case.batch, case.seq_len, case.input_size, case.hidden_size
        notes = {"dtype": dtype_name, "threads": threads}
        if case.mode == "step":
            cls = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "elman": nn.RNNCell}[case.cell]
            mod = cls(I, H).to(device, tdt).eval()
            x = torch.randn(B, I, device=device, dtype=tdt)
            h = 0.5 * torch.randn(B, H, device=device, dtype=tdt)
            carry = (h, 0.5 * torch.randn(B, H, device=device, dtype=tdt)) if case.cell == "lstm" else h

            def run():
                use_threads()
                with torch.no_grad():
                    out = mod(x, carry)
                sync()
                return out

            library = f"torch.nn.{cls.__name__}"
        else:
            cls = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}[case.cell]
            mod = cls(I, H, num_layers=case.num_layers, bidirectional=case.bidirectional, batch_first=True)
            mod = mod.to(device, tdt)
            x = torch.randn(B, T, I, device=device, dtype=tdt)
            library = f"torch.nn.{cls.__name__}(num_layers={case.num_layers}, bidirectional={case.bidirectional})"
            lengths = case.seq_lengths()
            if lengths is not None:
                library += " on a packed batch (pack_padded_sequence)"
                lengths = torch.tensor(lengths, dtype=torch.int64)  # on the CPU, as packing wants
                utils = nn.utils.rnn

                def apply(inputs):
                    packed = utils.pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
                    return utils.pad_packed_sequence(mod(packed)[0], batch_first=True, total_length=T)[0]

            else:

                def apply(inputs):
                    return mod(inputs)[0]

            if case.mode == "fwd":
                mod.eval()  # inference path (cuDNN: no reserve space)

                def run():
                    use_threads()
                    with torch.no_grad():
                        y = apply(x)
                    sync()
                    return y

            else:
                xg = x.clone().requires_grad_(True)
                params = list(mod.parameters())

                def run():
                    use_threads()
                    y = apply(xg)
                    grads = torch.autograd.grad(y.float().sum(), [*params, xg])
                    sync()
                    return grads

            if on_gpu:
                p = torch.cuda.get_device_properties(0)
                props = (p.major, p.minor, p.multi_processor_count)
                args = (case.cell, dtype_name, B, T, I, H, case.num_layers, case.bidirectional)
                notes["cudnn_algo_forward"] = cudnn_algorithm(*args, True, props)
                if case.mode == "fwdbwd":
                    notes["cudnn_algo_backward"] = cudnn_algorithm(*args, False, props)
                algos = [v for k, v in notes.items() if k.startswith("cudnn_algo")]
                notes["cudnn_persistent"] = any(a.startswith("PERSIST") for a in algos)
                single = case.num_layers == 1 and not case.bidirectional
                notes["persistent_rule"] = dtype_name == "float16" and single and H <= 1024 and H % 128 == 0 and B % 8 == 0
                notes["cudnn_algo_source"] = "PyTorch get_algo heuristic (computed, not observed); see top_kernels"
        if on_gpu:
            peak = lambda: int(torch.cuda.max_memory_allocated() - base)  # noqa: E731
            method = "torch.cuda.max_memory_allocated minus allocated before the row (params, inputs, outputs, workspace)"
        else:
            peak = None
            method = "not measured on CPU (PyTorch's CPU allocator keeps no peak statistics; process RSS is too coarse)"
        return TorchWork(run, library, notes=notes, peak_memory=peak, memory_method=method)

    return build


# Order matters: jaxrnn:reference runs first in every case (the others are checked against it).
IMPLEMENTATIONS = {
    "jaxrnn:reference": jaxrnn_builder("reference"),
    "jaxrnn:xla": jaxrnn_builder("xla"),
    "jaxrnn:ffi": jaxrnn_builder("ffi"),
    "jaxrnn:pallas": jaxrnn_builder("pallas"),
    "flax.linen": _flax_linen,
    "flax.nnx": _flax_nnx,
    "equinox": _equinox,
    "jax.cudnn": _jax_cudnn,
    "torch:1thread": _torch("1thread"),
    "torch": _torch("default"),
    "torch:fp16": _torch("fp16"),
}
