"""The ``impl="ffi"`` backend (kernels/ffi.py, kernels/rnn_cpu.cc) as part of a program: concurrent calls,
vmap, shard_map, other parameter dtypes, empty inputs, no retracing, the ``auto`` choice, argument checks,
the library's cache and its absence. (Equivalence on the grid of shapes: ``test_ffi.py``.)
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _util import assert_close, devices_env, normal, randomize
from _ffi_cases import final_loss, problem, requires_ffi
from jaxrnn import kernels
from jaxrnn.kernels import ffi

pytestmark = requires_ffi


@pytest.mark.parametrize("kind", ["lstm", "gru-before"])
def test_independent_calls_in_one_program(kind):
    """Two independent recurrences in one jitted program (XLA may run their custom calls at the same
    time, on different threads): each equals the reference (the C++ scratch memory is per thread)."""
    cell, params, xs, carry0, lens = problem(16, 9, 64, 8, seed=2, cell=kind)
    other = randomize(params, jax.random.key(11))

    def both(impl):
        def f(p, q, x):
            ys_f = jaxrnn.rnn(cell, p, x, seq_lengths=lens, impl=impl)[0]
            ys_b = jaxrnn.rnn(cell, q, x, seq_lengths=lens, reverse=True, impl=impl)[0]
            return jnp.sum(jnp.sin(ys_f)) + jnp.sum(jnp.cos(ys_b) * ys_b)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(params, other, xs)

    assert_close(both("ffi"), both("reference"), scale=2.0)  # summed over both recurrences


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_low_precision_params(kind):
    """Parameters of another float dtype are cast to float32 and get gradients of their own dtype back."""
    cell, params, xs, carry0, _ = problem(3, 7, 5, 4, cell=kind)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    loss = lambda impl: lambda p, x: jnp.sum(jnp.sin(jaxrnn.rnn(cell, p, x, impl=impl)[0]))  # noqa: E731
    got = jax.grad(loss("ffi"), argnums=(0, 1))(params, xs)
    want = jax.grad(loss("xla"), argnums=(0, 1))(params, xs)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    assert_close(got, want, dtype=jnp.bfloat16)


@pytest.mark.parametrize("kind", ["lstm", "gru-before"])
def test_vmap_over_parameters(kind):
    """Under ``vmap`` the custom calls run once per mapped element, each equal to the reference."""
    cell, params, xs, carry0, lens = problem(4, 6, 20, 3, cell=kind)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), params)

    def run(impl):
        f = lambda p: jaxrnn.rnn(cell, p, xs, initial_carry=carry0, seq_lengths=lens, impl=impl)  # noqa: E731
        loss = lambda p: jnp.sum(jnp.tanh(f(p)[0]))  # noqa: E731
        return jax.vmap(f)(stacked), jax.vmap(jax.grad(loss))(stacked)

    assert_close(run("ffi"), run("reference"))


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_empty_sequence_and_batch(kind):
    """``T = 0`` and ``B = 0`` go to the reference: zeros, and the initial carry (and its gradient) back."""
    cell, params, xs, carry0, _ = problem(3, 7, 5, 4, cell=kind)
    for x, c in ((xs[:, :0], carry0), (xs[:0], jax.tree.map(lambda a: a[:0], carry0))):

        def loss(impl, x=x):
            def f(c):
                ys, final = jaxrnn.rnn(cell, params, x, initial_carry=c, impl=impl)
                return jnp.sum(ys) + final_loss(final)

            return f

        assert_close(jax.value_and_grad(loss("ffi"))(c), jax.value_and_grad(loss("reference"))(c))


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_no_retrace_or_recompile(monkeypatch, kind):
    """A second jitted call with equal shapes neither traces the custom calls again nor recompiles."""
    traces = []
    original = ffi._call
    monkeypatch.setattr(ffi, "_call", lambda *a, **k: traces.append(a[0]) or original(*a, **k))
    cell, params, xs, carry0, _ = problem(16, 5, 64, 8, cell=kind)

    @jax.jit
    def grad(p, x):
        return jax.grad(lambda p, x: jnp.sum(jaxrnn.rnn(cell, p, x, impl="ffi")[0]), argnums=(0, 1))(p, x)

    jax.block_until_ready(grad(params, xs))
    first = len(traces)
    name = "jaxrnn_" + kind.replace("-", "_")
    # The forward loop, the backward loop and the weight gradients after it (at this small shape the LSTM's
    # and the Elman RNN's backward call adds them itself; the GRU with the reset before the matmul keeps
    # XLA's products: its candidate's recurrent gradient reads the saved r ⊙ h_{t-1}).
    products = ["jaxrnn_weight_grads"] if kind == "gru" else []
    assert sorted(set(traces)) == sorted([f"{name}_bwd", f"{name}_fwd", *products]), traces
    jax.block_until_ready(grad(randomize(params, jax.random.key(9)), xs + 1.0))
    assert len(traces) == first, "the jitted gradient was traced again"
    assert grad._cache_size() == 1, "the jitted gradient was compiled again"


def test_auto_picks_ffi_for_float32_cells_on_cpu():
    lstm = jaxrnn.LSTM(8)
    resolve = lambda impl, cell, platform="cpu": kernels.resolve(impl, cell, platform)[0]  # noqa: E731
    on_cpu = "ffi" if jax.device_count() == 1 else "xla"
    assert resolve("auto", lstm.resolve(jnp.float32)) == on_cpu
    assert resolve("auto", jaxrnn.GRU(8, reset="after").resolve(jnp.float32)) == on_cpu
    assert resolve("auto", jaxrnn.Elman(8, activation="relu").resolve(jnp.float32)) == on_cpu
    assert resolve("auto", lstm.resolve(jnp.bfloat16)) == "xla"
    assert resolve("auto", jaxrnn.LSTM(8, compute_dtype=jnp.bfloat16).resolve(jnp.float32)) == "xla"
    assert resolve("auto", jaxrnn.GRU(8, reset="before").resolve(jnp.float32)) == on_cpu
    assert resolve("auto", lstm.resolve(jnp.float32), "gpu") != "ffi"
    assert resolve("ffi", lstm.resolve(jnp.float32)) == "ffi"
    # What "auto" picks is what runs: equal to impl="ffi" exactly.
    cell, params, xs, carry0, _ = problem(3, 7, 5, 4)
    np.testing.assert_array_equal(jaxrnn.rnn(cell, params, xs, impl="auto")[0], jaxrnn.rnn(cell, params, xs, impl="ffi")[0])


def test_validation():
    cell, params, xs, carry0, _ = problem(3, 7, 5, 4)
    gru = jaxrnn.GRU(5, reset="after")
    gru_params = gru.init(jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"params.b_hn: expected shape \(5,\), got \(4,\)"):
        ffi.rnn_ffi(gru.resolve(jnp.float32), gru_params._replace(b_hn=gru_params.b_hn[:4]), jnp.swapaxes(xs, 0, 1),
                    gru.zero_carry(3), None, False)
    with pytest.raises(ValueError, match="xs: impl='ffi' computes in float32.*got xs bfloat16"):
        jaxrnn.rnn(cell, params, xs.astype(jnp.bfloat16), impl="ffi")
    with pytest.raises(ValueError, match=r"FFI.threads: expected a positive int or None, got 0"):
        kernels.FFI(threads=0)
    resolved = cell.resolve(jnp.float32)
    time_major = jnp.swapaxes(xs, 0, 1)
    with pytest.raises(ValueError, match=r"xs: expected shape \(T, B, 4\) \(time-major inputs\), got \(7, 3, 3\)"):
        ffi.rnn_ffi(resolved, params, time_major[..., :3], carry0, None, False)
    with pytest.raises(ValueError, match=r"carry0.c: expected shape \(3, 5\), got \(2, 5\)"):
        ffi.rnn_ffi(resolved, params, time_major, carry0._replace(c=carry0.c[:2]), None, False)
    with pytest.raises(ValueError, match=r"params.b: expected shape \(20,\), got \(16,\)"):
        ffi.rnn_ffi(resolved, params._replace(b=params.b[:16]), time_major, carry0, None, False)
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\), got \(4,\)"):
        ffi.rnn_ffi(resolved, params, time_major, carry0, jnp.zeros((4,), jnp.int32), False)
    with pytest.raises(ValueError, match=r"threads: expected a positive int or None, got -1"):
        ffi.rnn_ffi(resolved, params, time_major, carry0, None, False, threads=-1)
    with pytest.raises(ValueError, match=r"FFI.split: expected one of \('auto', 'units', 'rows'\), got 'batch'"):
        kernels.FFI(split="batch")
    with pytest.raises(ValueError, match=r"split: expected one of \('auto', 'units', 'rows'\), got None"):
        ffi.rnn_ffi(resolved, params, time_major, carry0, None, False, split=None)


def test_library_cache_key():
    """The cached library is keyed by the source: an edited source builds anew, an unchanged one is reused."""
    path = ffi.build()
    assert path.exists() and ffi.build() == path
    assert path.name.startswith("rnn_cpu-") and path.suffix == ".so"


def test_sanitized_build_flags(monkeypatch):
    """``JAXRNN_FFI_SANITIZE`` adds the sanitizers (at -O1, with debug information) and keys the build apart."""
    monkeypatch.delenv("JAXRNN_FFI_SANITIZE", raising=False)
    assert ffi.compiler_flags() == ffi.CXXFLAGS
    plain = ffi.library_path("c++")
    monkeypatch.setenv("JAXRNN_FFI_SANITIZE", "address, undefined")
    flags = ffi.compiler_flags()
    assert "-fsanitize=address,undefined" in flags and "-g" in flags and "-O1" in flags and "-O3" not in flags
    assert set(ffi.CXXFLAGS) - {"-O3"} <= set(flags)
    assert ffi.library_path("c++") != plain
    monkeypatch.setenv("JAXRNN_FFI_SANITIZE", "thread")
    with pytest.raises(ValueError, match=r"JAXRNN_FFI_SANITIZE: expected a comma-separated subset of \('address', 'undefined'\), got 'thread'"):
        ffi.compiler_flags()


NO_COMPILER = textwrap.dedent(
    """
    import os, warnings, jax, jax.numpy as jnp, jaxrnn
    from jaxrnn import kernels
    from jaxrnn.kernels import ffi
    if os.environ.get("JAXRNN_FFI") != "0":  # turned off, a build would still compile (slow, and not the point)
        try:
            ffi.build()
        except ffi.BuildError as e:
            print("build:", e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a machine without a compiler falls back silently
        print("auto:", kernels.resolve("auto", jaxrnn.LSTM(8).resolve(jnp.float32), "cpu")[0])
    cell = jaxrnn.LSTM(4)
    try:
        jaxrnn.rnn(cell, cell.init(jax.random.key(0), 3), jnp.ones((2, 5, 3)), impl="ffi")
    except ffi.BuildError as e:
        print("ffi:", e)
    """
)


@pytest.mark.parametrize("env", [{"PATH": "/nonexistent", "CXX": ""}, {"JAXRNN_FFI": "0"}], ids=["no-compiler", "off"])
def test_without_the_library(tmp_path, env):
    """No C++ compiler (or ``JAXRNN_FFI=0``): ``"auto"`` uses ``xla``; ``impl="ffi"`` raises saying why."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", JAXRNN_CACHE_DIR=str(tmp_path), **env)
    out = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True, env=full_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reason = "no C++ compiler found" if "PATH" in env else "turned off by JAXRNN_FFI=0"
    if "PATH" in env:
        assert f"build: {reason}" in out.stdout
    assert "auto: xla" in out.stdout and f"ffi: {reason}" in out.stdout, out.stdout


SHARD_MAP = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, jaxrnn
    from jax.sharding import PartitionSpec as P
    try:
        from jax import shard_map
    except ImportError:
        from jax.experimental.shard_map import shard_map
    mesh = jax.make_mesh((2,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    for cell in (jaxrnn.GRU(20, reset="after"), jaxrnn.GRU(20), jaxrnn.Elman(20), jaxrnn.LSTM(20)):
        p = cell.init(jax.random.key(0), 3)
        xs = jax.random.normal(jax.random.key(1), (4, 6, 3))
        lengths = jnp.arange(4) % 7
        loss = lambda impl: lambda p, xs, l: jnp.sum(jnp.sin(jaxrnn.rnn(cell, p, xs, seq_lengths=l, impl=impl)[0]))
        want = jax.grad(loss("reference"))(p, xs, lengths)
        # The parameters are replicated: autodiff sums their per-shard cotangents itself.
        sharded = shard_map(lambda p, xs, l: jax.grad(loss("ffi"))(p, xs, l),
                            mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=P())
        got = sharded(p, xs, lengths)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # The LSTM's embedded inputs (ids into a replicated table): gradients of the parameters and the table.
    table, ids = jax.random.normal(jax.random.key(2), (7, 3)), jax.random.randint(jax.random.key(3), (4, 6), 0, 7)
    loss = lambda impl: lambda p, t, i, l: jnp.sum(jnp.sin(jaxrnn.rnn(cell, p, jaxrnn.Embedded(t, i), seq_lengths=l, impl=impl)[0]))
    want = jax.grad(loss("reference"), (0, 1))(p, table, ids, lengths)
    sharded = shard_map(lambda p, t, i, l: jax.grad(loss("ffi"), (0, 1))(p, t, i, l),
                        mesh=mesh, in_specs=(P(), P(), P("b"), P("b")), out_specs=P())
    for g, w in zip(jax.tree.leaves(sharded(p, table, ids, lengths)), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    print("auto with 2 devices:", jaxrnn.kernels.resolve("auto", cell.resolve(jnp.float32), "cpu")[0])
    """
)


def test_under_shard_map():
    """Per-shard custom calls under ``shard_map`` give the full batch's gradient (embedded LSTM inputs included);
    ``"auto"`` with two devices is ``xla``."""
    env = devices_env(2)
    out = subprocess.run([sys.executable, "-c", SHARD_MAP], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "auto with 2 devices: xla", out.stdout
