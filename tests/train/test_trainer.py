"""jaxrnn.train.fit against hand-written loops over make_train_step: the history it records, truncated BPTT
with a carried state, fault recovery (restore, lower the learning rate, continue), one compilation,
progress/metrics/validation/figure, argument errors, and data parallelism on 8 CPU devices."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from jaxrnn import train
from train.test_step import all_finite, assert_tree_equal, poison_gradient
from _util import devices_env, normal

STEPS = 12


# --------------------------------------------------------------------------
# Problems and reference loops (test_checkpoint.py uses them too)
# --------------------------------------------------------------------------
def linear_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def linear_params():
    return {"w": jnp.zeros((3,)), "b": jnp.zeros(())}


def linear_batches(bad=(), bad_gradient=()):
    """``batches(i)``: a fixed regression batch ``i``; NaN targets at the indices ``bad``; a NaN gradient
    (finite loss) at ``bad_gradient`` (through an input that reaches only the backward pass)."""
    x = np.asarray(normal(jax.random.key(0), (64, 8, 3)))
    y = np.asarray(normal(jax.random.key(1), (64, 8)))

    def batches(i):
        yy = y[i % 64] * (np.nan if i in bad else 1.0)
        xx = x[i % 64] * (np.inf if i in bad_gradient else 1.0)
        return xx, yy.astype(np.float32)

    return batches


def gradient_poisoning_loss(params, batch):
    """``linear_loss``; on a batch with an inf input the loss stays finite (the inf is zeroed) but the gradient is NaN."""
    x, y = batch
    bad = jnp.any(~jnp.isfinite(x))
    params = dict(params, b=poison_gradient(params["b"], bad.astype(jnp.float32)))
    return linear_loss(params, (jnp.where(jnp.isfinite(x), x, 0.0), y))


def hand_loop(loss_fn, params, batches, indices, lrs, max_grad_norm=None, opt_state=None, step=None):
    """make_train_step in a loop with an inject_hyperparams Adam: batch ``indices[j]`` at learning rate ``lrs[j]``."""
    if step is None:
        step = train.make_train_step(loss_fn, optax.inject_hyperparams(optax.adam)(learning_rate=lrs[0]), max_grad_norm=max_grad_norm)
    opt_state = step.init(params) if opt_state is None else opt_state
    rows = []
    for i, lr in zip(indices, lrs):
        opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        params, opt_state, m = step(params, opt_state, batches(i))
        assert bool(m.finite)
        rows.append((float(m.loss), float(m.grad_norm), bool(m.clipped)))
    return params, opt_state, rows


# --------------------------------------------------------------------------
# The history is the bare step's measurements
# --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["factory", "inject", "clipped"])
def test_history_matches_hand_loop(how):
    batches = linear_batches()
    if how == "factory":
        kwargs = dict(optimizer=lambda lr: optax.adam(lr), learning_rate=1e-2, max_grad_norm=1.0)
    elif how == "inject":
        kwargs = dict(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), max_grad_norm=1.0)
    else:
        kwargs = dict(optimizer=lambda lr: train.ClippedOptimizer(optax.adam(lr), 1.0), learning_rate=1e-2)
    optimizer = kwargs.pop("optimizer")
    params, history = train.fit(linear_loss, linear_params(), optimizer, batches, steps=STEPS, progress=False, **kwargs)
    expected_params, _, rows = hand_loop(linear_loss, linear_params(), batches, range(STEPS), [1e-2] * STEPS, max_grad_norm=1.0)
    got = [(r["loss"], r["grad_norm"], r["clipped"]) for r in history.steps()]
    assert [r["step"] for r in history.steps()] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(np.array(got, float), np.array(rows, float), rtol=1e-5, atol=0)
    assert [g[2] for g in got] == [r[2] for r in rows] and any(g[2] for g in got) and not all(g[2] for g in got)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected_params)
    assert history.faults() == []


def test_iterator_batches_equal_function_batches():
    batches = linear_batches()
    _, by_function = train.fit(linear_loss, linear_params(), lambda lr: optax.sgd(lr), batches, learning_rate=0.1, steps=6, progress=False)
    _, by_iterator = train.fit(
        linear_loss, linear_params(), lambda lr: optax.sgd(lr), (batches(i) for i in range(100)), learning_rate=0.1, steps=6, progress=False
    )
    np.testing.assert_array_equal(by_function.losses(), by_iterator.losses())


def test_exhausted_iterator_stops_with_a_record():
    batches = linear_batches()
    params, history = train.fit(
        linear_loss, linear_params(), lambda lr: optax.sgd(lr), [batches(i) for i in range(4)], learning_rate=0.1, steps=10, progress=False
    )
    assert len(history.steps()) == 4 and history[-1] == {"step": 4, "stop": "batches exhausted after 4 batches"}
    expected, _, _ = hand_loop(linear_loss, linear_params(), batches, range(4), [0.1] * 4, step=train.make_train_step(
        linear_loss, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)))
    assert_tree_equal(params, expected)


# --------------------------------------------------------------------------
# Truncated BPTT with a carried state
# --------------------------------------------------------------------------
CELL = jaxrnn.LSTM(8)


def tbptt_loss(params, batch, carry):
    """Predict the next input of each window from the RNN output; the final carry is the next window's start."""
    xs, ys = batch
    hs, new_carry = jaxrnn.rnn(CELL, params["cell"], xs, initial_carry=carry, impl="reference")
    return jnp.mean((hs @ params["out"] - ys) ** 2), new_carry


def tbptt_problem(batch=4, windows=8, T=5):
    kp, kx = jax.random.split(jax.random.key(3))
    params = {"cell": CELL.init(kp, 2), "out": 0.1 * jnp.ones((8, 2))}
    stream = np.asarray(normal(kx, (batch, windows * T + 1, 2)))

    def batches(i):
        s = (i % windows) * T
        return stream[:, s : s + T], stream[:, s + 1 : s + T + 1]

    return params, batches, CELL.zero_carry((batch,))


def test_tbptt_carry_matches_hand_loop():
    params, batches, carry0 = tbptt_problem()
    got, history = train.fit(
        tbptt_loss, params, lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=8, initial_carry=carry0, progress=False
    )

    def loss_on_pair(p, pair):  # the hand-written loop: the carry rides in the batch, comes back in aux
        batch, carry = pair
        return tbptt_loss(p, batch, jax.lax.stop_gradient(carry))

    step = train.make_train_step(loss_on_pair, optax.adam(1e-2), has_aux=True)
    p, opt_state, carry, losses = params, None, carry0, []
    opt_state = step.init(p)
    for i in range(8):
        p, opt_state, m = step(p, opt_state, (batches(i), carry))
        carry = m.aux
        losses.append(float(m.loss))
    np.testing.assert_allclose(history.losses(), losses, rtol=1e-5, atol=0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, p)
    assert float(jnp.abs(carry.h).max()) > 0.1  # the carry is not the zero state it started from


def test_carry_of_another_shape_is_an_error():
    params, batches, carry0 = tbptt_problem()
    bad = lambda p, b, c: (tbptt_loss(p, b, c)[0], jax.tree_util.tree_map(lambda x: x[:2], c))  # noqa: E731
    with pytest.raises(ValueError, match="^loss_fn: expected a new carry like initial_carry"):
        train.fit(bad, params, lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=2, initial_carry=carry0, progress=False)


# --------------------------------------------------------------------------
# Faults: restore, lower the learning rate, continue
# --------------------------------------------------------------------------
def test_fault_restores_last_checkpoint_and_halves_lr(tmp_path):
    batches = linear_batches(bad={6})
    params, history = train.fit(
        linear_loss, linear_params(), lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=10,
        checkpoint_dir=tmp_path, checkpoint_every=4, progress=False,
    )
    (fault,) = history.faults()
    assert fault["step"] == 7 and fault["batch"] == 6 and fault["fault"] == "non-finite loss"
    assert fault["action"] == "restored step 4, lr 0.01 -> 0.005"
    # Reference: steps 1-4 on batches 0-3 at 1e-2; then, from step 4's state, batches 7-12 at 5e-3.
    expected, _, rows = hand_loop(linear_loss, linear_params(), batches, [0, 1, 2, 3, 7, 8, 9, 10, 11, 12], [1e-2] * 4 + [5e-3] * 6)
    np.testing.assert_allclose(history.losses(), [r[0] for r in rows], rtol=1e-5)
    assert [r["step"] for r in history.steps()] == list(range(1, 11))
    assert [r["lr"] for r in history.steps()] == [1e-2] * 4 + [5e-3] * 6
    assert sum(1 for r in history if r.get("rolled_back")) == 2  # steps 5 and 6 were undone
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected)
    assert all_finite(params)


def test_fault_before_first_checkpoint_restores_initial_state():
    batches = linear_batches(bad={1})
    params, history = train.fit(
        linear_loss, linear_params(), lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=5, checkpoint_every=50, progress=False
    )
    (fault,) = history.faults()
    assert fault["action"] == "restored step 0, lr 0.01 -> 0.005"
    expected, _, rows = hand_loop(linear_loss, linear_params(), batches, [2, 3, 4, 5, 6], [5e-3] * 5)
    np.testing.assert_allclose(history.losses(), [r[0] for r in rows], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected)


def test_several_faults_then_fault_limit(tmp_path):
    batches = linear_batches(bad={2, 9}, bad_gradient={5})
    params, history = train.fit(
        gradient_poisoning_loss, linear_params(), optax.inject_hyperparams(optax.adam)(learning_rate=0.02), batches,
        steps=10, checkpoint_dir=tmp_path / "a", checkpoint_every=3, max_to_keep=None, progress=False,
    )
    assert [(f["batch"], f["fault"]) for f in history.faults()] == [(2, "non-finite loss"), (5, "non-finite gradient"), (9, "non-finite loss")]
    assert [f["action"] for f in history.faults()] == [
        "restored step 0, lr 0.02 -> 0.01", "restored step 0, lr 0.01 -> 0.005", "restored step 3, lr 0.005 -> 0.0025"]
    assert all_finite(params) and len(history.steps()) == 10 and history.steps()[-1]["lr"] == pytest.approx(0.0025)
    # Every checkpoint on disk is finite and loadable.
    for step in (3, 6, 9, 10):
        saved, _ = train.load_checkpoint(tmp_path / "a", params, step=step)
        assert all_finite(saved)

    # One more fault than max_faults raises, after restoring; what was saved stays as it was.
    with pytest.raises(train.FaultLimitError, match=r"3 faults, more than max_faults=2 .*step 3, is in"):
        train.fit(
            gradient_poisoning_loss, linear_params(), optax.inject_hyperparams(optax.adam)(learning_rate=0.02), batches,
            steps=10, checkpoint_dir=tmp_path / "b", checkpoint_every=3, max_faults=2, progress=False,
        )
    saved, _ = train.load_checkpoint(tmp_path / "b", params)
    reference, _ = train.load_checkpoint(tmp_path / "a", params, step=3)
    assert_tree_equal(saved, reference)


def test_non_finite_update_is_a_fault():
    # A finite loss and gradient (1e18) whose SGD update (lr 1e21) overflows float32.
    batches = linear_batches()
    params, history = train.fit(
        lambda p, b: linear_loss(p, b) + 1e18 * jnp.sum(p["w"]), linear_params(), lambda lr: optax.sgd(lr), batches,
        learning_rate=1e21, steps=2, lr_decay_on_fault=1e-30, max_faults=1, progress=False,
    )
    assert history.faults()[0]["fault"] == "non-finite parameters after the update"
    assert all_finite(params)


def test_fault_limit_zero_and_lr_decay_one_needs_no_injection():
    batches = linear_batches(bad={0})
    with pytest.raises(train.FaultLimitError, match="1 faults, more than max_faults=0"):
        train.fit(linear_loss, linear_params(), optax.adam(1e-2), batches, steps=3, lr_decay_on_fault=1.0, max_faults=0, progress=False)
    _, history = train.fit(linear_loss, linear_params(), optax.adam(1e-2), batches, steps=3, lr_decay_on_fault=1.0, progress=False)
    assert history.faults()[0]["action"] == "restored step 0, lr unchanged"


# --------------------------------------------------------------------------
# One compilation
# --------------------------------------------------------------------------
def test_step_compiles_once_across_steps_and_faults(caplog):
    traces = []

    def counted(params, batch, carry, key):
        traces.append(1)
        return linear_loss(params, batch), carry + 1.0

    with jax.log_compiles(True), caplog.at_level("WARNING"):
        _, history = train.fit(counted, linear_params(), lambda lr: optax.adam(lr), linear_batches(bad={10}), learning_rate=1e-2,
                               steps=30, checkpoint_every=5, initial_carry=jnp.zeros(()), key=jax.random.key(0), progress=False)
    compiles = [r for r in caplog.records if "XLA compilation of jit(run_step)" in r.getMessage()]
    # make_train_step traces the loss twice (shape check + autodiff) for its one compilation, and never again,
    # not even after the fault's restore and new learning rate.
    assert len(compiles) == 1 and len(traces) == 2 and len(history.faults()) == 1 and len(history.steps()) == 30


# --------------------------------------------------------------------------
# Progress, metrics, validation, the figure
# --------------------------------------------------------------------------
def test_describe_labels_perplexity_only_for_nll():
    record = {"loss": 1.0, "grad_norm": 2.0, "clipped": True}
    assert train.progress.describe(record) == "loss 1.0000  |g| 2 (clipped)"
    assert train.progress.describe(record, loss_is_nll=True, tokens_per_second=1500.0) == "loss 1.0000  ppl 2.718  |g| 2 (clipped)  1.5k tok/s"


def test_metrics_eval_progress_and_figure(tmp_path, capsys):
    batches = linear_batches()
    evals = []

    def eval_fn(params):
        evals.append(params)
        return {"val_loss": linear_loss(params, batches(63))}

    path = tmp_path / "m" / "metrics.jsonl"
    params, history = train.fit(
        linear_loss, linear_params(), lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=7,
        eval_fn=eval_fn, eval_every=3, metrics_path=path, loss_is_nll=True, tokens_per_batch=8,
    )
    assert capsys.readouterr().out == ""  # progress=None: off when stdout is not a terminal
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert lines == json.loads(json.dumps(list(history)))
    assert [r["step"] for r in history.evals()] == [3, 6, 7] and len(evals) == 3
    assert history.evals()[-1]["eval"]["val_loss"] == pytest.approx(float(linear_loss(params, batches(63))), rel=1e-6)
    assert all("tokens_per_second" in r for r in history.steps()[1:])
    train.fit(linear_loss, linear_params(), lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=3, progress=True,
              loss_is_nll=True)
    assert "ppl" in capsys.readouterr().out
    figure = train.plot_history(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure == tmp_path / "loss.png"


def test_import_does_not_load_matplotlib_or_orbax():
    code = "import sys, jaxrnn, jaxrnn.train; print('matplotlib' in sys.modules, 'orbax.checkpoint' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --------------------------------------------------------------------------
# Argument errors, before any work
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(steps=0), ValueError, "^steps: expected a positive int, got 0"),
        (dict(loss_fn=3), TypeError, "^loss_fn: expected a callable"),
        (dict(optimizer="adam"), TypeError, "^optimizer: expected an optax.GradientTransformation or a factory"),
        (dict(optimizer=optax.adam(1e-2), learning_rate=None), TypeError, "^optimizer: expected an injectable learning rate"),
        (dict(optimizer=optax.adam(1e-2), learning_rate=1e-2), ValueError, "^learning_rate: expected None with an optax optimizer"),
        (dict(learning_rate=None), ValueError, "^learning_rate: expected a positive number"),
        (dict(lr_decay_on_fault=0.0), ValueError, r"^lr_decay_on_fault: expected a rate in \(0, 1\]"),
        (dict(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(1e-2, 0.0, 10)), learning_rate=None),
         TypeError, "^optimizer: expected a constant injected learning rate, got a schedule"),
        (dict(metadata={"f": object()}), TypeError, "^metadata: expected a JSON-serialisable dict"),
        (dict(mesh="data"), TypeError, "^mesh: expected a jax.sharding.Mesh"),
        (dict(eval_every=2), ValueError, "^eval_every: expected None without an eval_fn"),
        (dict(batches=3), TypeError, "^batches: expected an iterator"),
        (dict(max_grad_norm=-1.0), ValueError, "^max_grad_norm: expected a positive number"),
        (dict(optimizer=lambda lr: train.ClippedOptimizer(optax.adam(lr), 1.0), max_grad_norm=2.0), ValueError, "^max_grad_norm: expected None or 1.0"),
    ],
)
def test_argument_errors(change, error, message):
    calls = []
    kwargs = dict(loss_fn=linear_loss, params=linear_params(), optimizer=lambda lr: optax.adam(lr), batches=lambda i: calls.append(i),
                  steps=3, learning_rate=1e-2, progress=False)
    kwargs.update(change)
    with pytest.raises(error, match=message):
        train.fit(**kwargs)
    assert calls == []  # no batch drawn


def test_batch_not_divisible_by_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"^batches: expected every leaf's leading \(batch\) axis divisible"):
        train.fit(linear_loss, linear_params(), lambda lr: optax.adam(lr), lambda i: (np.ones((3,)) , np.ones(())), steps=1,
                  learning_rate=1e-2, mesh=mesh, progress=False)


# --------------------------------------------------------------------------
# Data parallelism: 8 CPU devices against one
# --------------------------------------------------------------------------
MULTI_DEVICE = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax, jaxrnn
    from jaxrnn import train
    assert jax.device_count() == 8
    from jaxrnn.runner import resolve_backend
    assert resolve_backend("auto", jaxrnn.LSTM(16))[0] == "xla"  # "auto" is the custom-VJP XLA loop on CPU
    V, B, T = 11, 8, 6
    def run(impl, mesh, carry):
        stack = jaxrnn.Stack(jaxrnn.LSTM(16), num_layers=1)
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        params = {"embed": 0.3 * jax.random.normal(k1, (V, 8)), "stack": stack.init(k2, 8),
                  "out": 0.3 * jax.random.normal(k3, (16, V))}
        tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, 6 * T + 1), 0, V))
        def loss_fn(p, batch, state):
            x, y = batch[:, :-1], batch[:, 1:]
            hs, new_state = stack.apply(p["stack"], p["embed"][x], initial_carry=state, impl=impl)
            logp = jax.nn.log_softmax(hs @ p["out"])
            return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1)), new_state
        state = stack.zero_carry((B,))
        f = loss_fn if carry else (lambda p, b: loss_fn(p, b, state)[0])
        _, history = train.fit(f, params, lambda lr: optax.adam(lr), lambda i: tokens[:, (i % 6) * T:(i % 6) * T + T + 1],
                               learning_rate=3e-2, steps=6, max_grad_norm=1.0, initial_carry=state if carry else None,
                               mesh=mesh, progress=False)
        return [[r["loss"], r["grad_norm"]] for r in history.steps()]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    out = {}
    for impl in sys.argv[1:]:
        out[impl] = [run(impl, None, True), run(impl, mesh, True)]
    print(json.dumps(out))
    """
)


def test_data_parallel_equals_single_device():
    """A truncated-BPTT LSTM language model (carry sharded with the batch), both backends: "reference" (scan and
    autodiff) and "auto" (the custom-VJP XLA loop)."""
    env = devices_env(8)
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE, "reference", "auto"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (single, sharded) in results.items():
        np.testing.assert_allclose(np.array(sharded), np.array(single), rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.ptp(np.array(single)[:, 0]) > 1e-3  # it trains
