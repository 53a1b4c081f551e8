"""Cells: equations against independent NumPy references, initialisers, dtypes, counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxrnn
from _util import CELL_VARIANTS, assert_close, compile_run, make_cell, normal, randomize, to64, tol
from jaxrnn.cells import ACTIVATIONS, SIGMOID, TANH

B, I, H = 3, 4, 5


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np(p):
    return [None if a is None else np.asarray(a, np.float64) for a in p]


# Independent references written from the lecture equations, gate by gate.
def lstm_ref(params, h, c, x):
    w_ih, w_hh, b = _np(params)
    W = lambda k: (w_ih[:, k * H : (k + 1) * H], w_hh[:, k * H : (k + 1) * H], b[k * H : (k + 1) * H])  # noqa: E731
    pre = lambda k: x @ W(k)[0] + h @ W(k)[1] + W(k)[2]  # noqa: E731
    i, f, g, o = _sigmoid(pre(0)), _sigmoid(pre(1)), np.tanh(pre(2)), _sigmoid(pre(3))
    c_new = f * c + i * g
    return o * np.tanh(c_new), c_new


def gru_ref(params, h, x, reset):
    w_ih, w_hh, b, b_hn = _np(params)
    U = lambda k: w_ih[:, k * H : (k + 1) * H]  # noqa: E731
    W = lambda k: w_hh[:, k * H : (k + 1) * H]  # noqa: E731
    bb = lambda k: b[k * H : (k + 1) * H]  # noqa: E731
    r = _sigmoid(h @ W(0) + x @ U(0) + bb(0))
    u = _sigmoid(h @ W(1) + x @ U(1) + bb(1))
    if reset == "before":  # Cho et al. 2014, the lectures' form
        h_tilde = np.tanh((r * h) @ W(2) + x @ U(2) + bb(2))
    else:  # cuDNN/PyTorch form
        h_tilde = np.tanh(x @ U(2) + bb(2) + r * (h @ W(2) + b_hn))
    return (1 - u) * h + u * h_tilde


PHI = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "linear": lambda v: v}


def elman_ref(params, h, x, activation):
    w_ih, w_hh, b = _np(params)
    z = x @ w_ih + h @ w_hh + b
    return PHI[activation](z)


def _random_params(cell, key, scale=0.5):
    """Non-trivial parameters: random biases too (init sets them to zero/one)."""
    return randomize(cell.init(key, I), jax.random.fold_in(key, 1), scale)


CELLS = [pytest.param(make_cell(name, H), id=name) for name in CELL_VARIANTS]


def _reference_step(cell, params, carry, x):
    h = np.asarray(carry.h, np.float64)
    x = np.asarray(x, np.float64)
    if isinstance(cell, jaxrnn.LSTM):
        return lstm_ref(params, h, np.asarray(carry.c, np.float64), x)
    if isinstance(cell, jaxrnn.GRU):
        return (gru_ref(params, h, x, cell.reset),)
    return (elman_ref(params, h, x, cell.activation),)


@pytest.mark.parametrize("cell", CELLS)
def test_step_matches_lecture_equations(cell):
    key = jax.random.key(0)
    params = _random_params(cell, key)
    carry = jax.tree_util.tree_map(lambda z: normal(jax.random.key(2), z.shape), cell.zero_carry(B))
    x = normal(jax.random.key(3), (B, I))
    new_carry, y = cell.step(params, carry, x)
    expected = _reference_step(cell, params, carry, x)
    assert_close(tuple(new_carry), expected)
    assert_close(y, expected[0])


def test_gru_reset_variants_differ():
    """The two GRU forms are different functions once the reset gate matters."""
    before, after = jaxrnn.GRU(H), jaxrnn.GRU(H, reset="after")
    p_b = _random_params(before, jax.random.key(0))
    p_a = p_b._replace(b_hn=jnp.zeros((H,)))
    carry = jaxrnn.Carry(normal(jax.random.key(1), (B, H)))
    x = normal(jax.random.key(2), (B, I))
    _, y_b = before.step(p_b, carry, x)
    _, y_a = after.step(p_a, carry, x)
    assert float(jnp.max(jnp.abs(y_a - y_b))) > 1e-3


def test_gru_update_gate_interpolates_as_in_the_lectures():
    """u → 1 copies the candidate, u → 0 keeps h_prev (h = (1-u)⊙h_prev + u⊙h̃)."""
    cell = jaxrnn.GRU(H)
    p = _random_params(cell, jax.random.key(0))
    carry = jaxrnn.Carry(normal(jax.random.key(1), (B, H)))
    x = normal(jax.random.key(2), (B, I))
    keep = p._replace(b=p.b.at[H : 2 * H].set(-1e4))
    _, y = cell.step(keep, carry, x)
    assert_close(y, carry.h)


@pytest.mark.parametrize("cell", CELLS)
def test_step_gradients_match_finite_differences(cell):
    params = _random_params(cell, jax.random.key(0), scale=0.3)
    carry = jax.tree_util.tree_map(lambda z: 0.5 * normal(jax.random.key(2), z.shape), cell.zero_carry(2))
    x = normal(jax.random.key(3), (2, I)) + 0.1  # keep relu away from its kink
    with jax.enable_x64(True):
        f = lambda p, c, x: cell.step(p, c, x)[1]  # noqa: E731
        check_grads(f, (to64(params), to64(carry), to64(x)), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- counts
@pytest.mark.parametrize("I_, H_", [(256, 512), (7, 3), (1, 1)])
def test_count_params_closed_form(I_, H_):
    key = jax.random.key(0)
    per_gate = I_ * H_ + H_ * H_ + H_

    def count(cell):  # the parameters' shapes, as init makes them (eval_shape: no orthogonal 512x512 QR eagerly)
        return jaxrnn.count_params(jax.eval_shape(lambda k: cell.init(k, I_), key))

    assert count(jaxrnn.Elman(H_)) == per_gate
    assert count(jaxrnn.LSTM(H_)) == 4 * per_gate
    assert count(jaxrnn.GRU(H_)) == 3 * per_gate
    assert count(jaxrnn.GRU(H_, reset="after")) == 3 * per_gate + H_


def test_lecture_parameter_count_exercise():
    """Lecture exercise: input 256, hidden 512; GRU has 25% fewer parameters than LSTM."""
    key = jax.random.key(0)
    lstm = jaxrnn.count_params(jaxrnn.LSTM(512).init(key, 256))
    gru = jaxrnn.count_params(jaxrnn.GRU(512).init(key, 256))
    assert lstm == 4 * (256 * 512 + 512 * 512 + 512)
    assert gru / lstm == pytest.approx(0.75)


# ---------------------------------------------------------------- initialisers
def test_lstm_forget_bias_initialised_to_one_and_configurable():
    p = jaxrnn.LSTM(H).init(jax.random.key(0), I)
    np.testing.assert_array_equal(p.b[H : 2 * H], 1.0)
    np.testing.assert_array_equal(p.b[:H], 0.0)
    np.testing.assert_array_equal(p.b[2 * H :], 0.0)
    p2 = jaxrnn.LSTM(H, forget_bias=2.5).init(jax.random.key(0), I)
    np.testing.assert_array_equal(p2.b[H : 2 * H], 2.5)


@pytest.mark.parametrize("cell", [jaxrnn.LSTM(8), jaxrnn.GRU(8), jaxrnn.Elman(8, recurrent_scale=0.9)])
def test_recurrent_kernel_is_orthogonal_per_gate(cell):
    p = cell.init(jax.random.key(0), 3)
    scale = getattr(cell, "recurrent_scale", 1.0)
    for k in range(cell.num_gates):
        Q = np.asarray(p.w_hh[:, k * 8 : (k + 1) * 8], np.float64)
        np.testing.assert_allclose(Q.T @ Q, scale**2 * np.eye(8), atol=1e-5)


@pytest.mark.parametrize("cell", [jaxrnn.LSTM(8), jaxrnn.GRU(8), jaxrnn.Elman(8, recurrent_scale=0.9)])
def test_recurrent_blocks_equal_one_orthogonal_call_per_gate_key(cell):
    """The batched draw gives each gate the block ``orthogonal(scale)(keys[k], (H, H))`` of a call per key
    (compiled as ``init`` is, without LLVM's optimisations: the same draws, rounded the same way)."""
    key = jax.random.key(3)
    p = cell.init(key, 3)
    k_rec = jax.random.split(key)[1]
    init = jax.nn.initializers.orthogonal(getattr(cell, "recurrent_scale", 1.0))
    for k, gate_key in enumerate(jax.random.split(k_rec, cell.num_gates)):
        block = compile_run(lambda gk: init(gk, (8, 8)), gate_key)
        np.testing.assert_array_equal(np.asarray(p.w_hh[:, k * 8 : (k + 1) * 8]), np.asarray(block))


def test_irnn_identity_recurrence():
    cell = jaxrnn.Elman(6, activation="relu", recurrent_init="identity", kernel_init="irnn")
    p = cell.init(jax.random.key(0), 4)
    np.testing.assert_array_equal(p.w_hh, np.eye(6))
    np.testing.assert_array_equal(p.b, 0.0)
    assert float(jnp.std(p.w_ih)) < 1e-2


def test_input_kernel_initialisers_have_their_variance():
    big = 400
    p = jaxrnn.Elman(300).init(jax.random.key(0), big)
    assert float(jnp.var(p.w_ih)) == pytest.approx(1.0 / big, rel=0.1)  # lecun: 1/fan_in
    p = jaxrnn.Elman(300, kernel_init="glorot_uniform").init(jax.random.key(0), big)
    assert float(jnp.var(p.w_ih)) == pytest.approx(2.0 / (big + 300), rel=0.1)


def test_callable_initialisers_are_used():
    ones = lambda key, shape, dtype: jnp.ones(shape, dtype)  # noqa: E731
    p = jaxrnn.LSTM(3, kernel_init=ones, recurrent_init=ones).init(jax.random.key(0), 2)
    np.testing.assert_array_equal(p.w_ih, 1.0)
    np.testing.assert_array_equal(p.w_hh, 1.0)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("cell", CELLS)
def test_dtype_policy_bf16_inputs(cell):
    """bf16 inputs: bf16 outputs, float32 carry, close to the float32 computation."""
    params = _random_params(cell, jax.random.key(0))
    carry = cell.zero_carry(B)
    x = normal(jax.random.key(3), (B, I))
    c32, y32 = cell.step(params, carry, x)
    c16, y16 = cell.step(params, carry, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in c16)
    assert_close(y16, y32, dtype=jnp.bfloat16)
    assert_close(tuple(c16), tuple(c32), dtype=jnp.bfloat16)


def test_compute_dtype_is_separate_from_param_and_input_dtype():
    cell32, cell16 = jaxrnn.LSTM(H), jaxrnn.LSTM(H, compute_dtype=jnp.bfloat16)
    params = _random_params(cell32, jax.random.key(0))
    x = normal(jax.random.key(3), (B, I))
    carry = cell32.zero_carry(B)
    _, y16 = cell16.step(params, carry, x)
    assert y16.dtype == jnp.float32  # output keeps the input dtype
    # matmul operands rounded to bf16: equal to the f32 cell fed bf16-rounded operands
    rounded = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
    rounded = rounded._replace(b=params.b)
    _, y_ref = cell32.step(rounded, carry, x.astype(jnp.bfloat16).astype(jnp.float32))
    assert_close(y16, y_ref)
    _, y32 = cell32.step(params, carry, x)
    assert float(jnp.max(jnp.abs(y16 - y32))) > 0  # it really computed in bf16


def test_param_dtype():
    p = jaxrnn.GRU(H, reset="after").init(jax.random.key(0), I, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(p))


def test_zero_carry():
    c = jaxrnn.LSTM(H).zero_carry((2, 3))
    assert isinstance(c, jaxrnn.LSTMCarry) and c.h.shape == (2, 3, H) and c.c.dtype == jnp.float32
    np.testing.assert_array_equal(c.c, 0)
    assert jaxrnn.GRU(H).zero_carry(4).h.shape == (4, H)


# ---------------------------------------------------------------- configs
def test_configs_are_frozen_and_hashable():
    assert jaxrnn.LSTM(4) == jaxrnn.LSTM(4) and hash(jaxrnn.LSTM(4)) == hash(jaxrnn.LSTM(4))
    assert jaxrnn.GRU(4) != jaxrnn.GRU(4, reset="after")
    with pytest.raises(Exception):
        jaxrnn.LSTM(4).hidden_size = 5
    # usable as a static argument
    g = jax.jit(lambda cell, x: cell.zero_carry(x.shape[:1]).h + x, static_argnums=0)
    assert g(jaxrnn.LSTM(4), jnp.ones((2, 4))).shape == (2, 4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jaxrnn.LSTM(0), "hidden_size"),
        (lambda: jaxrnn.LSTM(-3), "hidden_size"),
        (lambda: jaxrnn.LSTM(True), "hidden_size"),
        (lambda: jaxrnn.Elman(4, activation="sigmoid"), "activation"),
        (lambda: jaxrnn.GRU(4, reset="middle"), "reset"),
        (lambda: jaxrnn.LSTM(4, kernel_init="he"), "kernel_init"),
        (lambda: jaxrnn.LSTM(4, recurrent_init="random"), "recurrent_init"),
    ],
)
def test_bad_config_raises(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_hidden_size_type():
    with pytest.raises(TypeError, match="hidden_size"):
        jaxrnn.LSTM("8")


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        jaxrnn.LSTM(4).init(jax.random.key(0), 0)


def test_tolerance_table_is_the_one_used():
    assert tol(jnp.float32) == dict(rtol=1e-5, atol=1e-5)



# ---------------------------------------------------------------- one definition
def _tanh_sites_ref(cell, params, h, c, xp):
    """Hand-written tanh sites of one step from the projected input ``xp`` (float64 NumPy)."""
    w_hh, b_hn = _np(params)[1], getattr(params, "b_hn", None)
    blk = lambda a, k: a[..., k * H : (k + 1) * H]  # noqa: E731
    if isinstance(cell, jaxrnn.LSTM):
        z = xp + h @ w_hh
        i, f, g = _sigmoid(blk(z, 0)), _sigmoid(blk(z, 1)), np.tanh(blk(z, 2))
        return {"g": g, "c": np.tanh(f * c + i * g)}
    if isinstance(cell, jaxrnn.GRU):
        r = _sigmoid(blk(xp, 0) + h @ blk(w_hh, 0))
        if cell.reset == "before":
            return {"n": np.tanh(blk(xp, 2) + (r * h) @ blk(w_hh, 2))}
        return {"n": np.tanh(blk(xp, 2) + r * (h @ blk(w_hh, 2) + np.asarray(b_hn, np.float64)))}
    return {"h": PHI[cell.activation](xp + h @ w_hh)}


@pytest.mark.parametrize("cell", CELLS)
def test_tanh_sites_match_hand_formulas(cell):
    params = _random_params(cell, jax.random.key(0))
    carry = jax.tree_util.tree_map(lambda z: normal(jax.random.key(2), z.shape), cell.zero_carry(B))
    xp = cell.input_projection(params, normal(jax.random.key(3), (B, I)))
    sites = cell.resolve(jnp.float32).tanh_sites(params, carry, xp)
    c = np.asarray(getattr(carry, "c", carry.h), np.float64)
    expected = _tanh_sites_ref(cell, params, np.asarray(carry.h, np.float64), c, np.asarray(xp, np.float64))
    assert set(sites) == set(expected)
    assert_close(sites, expected)
    assert all(v.shape == (B, H) for v in sites.values())


@pytest.mark.parametrize("cell", CELLS)
def test_tanh_sites_are_the_steps_own(cell):
    """The sites are intermediate values of ``step_projected`` itself: Elman's is the new ``h``, the
    LSTM's ``c`` site is ``tanh`` of the new ``c``; with leading ``(T, B)`` axes too."""
    params = _random_params(cell, jax.random.key(1))
    carry = jax.tree_util.tree_map(lambda z: normal(jax.random.key(4), z.shape), cell.zero_carry((2, B)))
    xp = cell.input_projection(params, normal(jax.random.key(5), (2, B, I)))
    cell = cell.resolve(jnp.float32)
    new, h = cell.step_projected(params, carry, xp)
    sites = cell.tanh_sites(params, carry, xp)
    if isinstance(cell, jaxrnn.Elman):
        assert_close(sites["h"], h)
    if isinstance(cell, jaxrnn.LSTM):
        assert_close(sites["c"], jnp.tanh(new.c))


@pytest.mark.parametrize("cell", CELLS)
def test_step_projected_is_gate_step(cell):
    """``step_projected`` (stacked matmul blocks) is ``gate_step`` with one matmul per gate."""
    params = _random_params(cell, jax.random.key(0))
    carry = jax.tree_util.tree_map(lambda z: normal(jax.random.key(2), z.shape), cell.zero_carry(B))
    cell = cell.resolve(jnp.float32)
    xp = cell.input_projection(params, normal(jax.random.key(3), (B, I)))
    mm = cell.recurrent_matmul(cell.split_gates(params.w_hh), per_gate=True)
    new, h, acts = cell.gate_step(carry, cell.split_gates(xp), mm, getattr(params, "b_hn", None))
    assert_close(cell.step_projected(params, carry, xp), (new, h))
    assert_close(cell.step_activations(params, carry, xp), (new, h, acts))
    assert len(acts) == cell.num_gates + (getattr(cell, "reset", None) == "after")


@pytest.mark.parametrize("act", ["tanh", "relu", "linear", "sigmoid"])
def test_activation_derivative_from_output_is_the_derivative(act):
    """``Activation.deriv(φ(z)) = φ'(z)`` for every activation the cells and kernels use."""
    a = SIGMOID if act == "sigmoid" else ACTIVATIONS[act]
    z = jnp.linspace(-4.0, 4.0, 41) + 0.05  # off relu's kink
    assert_close(a.deriv(a.value(z)), jax.vmap(jax.grad(a.value))(z))
    assert ACTIVATIONS["tanh"] is TANH
    assert jaxrnn.LSTM(H).gate_activations == (SIGMOID, SIGMOID, TANH, SIGMOID)
    assert jaxrnn.GRU(H).gate_activations == (SIGMOID, SIGMOID, TANH)
    assert jaxrnn.Elman(H, activation="relu").gate_activations == (ACTIVATIONS["relu"],)


@pytest.mark.parametrize("cd", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_dot_t_is_dot_of_the_transpose(cd):
    cell = jaxrnn.LSTM(H, compute_dtype=cd)
    a = normal(jax.random.key(0), (2, B, 4 * H))
    w = normal(jax.random.key(1), (H, 4 * H))
    got = cell.dot_t(a, w)
    assert got.dtype == jnp.float32 and got.shape == (2, B, H)
    assert_close(got, cell.dot(a, w.T))
