"""kernels/gates.py: the hand-written step VJP against ``jax.vjp`` of ``cell.step_projected``."""

import functools

import jax
import jax.numpy as jnp
import pytest

import jaxrnn
from jaxrnn.kernels import gates
from _util import CELL_VARIANTS, assert_close, make_cell, normal

B, H, I = 3, 5, 4

CELLS = {name: functools.partial(make_cell, name, H) for name in CELL_VARIANTS}
DTYPES = [jnp.float32, jnp.bfloat16]


def _setup(name, cd, seed=0, lead=(B,)):
    cell = CELLS[name](compute_dtype=cd)
    keys = jax.random.split(jax.random.key(seed), 8)
    params = cell.init(keys[0], I)
    # Non-zero biases everywhere (b_hn included) so every term is exercised.
    leaves, tree = jax.tree.flatten(params)
    leaves = [p + 0.3 * normal(k, p.shape) for p, k in zip(leaves, keys[1:5])]
    params = jax.tree.unflatten(tree, leaves)
    carry = cell.carry_type(*(normal(k, (*lead, H)) for k in keys[5 : 5 + len(cell.carry_type._fields)]))
    xp = normal(keys[7], (*lead, cell.gate_size))
    return cell, params, carry, xp


def _cotangents(cell, seed, lead=(B,)):
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    fields = cell.carry_type._fields
    dcarry = cell.carry_type(*(normal(k, (*lead, H)) for k in jax.random.split(k1, len(fields))))
    dh = normal(k2, (*lead, H))
    return dcarry, dh


def _expected_grads(cell, params, carry, xp, dcarry, dh):
    (_, _), vjp = jax.vjp(cell.step_projected, params, carry, xp)
    return vjp((dcarry, dh))


@pytest.mark.parametrize("cd", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_forward_matches_step_projected(name, cd):
    cell, params, carry, xp = _setup(name, cd)
    new, h, res = gates.forward(cell, params, carry, xp)
    new_ref, h_ref = cell.step_projected(params, carry, xp)
    assert type(new) is type(new_ref)
    assert_close((new, h), (new_ref, h_ref), dtype=jnp.float32)
    assert all(r.dtype == jnp.float32 and r.shape[0] == B for r in res)


@pytest.mark.parametrize("cd", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_backward_matches_vjp(name, cd):
    cell, params, carry, xp = _setup(name, cd, seed=1)
    dcarry, dh = _cotangents(cell, 1)
    dparams_ref, dcarry_ref, dxp_ref = _expected_grads(cell, params, carry, xp, dcarry, dh)

    _, _, res = gates.forward(cell, params, carry, xp)
    total = dcarry._replace(h=dcarry.h + dh)
    dxp, dcarry_prev, dmm = gates.backward(cell, params, carry, res, total)
    lhs, dmm_rebuilt = gates.matmul_operands(cell, carry, res, dxp)
    dw_hh, db_hn = gates.weight_grads(cell, lhs, dmm)

    assert_close(dxp, dxp_ref, dtype=cd)
    assert_close(dcarry_prev, dcarry_ref, dtype=cd)
    assert_close(dw_hh, dparams_ref.w_hh, dtype=cd)
    if getattr(cell, "reset", None) == "after":
        assert_close(db_hn, dparams_ref.b_hn, dtype=cd)
    else:
        assert db_hn is None
    # The cotangents the backend rebuilds after the loop equal those of the step.
    assert_close(dmm_rebuilt, dmm, dtype=jnp.float32)


@pytest.mark.parametrize("name", list(CELLS))
def test_weight_grads_sum_over_stacked_steps(name):
    """Stacked ``(T, B, ·)`` operands give ``Σ_t`` of the per-step weight gradients."""
    T = 3
    cell, params, carry, xp = _setup(name, jnp.float32, seed=2, lead=(T, B))
    dcarry, dh = _cotangents(cell, 2, lead=(T, B))
    expected_w, expected_b = 0.0, 0.0
    for t in range(T):
        at = lambda tree: jax.tree.map(lambda a: a[t], tree)  # noqa: B023, E731
        dparams, _, _ = _expected_grads(cell, params, at(carry), xp[t], at(dcarry), dh[t])
        expected_w = expected_w + dparams.w_hh
        if getattr(dparams, "b_hn", None) is not None:
            expected_b = expected_b + dparams.b_hn

    _, _, res = gates.forward(cell, params, carry, xp)  # elementwise: works on (T, B, ·)
    dxp = jax.vmap(lambda c, r, d, g: gates.backward(cell, params, c, r, d._replace(h=d.h + g))[0])(
        carry, res, dcarry, dh
    )
    dw_hh, db_hn = gates.weight_grads(cell, *gates.matmul_operands(cell, carry, res, dxp))
    assert_close(dw_hh, expected_w, dtype=jnp.float32)
    if db_hn is not None:
        assert_close(db_hn, expected_b, dtype=jnp.float32)


def test_rejects_non_cells():
    with pytest.raises(TypeError, match="cell"):
        gates.forward(object(), None, None, None)
    with pytest.raises(TypeError, match="cell"):
        gates.backward(object(), None, None, None, None)


@pytest.mark.parametrize("cd", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_prepared_weights_match_params(name, cd):
    """``prepare`` (cast, split, transposed blocks) changes nothing but speed."""
    cell, params, carry, xp = _setup(name, cd, seed=4)
    dcarry, _ = _cotangents(cell, 4)
    weights = gates.prepare(cell, params, jnp.float32)
    new, h, res = gates.forward(cell, params, carry, xp)
    new_w, h_w, res_w = gates.forward(cell, weights, carry, xp)
    assert_close((new_w, h_w, res_w), (new, h, res), dtype=jnp.float32)
    got = gates.backward(cell, weights, carry, res, dcarry)
    want = gates.backward(cell, params, carry, res, dcarry)
    assert_close(got, want, dtype=jnp.float32)


@pytest.mark.parametrize("cd", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_per_gate_form_matches(name, cd):
    """``forward_gates``/``backward_gates`` (no slices, for Triton) equal the sliced forms."""
    cell, params, carry, xp = _setup(name, cd)
    w = gates.split_gates(cell, params.w_hh)
    b_hn = getattr(params, "b_hn", None)
    new, h, res = gates.forward_gates(cell, w, b_hn, carry, gates.split_gates(cell, xp))
    new_ref, h_ref, res_ref = gates.forward(cell, params, carry, xp)
    assert_close((new, h, gates.flat_residuals(cell, res)), (new_ref, h_ref, res_ref), dtype=jnp.float32)
    dcarry, dh = _cotangents(cell, 1)
    total = dcarry._replace(h=dcarry.h + dh)
    dxp, dprev = gates.backward_gates(cell, w, carry, res, total)
    dxp_ref, dprev_ref, _ = gates.backward(cell, params, carry, res_ref, total)
    assert_close((jnp.concatenate(dxp, axis=-1), dprev), (dxp_ref, dprev_ref), dtype=jnp.float32)
    # and against autodiff of the cell itself
    _, dcarry_ad, dxp_ad = _expected_grads(cell, params, carry, xp, dcarry, dh)
    assert_close((jnp.concatenate(dxp, axis=-1), dprev), (dxp_ad, dcarry_ad), dtype=cd)


@pytest.mark.parametrize("name", [n for n in CELLS if n != "gru_before"])
def test_column_tiles_compose_the_step(name):
    """The step on column tiles ``J`` (what one program of the split Pallas
    kernels computes) gives the ``J`` columns of the whole step, forward and
    backward; the matmul's transpose on row tiles of ``w_hh`` gives the ``J``
    columns of the previous ``dh``."""
    cell, params, carry, xp = _setup(name, jnp.float32, seed=6)
    w, xps = gates.split_gates(cell, params.w_hh), gates.split_gates(cell, xp)
    b_hn = getattr(params, "b_hn", None)
    new, h, res = gates.forward_gates(cell, w, b_hn, carry, xps)
    dcarry, dh = _cotangents(cell, 6)
    total = dcarry._replace(h=dcarry.h + dh)
    dxp, dprev = gates.backward_gates(cell, w, carry, res, total)
    dxp_l, dmm, dprev_l = gates.backward_gates_local(cell, carry, res, total)
    for J in (slice(0, 2), slice(2, 5)):
        cols = lambda tree: jax.tree.map(lambda a: a[..., J], tree)  # noqa: B023, E731
        tile = cols(carry)._replace(h=carry.h)
        b_tile = None if b_hn is None else b_hn[J]
        got = gates.forward_gates(cell, cols(w), b_tile, tile, cols(xps), h_tile=carry.h[..., J])
        assert_close(got, (cols(new), h[..., J], cols(res)), dtype=jnp.float32)
        got_l = gates.backward_gates_local(cell, cols(carry), cols(res), cols(total))
        assert_close(got_l, (cols(dxp_l), cols(dmm), cols(dprev_l)), dtype=jnp.float32)
        rows = tuple(wk[J] for wk in w)
        dh_prev = got_l[2].h + gates.recurrent_vjp(cell, rows, dmm)
        assert_close((got_l[0], dh_prev), (cols(dxp), dprev.h[..., J]), dtype=jnp.float32)


def test_gru_before_cannot_be_tiled():
    cell, params, carry, xp = _setup("gru_before", jnp.float32)
    w, xps = gates.split_gates(cell, params.w_hh), gates.split_gates(cell, xp)
    with pytest.raises(ValueError, match=r"h_tile: a GRU with reset='before' cannot be computed in column tiles"):
        gates.forward_gates(cell, w, None, carry, xps, h_tile=carry.h)
    _, _, res = gates.forward_gates(cell, w, None, carry, xps)
    with pytest.raises(ValueError, match=r"backward_gates_local needs a GRU with reset='after'"):
        gates.backward_gates_local(cell, carry, res, carry)


# ---------------------------------------------------------------- one definition
def _definition(cell, params, carry, xp):
    """The cell's equations, ``gate_step``, with one matmul per gate: the reference every variant must equal."""
    mm = cell.recurrent_matmul(gates.split_gates(cell, params.w_hh), per_gate=True)
    return cell.gate_step(carry, gates.split_gates(cell, xp), mm, getattr(params, "b_hn", None))


@pytest.mark.parametrize("cd", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_every_forward_variant_is_gate_step(name, cd):
    """``forward`` (parameters or prepared weights; LSTM: the single-``tanh`` activations),
    ``forward_gates`` and ``step_projected`` all equal the cell's ``gate_step``."""
    cell, params, carry, xp = _setup(name, cd, seed=7)
    new, h, acts = _definition(cell, params, carry, xp)
    flat = gates.flat_residuals(cell, acts)
    for p in (params, gates.prepare(cell, params, jnp.float32)):
        assert_close(gates.forward(cell, p, carry, xp), (new, h, flat), dtype=jnp.float32)
    w = gates.split_gates(cell, params.w_hh)
    got = gates.forward_gates(cell, w, getattr(params, "b_hn", None), carry, gates.split_gates(cell, xp))
    assert_close(got, (new, h, acts), dtype=jnp.float32)
    assert_close(cell.step_projected(params, carry, xp), (new, h), dtype=jnp.float32)


@pytest.mark.parametrize("name", ["lstm", "gru_before", "elman"])
def test_fused_activations_are_the_gate_activations(name):
    """The single-``tanh`` form equals each gate's own activation, over a wide range."""
    cell = CELLS[name](compute_dtype=jnp.float32)
    z = jnp.linspace(-30.0, 30.0, 7 * cell.gate_size).reshape(7, cell.gate_size)
    per_gate = [act.value(zk) for act, zk in zip(cell.gate_activations, gates.split_gates(cell, z))]
    assert_close(gates.fused_activations(cell, z), jnp.concatenate(per_gate, axis=-1), dtype=jnp.float32)


def test_fused_activations_need_tanh_or_sigmoid_gates():
    with pytest.raises(KeyError):
        gates.fused_activations(CELLS["elman_relu"](compute_dtype=jnp.float32), jnp.ones((2, H)))

