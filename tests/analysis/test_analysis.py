"""jaxrnn.analysis: every quantity against brute force (jax.grad/jacrev of the unrolled
map, a Python loop over cell.step), finite differences in float64, and the lectures' theory."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import assert_close, normal

import jaxrnn
from jaxrnn import analysis as A

CELLS = {
    "elman": jaxrnn.Elman(5),
    "lstm": jaxrnn.LSTM(5, forget_bias=0.5),
    "gru_before": jaxrnn.GRU(5),
    "gru_after": jaxrnn.GRU(5, reset="after"),
}
T, I, B = 7, 3, 2


def setup(cell, key=0, batch=B, seq_len=T, scale=1.0):
    k_p, k_x, k_b = jax.random.split(jax.random.key(key), 3)
    params = cell.init(k_p, I)
    # non-zero biases so that every term of every cell matters
    params = params._replace(b=0.3 * normal(k_b, params.b.shape))
    shape = (batch, seq_len, I) if batch else (seq_len, I)
    return params, scale * normal(k_x, shape)


def wavy(y):
    """A loss that is a sum over examples and exercises every unit differently."""
    return jnp.sum(jnp.sin(3.0 * y + 0.5))


def cumulative(ys):
    """A whole-sequence loss coupling time steps (axis -2 is time, batched or not)."""
    return jnp.sum(jnp.square(jnp.cumsum(ys, axis=-2)))


# --------------------------------------------------------------------------
# Brute force: a Python loop over cell.step and jax.grad from the state at t
# --------------------------------------------------------------------------
def unroll(cell, params, xs, carry):
    carries, ys = [], []
    for t in range(xs.shape[0]):
        carry, y = cell.step(params, carry, xs[t])
        carries.append(carry)
        ys.append(y)
    return carries, ys


def combine(loss_fn, loss_at, outs):
    if loss_at == "last":
        return loss_fn(outs[-1])
    if loss_at == "sum":
        return sum(loss_fn(o) for o in outs)
    return loss_fn(jnp.stack(outs))


def brute_state_grads(cell, params, xs, loss_fn, loss_at, carry0=None):
    """∂J/∂h_t (and ∂J/∂c_t) of one unbatched sequence, by differentiating J as a
    function of the state at t (outputs before t fixed, later steps re-run)."""
    carry0 = cell.zero_carry(()) if carry0 is None else carry0
    carries, ys = unroll(cell, params, xs, carry0)

    def J_from(t, carry_t):
        outs, carry = list(ys[:t]) + [cell.hidden(carry_t)], carry_t
        for s in range(t + 1, xs.shape[0]):
            carry, y = cell.step(params, carry, xs[s])
            outs.append(y)
        return combine(loss_fn, loss_at, outs)

    out = {}
    for field in carries[0]._fields:
        rows = []
        for t, carry_t in enumerate(carries):
            J = lambda v, t=t, c=carry_t: J_from(t, c._replace(**{field: v}))  # noqa: E731
            rows.append(jax.grad(J)(getattr(carry_t, field)))
        out[field] = jnp.stack(rows)
    return out


@pytest.mark.parametrize(
    "name,loss_at",
    [(name, "sum") for name in CELLS] + [("elman", "last"), ("lstm", "last"), ("gru_after", "sequence")],
)
def test_state_grads_match_bruteforce(name, loss_at):
    cell = CELLS[name]
    params, xs = setup(cell)
    loss_fn = cumulative if loss_at == "sequence" else wavy
    loss, grads = A.grads_through_time(cell, params, xs, loss_fn, loss_at=loss_at)
    total = 0.0
    for b in range(B):
        brute = brute_state_grads(cell, params, xs[b], loss_fn, loss_at)
        for field, g in brute.items():
            assert_close(getattr(grads, field)[b], g, err_msg=f"{name} {field} example {b}")
        total += combine(loss_fn, loss_at, unroll(cell, params, xs[b], cell.zero_carry(()))[1])
    assert_close(loss, total)
    norms = A.grad_norms_through_time(cell, params, xs, loss_fn, loss_at=loss_at)
    assert_close(norms.h, jnp.linalg.norm(grads.h, axis=-1))
    if isinstance(cell, jaxrnn.LSTM):
        assert_close(norms.c, jnp.linalg.norm(grads.c, axis=-1))
    else:
        assert norms.c is None
    mean = A.grad_norms_through_time(cell, params, xs, loss_fn, loss_at=loss_at, reduce="mean")
    assert_close(mean.h, jnp.mean(norms.h, axis=0))


def test_unbatched_and_initial_carry():
    cell = CELLS["lstm"]
    params, xs = setup(cell, batch=0)
    carry0 = jaxrnn.LSTMCarry(0.5 * jnp.ones((5,)), -0.3 * jnp.ones((5,)))
    _, grads = A.grads_through_time(cell, params, xs, wavy, loss_at="sum", initial_carry=carry0)
    brute = brute_state_grads(cell, params, xs, wavy, "sum", carry0)
    assert_close(grads.h, brute["h"])
    assert_close(grads.c, brute["c"])
    norms = A.grad_norms_through_time(cell, params, xs, wavy, loss_at="sum", initial_carry=carry0)
    assert norms.h.shape == (T,)
    assert_close(norms.h, jnp.linalg.norm(brute["h"], axis=-1))


@pytest.mark.parametrize("name", ["lstm"])
def test_seq_lengths_equal_truncated_runs(name):
    """With seq_lengths each example's gradients equal those of its truncated sequence;
    padded steps get none. (The last-step loss reads each example's last valid output.)"""
    cell = CELLS[name]
    params, xs = setup(cell, batch=3)
    lengths = jnp.array([T, 4, 1])
    for loss_at in ("last", "sum"):
        _, grads = A.grads_through_time(cell, params, xs, wavy, loss_at=loss_at, seq_lengths=lengths)
        for b, n in enumerate(np.asarray(lengths)):
            ref = brute_state_grads(cell, params, xs[b, :n], wavy, loss_at)
            for field in grads._fields:
                assert_close(getattr(grads, field)[b, :n], ref[field])
                np.testing.assert_array_equal(np.asarray(getattr(grads, field)[b, n:]), 0.0)


@pytest.fixture
def float64():
    """64-bit mode: float64 inputs make the cells accumulate and carry in float64."""
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", ["lstm", "gru_after"])
def test_state_grads_finite_differences(float64, name):
    """Central differences of the plain forward map, float64: J(state_t ± εv)."""
    cell = CELLS[name]
    params, xs = setup(cell, batch=0)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    xs = xs.astype(jnp.float64)
    carry0 = cell.zero_carry((), dtype=jnp.float64)
    _, grads = A.grads_through_time(cell, params, xs, wavy, loss_at="sum", initial_carry=carry0)
    assert grads.h.dtype == jnp.float64
    carries, ys = unroll(cell, params, xs, carry0)
    rng = np.random.default_rng(0)

    def J(t, carry_t):
        outs, carry = list(ys[:t]) + [cell.hidden(carry_t)], carry_t
        for s in range(t + 1, T):
            carry, y = cell.step(params, carry, xs[s])
            outs.append(y)
        return float(combine(wavy, "sum", outs))

    eps = 1e-6
    for t in (0, 3, T - 1):
        for field in carries[t]._fields:
            v = jnp.asarray(rng.standard_normal(5))
            base = getattr(carries[t], field)
            plus = J(t, carries[t]._replace(**{field: base + eps * v}))
            minus = J(t, carries[t]._replace(**{field: base - eps * v}))
            fd = (plus - minus) / (2 * eps)
            np.testing.assert_allclose(float(jnp.dot(getattr(grads, field)[t], v)), fd, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------
# Stacks: a Python-unrolled stack with explicit perturbations, jax.grad of the whole map
# --------------------------------------------------------------------------
def stack_forward_py(stack, params, xs, deltas):
    """Unbatched ``(T, I)`` stack forward with ``deltas[layer][direction][field]`` ``(T, H)``
    added to each carry after its step; connections written out here."""
    cell, inputs = stack.cell, xs
    for layer, p in enumerate(params):

        def run(p_dir, d, reverse):
            carry, outs = cell.zero_carry(()), [None] * T
            for t in reversed(range(T)) if reverse else range(T):
                carry, _ = cell.step(p_dir, carry, inputs[t])
                carry = jax.tree_util.tree_map(lambda c, dd: c + dd[t], carry, d)
                outs[t] = carry.h
            return jnp.stack(outs)

        y = run(p.fwd, deltas[layer][0], False)
        if stack.bidirectional:
            y = jnp.concatenate([y, run(p.bwd, deltas[layer][1], True)], axis=-1)
        joins = inputs.shape[-1] == y.shape[-1]
        if stack.connection == "residual" and joins:
            out = y + inputs
        elif stack.connection == "highway" and joins:
            gate = jax.nn.sigmoid(inputs @ p.highway.w + p.highway.b[None])
            out = gate * y + (1 - gate) * inputs
        else:
            out = y
        last = layer == len(params) - 1
        inputs = jnp.concatenate([inputs, out], axis=-1) if stack.connection == "dense" and not last else out
    return inputs


@pytest.mark.parametrize(
    "stack,B",
    [
        (jaxrnn.Stack(jaxrnn.LSTM(4), num_layers=2, bidirectional=True, connection="residual"), 1),
        (jaxrnn.Stack(jaxrnn.GRU(4), num_layers=3, connection="dense"), 1),
        (jaxrnn.Stack(jaxrnn.Elman(4), num_layers=2, connection="highway"), 2),
    ],
    ids=["lstm-bidir-residual", "gru-dense", "elman-highway"],
)
def test_stack_grads_match_bruteforce(stack, B):
    params = stack.init(jax.random.key(1), I)
    xs = normal(jax.random.key(2), (B, T, I))
    dirs = 2 if stack.bidirectional else 1
    zero = jax.tree_util.tree_map(lambda c: jnp.zeros((T, 4)), stack.cell.zero_carry(()))
    zeros = [[zero] * dirs for _ in params]
    for b in range(B):  # the brute-force map reproduces Stack.apply
        ys_ref, _ = stack.apply(params, xs[b], impl="reference")
        assert_close(stack_forward_py(stack, params, xs[b], zeros), ys_ref)
    _, grads = A.grads_through_time(stack, params, xs, wavy, loss_at="sum")
    norms = A.grad_norms_through_time(stack, params, xs, wavy, loss_at="sum")
    assert norms.h.shape == ((len(params), 2, B, T) if stack.bidirectional else (len(params), B, T))
    for b in range(B):
        brute = jax.grad(lambda d, b=b: combine(wavy, "sum", list(stack_forward_py(stack, params, xs[b], d))))(zeros)
        for layer in range(len(params)):
            for d in range(dirs):
                got = grads[layer][d] if stack.bidirectional else grads[layer]
                for field in got._fields:
                    want = getattr(brute[layer][d], field)
                    assert_close(getattr(got, field)[b], want, err_msg=f"layer {layer} dir {d}")
                norm = norms.h[layer, d, b] if stack.bidirectional else norms.h[layer, b]
                assert_close(norm, jnp.linalg.norm(brute[layer][d].h, axis=-1))


def test_stack_seq_lengths():
    """Bidirectional stack with padding: the forward pass is Stack.apply's, padded steps get no
    gradient, and a padded example's gradients are those of its truncated sequence."""
    stack = jaxrnn.Stack(jaxrnn.GRU(4), num_layers=2, bidirectional=True, connection="residual")
    params = stack.init(jax.random.key(3), I)
    xs = normal(jax.random.key(4), (2, T, I))
    lengths = jnp.array([T, 3])
    loss, grads = A.grads_through_time(stack, params, xs, wavy, loss_at="sum", seq_lengths=lengths)
    ys = stack.apply(params, xs, seq_lengths=lengths, impl="reference")[0]
    assert_close(loss, sum(wavy(ys[:, t]) for t in range(T)))
    _, short = A.grads_through_time(stack, params, xs[1, :3], wavy, loss_at="sum")
    for layer in range(2):
        for d in range(2):
            assert_close(grads[layer][d].h[1, :3], short[layer][d].h)
            np.testing.assert_array_equal(np.asarray(grads[layer][d].h[1, 3:]), 0.0)


# --------------------------------------------------------------------------
# The runner's carry_perturbation hook, impl, padding
# --------------------------------------------------------------------------
def hook_grads(model, params, xs, loss_fn, seq_lengths=None):
    """∂J/∂carry_t straight from jaxrnn.rnn / Stack.apply(carry_perturbation=0), J summed over steps."""
    if isinstance(model, jaxrnn.Stack):
        zeros = model.zero_carry(xs.shape[:2])
        run = lambda d: model.apply(params, xs, seq_lengths=seq_lengths, impl="reference", carry_perturbation=d)  # noqa: E731
    else:
        zeros = model.zero_carry(xs.shape[:-1])
        run = lambda d: jaxrnn.rnn(model, params, xs, seq_lengths=seq_lengths, impl="reference", carry_perturbation=d)  # noqa: E731
    J = lambda d: sum(loss_fn(y) for y in jnp.moveaxis(run(d)[0], -2, 0))  # noqa: E731
    plain = dict(seq_lengths=seq_lengths, impl="reference")
    ys_plain = (model.apply(params, xs, **plain) if isinstance(model, jaxrnn.Stack)
                else jaxrnn.rnn(model, params, xs, **plain))[0]  # fmt: skip
    assert_close(run(zeros)[0], ys_plain)  # at zero the hook changes nothing
    return jax.value_and_grad(J)(zeros)


@pytest.mark.parametrize(
    "model,batch",
    [
        (CELLS["lstm"], 3),
        (CELLS["gru_after"], 0),
        (jaxrnn.Stack(jaxrnn.LSTM(4), num_layers=2, bidirectional=True, connection="residual"), 2),
    ],
    ids=["lstm", "gru-unbatched", "stack-bidir"],
)
def test_grads_equal_the_runner_hook(model, batch):
    """The analysis' gradients are those of jaxrnn.rnn / Stack.apply with a zero carry_perturbation."""
    params = model.init(jax.random.key(6), I)
    shape = (batch, T, I) if batch else (T, I)
    xs = normal(jax.random.key(7), shape)
    lengths = jnp.array([T, 4, 1][:batch]) if batch else None
    loss, grads = A.grads_through_time(model, params, xs, wavy, loss_at="sum", seq_lengths=lengths)
    want_loss, want = hook_grads(model, params, xs, wavy, lengths)
    assert_close(loss, want_loss)
    for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        assert got.shape == ref.shape
        assert_close(got, ref)


def test_impl_is_deprecated_and_ignored():
    cell = CELLS["elman"]
    params, xs = setup(cell)
    loss, grads = A.grads_through_time(cell, params, xs, wavy)
    norms = A.grad_norms_through_time(cell, params, xs, wavy)
    for impl in ("reference", "xla", "auto"):
        with pytest.warns(DeprecationWarning, match="impl.*ignored.*reference recurrence"):
            loss2, grads2 = A.grads_through_time(cell, params, xs, wavy, impl=impl)
        assert_close(loss2, loss)
        assert_close(grads2.h, grads.h)
        with pytest.warns(DeprecationWarning, match="grad_norms_through_time.*ignored"):
            assert_close(A.grad_norms_through_time(cell, params, xs, wavy, impl=impl).h, norms.h)
    with pytest.raises(ValueError, match="impl"):  # still validated
        A.grads_through_time(cell, params, xs, impl="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no warning without impl
        A.grads_through_time(cell, params, xs)
        A.grad_norms_through_time(cell, params, xs)


@pytest.mark.parametrize("loss_at", ["last", "sum"])
def test_nan_in_padding_does_not_reach_the_norms(loss_at):
    """Padded positions are zeroed by the runner before any computation: NaN there changes nothing."""
    cell = CELLS["lstm"]
    params, xs = setup(cell, batch=3)
    lengths = jnp.array([T, 4, 1])
    pad = jnp.arange(T)[None, :, None] >= lengths[:, None, None]
    clean = A.grad_norms_through_time(cell, params, jnp.where(pad, 0.0, xs), wavy, loss_at=loss_at, seq_lengths=lengths)
    dirty = A.grad_norms_through_time(cell, params, jnp.where(pad, jnp.nan, xs), wavy, loss_at=loss_at, seq_lengths=lengths)
    for got, want in ((dirty.h, clean.h), (dirty.c, clean.c)):
        assert np.all(np.isfinite(np.asarray(got)))
        assert_close(got, want)
    assert np.isfinite(float(dirty.loss))


# --------------------------------------------------------------------------
# Ratios and horizon
# --------------------------------------------------------------------------
def test_ratios_and_horizon_on_geometric_profiles():
    Tn = 60
    lams = [0.5, 0.9, 0.95, 1.0, 1.1]
    norms = jnp.stack([lam ** jnp.arange(Tn - 1, -1, -1.0) for lam in lams])  # ‖∂J/∂h_t‖ = λ^(T-1-t)
    ratios = A.gradient_ratios(norms)
    for k, lam in enumerate(lams):
        assert_close(ratios[k], lam ** jnp.arange(Tn, dtype=jnp.float32))
    horizon = A.memory_horizon(norms, threshold=0.05)
    expect = [next((ell for ell in range(Tn) if lam**ell < 0.05), Tn) for lam in lams]
    np.testing.assert_array_equal(np.asarray(horizon), expect)
    assert expect[-1] == Tn and expect[-2] == Tn  # preserved and exploding: never below


def test_horizon_first_crossing_and_lengths():
    norms = jnp.array([[0.001, 0.5, 0.001, 0.2, 1.0], [9.0, 0.001, 0.5, 2.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(A.memory_horizon(norms, 0.1)), [2, 3])  # not the last crossing
    lengths = jnp.array([5, 4])  # example 1: last valid step is position 3
    r = A.gradient_ratios(norms, lengths)
    assert_close(r[1, :4], jnp.array([1.0, 0.25, 0.0005, 4.5]))
    assert np.isnan(np.asarray(r[1, 4]))
    np.testing.assert_array_equal(np.asarray(A.memory_horizon(norms, 0.1, lengths)), [2, 2])
    np.testing.assert_array_equal(np.asarray(A.memory_horizon(norms, 1e-4, lengths)), [5, 4])


# --------------------------------------------------------------------------
# Jacobians
# --------------------------------------------------------------------------
def flat(carry):
    return jnp.concatenate(list(carry), axis=-1)


def brute_jacobian(cell, params, xs, start, stop, wrt):
    """jax.jacrev of the unrolled map state_start -> state_stop (start = -1: the initial carry)."""
    carry0 = cell.zero_carry(())
    carries, _ = unroll(cell, params, xs, carry0)
    H = cell.hidden_size

    def F(s):
        carry = cell.carry_type(*jnp.split(s, len(carry0), axis=-1))
        for t in range(start + 1, stop + 1):
            carry, _ = cell.step(params, carry, xs[t])
        return flat(carry)

    M = jax.jacrev(F)(flat(carries[start] if start >= 0 else carry0))
    return M[:H, :H] if wrt == "h" else M


@pytest.mark.parametrize("name,wrt", [(name, "carry") for name in CELLS] + [("lstm", "h")])
def test_jacobian_product_matches_bruteforce(name, wrt):
    cell = CELLS[name]
    params, xs = setup(cell, batch=2, seq_len=9)
    jp = A.jacobian_product(cell, params, xs, 1, 8, wrt=wrt)  # batched: one product per example
    for b in range(2):
        M = brute_jacobian(cell, params, xs[b], 1, 8, wrt)
        assert_close(jp.matrix[b], M)
        sv = np.linalg.svd(np.asarray(M, np.float64), compute_uv=False)
        assert_close(jp.singular_values[b], sv)
        assert_close(jp.norm[b], sv[0])


def test_jacobian_product_identity_and_unbatched():
    cell = CELLS["lstm"]
    params, xs = setup(cell, batch=0, seq_len=9)
    jp = A.jacobian_product(cell, params, xs, 3, 3)
    assert_close(jp.matrix, jnp.eye(10))
    assert_close(jp.norm, 1.0)


def test_jacobian_product_finite_differences(float64):
    cell = CELLS["lstm"]
    params, xs = setup(cell, batch=0, seq_len=8)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    xs = xs.astype(jnp.float64)
    carry0 = cell.zero_carry((), dtype=jnp.float64)
    jp = A.jacobian_product(cell, params, xs, 2, 7, initial_carry=carry0)
    carries, _ = unroll(cell, params, xs, carry0)

    def F(s):
        carry = jaxrnn.LSTMCarry(s[:5], s[5:])
        for t in range(3, 8):
            carry, _ = cell.step(params, carry, xs[t])
        return np.asarray(flat(carry))

    s0, eps = flat(carries[2]), 1e-6
    fd = np.stack([(F(s0 + eps * e) - F(s0 - eps * e)) / (2 * eps) for e in np.eye(10)], axis=1)
    np.testing.assert_allclose(np.asarray(jp.matrix), fd, rtol=1e-6, atol=1e-8)


def test_jacobian_product_transports_the_last_step_gradient():
    """With J at the last step only, ∂J/∂h_t = (∂h_{T-1}/∂h_t)^T ∂J/∂h_{T-1}."""
    for name in ("elman", "gru_before"):
        cell = CELLS[name]
        params, xs = setup(cell, batch=0, seq_len=10)
        _, grads = A.grads_through_time(cell, params, xs, wavy)
        for t in (0, 4, 9):
            M = A.jacobian_product(cell, params, xs, t, 9).matrix
            assert_close(grads.h[t], M.T @ grads.h[9])


@pytest.mark.parametrize("name", list(CELLS))
def test_step_jacobian_spectra(name):
    cell = CELLS[name]
    params, xs = setup(cell, batch=0)
    wrts = ("carry", "h") if name == "lstm" else ("carry",)
    for wrt in wrts:
        spectra = A.step_jacobian_spectra(cell, params, xs, wrt=wrt)
        for t in range(T):  # t = 0: with respect to the initial carry
            M = brute_jacobian(cell, params, xs, t - 1, t, wrt)
            assert_close(spectra[t], np.linalg.svd(np.asarray(M), compute_uv=False))


def test_elman_step_jacobian_is_diag_tanh_prime_times_w():
    """The lectures' formula ∂h_t/∂h_{t-1} = diag(1 - h_t²) W_hh^T (row-vector h @ W_hh)."""
    cell = CELLS["elman"]
    params, xs = setup(cell, batch=0)
    carries, _ = unroll(cell, params, xs, cell.zero_carry(()))
    spectra = A.step_jacobian_spectra(cell, params, xs)
    for t in range(1, T):
        J = (1 - carries[t].h ** 2)[:, None] * params.w_hh.T
        assert_close(spectra[t], np.linalg.svd(np.asarray(J), compute_uv=False))


@pytest.mark.parametrize("name,wrt", [("lstm", "carry"), ("lstm", "h"), ("gru_after", "carry")])
def test_jacobian_norms_to_last(name, wrt):
    """Equal to the spectral norm of ∂s_{T-1}/∂s_t from jacrev of the unrolled map."""
    cell = CELLS[name]
    params, xs = setup(cell, batch=2, seq_len=8)
    norms = A.jacobian_norms_to_last(cell, params, xs, wrt=wrt)
    for b, t in [(0, 0), (1, 0), (1, 4), (0, 6), (1, 7)]:
        M = brute_jacobian(cell, params, xs[b], t, 7, wrt)
        assert_close(norms[b, t], np.linalg.norm(np.asarray(M, np.float64), 2))


def test_spectral_radius():
    H = 6
    rng = np.random.default_rng(0)
    P = rng.standard_normal((H, H))
    eig = np.array([0.3, -0.7, 0.5, 0.9, -0.2, 0.1])
    w = P @ np.diag(eig) @ np.linalg.inv(P)
    cell = jaxrnn.Elman(H)
    params = cell.init(jax.random.key(0), 2)._replace(w_hh=jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(A.spectral_radius(cell, params), [0.9], rtol=1e-5)
    for lam in (0.95, 1.1):
        cell = jaxrnn.Elman(16, recurrent_scale=lam)
        np.testing.assert_allclose(A.spectral_radius(cell, cell.init(jax.random.key(1), 2)), [lam], rtol=1e-5)
    lstm = jaxrnn.LSTM(H, recurrent_init="identity")
    np.testing.assert_allclose(A.spectral_radius(lstm, lstm.init(jax.random.key(0), 2)), np.ones(4), rtol=1e-6)


# --------------------------------------------------------------------------
# tanh saturation
# --------------------------------------------------------------------------
def test_saturation_lecture_table():
    """Pre-activations with tanh = 0.5, 0.95, 0.995, 0: tanh' = 0.75, 0.0975, 0.00998, 1."""
    cell = jaxrnn.Elman(4)
    z = np.arctanh(np.array([0.5, -0.95, 0.995, 0.0]))
    params = jaxrnn.ElmanParams(jnp.zeros((1, 4)), jnp.zeros((4, 4)), jnp.asarray(z, jnp.float32))
    sat = A.tanh_saturation(cell, params, jnp.zeros((3, 1)))
    assert sat.thresholds == (0.19, 0.02)
    assert_close(sat.per_step["h"], jnp.tile(jnp.array([[0.5, 0.25]]), (3, 1)))
    assert_close(sat.overall["h"], jnp.array([0.5, 0.25]))


def sites_by_loop(cell, params, xs):
    """tanh outputs per step by a Python loop, checked to recompose the cell's step."""
    H, sig = cell.hidden_size, jax.nn.sigmoid
    carry, out = cell.zero_carry(xs.shape[:1]), []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        new, _ = cell.step(params, carry, x)
        xp = x @ params.w_ih + params.b[None]
        if isinstance(cell, jaxrnn.Elman):
            sites = {"h": new.h}
        elif isinstance(cell, jaxrnn.LSTM):
            i, f, g, o = jnp.split(xp + carry.h @ params.w_hh, 4, axis=-1)
            assert_close(sig(f) * carry.c + sig(i) * jnp.tanh(g), new.c)
            assert_close(sig(o) * jnp.tanh(new.c), new.h)
            sites = {"g": jnp.tanh(g), "c": jnp.tanh(new.c)}
        else:
            xr, xu, xn = jnp.split(xp, 3, axis=-1)
            w_r, w_u, w_n = jnp.split(params.w_hh, 3, axis=-1)
            r, u = sig(xr + carry.h @ w_r), sig(xu + carry.h @ w_u)
            if cell.reset == "after":
                n = jnp.tanh(xn + r * (carry.h @ w_n + params.b_hn[None]))
            else:
                n = jnp.tanh(xn + (r * carry.h) @ w_n)
            assert_close((1 - u) * carry.h + u * n, new.h)
            sites = {"n": n}
        out.append(sites)
        carry = new
    return {k: jnp.stack([s[k] for s in out]) for k in out[0]}


@pytest.mark.parametrize("name", list(CELLS))
def test_saturation_matches_loop(name):
    cell = CELLS[name]
    params, xs = setup(cell, scale=3.0)  # large inputs: many saturated units
    thresholds = (0.19, 0.02, 0.5)
    sat = A.tanh_saturation(cell, params, xs, thresholds=thresholds)
    sites = sites_by_loop(cell, params, xs)
    assert set(sat.per_step) == set(sites)
    for k, a in sites.items():
        slope = 1 - np.asarray(a, np.float64) ** 2  # (T, B, H)
        expect = np.stack([(slope < thr).mean(axis=(1, 2)) for thr in thresholds], axis=-1)
        assert_close(sat.per_step[k], expect)
        assert_close(sat.overall[k], expect.mean(axis=0))
    assert float(max(v[0] for v in sat.overall.values())) > 0.05


# --------------------------------------------------------------------------
# Theory checks
# --------------------------------------------------------------------------
def test_linear_rnn_lambda_to_the_ell():
    check = A.linear_rnn_check(0.95, 101)
    assert float(check.max_rel_error) < 1e-5
    np.testing.assert_allclose(float(check.measured[50]), 0.95**50, rtol=1e-5)  # the lecture's 7.7%
    np.testing.assert_allclose(float(check.measured[100]), 0.95**100, rtol=1e-5)  # and 0.6%
    assert round(float(check.measured[50]), 3) == 0.077 and round(float(check.measured[100]), 3) == 0.006
    np.testing.assert_allclose(check.spectral_radius, 0.95, rtol=1e-6)
    flat_ = A.linear_rnn_check(1.0, 50)
    assert_close(flat_.measured, jnp.ones(50))


def test_linear_rnn_float64_explodes(float64):
    for lam in (0.95, 1.1):
        check = A.linear_rnn_check(lam, 101, hidden_size=8, dtype=jnp.float64)
        assert check.measured.dtype == jnp.float64
        assert float(check.max_rel_error) < 1e-10
    assert float(check.measured[100]) > 1e4  # 1.1^100 ≈ 13780


def test_lstm_cell_path_is_the_forget_product():
    cell = jaxrnn.LSTM(5, forget_bias=2.0)
    params, xs = setup(cell, batch=0, seq_len=12)
    path = A.lstm_cell_path(cell, params, xs, 2, 11)
    assert float(path.max_abs_error) < 1e-5
    assert_close(path.jacobian, jnp.diag(path.forget_product))
    # forget gates by a Python loop
    carry, prod = cell.zero_carry(()), jnp.ones(5)
    for t in range(12):
        f = jax.nn.sigmoid(jnp.split(xs[t] @ params.w_ih + params.b + carry.h @ params.w_hh, 4)[1])
        if t > 2:
            prod = prod * f
        carry, _ = cell.step(params, carry, xs[t])
    assert_close(path.forget_product, prod)
    # the total derivative (through h as well) by jacrev of the unrolled map differs from the diagonal path
    full = brute_jacobian(cell, params, xs, 2, 11, "carry")[5:, 5:]
    assert_close(path.full_jacobian, full)
    assert float(jnp.max(jnp.abs(full - path.jacobian))) > 1e-4


# --------------------------------------------------------------------------
# Exploding gradients
# --------------------------------------------------------------------------
def reference_param_grads(cell, params, xs, loss_fn):
    def J(p):
        return sum(loss_fn(unroll(cell, p, xs[b], cell.zero_carry(()))[1][-1]) for b in range(xs.shape[0]))

    return jax.grad(J)(params)


def test_clipping_report():
    cell = jaxrnn.Elman(5, recurrent_scale=1.3)
    params, xs = setup(cell)
    grads = reference_param_grads(cell, params, xs, wavy)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree_util.tree_leaves(grads)))
    for max_norm in (0.5 * norm, 2.0 * norm):
        report = A.clipping_report(cell, params, xs, float(max_norm), wavy)
        assert_close(report.norm_before, norm)
        assert_close(report.norm_after, min(norm, max_norm))
        scale = min(1.0, max_norm / norm)
        assert_close(report.grads, jax.tree_util.tree_map(lambda g: g * scale, grads))


def test_clipping_report_stack():
    stack = jaxrnn.Stack(jaxrnn.GRU(4), num_layers=2, connection="residual")
    params = stack.init(jax.random.key(0), I)
    xs = normal(jax.random.key(1), (B, T, I))
    grads = jax.grad(lambda p: wavy(stack.apply(p, xs, impl="reference")[0][:, -1]))(params)
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree_util.tree_leaves(grads)))
    report = A.clipping_report(stack, params, xs, 0.1, wavy)
    assert_close(report.norm_before, norm)
    assert_close(report.norm_after, 0.1)


def test_loss_along_direction():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
    direction = {"a": jnp.array([0.5, -1.0]), "b": jnp.array(2.0)}
    loss = lambda p: jnp.sum(p["a"] ** 3) * jnp.sin(p["b"])  # noqa: E731
    alphas = jnp.linspace(-1.0, 1.0, 7)
    losses, slopes = A.loss_along_direction(loss, params, direction, alphas)
    for k, a in enumerate(np.asarray(alphas)):
        point = jax.tree_util.tree_map(lambda p, d, a=a: p + a * d, params, direction)
        assert_close(losses[k], loss(point))
        grad = jax.grad(loss)(point)
        assert_close(slopes[k], sum(jnp.vdot(grad[k2], direction[k2]) for k2 in params))


def test_scalar_rnn_cliff():
    ws = jnp.linspace(0.0, 2.5, 501)
    curve = A.scalar_rnn_cliff(ws)
    for k in (0, 137, 400):  # the loss is the scalar recurrence
        h = 0.5
        for _ in range(50):
            h = np.tanh(float(ws[k]) * h - 0.1)
        np.testing.assert_allclose(float(curve.loss[k]), (h - 0.5) ** 2, rtol=1e-4, atol=1e-6)
    slope = np.abs(np.asarray(curve.slope))
    assert slope.max() > 1000 * np.median(slope)  # the wall
    wall = float(ws[slope.argmax()])
    assert 1.0 < wall < 1.6
    assert float(curve.loss[slope.argmax() + 10]) < 0.1 < float(curve.loss[slope.argmax() - 10])
    linear = A.scalar_rnn_cliff(jnp.array([0.5, 1.5]), activation="linear", bias=0.0, h0=1.0)
    assert_close(linear.loss, (jnp.array([0.5, 1.5]) ** 50 - 0.5) ** 2, scale=10.0)


def test_scalar_rnn_cliff_finite_differences(float64):
    ws = jnp.array([0.4, 0.9, 1.8], jnp.float64)
    eps = 1e-6
    curve = A.scalar_rnn_cliff(ws)
    plus = A.scalar_rnn_cliff(ws + eps).loss
    minus = A.scalar_rnn_cliff(ws - eps).loss
    assert curve.loss.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(curve.slope), np.asarray((plus - minus) / (2 * eps)), rtol=1e-6, atol=1e-9)


def test_profile_during_training():
    cell = jaxrnn.Elman(6)
    params = cell.init(jax.random.key(5), 1)
    run = A.profile_during_training(cell, seq_len=10, num_steps=7, every=3, batch_size=8, params=params)
    np.testing.assert_array_equal(np.asarray(run.steps), [0, 3, 6, 7])
    assert run.profiles.shape == (4, 10) and run.losses.shape == (7,)
    assert_close(run.profiles[0], A.jacobian_norms_to_last(cell, params, run.probe, wrt="h"))
    assert_close(run.profiles[-1], A.jacobian_norms_to_last(cell, run.params[0], run.probe, wrt="h"))
    assert not np.allclose(np.asarray(run.profiles[0]), np.asarray(run.profiles[-1]))  # training moved it
    # the first loss is the task's loss at the initial parameters
    xs = normal(jax.random.fold_in(jax.random.split(jax.random.key(0), 4)[3], 0), (8, 10, 1))
    w_out = normal(jax.random.split(jax.random.key(0), 4)[1], (6, 1)) / np.sqrt(6)
    h = unroll(cell, params, jnp.swapaxes(xs, 0, 1), cell.zero_carry((8,)))[0][-1].h
    assert_close(run.losses[0], jnp.mean(jnp.square((h @ w_out)[:, 0] - xs[:, 0, 0])))


# --------------------------------------------------------------------------
# Bad input: clear errors before XLA
# --------------------------------------------------------------------------
def test_errors():
    cell, gru = CELLS["lstm"], CELLS["gru_before"]
    params, xs = setup(cell)
    gru_params, elman_params = gru.init(jax.random.key(0), I), CELLS["elman"].init(jax.random.key(0), I)
    relu, wrong_carry = jaxrnn.Elman(5, activation="relu"), cell.zero_carry(3)
    cases = [
        (TypeError, "cell_or_stack", lambda: A.grad_norms_through_time("lstm", params, xs)),
        (ValueError, "loss_at", lambda: A.grad_norms_through_time(cell, params, xs, loss_at="first")),
        (ValueError, "reduce", lambda: A.grad_norms_through_time(cell, params, xs, reduce="max")),
        (TypeError, "loss_fn", lambda: A.grad_norms_through_time(cell, params, xs, loss_fn=3)),
        (ValueError, "loss_fn", lambda: A.grad_norms_through_time(cell, params, xs, loss_fn=lambda y: y)),
        (ValueError, "impl", lambda: A.grad_norms_through_time(cell, params, xs, impl="cuda")),
        (ValueError, "xs", lambda: A.grad_norms_through_time(cell, params, xs[..., :2])),
        (TypeError, "xs", lambda: A.grad_norms_through_time(cell, params, jnp.ones((2, 3, 3), jnp.int32))),
        (ValueError, "seq_lengths", lambda: A.grad_norms_through_time(cell, params, xs, seq_lengths=jnp.ones(3, int))),
        (ValueError, "seq_lengths", lambda: A.grad_norms_through_time(cell, params, xs, seq_lengths=jnp.array([1, 9]))),
        (ValueError, "initial_carry.h", lambda: A.grads_through_time(cell, params, xs, initial_carry=wrong_carry)),
        (ValueError, "params.w_ih", lambda: A.grads_through_time(cell, gru_params, xs)),
        (ValueError, "stop", lambda: A.jacobian_product(cell, params, xs, 0, T)),
        (ValueError, "start", lambda: A.jacobian_product(cell, params, xs, 4, 2)),
        (TypeError, "start", lambda: A.jacobian_product(cell, params, xs, 1.0, 2)),
        (ValueError, "wrt", lambda: A.step_jacobian_spectra(cell, params, xs, wrt="c")),
        (TypeError, "cell", lambda: A.jacobian_norms_to_last(jaxrnn.Stack(cell), params, xs)),
        (ValueError, "thresholds", lambda: A.tanh_saturation(cell, params, xs, thresholds=(0.5, 2.0))),
        (ValueError, "tanh", lambda: A.tanh_saturation(relu, elman_params, xs)),
        (TypeError, "LSTM", lambda: A.lstm_cell_path(gru, gru_params, xs, 0, 1)),
        (ValueError, "max_norm", lambda: A.clipping_report(cell, params, xs, 0.0)),
        (ValueError, "direction", lambda: A.loss_along_direction(jnp.sum, {"a": 1.0}, {"b": 1.0}, jnp.ones(3))),
        (ValueError, "alphas", lambda: A.loss_along_direction(jnp.sum, {"a": 1.0}, {"a": 1.0}, jnp.ones((3, 1)))),
        (ValueError, "threshold", lambda: A.memory_horizon(jnp.ones(5), threshold=-1.0)),
        (ValueError, "seq_lengths", lambda: A.gradient_ratios(jnp.ones((2, 5)), jnp.array([1, 2, 3]))),
        (ValueError, "lam", lambda: A.linear_rnn_check(-0.5, 10)),
        (ValueError, "activation", lambda: A.scalar_rnn_cliff(jnp.ones(3), activation="relu")),
        (ValueError, "every", lambda: A.profile_during_training(cell, every=0)),
    ]
    for exc, word, fn in cases:
        with pytest.raises(exc, match=word):
            fn()
