"""Checkpoints of jaxrnn.train.fit: an interrupted and resumed run equals the uninterrupted one bitwise
(function and iterator batches, a carried state, a threaded key, a fault's lowered learning rate),
a checkpoint of another model is one clear ValueError, a run killed mid-save leaves the previous
step loadable, and load_checkpoint returns the saved parameters and metadata."""

import os
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
from train.test_step import assert_tree_equal
from _util import normal

CELL = jaxrnn.GRU(6)
B, T, WINDOWS = 4, 5, 6


def problem():
    kp, kx = jax.random.split(jax.random.key(7))
    params = {"cell": CELL.init(kp, 3), "out": 0.1 * jnp.ones((6, 3))}
    stream = np.asarray(normal(kx, (B, WINDOWS * T + 1, 3)), np.float32)

    def batches(i):
        s = (i % WINDOWS) * T
        x, y = stream[:, s : s + T], stream[:, s + 1 : s + T + 1]
        return x, y * np.float32(np.nan if i == 5 else 1.0)  # batch 5 makes the loss NaN: one fault

    return params, batches


def loss_fn(params, batch, carry, *, key):
    """Truncated BPTT with input dropout: the carry flows between windows, the key differs per batch."""
    x, y = batch
    keep = jax.random.bernoulli(key, 0.8, x.shape)
    hs, carry = jaxrnn.rnn(CELL, params["cell"], jnp.where(keep, x / 0.8, 0.0), initial_carry=carry, impl="reference")
    return jnp.mean((hs @ params["out"] - y) ** 2), carry


def run(directory, batches, steps, **kwargs):
    params, _ = problem()
    return train.fit(
        loss_fn, params, lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=steps, checkpoint_dir=directory,
        checkpoint_every=3, initial_carry=CELL.zero_carry((B,)), key=jax.random.key(11), progress=False,
        metadata={"model": {"cell": "GRU", "hidden": 6}, "vocab": ["a", "b"]}, **kwargs,
    )


class Interrupt(Exception):
    pass


def interrupting(batches, at):
    def get(i):
        if i == at:
            raise Interrupt(i)
        return batches(i)

    return get


def by_step(history):
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in history.steps()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    _, batches = problem()
    return run(tmp_path_factory.mktemp("full"), batches, 12)


@pytest.mark.parametrize("kind", ["function", "iterator"])
def test_resume_reproduces_uninterrupted_run_bitwise(tmp_path, uninterrupted, kind):
    full_params, full = uninterrupted
    assert [f["action"] for f in full.faults()] == ["restored step 3, lr 0.01 -> 0.005"]
    _, batches = problem()
    # Steps 1-5 on batches 0-4, a fault at batch 5 restores step 3, steps 4-12 on batches 6-14. Killed while
    # drawing batch 10 (step 7 done): the checkpoint at step 6 holds data position 9 and the fault's lower lr.
    with pytest.raises(Interrupt):
        if kind == "function":
            run(tmp_path, interrupting(batches, 10), 12)
        else:
            run(tmp_path, (batches(i) if i < 10 else (_ for _ in ()).throw(Interrupt(i)) for i in range(100)), 12)
    source = batches if kind == "function" else (batches(i) for i in range(100))  # an iterator from its start
    params, resumed = run(tmp_path, source, 12)
    assert [r["step"] for r in resumed.steps()] == list(range(7, 13))
    assert [r["batch"] for r in resumed.steps()] == list(range(9, 15))
    expected = by_step(full)
    assert by_step(resumed) == {s: expected[s] for s in range(7, 13)}  # loss, grad norm and lr, bitwise
    assert_tree_equal(params, full_params)


def test_resume_after_checkpoint_before_a_fault(tmp_path, uninterrupted):
    full_params, full = uninterrupted
    _, batches = problem()
    run(tmp_path, batches, 4)  # stops at step 4 (checkpointed), before batch 5's fault
    params, resumed = run(tmp_path, batches, 12)
    assert [f["action"] for f in resumed.faults()] == ["restored step 4, lr 0.01 -> 0.005"]  # the same fault, later restore point
    (gone,) = [r for r in resumed if r.get("rolled_back")]  # step 5 on batch 4, undone by the fault in both runs
    (same,) = [r for r in full if r.get("rolled_back") and r["step"] == 5]
    assert (gone["step"], gone["batch"], gone["loss"], gone["grad_norm"]) == (same["step"], same["batch"], same["loss"], same["grad_norm"])
    assert resumed.steps()[0] == {**resumed.steps()[0], "step": 5, "batch": 6, "lr": 0.005}


def test_resume_with_nothing_left_returns_checkpoint(tmp_path):
    _, batches = problem()
    params, _ = run(tmp_path, batches, 3)
    again, history = run(tmp_path, batches, 3)
    assert_tree_equal(again, params)
    assert list(history) == []


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _, batches = problem()
    run(tmp_path, batches, 3)
    params, _ = problem()
    wider = dict(params, out=jnp.ones((6, 4)))
    with pytest.raises(ValueError, match=r"^checkpoint_dir: the checkpoint at step 3 in .* is of a different model: params\['out'\] has shape \(6, 3\) float32 in the checkpoint, \(6, 4\) float32 in this run"):
        train.fit(loss_fn, wider, lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=6, checkpoint_dir=tmp_path,
                  initial_carry=CELL.zero_carry((B,)), key=jax.random.key(11), progress=False)
    with pytest.raises(ValueError, match=r"^checkpoint_dir: .* different model: the params tree differs \(leaves only in this run: \['extra'\]\)"):
        train.load_checkpoint(tmp_path, dict(params, extra=jnp.zeros(())))
    with pytest.raises(ValueError, match=r"^checkpoint_dir: .* different model: metadata\['model'\] is \{'cell': 'GRU', 'hidden': 6\} there, 'lstm' in this run"):
        train.fit(loss_fn, params, lambda lr: optax.adam(lr), batches, learning_rate=1e-2, steps=6, checkpoint_dir=tmp_path,
                  initial_carry=CELL.zero_carry((B,)), key=jax.random.key(11), progress=False, metadata={"model": "lstm"})
    with pytest.raises(ValueError, match=r"^checkpoint_dir: .* different model or optimiser: the opt_state tree differs"):
        train.fit(loss_fn, params, lambda lr: optax.sgd(lr), batches, learning_rate=1e-2, steps=6, checkpoint_dir=tmp_path,
                  initial_carry=CELL.zero_carry((B,)), key=jax.random.key(11), progress=False)
    with pytest.raises(ValueError, match=r"^checkpoint_dir: expected an empty directory with resume=False, got .* up to step 3"):
        run(tmp_path, batches, 6, resume=False)


def test_load_checkpoint(tmp_path):
    _, batches = problem()
    params, _ = run(tmp_path, batches, 4, max_to_keep=2)
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    loaded, metadata = train.load_checkpoint(tmp_path, params_like=jax.eval_shape(lambda: params))
    assert_tree_equal(loaded, params)
    assert metadata == {"model": {"cell": "GRU", "hidden": 6}, "vocab": ["a", "b"]}
    raw, _ = train.load_checkpoint(str(tmp_path), step=3)  # no params_like: orbax's dicts (a NamedTuple becomes a dict)
    assert set(raw) == {"cell", "out"} and isinstance(raw["cell"], dict)
    with pytest.raises(ValueError, match=r"^step: expected one of the saved steps \[3, 4\]"):
        train.load_checkpoint(tmp_path, step=1)
    with pytest.raises(ValueError, match=r"^checkpoint_dir: expected an existing checkpoint directory, got .*nowhere"):
        train.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^checkpoint_dir: expected a directory holding checkpoints"):
        os.mkdir(tmp_path / "empty")
        train.load_checkpoint(tmp_path / "empty")


def test_partial_save_is_ignored(tmp_path):
    """A leftover temporary step directory (a save that never finished) is not a step; resume uses the previous one."""
    _, batches = problem()
    params, _ = run(tmp_path, batches, 3)
    partial = tmp_path / "6.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\x00" * 10)
    loaded, _ = train.load_checkpoint(tmp_path, params)
    assert_tree_equal(loaded, params)
    _, resumed = run(tmp_path, batches, 4)
    assert resumed.steps()[0]["step"] == 4 and not partial.exists()  # cleaned when the run opened the directory


KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [sys.argv[2], os.path.dirname(sys.argv[2])]  # tests/train and tests
    from orbax.checkpoint._src.path import atomicity  # internal: the rename that commits a step
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def killing(self, *args, **kwargs):
        if self.get_final().name == "6":
            os._exit(17)  # everything of step 6 is written, not yet renamed into place
        return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = killing
    import test_checkpoint as t
    t.run(sys.argv[1], t.problem()[1], 12)
    """
)


def test_run_killed_mid_save_leaves_previous_checkpoint(tmp_path, uninterrupted):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path), os.path.dirname(__file__)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert any(name.startswith("6.orbax-checkpoint-tmp") for name in os.listdir(tmp_path))
    full_params, full = uninterrupted
    _, batches = problem()
    params, resumed = run(tmp_path, batches, 12)
    assert resumed.steps()[0]["step"] == 4  # from step 3, the last complete checkpoint
    expected = by_step(full)
    assert by_step(resumed) == {s: expected[s] for s in range(4, 13)}
    assert_tree_equal(params, full_params)
