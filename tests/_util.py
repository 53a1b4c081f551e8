"""Shared test helpers: the one per-dtype tolerance table for every equivalence test."""

import jax
import jax.numpy as jnp
import numpy as np

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
import jaxrnn  # noqa: E402

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


def randomize(tree, key, scale=0.3):
    """``tree`` with Gaussian noise of std ``scale`` added to every leaf (biases and ``b_hn`` included),
    so that every term of a formula matters."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [a + jnp.asarray(scale * jax.random.normal(k, jnp.shape(a)), a.dtype) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def to64(tree):
    """Every leaf as a float64 array (for references computed with x64 enabled)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)
