"""The trainer: :func:`fit` runs :func:`jaxrnn.train.make_train_step` in a loop that survives what goes wrong.

On top of the bare step it adds checkpoints (orbax; resumable, with the
data position), fault recovery (a non-finite loss, gradient or update
restores the last good state and lowers the learning rate), truncated
backpropagation through time with a carried state, data parallelism over a
``jax.sharding.Mesh``, periodic validation, a progress line, JSON-lines
metrics and a history for :func:`jaxrnn.train.plot_history`. See
``docs/training.md``.

Example:
  >>> def loss_fn(params, batch):
  ...     x, y = batch
  ...     return jnp.mean((x @ params["w"] - y) ** 2)
  >>> params, history = fit(loss_fn, params, lambda lr: optax.adam(lr), batches,
  ...                       learning_rate=1e-2, steps=1000, max_grad_norm=1.0,
  ...                       checkpoint_dir="runs/linear", checkpoint_every=100)
  >>> history.losses()[-1], history.faults()
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.checks import check_index, check_key, check_rate, check_static, shape_of
from jaxrnn.train.checkpoint import CheckpointStore
from jaxrnn.train.clipping import split_clipping
from jaxrnn.train.progress import History, MetricsWriter, ProgressLine, describe
from jaxrnn.train.step import make_train_step

__all__ = ["FaultLimitError", "fit", "learning_rate_of", "with_learning_rate"]

INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


class FaultLimitError(RuntimeError):
    """More faults (non-finite losses, gradients or updates) than ``fit(..., max_faults=)`` tolerates."""


# --------------------------------------------------------------------------
# The learning rate inside an optimiser state
# --------------------------------------------------------------------------
def _is_inject(x) -> bool:
    return isinstance(x, INJECT_STATES)


def learning_rate_of(opt_state) -> Optional[float]:
    """The ``learning_rate`` hyperparameter of the first ``optax.inject_hyperparams`` state in ``opt_state``, or ``None``."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_inject):
        if _is_inject(node) and "learning_rate" in node.hyperparams:
            return float(np.asarray(node.hyperparams["learning_rate"]))
    return None


def with_learning_rate(opt_state, value: float):
    """``opt_state`` with every ``inject_hyperparams`` ``learning_rate`` set to ``value`` (same dtype and sharding)."""

    def set_rate(node):
        if not (_is_inject(node) and "learning_rate" in node.hyperparams):
            return node
        old = node.hyperparams["learning_rate"]
        new = np.asarray(value, dtype=old.dtype)
        sharding = getattr(old, "sharding", None)
        new = jax.device_put(new, sharding) if sharding is not None else jnp.asarray(new)
        return node._replace(hyperparams={**node.hyperparams, "learning_rate": new})

    return jax.tree_util.tree_map(set_rate, opt_state, is_leaf=_is_inject)


def prepare_optimizer(optimizer, learning_rate, max_grad_norm, lr_decay_on_fault):
    """``(optax transformation, max_grad_norm)`` from the ways ``fit`` accepts an optimiser."""
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None:
            raise ValueError(
                f"learning_rate: expected None with an optax optimizer (it has its own), got {learning_rate!r}; "
                "to have fit set it, pass a factory such as `lambda lr: optax.adam(lr)`"
            )
        inner, clip = split_clipping(optimizer)
    elif callable(optimizer):
        if learning_rate is None:
            raise ValueError("learning_rate: expected a positive number with an optimizer factory, got None")
        learning_rate = check_rate("learning_rate", learning_rate, 0.0, float("inf"), closed_low=False, what="a positive number")
        probe = optimizer(learning_rate)
        if not isinstance(probe, optax.GradientTransformation):
            raise TypeError(
                f"optimizer: expected a factory returning an optax.GradientTransformation, got one returning {type(probe).__name__}"
            )
        _, clip = split_clipping(probe)
        inner = optax.inject_hyperparams(lambda learning_rate: split_clipping(optimizer(learning_rate))[0])(
            learning_rate=learning_rate
        )
    else:
        raise TypeError(
            f"optimizer: expected an optax.GradientTransformation or a factory `lambda lr: optax.adam(lr)`, "
            f"got {type(optimizer).__name__}"
        )
    if clip is not None and max_grad_norm is not None and float(max_grad_norm) != clip:
        raise ValueError(f"max_grad_norm: expected None or {clip} (the optimizer's ClippedOptimizer clips), got {max_grad_norm!r}")
    return inner, clip if max_grad_norm is None else max_grad_norm


def check_injectable(opt_state, lr_decay_on_fault: float) -> None:
    """The learning rate must be a number inside an ``inject_hyperparams`` state, unless faults leave it alone."""
    if lr_decay_on_fault == 1.0:
        return
    nodes = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_inject) if _is_inject(n)]
    if not any("learning_rate" in n.hyperparams for n in nodes):
        raise TypeError(
            "optimizer: expected an injectable learning rate, so that a fault can lower it "
            "(lr_decay_on_fault < 1): pass `optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`, or a factory "
            "`lambda lr: optax.adam(lr)` with learning_rate=, or lr_decay_on_fault=1.0; got an optimizer without one"
        )
    if any("learning_rate" in getattr(n, "hyperparams_states", {}) for n in nodes):
        raise TypeError(
            "optimizer: expected a constant injected learning rate, got a schedule (inject_hyperparams recomputes it each "
            "step, so a fault could not lower it); pass lr_decay_on_fault=1.0 to train with the schedule"
        )


# --------------------------------------------------------------------------
# The jitted step of a run
# --------------------------------------------------------------------------
def wrap_loss(loss_fn, has_aux: bool, use_carry: bool, use_key: bool):
    """``inner(params, (batch, carry, key, position)) -> (loss, (aux, new_carry))`` for ``make_train_step``."""

    def inner(params, inner_batch):
        batch, carry, key, position = inner_batch
        args = (params, batch)
        if use_carry:
            args += (jax.lax.stop_gradient(carry),)  # truncated BPTT: no gradient reaches the previous window
        kwargs = {"key": jax.random.fold_in(key, position)} if use_key else {}
        out = loss_fn(*args, **kwargs)
        if not use_carry:
            loss, aux = out if has_aux else (out, None)
            return loss, (aux, None)
        shape = "(loss, (aux, new_carry))" if has_aux else "(loss, new_carry)"
        if not (isinstance(out, tuple) and len(out) == 2) or (has_aux and not (isinstance(out[1], tuple) and len(out[1]) == 2)):
            raise ValueError(f"loss_fn: expected {shape} with initial_carry, got {type(out).__name__}")
        loss, rest = out
        aux, new_carry = rest if has_aux else (None, rest)
        before = jax.tree_util.tree_map(lambda x: (shape_of(x), jnp.result_type(x)), carry)
        after = jax.tree_util.tree_map(lambda x: (shape_of(x), jnp.result_type(x)), new_carry)
        if before != after:
            raise ValueError(f"loss_fn: expected a new carry like initial_carry {before}, got {after}")
        return loss, (aux, jax.lax.stop_gradient(new_carry))

    return inner


def tree_all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_run_step(loss_fn, optimizer, max_grad_norm, has_aux, use_carry, use_key, replicated):
    """``(init, jitted step(params, opt_state, batch, carry, key, position) -> (params, opt_state, metrics, carry, params_finite))``."""
    bare = make_train_step(wrap_loss(loss_fn, has_aux, use_carry, use_key), optimizer, max_grad_norm=max_grad_norm, has_aux=True, jit=False)

    def run_step(params, opt_state, batch, carry, key, position):
        params, opt_state, metrics = bare.step(params, opt_state, (batch, carry, key, position))
        aux, new_carry = metrics.aux
        if replicated is not None:  # keep the state replicated, so that the next call's shardings (and program) match
            params = jax.lax.with_sharding_constraint(params, replicated)
            opt_state = jax.lax.with_sharding_constraint(opt_state, replicated)
        return params, opt_state, metrics._replace(aux=aux), new_carry, tree_all_finite(params)

    return bare.init, jax.jit(run_step)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
class BatchSource:
    """Batch ``i`` (the data position: batches drawn so far) from an iterator or a function of ``i``."""

    def __init__(self, batches):
        self.function = batches if callable(batches) and not hasattr(batches, "__next__") else None
        if self.function is None:
            try:
                self.iterator = iter(batches)
            except TypeError:
                raise TypeError(
                    f"batches: expected an iterator (or iterable) of batches or a function batches(i), got {type(batches).__name__}"
                ) from None

    def skip(self, count: int) -> None:
        """Draw ``count`` batches from an iterator and drop them (a resumed run; nothing for a function)."""
        if self.function is None:
            for i in range(count):
                try:
                    next(self.iterator)
                except StopIteration:
                    raise ValueError(
                        f"batches: the checkpoint was written after {count} batches, but the iterator ended after {i}; "
                        "on resume pass the same iterator from its start (fit skips the batches already consumed)"
                    ) from None

    def get(self, i: int):
        """Batch ``i``; raises ``StopIteration`` at the end of an iterator."""
        return self.function(i) if self.function is not None else next(self.iterator)


def make_placer(mesh):
    """``(place(batch), carry/data sharding, state sharding)``.

    Without a mesh the state lives on the default device, committed, so that
    the step's inputs keep one placement (an uncommitted array replaced by a
    committed one, e.g. after a restore, would compile the step again).
    """
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return (lambda batch: batch), device, device
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    axis = mesh.axis_names[0]
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    size = mesh.shape[axis]

    def place(batch):
        if jax.process_count() > 1:  # each process gives its own slice of the global batch
            return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(data, np.asarray(x)), batch)
        for path, x in jax.tree_util.tree_leaves_with_path(batch):
            shape = shape_of(x)
            if not shape or shape[0] % size:
                raise ValueError(
                    f"batches: expected every leaf's leading (batch) axis divisible by mesh axis {axis!r} of size {size}, "
                    f"got shape {shape} at {jax.tree_util.keystr(path) or 'the batch'}"
                )
        return jax.device_put(batch, data)

    return place, data, replicated


def to_json(value):
    """A validation result as JSON: arrays become floats (scalars) or lists."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


# --------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------
def fit(
    loss_fn: Callable[..., Any],
    params,
    optimizer,
    batches,
    *,
    steps: int,
    learning_rate: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    has_aux: bool = False,
    initial_carry: Any = None,
    key: Any = None,
    checkpoint_dir=None,
    checkpoint_every: int = 100,
    max_to_keep: Optional[int] = 3,
    resume: bool = True,
    metadata: Optional[Dict[str, Any]] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    lr_decay_on_fault: float = 0.5,
    max_faults: int = 5,
    eval_fn: Optional[Callable[[Any], Dict[str, Any]]] = None,
    eval_every: Optional[int] = None,
    progress: Optional[bool] = None,
    loss_is_nll: bool = False,
    tokens_per_batch: Optional[int] = None,
    metrics_path=None,
) -> Tuple[Any, History]:
    """Train ``params`` for ``steps`` optimiser steps; return ``(params, history)``.

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a scalar loss, or
        ``(loss, aux)`` with ``has_aux=True``. With ``initial_carry`` it is
        ``loss_fn(params, batch, carry)`` returning ``(loss, new_carry)``
        (``(loss, (aux, new_carry))`` with ``has_aux``); with ``key`` it also
        gets ``key=`` (a fresh key per batch: ``fold_in(key, i)`` for the
        batch at data position ``i``).
      params: the initial parameters (any pytree of arrays).
      optimizer: how the learning rate is found, to be lowered after a fault:
        a factory ``lambda lr: optax.adam(lr)`` together with
        ``learning_rate=`` (fit wraps it in ``optax.inject_hyperparams``);
        or an optax transformation built with
        ``optax.inject_hyperparams(...)(learning_rate=<a number>)`` whose
        ``learning_rate`` fit scales; or any optax transformation with
        ``lr_decay_on_fault=1.0``. A :class:`~jaxrnn.train.ClippedOptimizer`
        (or a factory returning one) clips through the step, which measures it.
      batches: an iterator (or iterable) of batches, or a function
        ``batches(i)`` of the data position ``i`` (batches drawn so far,
        from 0; equal to the 0-based step index until a fault skips data).
        A resumed run calls the function from the saved position, so it sees
        exactly the batches the uninterrupted run would have seen; an
        iterator must be passed again from its start, and fit draws and
        drops the batches already consumed. An iterator that ends early
        stops the run (a ``"stop"`` record; the state is checkpointed).
      steps: the number of optimiser steps the run ends at (counted over
        resumes: a run resumed at step 40 with ``steps=100`` does 60 more).
      learning_rate: with an optimiser factory, its learning rate.
      max_grad_norm: clip the gradient to this global norm (or use a ``ClippedOptimizer``).
      has_aux: ``loss_fn`` returns auxiliary output (not kept by fit).
      initial_carry: the truncated-BPTT state (a pytree; leaves ``(B, ...)``
        batch-major under a mesh): each step's ``new_carry`` (gradient
        stopped) is the next step's ``carry``. It is checkpointed, and a
        fault restores the carry of the restored step.
      key: a PRNG key threaded to ``loss_fn(..., key=)`` (dropout); checkpointed.
      checkpoint_dir: save here every ``checkpoint_every`` steps and at the
        end (orbax; ``max_to_keep`` latest steps kept). ``None``: no files
        (faults still restore the in-memory state of the last
        ``checkpoint_every`` boundary).
      checkpoint_every: steps between checkpoints (and in-memory restore points).
      max_to_keep: how many checkpoints to keep (``None``: all).
      resume: continue from the latest checkpoint in ``checkpoint_dir`` if
        there is one. With ``resume=False`` a directory that holds
        checkpoints is refused (they are never overwritten).
      metadata: JSON-serialisable dict saved with each checkpoint (what is
        needed to rebuild the model: vocabulary, configuration). A resumed
        run whose ``metadata["model"]`` differs from the checkpoint's is
        refused, as is one whose parameter or optimiser-state tree differs.
      mesh: a ``jax.sharding.Mesh`` for data parallelism: every batch leaf
        (and the carry) is sharded along its leading axis over the mesh's
        first axis, parameters and optimiser state are replicated, and jit
        partitions the step (gradients all-reduced by XLA).
      lr_decay_on_fault: the factor a fault multiplies the learning rate by, in ``(0, 1]``.
      max_faults: how many faults fit recovers from; the next one raises
        :class:`FaultLimitError` (after restoring the last good state; no checkpoint is written).
      eval_fn: ``eval_fn(params) -> dict`` of scalars, called every
        ``eval_every`` steps and at the end (an ``{"step", "eval"}`` record).
      eval_every: steps between validations (default: only at the end).
      progress: show a progress line (rich); ``None``: when stdout is a terminal.
      loss_is_nll: the loss is a per-token negative log-likelihood in nats:
        the progress line shows the perplexity ``exp(loss)``.
      tokens_per_batch: tokens in one batch: the progress line shows tokens/s.
      metrics_path: write every history record there as a JSON line
        (appended to when the run resumes from a checkpoint).

    Returns:
      ``(params, history)``: the parameters after the last step and the run's
      :class:`~jaxrnn.train.History` (a list of dict records: one per step
      with ``loss``, ``grad_norm`` (before clipping), ``clipped`` and ``lr``;
      one per fault with ``fault`` and ``action``; one per validation).

    Faults:
      A step whose loss or gradient is not finite, or whose update makes a
      parameter non-finite, is never applied. fit then restores the last
      restore point (the last checkpoint; the initial state before the
      first), multiplies the learning rate by ``lr_decay_on_fault``, records
      ``{"step", "fault": "non-finite loss", "action": "restored step 40,
      lr 0.001 -> 0.0005"}`` and continues with the next batch: the batches
      drawn since the restore point are not replayed (as PaLM skipped the
      batches around a loss spike), so a bad batch is seen only once.

    Raises:
      TypeError, ValueError: bad arguments (before any work), or a
        checkpoint of a different model in ``checkpoint_dir``.
      FaultLimitError: more than ``max_faults`` faults.

    Example:
      >>> params, history = fit(loss_fn, params, lambda lr: optax.adam(lr), batches,
      ...                       learning_rate=3e-3, steps=500, checkpoint_dir="runs/a")
    """
    # ---- arguments, before any work
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(params, batch), got {type(loss_fn).__name__}")
    steps = check_index(steps, "steps")
    checkpoint_every = check_index(checkpoint_every, "checkpoint_every")
    if max_to_keep is not None:
        max_to_keep = check_index(max_to_keep, "max_to_keep")
    max_faults = check_index(max_faults, "max_faults", minimum=0)
    lr_decay_on_fault = check_rate("lr_decay_on_fault", lr_decay_on_fault, 0.0, 1.0, closed_low=False, closed_high=True)
    if max_grad_norm is not None:
        max_grad_norm = check_rate("max_grad_norm", max_grad_norm, 0.0, float("inf"), closed_low=False, what="a positive number")
    has_aux = check_static("has_aux", has_aux)
    resume = check_static("resume", resume)
    loss_is_nll = check_static("loss_is_nll", loss_is_nll)
    if progress is not None:
        progress = check_static("progress", progress)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn: expected a callable eval_fn(params) -> dict, got {type(eval_fn).__name__}")
    if eval_every is not None:
        eval_every = check_index(eval_every, "eval_every")
        if eval_fn is None:
            raise ValueError(f"eval_every: expected None without an eval_fn, got {eval_every}")
    if tokens_per_batch is not None:
        tokens_per_batch = check_index(tokens_per_batch, "tokens_per_batch")
    key = check_key("key", key)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a JSON-serialisable dict or None, got {type(metadata).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(f"metadata: expected a JSON-serialisable dict, got one that json.dumps refuses ({error})") from None
    inner_optimizer, max_grad_norm = prepare_optimizer(optimizer, learning_rate, max_grad_norm, lr_decay_on_fault)
    place, data_sharding, replicated = make_placer(mesh)  # without a mesh: both the default device
    source = BatchSource(batches)
    use_carry = initial_carry is not None

    # ---- the initial state (placed on the mesh)
    init, run_step = make_run_step(
        loss_fn, inner_optimizer, max_grad_norm, has_aux, use_carry, key is not None, None if mesh is None else replicated
    )
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(init(params), replicated)
    check_injectable(opt_state, lr_decay_on_fault)
    carry = initial_carry
    if use_carry:
        carry = jax.device_put(carry, data_sharding)
    key_data = None
    if key is not None:
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        key_data = jax.device_put(jax.random.key_data(key) if typed else key, replicated)
    base_lr = learning_rate if learning_rate is not None else learning_rate_of(opt_state)
    step, position, lr_scale = 0, 0, 1.0

    # ---- resume
    store = CheckpointStore(checkpoint_dir, max_to_keep) if checkpoint_dir is not None else None
    resumed = False
    if store is not None and store.latest_step() is not None:
        latest = store.latest_step()
        if not resume:
            store.close()
            raise ValueError(
                f"checkpoint_dir: expected an empty directory with resume=False, got {store.directory!r} holding "
                f"checkpoints up to step {latest}; pass resume=True to continue, or another directory"
            )
        meta = store.read_meta(latest)
        store.check_compatible(meta, params, opt_state, metadata)
        params, opt_state, state = store.restore(latest, params, opt_state, {"carry": carry, "key": key_data})
        carry, key_data = state["carry"], state["key"]
        step, position, lr_scale = meta["step"], meta["data_position"], meta["lr_scale"]
        base_lr = meta["base_learning_rate"] if meta["base_learning_rate"] is not None else base_lr
        source.skip(position)
        resumed = True
    if key is not None:  # the checkpoint's key data (the same as key's unless the caller changed it), as key's kind
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        key = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key)) if typed else key_data

    def lr_now():
        return None if base_lr is None else base_lr * lr_scale

    def save(at_step):
        if store is not None and at_step not in store.all_steps():
            store.save(
                at_step,
                params,
                opt_state,
                {"carry": carry, "key": key_data},
                {
                    "data_position": position,
                    "lr_scale": lr_scale,
                    "base_learning_rate": base_lr,
                    "metadata": metadata,
                },
            )

    # The restore point: the state at the last checkpoint boundary (what is on disk), or the initial state.
    good = (step, params, opt_state, carry)
    history = History()
    writer = MetricsWriter(metrics_path, append=resumed)
    line = ProgressLine(steps, step, progress)
    faults = 0
    start = time.perf_counter()
    first_done = None  # (time, step) after the first (compiling) step: the throughput's origin

    def emit(record, message=None):
        history.append(record)
        writer.write(record)
        if message:
            line.log(message)

    def evaluate():
        emit({"step": step, "eval": to_json(eval_fn(params))}, None)
        line.log(f"step {step}: eval " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in history[-1]["eval"].items()))

    try:
        while step < steps:
            try:
                batch = source.get(position)
            except StopIteration:
                emit({"step": step, "stop": f"batches exhausted after {position} batches"}, f"step {step}: batches exhausted")
                break
            new_params, new_opt_state, metrics, new_carry, params_finite = run_step(
                params, opt_state, place(batch), carry, key, np.int32(position)
            )
            loss, grad_norm, clipped, finite, params_finite = jax.device_get(
                (metrics.loss, metrics.grad_norm, metrics.clipped, metrics.finite, params_finite)
            )
            position += 1
            if not (finite and params_finite):
                faults += 1
                kind = (
                    "non-finite loss"
                    if not np.isfinite(loss)
                    else "non-finite gradient"
                    if not finite
                    else "non-finite parameters after the update"
                )
                attempted, old_lr = step + 1, lr_now()
                lr_scale *= lr_decay_on_fault
                step, params, opt_state, carry = good
                if old_lr is not None and lr_decay_on_fault != 1.0:
                    opt_state = with_learning_rate(opt_state, lr_now())
                    action = f"restored step {step}, lr {old_lr:.4g} -> {lr_now():.4g}"
                else:
                    action = f"restored step {step}, lr unchanged"
                history.roll_back(step)
                record = {
                    "step": attempted,
                    "batch": position - 1,
                    "fault": kind,
                    "action": action,
                    "loss": float(loss),
                    "grad_norm": float(grad_norm),
                }
                emit(record, f"step {attempted} (batch {position - 1}): {kind}; {action}")
                if faults > max_faults:
                    saved = store is not None and step in store.all_steps()
                    where = f"; the last good state, step {step}, is in {store.directory!r}" if saved else ""
                    listing = "; ".join(f"step {r['step']}: {r['fault']}" for r in history.faults())
                    raise FaultLimitError(f"fit: {faults} faults, more than max_faults={max_faults} ({listing}){where}")
                continue
            params, opt_state, carry = new_params, new_opt_state, new_carry
            step += 1
            now = time.perf_counter()
            record = {
                "step": step,
                "batch": position - 1,
                "loss": float(loss),
                "grad_norm": float(grad_norm),
                "clipped": bool(clipped),
                "lr": lr_now(),
                "time": now - start,
            }
            rate = None
            if first_done is None:
                first_done = (now, step)
            elif tokens_per_batch is not None:
                rate = tokens_per_batch * (step - first_done[1]) / max(now - first_done[0], 1e-9)
                record["tokens_per_second"] = rate
            emit(record)
            line.update(step, describe(record, loss_is_nll=loss_is_nll, tokens_per_second=rate))
            if eval_fn is not None and eval_every is not None and step % eval_every == 0 and step != steps:
                evaluate()
            if step % checkpoint_every == 0:
                save(step)
                good = (step, params, opt_state, carry)
        if eval_fn is not None and (not history.evals() or history.evals()[-1]["step"] != step):
            evaluate()
        save(step)
    finally:
        line.close()
        writer.close()
        if store is not None:
            store.close()
    return params, history
