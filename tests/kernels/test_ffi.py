"""The ``impl="ffi"`` backend (kernels/ffi.py, kernels/rnn_cpu.cc) against ``impl="reference"``.

Every cell the backend computes (LSTM, GRU with either reset, Elman with
each activation); shapes chosen to reach every path of the C++ code: one team member and
several (``threads``), hidden sizes below, at and off multiples of the 16-unit
blocks, batches off multiples of the 8-row register block, padded rows
(lengths 0 and T) in both directions, buffers large enough for the huge-page
advice. Outputs, final carries and the VJP w.r.t. every parameter, ``xs`` and
the initial carry, with random cotangents on both outputs.

Set ``JAXRNN_REQUIRE_FFI=1`` (CI does) to fail instead of skipping when the
library cannot be built here.
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
from _util import assert_close, randomize
from jaxrnn import kernels
from jaxrnn.kernels import ffi

REASON = ffi.unavailable_reason()
if REASON is not None and os.environ.get("JAXRNN_REQUIRE_FFI") == "1":
    raise RuntimeError(f"JAXRNN_REQUIRE_FFI=1 but the C++ kernel is unavailable: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"C++ kernel unavailable: {REASON}")

# (B, T, H, I): one member (H < 16); 3 blocks of 16 units with a partial last block and
# 17 rows (two 8-row blocks and a 1-row tail); steps large enough for two members in both loops of
# every cell (at least 0.7 MFLOP, see team_size in rnn_cpu.cc), and that shape again on one thread.
SHAPES = [(3, 7, 5, 4), (17, 6, 40, 6), (24, 5, 128, 16)]
CASES = [(SHAPES[0], None), (SHAPES[1], None), (SHAPES[2], None), (SHAPES[2], 1)]

CELLS = {
    "lstm": jaxrnn.LSTM,
    "gru": lambda H: jaxrnn.GRU(H, reset="after"),
    "gru-before": lambda H: jaxrnn.GRU(H, reset="before"),
    "elman": jaxrnn.Elman,
    "elman-relu": lambda H: jaxrnn.Elman(H, activation="relu"),
    "elman-linear": lambda H: jaxrnn.Elman(H, activation="linear"),
}


def _problem(B, T, H, I, seed=0, cell="lstm"):
    cell = CELLS[cell](H)
    k = jax.random.split(jax.random.key(seed), 5)
    # Random weights of a fixed scale: past H = 64 they shrink as 1/sqrt(H) (else the recurrence grows chaotic
    # with H and amplifies rounding, and two float32 computations part by more than the tolerance).
    params = jax.tree.map(lambda a: a * min(1.0, (64 / H) ** 0.5), randomize(cell.init(k[0], I), k[1]))
    if isinstance(cell, jaxrnn.Elman):
        # Half the random weights: at full scale the Elman map amplifies rounding so much that two float32
        # computations (either of which is within 1e-5 of a float64 run) differ by twice the tolerance.
        params = jax.tree.map(lambda a: 0.5 * a, params)
    xs = jax.random.normal(k[2], (B, T, I))
    carry0 = randomize(cell.zero_carry(B), k[3], scale=1.0)
    lengths = jnp.asarray(np.random.RandomState(seed).randint(1, T, B), jnp.int32).at[0].set(0).at[-1].set(T)
    return cell, params, xs, carry0, lengths


def _outputs_and_vjp(impl, cell, params, xs, carry0, lengths, reverse, cot_key):
    def f(p, x, c):
        return jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lengths, reverse=reverse, impl=impl)

    (ys, final), vjp = jax.vjp(f, params, xs, carry0)
    k1, k2 = jax.random.split(cot_key)
    dys = jax.random.normal(k1, ys.shape)
    dfinal = randomize(jax.tree.map(jnp.zeros_like, final), k2, scale=1.0)
    return ys, final, vjp((dys, dfinal)), f(params, xs, carry0)[0]


def _final_loss(final):
    """A scalar from a final carry of any cell, with a different cotangent per leaf."""
    return sum(jnp.sum(jnp.sin((k + 1.0) * leaf)) for k, leaf in enumerate(final))


@pytest.mark.parametrize("shape, threads", CASES, ids=lambda v: "B{}-T{}-H{}-I{}".format(*v) if isinstance(v, tuple) else f"threads={v}")
@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_matches_reference(kind, shape, threads):
    cell, params, xs, carry0, lens = _problem(*shape, cell=kind)
    impl = kernels.FFI(threads=threads)
    teams_before = ffi.team_stats()["team_calls"]
    # Padding and direction: every combination on the two-member shape; two complementary ones on the others.
    variants = {SHAPES[0]: [(None, False), (lens, True)], SHAPES[1]: [(lens, False), (None, True)]}.get(
        shape, [(None, False), (lens, False), (None, True), (lens, True)]
    )
    for lengths, reverse in variants:
        msg = f"{shape} threads={threads} lengths={lengths is not None} reverse={reverse}"
        args = (cell, params, xs, carry0, lengths, reverse, jax.random.key(7))
        ys, final, grads, plain = _outputs_and_vjp(impl, *args)
        ys_r, final_r, grads_r, _ = _outputs_and_vjp("reference", *args)
        assert_close(ys, ys_r, err_msg=msg + " ys")
        assert_close(plain, ys_r, err_msg=msg + " ys (no grad)")
        assert_close(final, final_r, err_msg=msg + " final carry")
        for part, g, g_r in zip(("params", "xs", "carry0"), grads, grads_r):
            # The weight gradients are sums of up to 120 rows of products (the Elman RNN's reach 20 here: no
            # gate bounds its dz), added in another order than the reference's, so two float32 results each
            # within the tolerance of a float64 run may differ by twice it. Measured (gru-before, the
            # 128-unit shape, on a machine whose XLA orders the reference's sums otherwise): dW_hh's worst
            # error against float64, relative to 1 + |value|, 7.9e-6 here and 9.3e-6 for the reference,
            # which differ by 1.4e-5 at one entry of 49152; the Elman's small entries, by up to 1.8e-5.
            scale = 2.0 if part == "params" else 1.0
            assert_close(g, g_r, scale=scale, err_msg=f"{msg} d{part}")
        if lengths is not None:  # padded steps output exact zeros
            mask = np.arange(xs.shape[1])[None, :] < np.asarray(lens)[:, None]
            assert not np.any(np.asarray(ys)[~mask])
    if shape == SHAPES[2] and threads is None and (os.cpu_count() or 1) >= 2:
        # Every call formed a team (4 variants x the forward with saves, the backward, the plain forward).
        assert ffi.team_stats()["team_calls"] - teams_before >= 12


@pytest.mark.parametrize("kind", ["elman-relu", "elman-linear"])
def test_other_elman_activations_match_reference(kind):
    """ReLU (derivative 0 at and below 0) and the linear RNN, with one member and two."""
    for shape in ((5, 6, 7, 3), SHAPES[2]):
        cell, params, xs, carry0, lens = _problem(*shape, seed=4, cell=kind)
        for reverse in (False, True):
            args = (cell, params, xs, carry0, lens, reverse, jax.random.key(5))
            for got, want in zip(_outputs_and_vjp("ffi", *args), _outputs_and_vjp("reference", *args)):
                # scale 4: the weight gradients reach 25 here, and their small entries are sums of terms that
                # large (measured: 2.5e-5 off at worst, as far from a float64 run as the xla backend is).
                assert_close(got, want, scale=4.0, err_msg=f"{kind} {shape} reverse={reverse}")


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_large_buffers_match_xla(kind):
    """Buffers of several MiB (the huge-page advice applies) and the full two-member split.

    With initialised (not randomised) weights: 72 steps of a recurrence with
    large random weights are chaotic, and amplify any rounding difference.
    """
    cell, _, xs, carry0, lens = _problem(16, 72, 256, 32, seed=1, cell=kind)
    params = cell.init(jax.random.key(3), 32)

    def loss(impl):
        def f(p, x, c):
            ys, final = jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lens, impl=impl)
            return jnp.sum(jnp.sin(ys)) + _final_loss(final)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    before = ffi.team_stats()
    got, want = loss("ffi")(params, xs, carry0), loss("xla")(params, xs, carry0)
    after = ffi.team_stats()
    # Calls that formed a team (none where XLA's pool has one thread), and those that ran short-handed.
    assert set(after) == {"team_calls", "short_handed_calls"}
    assert 0 <= after["short_handed_calls"] - before["short_handed_calls"] <= after["team_calls"] - before["team_calls"] <= 2
    # Weight gradients: sums of 1,152 rows, in another order; the Elman's reach 40 (its worst entry is 3.5e-5
    # off, measured; against a float64 run ffi and xla are equally far).
    assert_close(got, want, scale=4.0 if kind == "elman" else 2.0)


def test_saturated_gates_count_exactly():
    """The counting experiment's hand-set LSTM (gate pre-activations of ±50): its sigmoids and tanhs
    saturate to exactly 0 and ±1, so the cell state counts exactly, as with the reference."""
    from jaxrnn import tasks  # noqa: PLC0415
    from jaxrnn.experiments import common, counting  # noqa: PLC0415

    cell, params = counting.counter_lstm()
    xs = common.one_hot(tasks.anbn([100]).inputs[:1], len(tasks.COUNTING_SYMBOLS))
    ys, final = jaxrnn.rnn(cell, params.cell, xs, impl="ffi")
    ys_r, final_r = jaxrnn.rnn(cell, params.cell, xs, impl="reference")
    np.testing.assert_array_equal(final.c, final_r.c)  # [#a - #b, #b] = [0, 100]
    np.testing.assert_array_equal(np.asarray(final.c), [[0.0, 100.0]])
    assert_close(ys, ys_r)


@pytest.mark.parametrize("kind", ["lstm", "gru-before"])
def test_independent_calls_in_one_program(kind):
    """Two independent recurrences in one jitted program (XLA may run their custom calls at the same
    time, on different threads): each equals the reference (the C++ scratch memory is per thread)."""
    cell, params, xs, carry0, lens = _problem(16, 9, 64, 8, seed=2, cell=kind)
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
    cell, params, xs, carry0, _ = _problem(3, 7, 5, 4, cell=kind)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    loss = lambda impl: lambda p, x: jnp.sum(jnp.sin(jaxrnn.rnn(cell, p, x, impl=impl)[0]))  # noqa: E731
    got = jax.grad(loss("ffi"), argnums=(0, 1))(params, xs)
    want = jax.grad(loss("xla"), argnums=(0, 1))(params, xs)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    assert_close(got, want, dtype=jnp.bfloat16)


@pytest.mark.parametrize("kind", ["lstm", "gru-before"])
def test_vmap_over_parameters(kind):
    """Under ``vmap`` the custom calls run once per mapped element, each equal to the reference."""
    cell, params, xs, carry0, lens = _problem(4, 6, 20, 3, cell=kind)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), params)

    def run(impl):
        f = lambda p: jaxrnn.rnn(cell, p, xs, initial_carry=carry0, seq_lengths=lens, impl=impl)  # noqa: E731
        loss = lambda p: jnp.sum(jnp.tanh(f(p)[0]))  # noqa: E731
        return jax.vmap(f)(stacked), jax.vmap(jax.grad(loss))(stacked)

    assert_close(run("ffi"), run("reference"))


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_empty_sequence_and_batch(kind):
    """``T = 0`` and ``B = 0`` go to the reference: zeros, and the initial carry (and its gradient) back."""
    cell, params, xs, carry0, _ = _problem(3, 7, 5, 4, cell=kind)
    for x, c in ((xs[:, :0], carry0), (xs[:0], jax.tree.map(lambda a: a[:0], carry0))):

        def loss(impl, x=x):
            def f(c):
                ys, final = jaxrnn.rnn(cell, params, x, initial_carry=c, impl=impl)
                return jnp.sum(ys) + _final_loss(final)

            return f

        assert_close(jax.value_and_grad(loss("ffi"))(c), jax.value_and_grad(loss("reference"))(c))


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_no_retrace_or_recompile(monkeypatch, kind):
    """A second jitted call with equal shapes neither traces the custom calls again nor recompiles."""
    traces = []
    original = ffi._call
    monkeypatch.setattr(ffi, "_call", lambda *a, **k: traces.append(a[0]) or original(*a, **k))
    cell, params, xs, carry0, _ = _problem(16, 5, 64, 8, cell=kind)

    @jax.jit
    def grad(p, x):
        return jax.grad(lambda p, x: jnp.sum(jaxrnn.rnn(cell, p, x, impl="ffi")[0]), argnums=(0, 1))(p, x)

    jax.block_until_ready(grad(params, xs))
    first = len(traces)
    name = "jaxrnn_" + kind.replace("-", "_")
    assert sorted(set(traces)) == [f"{name}_bwd", f"{name}_fwd"], traces
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
    cell, params, xs, carry0, _ = _problem(3, 7, 5, 4)
    np.testing.assert_array_equal(jaxrnn.rnn(cell, params, xs, impl="auto")[0], jaxrnn.rnn(cell, params, xs, impl="ffi")[0])


def test_validation():
    cell, params, xs, carry0, _ = _problem(3, 7, 5, 4)
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


def test_library_cache_key():
    """The cached library is keyed by the source: an edited source builds anew, an unchanged one is reused."""
    path = ffi.build()
    assert path.exists() and ffi.build() == path
    assert path.name.startswith("rnn_cpu-") and path.suffix == ".so"


NO_COMPILER = textwrap.dedent(
    """
    import warnings, jax, jax.numpy as jnp, jaxrnn
    from jaxrnn import kernels
    from jaxrnn.kernels import ffi
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
    print("auto with 2 devices:", jaxrnn.kernels.resolve("auto", cell.resolve(jnp.float32), "cpu")[0])
    """
)


def test_under_shard_map():
    """Per-shard custom calls under ``shard_map`` give the full batch's gradient; ``"auto"`` with two devices is ``xla``."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARD_MAP], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "auto with 2 devices: xla", out.stdout
