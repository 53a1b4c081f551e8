"""The ``impl="ffi"`` backend (kernels/ffi.py, kernels/rnn_cpu.cc) against ``impl="reference"``.

Every cell the backend computes (LSTM, GRU with either reset, Elman with
each activation); shapes chosen to reach every path of the C++ code: one team member and
several, splitting the hidden units or the batch's rows (``split``), hidden sizes below, at and off multiples of the 16-unit
blocks, batches off multiples of the 8-row register block, padded rows
(lengths 0 and T) in both directions, buffers large enough for the huge-page
advice. Outputs, final carries and the VJP w.r.t. every parameter, ``xs`` and
the initial carry, with random cotangents on both outputs.

Set ``JAXRNN_REQUIRE_FFI=1`` (CI does) to fail instead of skipping when the
library cannot be built here.
"""

import ctypes
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from _util import assert_close, compile_run, via_rnn, vjp_variants
from _ffi_cases import CASES, SHAPES, final_loss, outputs_and_vjp, problem, requires_ffi
from jaxrnn import kernels
from jaxrnn.kernels import ffi

pytestmark = requires_ffi


def _case_id(v):
    if isinstance(v, tuple):
        return "B{}-T{}-H{}-I{}".format(*v)
    return ",".join(f"{k}={o}" for k, o in v.items()) or "auto"


@pytest.mark.parametrize("shape, options", CASES, ids=_case_id)
@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_matches_reference(kind, shape, options):
    cell, params, xs, carry0, lens = problem(*shape, cell=kind)
    impl = kernels.FFI(**options)
    teams_before = ffi.team_stats()["team_calls"]
    # Padding and direction: every combination on the two-member shape; two complementary ones on the others.
    variants = {SHAPES[0]: [(None, False), (lens, True)], SHAPES[1]: [(lens, False), (None, True)]}.get(
        shape, [(None, False), (lens, False), (None, True), (lens, True)]
    )
    # Every variant in one program each, compiled without LLVM's optimisations (the C++ is compiled as it is).
    args = (params, xs, carry0, jax.random.key(7))
    got = compile_run(vjp_variants(via_rnn(cell, impl), variants), *args)
    want = compile_run(vjp_variants(via_rnn(cell, "reference"), variants), *args)
    for lengths, reverse in variants:
        msg = f"{shape} {options} lengths={lengths is not None} reverse={reverse}"
        (ys, final, grads, plain), (ys_r, final_r, grads_r, _) = got[lengths is not None, reverse], want[lengths is not None, reverse]
        assert_close(ys, ys_r, err_msg=msg + " ys")
        assert_close(plain, (ys_r, final_r), err_msg=msg + " ys, final carry (no grad)")
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
    if shape == SHAPES[2] and (os.cpu_count() or 1) >= 2:
        # Every call formed a team (4 variants x the forward with saves, the backward, the plain forward).
        assert ffi.team_stats()["team_calls"] - teams_before >= 12


@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("kind", ["lstm", "gru", "elman"])
def test_weight_gradients_cross_row_blocks_and_partial_panels(kind, threads):
    """The weight-gradient call (``jaxrnn_weight_grads``) on the shapes that reach its edges.

    T B = 299 rows: three blocks of 128 rows, 13 rows a step, so that blocks start inside a step and, in
    reverse, the rows whose previous carry is ``h0`` (the last 13) share a block with rows of ``hs``;
    hidden 20 (LSTM 80 gate columns, GRU 60, Elman 20: a partial 32-column panel each) and input 1 (a
    one-row tile). One thread, and the pool's (the two-thread split starts at 1 MFLOP; this is 1.0).
    """
    cell, params, xs, carry0, lens = problem(13, 23, 20, 1, seed=2, cell=kind)
    # Forward, and padded in reverse (where the h0 rows sit in the last block; the grid covers the other pairs).
    for lengths, reverse in [(None, False), (lens, True)]:
        args = (cell, params, xs, carry0, lengths, reverse, jax.random.key(11))
        _, _, grads, _ = outputs_and_vjp(kernels.FFI(threads=threads), *args)
        _, _, grads_r, _ = outputs_and_vjp("reference", *args)
        assert_close(grads, grads_r, scale=2.0, err_msg=f"{kind} lengths={lengths is not None} reverse={reverse}")


@pytest.mark.parametrize("kind, hidden", [("lstm", 88), ("elman", 64), ("gru", 40)])
def test_weight_gradients_do_not_depend_on_the_split(kind, hidden):
    """One thread and the pool's give the weight gradients bit for bit, and the reference's within tolerance.

    Each output entry is one thread's sum over the rows in the same order, however the panels are shared:
    the LSTM (hidden 88: 11 panels of 32 gate columns, dz shared by both operands) runs one pass through
    both operands, in panel groups of 8 and 3 on one thread and halves of 5 and 6 panels on two; the Elman
    RNN (2 panels) and the GRU (its own dz for each operand) run a pass per operand on two threads.
    """
    cell, params, xs, carry0, lens = problem(13, 23, hidden, 5, seed=3, cell=kind)
    args = (cell, params, xs, carry0, lens, True, jax.random.key(2))
    _, _, one, _ = outputs_and_vjp(kernels.FFI(threads=1), *args)
    _, _, pool, _ = outputs_and_vjp(kernels.FFI(), *args)
    _, _, want, _ = outputs_and_vjp("reference", *args)
    for got, ref in zip(jax.tree_util.tree_leaves(pool), jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # scale 4 for the Elman RNN, whose weight gradients reach tens here (as in the tests below).
    assert_close(one, want, scale=4.0 if kind == "elman" else 2.0, err_msg=kind)


@pytest.mark.parametrize("kind", ["lstm", "elman"])
@pytest.mark.parametrize("batch, steps, inputs", [(19, 23, 3), (64, 40, 17)])
def test_weight_gradients_inside_the_backward_loop(kind, batch, steps, inputs):
    """The LSTM's and the Elman RNN's backward call adds a small model's weight gradients, per chunk of rows.

    Batch 19: two chunks of 9 and 10 rows, each adding 15 collected steps at a time (128 rows / 9), so that
    23 steps end with a partial group; batch 64: four chunks of 16 rows (a pool of two), 8 steps a group. The chunks are
    fixed by the shapes, not by the threads, so one thread and the pool's agree bit for bit; padded, in
    reverse (the rows of ``h0`` come last), and against the reference and the products after the loop
    (``split="units"``: a team of members by hidden units never takes this path). Input 3 is one partial
    tile of dW_ih's rows, input 17 two full ones and a partial one.
    """
    cell, params, xs, carry0, lens = problem(batch, steps, 24 if kind == "lstm" else 32, inputs, seed=6, cell=kind)
    args = (cell, params, xs, carry0, lens, True, jax.random.key(4))
    _, _, one, _ = outputs_and_vjp(kernels.FFI(threads=1), *args)
    _, _, pool, _ = outputs_and_vjp(kernels.FFI(), *args)
    _, _, after, _ = outputs_and_vjp(kernels.FFI(split="units"), *args)
    _, _, want, _ = outputs_and_vjp("reference", *args)
    for got, ref in zip(jax.tree_util.tree_leaves(pool), jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # scale 4 for the Elman RNN, whose weight gradients reach tens here (as in the tests above).
    scale = 4.0 if kind == "elman" else 2.0
    assert_close(one, want, scale=scale, err_msg="in the loop")
    assert_close(after, want, scale=scale, err_msg="after the loop")
    # Not the same sums in the same order: the two paths are distinct code.
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(after)))


@pytest.mark.parametrize("kind", ["elman-relu", "elman-linear"])
def test_other_elman_activations_match_reference(kind):
    """ReLU (derivative 0 at and below 0) and the linear RNN, with one member and two."""
    for shape in ((5, 6, 7, 3), SHAPES[2]):
        cell, params, xs, carry0, lens = problem(*shape, seed=4, cell=kind)
        for reverse in (False, True):
            args = (cell, params, xs, carry0, lens, reverse, jax.random.key(5))
            for got, want in zip(outputs_and_vjp("ffi", *args), outputs_and_vjp("reference", *args)):
                # scale 4: the weight gradients reach 25 here, and their small entries are sums of terms that
                # large (measured: 2.5e-5 off at worst, as far from a float64 run as the xla backend is).
                assert_close(got, want, scale=4.0, err_msg=f"{kind} {shape} reverse={reverse}")


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman"])
def test_large_buffers_match_xla(kind):
    """Buffers of several MiB (the huge-page advice applies), with the full two-member team and with chunks of rows.

    With initialised (not randomised) weights: 72 steps of a recurrence with
    large random weights are chaotic, and amplify any rounding difference.
    """
    cell, _, xs, carry0, lens = problem(16, 72, 256, 32, seed=1, cell=kind)
    params = cell.init(jax.random.key(3), 32)

    def loss(impl):
        def f(p, x, c):
            ys, final = jaxrnn.rnn(cell, p, x, initial_carry=c, seq_lengths=lens, impl=impl)
            return jnp.sum(jnp.sin(ys)) + final_loss(final)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    want = loss("xla")(params, xs, carry0)
    for split in ("units", "rows"):
        before = ffi.team_stats()
        got = loss(kernels.FFI(split=split))(params, xs, carry0)
        after = ffi.team_stats()
        # Calls that formed a team (none where XLA's pool has one thread: at most the forward loop, the backward
        # loop and the weight gradients), and those that ran short-handed.
        assert set(after) == {"team_calls", "short_handed_calls", "moved_threads"}
        assert 0 <= after["short_handed_calls"] - before["short_handed_calls"] <= after["team_calls"] - before["team_calls"] <= 3
        # Weight gradients: sums of 1,152 rows, in another order; the Elman's reach 40 (its worst entry is 3.5e-5
        # off, measured; against a float64 run ffi and xla are equally far).
        assert_close(got, want, scale=4.0 if kind == "elman" else 2.0, err_msg=f"split={split}")


@pytest.mark.parametrize("options", [{"split": "rows"}, {"threads": 1}], ids=["rows", "one-thread"])
def test_hoisted_projection_is_bit_identical(options):
    """The LSTM's saving forward with every step's input projected before its loop (``projection="hoisted"``)
    gives the in-loop results bit for bit, and the reference's within tolerance.

    Hidden 40 (160 gate columns: five whole 32-column panels, as hoisting needs; 3 blocks of 16 units
    with a partial last one), 17 rows (a chunk of 8 and one of 9: a 1-row tail), padded rows in both
    directions. The in-loop results are the grid's (``test_matches_reference``); the GRU, the Elman RNN
    and the embedded LSTM ignore the option.
    """
    cell, params, xs, carry0, lens = problem(17, 6, 40, 6, seed=3)
    for lengths, reverse in [(None, False), (lens, True), (lens, False)]:
        msg = f"{options} lengths={lengths is not None} reverse={reverse}"
        args = (cell, params, xs, carry0, lengths, reverse, jax.random.key(8))
        hoisted = outputs_and_vjp(kernels.FFI(projection="hoisted", **options), *args)
        in_loop = outputs_and_vjp(kernels.FFI(projection="in_loop", **options), *args)
        for got, want in zip(jax.tree.leaves(hoisted), jax.tree.leaves(in_loop)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=msg)
        ys, final, grads, _ = hoisted
        ys_r, final_r, grads_r, _ = outputs_and_vjp("reference", *args)
        assert_close((ys, final), (ys_r, final_r), err_msg=msg)
        assert_close(grads, grads_r, scale=2.0, err_msg=msg)


def test_projection_option_is_checked():
    with pytest.raises(ValueError, match=r"FFI.projection: expected one of \('auto', 'in_loop', 'hoisted'\), got 'early'"):
        kernels.FFI(projection="early")
    cell, params, xs, carry0, _ = problem(*SHAPES[0])
    with pytest.raises(ValueError, match="projection: expected one of"):
        ffi.rnn_ffi(cell.resolve(jnp.float32), params, jnp.swapaxes(xs, 0, 1), carry0, None, False, projection=None)


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


@pytest.mark.parametrize("kind", ["lstm", "gru", "gru-before", "elman", "elman-relu"])
def test_nan_propagates_as_in_the_reference(kind):
    """A NaN input at a real step makes that row's later outputs NaN, as with the reference (the gate
    math's clamps must not turn NaN into a finite value); one at a padded step changes nothing."""
    cell, params, xs, carry0, lens = problem(*SHAPES[1], seed=2, cell=kind)
    lengths = np.asarray(lens)
    real, padded = int(np.argmax(lengths >= 3)), int(np.argmax((lengths > 0) & (lengths < xs.shape[1])))
    assert lengths[real] >= 3 and 0 < lengths[padded] < xs.shape[1]
    xs = xs.at[real, 1, 0].set(jnp.nan).at[padded, -1, :].set(jnp.nan)
    for reverse in (False, True):
        got = jaxrnn.rnn(cell, params, xs, initial_carry=carry0, seq_lengths=lens, reverse=reverse, impl="ffi")
        want = jaxrnn.rnn(cell, params, xs, initial_carry=carry0, seq_lengths=lens, reverse=reverse, impl="reference")
        assert np.isnan(np.asarray(want[0])[real]).any()  # the problem does reach NaN
        assert_close(got, want, err_msg=f"{kind} reverse={reverse}")  # NaN where the reference has NaN, only there


def _library():
    """The backend's shared library (already loaded by the backend: the same handle and globals)."""
    ffi.build()
    return ctypes.CDLL(str(ffi.library_path()))


def _proc_state(tid):
    """(state, last CPU) of thread ``tid`` of this process, parsed here from /proc."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3, the state
    return fields[0], int(fields[39 - 3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the placement reads /proc (Linux)")
def test_placement_reads_a_threads_state_and_moves_it_off_a_cpu():
    """The placement's pieces (Placement in rnn_cpu.cc): the state and last CPU of a thread whose name holds
    spaces and parentheses, read as /proc says; a thread moved off a CPU has every other CPU of its
    affinity, and after the restore its affinity is as before."""
    lib = _library()
    ready, release, tid = threading.Event(), threading.Event(), []

    def sleeper():
        libc = ctypes.CDLL(None)
        libc.prctl(15, b"a (b) c) d", 0, 0, 0)  # PR_SET_NAME: the parser must find the *last* ')'
        tid.append(threading.get_native_id())
        ready.set()
        release.wait()

    thread = threading.Thread(target=sleeper)
    thread.start()
    try:
        ready.wait()
        (tid,) = tid
        for _ in range(1000):  # until it sleeps on the event (set right before waiting)
            if _proc_state(tid)[0] == "S":
                break
            time.sleep(0.001)
        state, cpu = ctypes.c_char(), ctypes.c_int()
        assert lib.jaxrnn_thread_state(tid, ctypes.byref(state), ctypes.byref(cpu)) == 1
        assert (state.value.decode(), cpu.value) == _proc_state(tid) and state.value == b"S"  # asleep on the event
        assert lib.jaxrnn_thread_state(2**31 - 1, ctypes.byref(state), ctypes.byref(cpu)) == 0  # no such thread

        allowed = sorted(os.sched_getaffinity(tid))
        if len(allowed) < 2:
            pytest.skip("one CPU allowed: nothing to move to")
        off = allowed[0]
        after = (ctypes.c_uint8 * 1024)()
        assert lib.jaxrnn_move_thread_off(tid, off, after, 1024) == 1
        assert [i for i in range(1024) if after[i]] == allowed[1:]
        assert sorted(os.sched_getaffinity(tid)) == allowed  # restored
        # A thread allowed one CPU is not moved off it.
        os.sched_setaffinity(tid, {off})
        assert lib.jaxrnn_move_thread_off(tid, off, after, 1024) == 0 and os.sched_getaffinity(tid) == {off}
        os.sched_setaffinity(tid, allowed)
    finally:
        release.set()
        thread.join()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the placement reads /proc (Linux)")
def test_calls_leave_every_threads_affinity_as_they_found_it():
    """Many small row-split fwd+bwd calls (whose helpers may start late and be moved): afterwards no thread of
    this process is left off a CPU, and the moved-threads count only grows."""
    before = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
    cell, params, xs, carry0, lens = problem(64, 20, 32, 16, seed=4, cell="lstm")
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(jaxrnn.rnn(cell, p, x, impl=kernels.FFI(split="rows"))[0] ** 2)))
    moved0 = ffi.team_stats()["moved_threads"]
    for _ in range(100):
        jax.block_until_ready(step(params, xs))
    assert ffi.team_stats()["moved_threads"] >= moved0
    for t in os.listdir("/proc/self/task"):
        want = before.get(int(t), os.sched_getaffinity(0))
        assert os.sched_getaffinity(int(t)) == want, f"thread {t}"
