"""The sequence runner against Python loops over ``cell.step``; lengths, reverse, layouts, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxrnn
from _util import MAIN_CELLS, assert_close, make_cell, normal

B, T, I, H = 3, 6, 4, 5
IMPL = "reference"

CELLS = [pytest.param(make_cell(name, H), id=name) for name in MAIN_CELLS]


def _params(cell, seed=0):
    p = cell.init(jax.random.key(seed), I)
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [a + 0.3 * normal(k, a.shape) for a, k in zip(leaves, keys)])


def _xs(shape=(B, T, I), seed=1):
    return normal(jax.random.key(seed), shape)


def _random_carry(cell, batch=B, seed=2):
    return jax.tree_util.tree_map(lambda z: normal(jax.random.key(seed), z.shape), cell.zero_carry(batch))


def loop_reference(cell, params, xs, carry, lengths=None, reverse=False):
    """Python loop over ``cell.step``, one sequence at a time, only over its valid part."""
    ys = np.zeros(xs.shape[:2] + (cell.hidden_size,), np.float32)
    finals = []
    for b in range(xs.shape[0]):
        n = xs.shape[1] if lengths is None else int(lengths[b])
        c = jax.tree_util.tree_map(lambda a: a[b], carry)
        steps = range(n - 1, -1, -1) if reverse else range(n)
        for t in steps:
            c, y = cell.step(params, c, xs[b, t])
            ys[b, t] = np.asarray(y)
        finals.append(c)
    final = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *finals)
    return ys, final


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_scan_equals_python_loop(cell, reverse):
    params, xs, carry = _params(cell), _xs(), _random_carry(cell)
    ys, final = jaxrnn.rnn(cell, params, xs, initial_carry=carry, reverse=reverse, impl=IMPL)
    ys_ref, final_ref = loop_reference(cell, params, xs, carry, reverse=reverse)
    assert_close(ys, ys_ref)
    assert_close(tuple(final), tuple(final_ref))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_seq_lengths_semantics(cell, reverse):
    """Padded outputs are zero, final carry is each sequence's own last valid carry,
    reverse runs over the valid part only (padding stays at the end)."""
    lengths = np.array([T, 2, 0])
    params, xs, carry = _params(cell), _xs(), _random_carry(cell)
    ys, final = jaxrnn.rnn(cell, params, xs, initial_carry=carry, seq_lengths=lengths, reverse=reverse, impl=IMPL)
    ys_ref, final_ref = loop_reference(cell, params, xs, carry, lengths, reverse)
    assert_close(ys, ys_ref)
    assert_close(tuple(final), tuple(final_ref))
    np.testing.assert_array_equal(ys[1, 2:], 0.0)
    np.testing.assert_array_equal(ys[2], 0.0)
    assert_close(tuple(jax.tree_util.tree_map(lambda a: a[2], final)), tuple(jax.tree_util.tree_map(lambda a: a[2], carry)))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_padding_values_do_not_matter(reverse):
    cell = jaxrnn.LSTM(H)
    params, xs = _params(cell), _xs()
    lengths = jnp.array([T, 3, 1])
    garbage = xs.at[1, 3:].set(1e3).at[2, 1:].set(-7.0)
    f = lambda x: jaxrnn.rnn(cell, params, x, seq_lengths=lengths, reverse=reverse, impl=IMPL)  # noqa: E731
    assert_close(f(garbage), f(xs))
    grad = jax.grad(lambda x: f(x)[0].sum() + f(x)[1].h.sum())(xs)
    np.testing.assert_array_equal(grad[1, 3:], 0.0)
    np.testing.assert_array_equal(grad[2, 1:], 0.0)
    assert float(jnp.abs(grad[1, :3]).min()) > 0


def test_reverse_without_lengths_is_flip():
    cell = jaxrnn.GRU(H)
    params, xs = _params(cell), _xs()
    ys, final = jaxrnn.rnn(cell, params, xs, reverse=True, impl=IMPL)
    ys_f, final_f = jaxrnn.rnn(cell, params, xs[:, ::-1], impl=IMPL)
    assert_close(ys, ys_f[:, ::-1])
    assert_close(final, final_f)


def test_reverse_with_lengths_is_flip_of_valid_part():
    """The backward direction of a padded batch equals the forward run on each
    sequence's reversed valid part: what bidirectional models need."""
    cell = jaxrnn.LSTM(H)
    params, xs = _params(cell), _xs()
    lengths = [T, 4, 1]
    ys, final = jaxrnn.rnn(cell, params, xs, seq_lengths=jnp.array(lengths), reverse=True, impl=IMPL)
    for b, n in enumerate(lengths):
        y_b, f_b = jaxrnn.rnn(cell, params, xs[b, :n][::-1], impl=IMPL)
        assert_close(ys[b, :n], y_b[::-1])
        assert_close(tuple(jax.tree_util.tree_map(lambda a: a[b], final)), tuple(f_b))


@pytest.mark.parametrize("cell", CELLS)
def test_time_major_and_unbatched(cell):
    params, xs = _params(cell), _xs()
    ys, final = jaxrnn.rnn(cell, params, xs, impl=IMPL)
    ys_tm, final_tm = jaxrnn.rnn(cell, params, jnp.swapaxes(xs, 0, 1), time_major=True, impl=IMPL)
    assert_close(jnp.swapaxes(ys_tm, 0, 1), ys)
    assert_close(final_tm, final)
    y1, f1 = jaxrnn.rnn(cell, params, xs[1], impl=IMPL)
    assert y1.shape == (T, H)
    assert_close(y1, ys[1])
    assert_close(f1, jax.tree_util.tree_map(lambda a: a[1], final))
    y1l, _ = jaxrnn.rnn(cell, params, xs[1], seq_lengths=2, impl=IMPL)
    assert_close(y1l[:2], ys[1, :2])
    np.testing.assert_array_equal(y1l[2:], 0.0)


def test_time_major_with_lengths():
    cell = jaxrnn.LSTM(H)
    params, xs, lengths = _params(cell), _xs(), jnp.array([2, T, 4])
    ys, final = jaxrnn.rnn(cell, params, xs, seq_lengths=lengths, reverse=True, impl=IMPL)
    ys_tm, final_tm = jaxrnn.rnn(
        cell, params, jnp.swapaxes(xs, 0, 1), seq_lengths=lengths, reverse=True, time_major=True, impl=IMPL
    )
    assert_close(jnp.swapaxes(ys_tm, 0, 1), ys)
    assert_close(final_tm, final)


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_finite_differences(cell):
    params, carry = _params(cell), _random_carry(cell, 2)
    xs = _xs((2, 4, I))
    lengths = jnp.array([4, 2])
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731

        def f(p, x, c):
            ys, final = jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lengths, reverse=True, impl=IMPL)
            return ys.sum() + 2.0 * final.h.sum()

        check_grads(f, (to64(params), to64(xs), to64(carry)), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_preserved(dtype):
    cell = jaxrnn.LSTM(H)
    params, xs = _params(cell), _xs()
    ys, final = jaxrnn.rnn(cell, params, xs.astype(dtype), impl=IMPL)
    ys32, final32 = jaxrnn.rnn(cell, params, xs, impl=IMPL)
    assert ys.dtype == dtype and final.h.dtype == jnp.float32 and final.c.dtype == jnp.float32
    assert_close(ys, ys32, dtype=dtype)
    bf16_params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    ys_p, _ = jaxrnn.rnn(cell, bf16_params, xs, impl=IMPL)
    assert ys_p.dtype == jnp.float32


def test_no_recompilation_on_second_call():
    cell = jaxrnn.LSTM(H)
    params = _params(cell)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(p, x, lengths):
        return jaxrnn.rnn(cell, p, x, seq_lengths=lengths, impl=IMPL)

    chex.clear_trace_counter()
    f(params, _xs(), jnp.array([1, 2, 3]))
    f(params, _xs(seed=5), jnp.array([3, 2, 6]))  # same shapes, new values: no retrace
    # the runner's own jit cache, used eagerly, does not grow either
    from jaxrnn.runner import _rnn

    jaxrnn.rnn(cell, params, _xs(), impl=IMPL)
    size = _rnn._cache_size()
    jaxrnn.rnn(cell, params, _xs(seed=7), impl=IMPL)
    assert _rnn._cache_size() == size


def test_traced_out_of_range_lengths_are_clamped():
    cell = jaxrnn.GRU(H)
    params, xs = _params(cell), _xs()
    f = jax.jit(lambda lengths: jaxrnn.rnn(cell, params, xs, seq_lengths=lengths, impl=IMPL))
    assert_close(f(jnp.array([T + 5, -3, 2])), f(jnp.array([T, 0, 2])))


def test_initial_carry_is_used():
    cell = jaxrnn.LSTM(H)
    params, xs, carry = _params(cell), _xs(), _random_carry(cell)
    ys0, _ = jaxrnn.rnn(cell, params, xs, impl=IMPL)
    ys1, _ = jaxrnn.rnn(cell, params, xs, initial_carry=carry, impl=IMPL)
    assert float(jnp.abs(ys0[:, 0] - ys1[:, 0]).max()) > 1e-3


# ---------------------------------------------------------------- bad input
def _expect(exc, match, **kwargs):
    cell = kwargs.pop("cell", jaxrnn.LSTM(H))
    params = kwargs.pop("params", _params(cell))
    xs = kwargs.pop("xs", _xs())
    with pytest.raises(exc, match=match):
        jaxrnn.rnn(cell, params, xs, **kwargs)


def test_error_wrong_rank():
    _expect(ValueError, r"xs: expected shape \(B, T, input_size\).*got \(2, 3, 4, 4\)", xs=jnp.ones((2, 3, 4, I)))
    _expect(ValueError, r"xs: expected shape \(T, B, input_size\)", xs=jnp.ones((I,)), time_major=True)


def test_error_wrong_feature_size():
    _expect(ValueError, r"xs: expected last dimension 4 .*\(4, 20\).*got shape \(3, 6, 7\)", xs=jnp.ones((B, T, 7)))


def test_error_integer_inputs():
    _expect(TypeError, "xs: expected a floating-point array", xs=jnp.ones((B, T, I), jnp.int32))


def test_error_mismatched_carry():
    cell = jaxrnn.LSTM(H)
    bad = jaxrnn.LSTMCarry(jnp.zeros((B, H)), jnp.zeros((B, H + 1)))
    _expect(ValueError, r"initial_carry.c: expected shape \(3, 5\), got \(3, 6\)", initial_carry=bad)
    _expect(ValueError, r"initial_carry.h: expected shape \(3, 5\), got \(2, 5\)", initial_carry=cell.zero_carry(2))
    _expect(TypeError, "initial_carry: expected LSTMCarry", initial_carry=jaxrnn.Carry(jnp.zeros((B, H))))
    _expect(TypeError, "initial_carry: expected Carry", cell=jaxrnn.GRU(H), initial_carry=jnp.zeros((B, H)))


def test_error_seq_lengths():
    _expect(TypeError, "seq_lengths: expected an integer array, got dtype float32", seq_lengths=jnp.ones((B,)))
    _expect(ValueError, r"seq_lengths: expected shape \(3,\), got \(2,\)", seq_lengths=jnp.array([1, 2]))
    _expect(ValueError, r"seq_lengths: expected values in \[0, 6\].*min -1", seq_lengths=np.array([1, -1, 2]))
    _expect(ValueError, r"seq_lengths: expected values in \[0, 6\].*max 7", seq_lengths=[1, 7, 2])


def test_error_params():
    cell = jaxrnn.LSTM(H)
    p = _params(cell)
    _expect(ValueError, r"params.w_hh: expected shape \(5, 20\)", params=p._replace(w_hh=jnp.ones((H, 3 * H))))
    _expect(ValueError, r"params.w_ih: expected shape \(input_size, 20\)", params=p._replace(w_ih=jnp.ones((I, H))))
    _expect(ValueError, r"params.b: expected shape \(20,\)", params=p._replace(b=jnp.ones((H,))))
    _expect(TypeError, "params: expected the parameter NamedTuple", params={"w": 1})
    g = jaxrnn.GRU(H, reset="after")
    _expect(ValueError, "params.b_hn: expected shape", cell=g, params=_params(jaxrnn.GRU(H)))


def test_error_unknown_impl_and_cell():
    _expect(ValueError, r"impl: expected one of \('auto', 'reference', 'xla', 'ffi', 'pallas'\) or a jaxrnn.kernels.XLA .*, got 'cudnn'", impl="cudnn")
    with pytest.raises(TypeError, match="cell: expected a jaxrnn cell"):
        jaxrnn.rnn("lstm", None, _xs())


def test_errors_are_raised_under_jit_at_trace_time():
    cell = jaxrnn.LSTM(H)
    params = _params(cell)
    f = jax.jit(lambda x: jaxrnn.rnn(cell, params, x))
    with pytest.raises(ValueError, match="xs: expected last dimension 4"):
        f(jnp.ones((B, T, I + 1)))


def test_impl_resolution():
    from jaxrnn.runner import resolve_backend, rnn_reference

    cell = jaxrnn.LSTM(H)
    assert resolve_backend("reference", cell, "cpu") == ("reference", rnn_reference)
    assert resolve_backend("auto", cell, "cpu")[0] == "xla"
    assert resolve_backend("xla", cell, "gpu")[0] == "xla"
    params, xs = _params(cell), _xs()
    assert_close(jaxrnn.rnn(cell, params, xs, impl="auto"), jaxrnn.rnn(cell, params, xs, impl="reference"))


def test_backend_configurations():
    """``impl`` takes configured backends: same results as the reference, static and hashable."""
    from jaxrnn.kernels import XLA, Pallas
    from jaxrnn.kernels.pallas import BlockSizes

    cell = jaxrnn.GRU(H, reset="after")
    params, xs = _params(cell), _xs()
    lengths = jnp.array([T, 1][:B] + [T] * max(0, B - 2), jnp.int32)[:B]
    want = jaxrnn.rnn(cell, params, xs, seq_lengths=lengths, reverse=True, impl="reference")
    grad = lambda impl: jax.grad(lambda p: jnp.sum(jaxrnn.rnn(cell, p, xs, seq_lengths=lengths, impl=impl)[0] ** 2))  # noqa: E731
    for impl in (XLA(projection="in_loop"), XLA(projection="hoisted"), Pallas(block=BlockSizes(batch=2), interpret=True)):
        assert_close(jaxrnn.rnn(cell, params, xs, seq_lengths=lengths, reverse=True, impl=impl), want, err_msg=str(impl))
        assert_close(grad(impl)(params), grad("reference")(params), err_msg=str(impl))
    # Equal configurations are equal static arguments: no new compilation.
    before = jaxrnn.runner._rnn._cache_size()
    jaxrnn.rnn(cell, params, xs + 1.0, seq_lengths=lengths, reverse=True, impl=XLA(projection="in_loop"))
    assert jaxrnn.runner._rnn._cache_size() == before
    # A stack passes the configuration to every layer.
    stack = jaxrnn.Stack(cell, num_layers=2, bidirectional=True)
    sp = stack.init(jax.random.key(1), I)
    assert_close(stack.apply(sp, xs, impl=XLA(projection="in_loop")), stack.apply(sp, xs, impl="reference"))


def test_backend_configuration_errors():
    from jaxrnn.kernels import XLA, Pallas

    with pytest.raises(ValueError, match=r"XLA.projection: expected one of \('auto', 'hoisted', 'in_loop'\), got 'x'"):
        XLA(projection="x")
    with pytest.raises(TypeError, match="Pallas.block: expected a BlockSizes or None, got int"):
        Pallas(block=8)
    with pytest.raises(TypeError, match="Pallas.interpret: expected a bool or None, got str"):
        Pallas(interpret="yes")
    cell = jaxrnn.LSTM(H)
    with pytest.raises(ValueError, match=r"impl: expected one of .* or a jaxrnn.kernels.XLA / FFI / Pallas configuration"):
        jaxrnn.rnn(cell, _params(cell), _xs(), impl=object())
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        jaxrnn.rnn(cell, _params(cell), _xs(), impl="cudnn")


def test_backend_configurations_reach_the_kernels(monkeypatch):
    """The options of ``XLA``/``Pallas`` are what the backends receive."""
    from jaxrnn.kernels import XLA, Pallas
    from jaxrnn.kernels import pallas as kp
    from jaxrnn.kernels import xla as kx
    from jaxrnn.kernels.pallas import BlockSizes

    seen = []
    real_xla, real_pallas = kx.rnn_xla, kp.rnn_pallas
    monkeypatch.setattr(kx, "rnn_xla", lambda *a, **k: seen.append(k) or real_xla(*a, **k))
    monkeypatch.setattr(kp, "rnn_pallas", lambda *a, **k: seen.append(k) or real_pallas(*a, **k))
    cell = jaxrnn.LSTM(H)
    params, xs = _params(cell), _xs()
    block = BlockSizes(batch=2, time=3)
    jaxrnn.rnn(cell, params, xs, impl=XLA(projection="in_loop"))
    jaxrnn.rnn(cell, params, xs, impl=Pallas(block=block, interpret=True))
    assert seen == [{"projection": "in_loop"}, {"block": block, "interpret": True}]
