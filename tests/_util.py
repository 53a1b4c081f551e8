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
