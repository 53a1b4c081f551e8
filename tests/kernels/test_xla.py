"""The ``impl="xla"`` backend (kernels/xla.py) against ``impl="reference"``.

Every cell × input dtype × {full length, lengths with 0 and T} × {forward,
reverse}: outputs, final carries and the VJP w.r.t. ``xs``, every parameter
and the initial carry. Plus finite differences, tracing and validation.
"""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxrnn
from _util import assert_close, compile_run, devices_env, make_cell, normal, randomize, to64, via_rnn, vjp_variants
from jaxrnn.kernels import xla
from jaxrnn.runner import rnn_reference

B, T, H, I = 3, 7, 5, 4
LENGTHS = np.array([0, T, 3], np.int32)
CONFIGS = [(lengths, reverse) for lengths in (None, LENGTHS) for reverse in (False, True)]

CELLS = {name: functools.partial(make_cell, name, H) for name in ("elman", "elman_relu", "lstm", "gru_before", "gru_after")}


def _problem(name, dtype, seed=0, param_dtype=jnp.float32):
    cell = CELLS[name]()
    k = jax.random.split(jax.random.key(seed), 4)
    params = randomize(cell.init(k[0], I, dtype=param_dtype), k[1])
    xs = normal(k[2], (B, T, I)).astype(dtype)
    carry0 = randomize(cell.zero_carry(B), k[3], scale=1.0)
    return cell, params, xs, carry0


def _run_all(impl, cell, *args):
    """``{config: (ys, final, (dparams, dxs, dcarry0), ys_no_grad)}`` for every config, in one program."""
    return compile_run(vjp_variants(via_rnn(cell, impl), CONFIGS), *args)


def _normalized(tree, ref):
    """``tree / max(1, max|ref|)`` leafwise, for sums that cancel at low precision."""

    def scaled(a, r):
        r = np.asarray(r, np.float64)
        return np.asarray(a, np.float64) / max(1.0, float(np.max(np.abs(r))))

    return jax.tree.map(scaled, tree, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_matches_reference(name, dtype):
    cell, params, xs, carry0 = _problem(name, dtype)
    cot_key = jax.random.key(7)
    got = _run_all("xla", cell, params, xs, carry0, cot_key)
    want = _run_all("reference", cell, params, xs, carry0, cot_key)
    for config, (ys, final, grads, plain) in got.items():
        ys_r, final_r, grads_r, plain_r = want[config]
        msg = f"{name} {jnp.dtype(dtype).name} lengths={config[0]} reverse={config[1]}"
        dtypes = lambda tree: jax.tree.map(lambda a: a.dtype, tree)  # noqa: E731
        assert ys.dtype == ys_r.dtype and dtypes(grads) == dtypes(grads_r)
        assert_close(ys, ys_r, dtype=dtype, err_msg=msg + " ys")
        assert_close(plain, plain_r, dtype=dtype, err_msg=msg + " ys (no grad)")
        assert_close(final, final_r, dtype=dtype, err_msg=msg + " final carry")
        for part, g, g_r in zip(("params", "xs", "carry0"), grads, grads_r):
            if dtype != jnp.float32:
                # In bfloat16 both sides round differently (the reference rounds
                # each step's weight gradient to bfloat16; xla accumulates all
                # steps in float32): compare relative to each array's scale.
                g, g_r = _normalized(g, g_r), _normalized(g_r, g_r)
            assert_close(g, g_r, dtype=dtype, err_msg=f"{msg} d{part}")
        if config[0]:  # padded steps output exact zeros
            mask = np.arange(T)[None, :] < LENGTHS[:, None]
            assert not np.any(np.asarray(ys, np.float32)[~mask])


def test_low_precision_params():
    """bfloat16 parameters get bfloat16 gradients matching the reference."""
    cell, params, xs, carry0 = _problem("lstm", jnp.float32, param_dtype=jnp.bfloat16)
    loss = lambda impl: lambda p, x: jnp.sum(jnp.sin(jaxrnn.rnn(cell, p, x, impl=impl)[0]))  # noqa: E731
    got = jax.grad(loss("xla"), argnums=(0, 1))(params, xs)
    want = jax.grad(loss("reference"), argnums=(0, 1))(params, xs)
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    assert_close(got, want, dtype=jnp.bfloat16)


@pytest.mark.parametrize("name", list(CELLS))
def test_check_grads_float64(name):
    """Finite differences of the whole map (params, xs, carry0) -> (ys, carry), in float64."""
    with jax.enable_x64(True):
        cell, params, xs, carry0 = _problem(name, jnp.float32, seed=3)
        lengths = np.array([0, 2, 4], np.int32)

        def f(p, x, c):
            fwd = jaxrnn.rnn(cell, p, x, initial_carry=c, impl="xla")
            bwd = jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lengths, reverse=True, impl="xla")
            return fwd, bwd

        check_grads(f, (to64(params), to64(xs[:, :4]), to64(carry0)), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_no_retrace(monkeypatch):
    """A second call with equal shapes (and an equal, freshly built cell) does not trace again."""
    traces = []
    original = xla._forward

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(xla, "_forward", counting)

    @jax.jit
    def grad(params, xs):
        loss = lambda p, x: jnp.sum(jaxrnn.rnn(jaxrnn.LSTM(H), p, x, impl="xla")[0])  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(params, xs)

    _, params, xs, _ = _problem("lstm", jnp.float32)
    jax.block_until_ready(grad(params, xs))
    first = len(traces)
    assert first >= 1
    jax.block_until_ready(grad(randomize(params, jax.random.key(9)), xs + 1.0))
    assert len(traces) == first, "the jitted gradient was traced again"
    jax.block_until_ready(jaxrnn.rnn(jaxrnn.LSTM(H), params, xs, impl="xla"))
    second = len(traces)
    jax.block_until_ready(jaxrnn.rnn(jaxrnn.LSTM(H), params, xs * 2.0, impl="xla"))
    assert len(traces) == second, "an equal cell with equal shapes retraced the forward"


def _loop_bodies(jaxpr):
    """The bodies of every loop (``scan``, ``while``) in ``jaxpr``, nested jaxprs included, printed, in order."""
    bodies = []
    for eqn in jaxpr.eqns:
        for key, value in eqn.params.items():
            sub = getattr(value, "jaxpr", value)  # a ClosedJaxpr's jaxpr
            if not isinstance(sub, jax.extend.core.Jaxpr):
                continue
            if (eqn.primitive.name, key) in (("scan", "jaxpr"), ("while", "body_jaxpr")):
                bodies.append(str(sub))
            bodies.extend(_loop_bodies(sub))
    return bodies


@pytest.mark.parametrize("name", ["lstm", "gru_after"])
def test_directions_share_loop_bodies(name):
    """The forward and backward time loops are the same program in both directions.

    The direction enters the loops as operands, not constants, so XLA compiles
    a bidirectional layer's loop kernels once (kernels/xla.py, ``_walk``): with
    constants, the bodies printed here differ by the literals ``T - 1`` and ``-1``.
    """
    cell, params, xs, carry0 = _problem(name, jnp.float32)
    cell = cell.resolve(jnp.float32)
    xs_tm = jnp.swapaxes(xs, 0, 1)

    def bodies(reverse):
        def loss(p, x):
            hs, _ = xla.rnn_xla(cell, p, x, carry0, jnp.asarray(LENGTHS), reverse, projection="hoisted")
            return jnp.sum(hs)

        return _loop_bodies(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, xs_tm).jaxpr)

    forward, backward = bodies(False), bodies(True)
    assert len(forward) == 2  # the forward loop and the backward loop
    assert forward == backward


def test_empty_sequence():
    """``T = 0``: zero outputs, the initial carry back, and its gradient passed through."""
    cell, params, xs, carry0 = _problem("lstm", jnp.float32)

    def loss(impl):
        def f(c):
            ys, final = jaxrnn.rnn(cell, params, xs[:, :0], initial_carry=c, impl=impl)
            return jnp.sum(ys) + jnp.sum(jnp.sin(final.h)) + jnp.sum(final.c)

        return f

    assert_close(jax.value_and_grad(loss("xla"))(carry0), jax.value_and_grad(loss("reference"))(carry0))


def _projection_configs(projection):
    """Every config through ``rnn_xla(projection=...)`` directly: ``{config: (hs, final, vjp)}``."""
    backend = functools.partial(xla.rnn_xla, projection=projection)

    def run(cell, params, xs, carry0, cot_key):
        xs = jnp.swapaxes(xs, 0, 1)
        out = {}
        for lengths, reverse in CONFIGS:
            lens = None if lengths is None else jnp.asarray(lengths)

            def f(p, x, c, lens=lens, reverse=reverse):
                return (rnn_reference if projection is None else backend)(cell, p, x, c, lens, reverse)

            hs, final = f(params, xs, carry0)  # forward only: the projection under test
            (_, _), vjp = jax.vjp(f, params, xs, carry0)
            dhs = normal(cot_key, hs.shape, hs.dtype)
            out[(lengths is not None, reverse)] = (hs, final, vjp((dhs, jax.tree.map(jnp.zeros_like, final))))
        return out

    return run


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("projection", ["hoisted", "in_loop"])
@pytest.mark.parametrize("name", ["elman", "lstm", "gru_before", "gru_after"])
def test_projection_modes_match_reference(name, projection, dtype):
    """Both places of the forward-only input projection agree with the reference, every config."""
    cell, params, xs, carry0 = _problem(name, dtype)
    cell = cell.resolve(dtype)
    args = (params, xs, carry0, jax.random.key(3))
    got = compile_run(_projection_configs(projection), cell, *args, static_argnums=0)
    want = compile_run(_projection_configs(None), cell, *args, static_argnums=0)
    for config, value in got.items():
        assert_close(value, want[config], dtype=dtype, err_msg=f"{name} {projection} {config}")


def test_projection_auto(monkeypatch):
    """``"auto"`` projects inside the loop on CPU for large projections and batches, hoisted otherwise."""
    used = []
    original = xla._forward_in_loop
    monkeypatch.setattr(xla, "_forward_in_loop", lambda *a: used.append(True) or original(*a))
    cell = jaxrnn.LSTM(H).resolve(jnp.float32)
    params = cell.init(jax.random.key(0), I)

    def in_loop(steps, batch, platform="cpu"):
        used.clear()
        xs = jax.ShapeDtypeStruct((steps, batch, I), jnp.float32)
        jax.eval_shape(lambda x: xla.rnn_xla(cell, params, x, cell.zero_carry(batch), None, False, platform=platform), xs)
        return bool(used)

    n, row_bytes = xla.IN_LOOP_MIN_BATCH, 4 * H * 4  # float32 bytes of one (b, t) projection
    steps = -(-xla.IN_LOOP_MIN_BYTES // (n * row_bytes))  # just enough steps at n rows
    assert in_loop(steps, n) and not in_loop(steps - 1, n)
    assert not in_loop(4 * steps, n - 1) and not in_loop(steps, n, platform="gpu")
    # Differentiated, the projection is hoisted whatever the choice.
    used.clear()
    xs = jnp.ones((steps, n, I))
    loss = lambda p: jnp.sum(xla.rnn_xla(cell, p, xs, cell.zero_carry(n), None, False)[0])  # noqa: E731
    jax.eval_shape(jax.grad(loss), params)
    assert not used


def test_validation():
    cell = jaxrnn.LSTM(H).resolve(jnp.float32)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.zeros((T, B, I))
    carry0 = cell.zero_carry(B)
    with pytest.raises(TypeError, match="cell"):
        xla.rnn_xla(object(), params, xs, carry0, None, False)
    with pytest.raises(ValueError, match=r"xs: expected shape \(T, B, 4\) \(time-major inputs\), got \(7, 3, 3\)"):
        xla.rnn_xla(cell, params, xs[..., :-1], carry0, None, False)
    with pytest.raises(ValueError, match=r"xs: expected shape"):
        xla.rnn_xla(cell, params, xs[0], carry0, None, False)
    with pytest.raises(ValueError, match=r"carry0.c: expected shape \(3, 5\), got \(2, 5\)"):
        xla.rnn_xla(cell, params, xs, carry0._replace(c=carry0.c[:2]), None, False)
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\), got \(4,\)"):
        xla.rnn_xla(cell, params, xs, carry0, jnp.zeros((4,), jnp.int32), False)
    with pytest.raises(ValueError, match=r"params.w_hh: expected shape \(5, 20\), got \(5, 16\)"):
        xla.rnn_xla(cell, params._replace(w_hh=params.w_hh[:, :16]), xs, carry0, None, False)
    with pytest.raises(ValueError, match=r"params.w_ih: expected shape \(input_size, 20\), got \(4, 16\)"):
        xla.rnn_xla(cell, params._replace(w_ih=params.w_ih[:, :16]), xs, carry0, None, False)
    with pytest.raises(ValueError, match=r"projection: expected one of \('auto', 'hoisted', 'in_loop'\), got 'x'"):
        xla.rnn_xla(cell, params, xs, carry0, None, False, projection="x")


SHARD_MAP_FORWARD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, jaxrnn
    from jax.sharding import PartitionSpec as P
    try:
        from jax import shard_map
    except ImportError:
        from jax.experimental.shard_map import shard_map
    mesh = jax.make_mesh((2,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    for cell in [jaxrnn.Elman(5), jaxrnn.LSTM(5), jaxrnn.GRU(5)]:
        p = cell.init(jax.random.key(0), 3)
        xs = jax.random.normal(jax.random.key(1), (4, 6, 3))
        lengths = jnp.arange(4) % 7
        want = jaxrnn.rnn(cell, p, xs, seq_lengths=lengths, impl="reference")[0]
        for projection in ["hoisted", "in_loop"]:
            impl = jaxrnn.kernels.XLA(projection=projection)
            f = shard_map(lambda p, xs, l: jaxrnn.rnn(cell, p, xs, seq_lengths=l, impl=impl)[0],
                          mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=P("b"))
            np.testing.assert_allclose(f(p, xs, lengths), want, rtol=1e-5, atol=1e-5)
    print("ok")
    """
)


def test_forward_under_shard_map():
    """The loop's zero-filled output stacks vary over the batch's mesh axis, as the values written into them."""
    env = devices_env(2)
    out = subprocess.run([sys.executable, "-c", SHARD_MAP_FORWARD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
