"""Shared test helpers: the one per-dtype tolerance table for every equivalence test, the cells, and the
variant-by-variant VJP that the kernel tests compare against ``impl="reference"``."""

import os

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn

#: (rtol, atol) per dtype, for every equivalence test in the suite.
TOLERANCES = {
    jnp.dtype(jnp.float64): (1e-10, 1e-10),
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (5e-3, 5e-3),
}


def tol(dtype):
    """``dict(rtol=..., atol=...)`` for ``dtype``."""
    rtol, atol = TOLERANCES[jnp.dtype(dtype)]
    return dict(rtol=rtol, atol=atol)


def assert_close(actual, expected, dtype=None, scale=1.0, err_msg=""):
    """Leafwise ``assert_allclose`` with the table's tolerance for ``dtype``
    (default: the dtype of each ``actual`` leaf), optionally scaled."""

    def check(a, e):
        d = dtype if dtype is not None else a.dtype
        t = tol(d)
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(e, np.float64),
            rtol=t["rtol"] * scale,
            atol=t["atol"] * scale,
            err_msg=err_msg,
        )

    jax.tree_util.tree_map(check, actual, expected)


# --------------------------------------------------------------------------
# The cell table and random trees every test file draws from
# --------------------------------------------------------------------------

#: Every cell variant, by name: ``CELL_VARIANTS[name](hidden, **kwargs)``.
CELL_VARIANTS = {
    "elman": lambda hidden, **kw: jaxrnn.Elman(hidden, **kw),
    "elman_relu": lambda hidden, **kw: jaxrnn.Elman(hidden, activation="relu", **kw),
    "elman_linear": lambda hidden, **kw: jaxrnn.Elman(hidden, activation="linear", **kw),
    "lstm": lambda hidden, **kw: jaxrnn.LSTM(hidden, **kw),
    "gru_before": lambda hidden, **kw: jaxrnn.GRU(hidden, reset="before", **kw),
    "gru_after": lambda hidden, **kw: jaxrnn.GRU(hidden, reset="after", **kw),
}
#: The four cell kinds most tests cover (Elman, LSTM and both GRU forms).
MAIN_CELLS = ("elman", "lstm", "gru_before", "gru_after")


def make_cell(name, hidden, **kwargs):
    """The cell variant ``name`` of :data:`CELL_VARIANTS` with ``hidden`` units."""
    return CELL_VARIANTS[name](hidden, **kwargs)


def _randomize(tree, key, scale):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [a + jnp.asarray(scale * jax.random.normal(k, jnp.shape(a)), a.dtype) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def randomize(tree, key, scale=0.3):
    """``tree`` with Gaussian noise of std ``scale`` added to every leaf (biases and ``b_hn`` included),
    so that every term of a formula matters. Outside a transformation, one program per tree's shapes,
    compiled with :data:`FAST_COMPILE` (a random draw eagerly is a program per shape, 0.5-1 s each)."""
    return _randomize_fast(tree, key, scale)


def to64(tree):
    """Every leaf as a float64 array (for references computed with x64 enabled)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def via_rnn(cell, impl):
    """``run(p, x, c, lengths, reverse)``: :func:`jaxrnn.rnn` of ``cell`` with ``impl``."""

    def run(p, x, c, lengths, reverse):
        return jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lengths, reverse=reverse, impl=impl)

    return run


#: Compiler options of the equivalence tests' programs: equivalence, not speed, is tested, so LLVM's
#: optimisations are skipped (XLA's HLO passes still run); compiling is about threefold faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_run(f, *args, static_argnums=()):
    """``jax.jit(f, static_argnums=...)(*args)``, compiled with :data:`FAST_COMPILE`."""
    static = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    compiled = jax.jit(f, static_argnums=static).lower(*args).compile(FAST_COMPILE)
    return compiled(*(a for i, a in enumerate(args) if i not in static))


def fast_jit(f, static_argnums):
    """``f`` jitted with :data:`FAST_COMPILE`; called inside a transformation (where compiler options
    cannot be set), ``f`` itself, traced into the caller's program."""
    compiled = jax.jit(f, static_argnums=static_argnums, compiler_options=FAST_COMPILE)

    def call(*args):
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))
        return (f if traced else compiled)(*args)

    return call


_randomize_fast = fast_jit(_randomize, static_argnums=2)
_normal_fast = fast_jit(jax.random.normal, static_argnums=(1, 2))


def normal(key, shape, dtype=float):
    """``jax.random.normal(key, shape, dtype)`` (float64 by default under x64); outside a transformation,
    compiled with :data:`FAST_COMPILE`."""
    return _normal_fast(key, tuple(shape), jax.dtypes.canonicalize_dtype(dtype))


def vjp_variants(run, variants):
    """A function of ``(params, xs, carry0, key)`` returning, per ``(lengths, reverse)`` of ``variants``,
    ``(ys, final, (dparams, dxs, dcarry0), plain)`` under random cotangents, ``plain`` the outputs without
    differentiation (the kernel that saves no residuals); ``run(p, x, c, lengths, reverse)`` is the
    implementation (e.g. :func:`via_rnn`). Jit it once: every variant shares one compilation."""

    def f(params, xs, carry0, key):
        out = {}
        for lengths, reverse in variants:
            (ys, final), vjp = jax.vjp(lambda p, x, c: run(p, x, c, lengths, reverse), params, xs, carry0)  # noqa: B023
            k1, k2 = jax.random.split(key)
            dys = jax.random.normal(k1, ys.shape).astype(ys.dtype)
            dfinal = randomize(jax.tree.map(jnp.zeros_like, final), k2, scale=1.0)
            plain = run(params, xs, carry0, lengths, reverse)
            out[lengths is not None, reverse] = (ys, final, vjp((dys, dfinal)), plain)
        return out

    return f


def devices_env(count):
    """The environment of a subprocess that sees ``count`` CPU devices: this one's, with XLA's device-count
    flag added to its ``XLA_FLAGS`` (whose other flags are kept)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
