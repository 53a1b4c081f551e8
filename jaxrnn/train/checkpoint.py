"""Checkpoints of a training run, written with orbax-checkpoint.

A checkpoint directory is an :class:`orbax.checkpoint.CheckpointManager`
directory: one sub-directory per saved step, the oldest deleted beyond
``max_to_keep``. Orbax writes each step into a temporary directory
(``<step>.orbax-checkpoint-tmp-*``) and renames it when complete, so a run
killed mid-save leaves the previous steps loadable and the partial directory
is never listed as a step (it is removed when the directory is next opened
for a run). Each step holds four items:

* ``params``: the parameters (any pytree of arrays);
* ``opt_state``: the optimiser state;
* ``state``: the rest of the run's array state: the truncated-BPTT carry and
  the PRNG key data, where the run has them;
* ``meta``: JSON: the step, the data position (batches drawn so far), the
  learning-rate scale after faults and the base learning rate, the PRNG
  key's implementation, a description of the parameter and optimiser-state
  trees (paths, shapes, dtypes, used to refuse a checkpoint of another
  model with a clear message), and the caller's ``metadata`` dict
  (vocabulary, configuration: what is needed to rebuild the model).

Example:
  >>> params, metadata = load_checkpoint("runs/lm", params_like=model.init(jax.random.key(0)))
  >>> metadata["model"]  # what the training run stored
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

__all__ = ["CheckpointStore", "describe_tree", "load_checkpoint"]

#: Version of the ``meta`` item's layout.
FORMAT = 1
ITEMS = ("params", "opt_state", "state", "meta")


def describe_tree(tree) -> List[list]:
    """``[[path, shape, dtype], ...]`` for every leaf of ``tree`` (JSON-serialisable; ``None`` leaves are skipped)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [[jax.tree_util.keystr(path), list(np.shape(x)), str(getattr(x, "dtype", np.asarray(x).dtype))] for path, x in leaves]


def tree_difference(name: str, saved: List[list], current: List[list]) -> Optional[str]:
    """A sentence saying how two :func:`describe_tree` descriptions differ, or ``None`` if they agree."""
    saved_paths = {p: (s, d) for p, s, d in saved}
    current_paths = {p: (s, d) for p, s, d in current}
    missing = [p for p in saved_paths if p not in current_paths]
    extra = [p for p in current_paths if p not in saved_paths]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"leaves only in the checkpoint: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"leaves only in this run: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        return f"the {name} tree differs ({'; '.join(parts)})"
    for path, (shape, dtype) in saved_paths.items():
        if (shape, dtype) != current_paths[path]:
            here = current_paths[path]
            return f"{name}{path} has shape {tuple(shape)} {dtype} in the checkpoint, {tuple(here[0])} {here[1]} in this run"
    return None


def abstract_like(tree):
    """``tree`` with every array replaced by a ``jax.ShapeDtypeStruct`` of the same shape, dtype and sharding."""

    def spec(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:  # a NumPy array or a ShapeDtypeStruct without one: the default device
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(spec, tree)


def check_directory(checkpoint_dir) -> str:
    """``checkpoint_dir`` as an absolute path string (``str`` or ``os.PathLike``)."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir: expected a path (str or os.PathLike), got {type(checkpoint_dir).__name__}")
    return os.path.abspath(os.fspath(checkpoint_dir))


class CheckpointStore:
    """The checkpoints of one run in ``directory`` (an orbax ``CheckpointManager``, synchronous saves).

    Args:
      directory: the checkpoint directory (created if missing, unless ``read_only``).
      max_to_keep: how many of the latest steps to keep (``None``: all).
      read_only: open an existing directory for loading only.
    """

    def __init__(self, directory, max_to_keep: Optional[int] = 3, read_only: bool = False):
        import orbax.checkpoint as ocp  # noqa: PLC0415  (orbax is heavy; only runs that checkpoint load it)

        self.ocp = ocp
        self.directory = check_directory(directory)
        if read_only and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint_dir: expected an existing checkpoint directory, got {self.directory!r} (no such directory)")
        options = ocp.CheckpointManagerOptions(  # loading opens it writable but saves nothing (read_only only logs warnings)
            max_to_keep=max_to_keep,
            create=not read_only,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> Optional[int]:
        """The latest complete step, or ``None`` when the directory holds none."""
        return self.manager.latest_step()

    def all_steps(self) -> List[int]:
        """Every complete step, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, state: Dict[str, Any], meta: Dict[str, Any]) -> None:
        """Write step ``step`` (blocks until it is complete and renamed into place)."""
        ocp = self.ocp
        meta = dict(meta, format=FORMAT, step=int(step), params_tree=describe_tree(params), opt_state_tree=describe_tree(opt_state))
        items = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
            "meta": ocp.args.JsonSave(meta),
        }
        if jax.tree_util.tree_leaves(state):  # an empty item would only make orbax log warnings
            items["state"] = ocp.args.StandardSave(state)
        self.manager.save(int(step), args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def read_meta(self, step: Optional[int] = None) -> Dict[str, Any]:
        """The ``meta`` item of ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"checkpoint_dir: expected a directory holding checkpoints, got {self.directory!r} (none found)")
        if step not in self.manager.all_steps():
            raise ValueError(f"step: expected one of the saved steps {self.all_steps()} in {self.directory!r}, got {step}")
        return self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore())).meta

    def check_compatible(self, meta: Dict[str, Any], params, opt_state=None, metadata: Optional[dict] = None) -> None:
        """Raise one ``ValueError`` naming ``checkpoint_dir`` if ``meta`` was saved by a different model.

        Compares ``metadata["model"]`` (when this run gives one), then the
        parameter tree (paths, shapes, dtypes), then the optimiser-state tree.
        """
        where = f"checkpoint_dir: the checkpoint at step {meta.get('step')} in {self.directory!r} is of a different model"
        if metadata is not None and "model" in metadata:
            saved = meta.get("metadata", {}).get("model")
            if saved != json.loads(json.dumps(metadata["model"])):
                raise ValueError(f"{where}: metadata['model'] is {saved!r} there, {metadata['model']!r} in this run")
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint_dir: expected checkpoint format {FORMAT}, got {meta.get('format')!r} in {self.directory!r}")
        difference = tree_difference("params", meta["params_tree"], describe_tree(params))
        if difference is None and opt_state is not None:
            difference = tree_difference("opt_state", meta["opt_state_tree"], describe_tree(opt_state))
            if difference is not None:
                where = where.replace("of a different model", "of a different model or optimiser")
        if difference is not None:
            raise ValueError(f"{where}: {difference}")

    def restore(self, step: int, params_like, opt_state_like=None, state_like=None) -> Tuple[Any, Any, Any]:
        """``(params, opt_state, state)`` of ``step``, in the structures, shardings and dtypes of the ``*_like`` trees.

        ``params_like=None`` restores the parameters as orbax saved them
        (nested dicts and lists); the other two are skipped when ``None``.
        """
        ocp = self.ocp
        items = {"params": ocp.args.StandardRestore(None if params_like is None else abstract_like(params_like))}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_like(opt_state_like))
        if state_like is not None and jax.tree_util.tree_leaves(state_like):
            items["state"] = ocp.args.StandardRestore(abstract_like(state_like))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored.state if "state" in items else state_like
        return restored.params, restored.opt_state if opt_state_like is not None else None, state

    def close(self) -> None:
        self.manager.close()


def load_checkpoint(checkpoint_dir, params_like=None, *, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
    """The parameters and ``metadata`` saved by :func:`jaxrnn.train.fit` in ``checkpoint_dir``.

    Args:
      checkpoint_dir: a directory that ``fit(..., checkpoint_dir=...)`` wrote.
      params_like: a parameter tree of the model (or its
        ``jax.eval_shape``): the parameters come back in its pytree types
        (e.g. :class:`jaxrnn.LMParams`), dtypes and shardings, after a check
        that the checkpoint holds this model. ``None``: as orbax stores them
        (nested dicts and lists of arrays; a NamedTuple becomes a dict of
        its fields).
      step: which saved step (default: the latest).

    Returns:
      ``(params, metadata)``: ``metadata`` is the dict given to ``fit`` (``{}`` if none).

    Raises:
      ValueError: no such directory or no checkpoint in it; ``params_like`` of a
        different model (the message names the leaf that differs).

    Example:
      >>> params, metadata = load_checkpoint("runs/lm", params_like=jax.eval_shape(model.init, jax.random.key(0)))
    """
    store = CheckpointStore(checkpoint_dir, max_to_keep=None, read_only=True)
    try:
        meta = store.read_meta(step)
        if params_like is not None:
            store.check_compatible(meta, params_like)
        params, _, _ = store.restore(meta["step"], params_like)
    finally:
        store.close()
    return params, dict(meta.get("metadata", {}))
