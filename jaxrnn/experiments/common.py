"""What every experiment shares: the training loop, a small sequence model, the pass rule, tables, the record.

* :func:`train_loop` — :func:`jaxrnn.train.make_train_step`'s step in a
  Python loop that records the loss, the gradient norm before clipping and
  whether the step was clipped, and keeps the parameters at chosen steps
  (the one training loop of :mod:`jaxrnn.experiments`).
* :func:`init_model` / :func:`model_logits` — a cell read out by a linear
  layer at every step (one-hot tokens in): the model of every task here.
* :func:`longest_passing` — the rule behind ``max_distance`` and ``max_n``.
* :func:`load_text` — the texts the language-model experiments learn.
* :func:`environment`, :func:`format_table`, :class:`Outcome`.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxrnn
from jaxrnn.cells import expand_bias
from jaxrnn.checks import check_index
from jaxrnn.data import DEFAULT_TEXT
from jaxrnn.runner import rnn
from jaxrnn.tasks import adding
from jaxrnn.train import TrainStep

__all__ = [
    "ModelParams",
    "adding_batches",
    "adding_loss",
    "Outcome",
    "TrainRecord",
    "environment",
    "format_table",
    "init_model",
    "load_text",
    "text_record",
    "longest_passing",
    "model_logits",
    "one_hot",
    "state_trajectory",
    "train_loop",
]


class Outcome(NamedTuple):
    """What an experiment's ``run`` returns: ``results`` (JSON-ready), the figure paths and the printed table."""

    results: Dict[str, Any]
    figures: Sequence[str]
    table: str


# --------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------
class TrainRecord(NamedTuple):
    """What :func:`train_loop` measured, one entry per step.

    Attributes:
      params: the parameters after the last step.
      losses: ``(S,)`` loss at the parameters each step started from.
      grad_norms: ``(S,)`` global gradient norm before clipping.
      clipped: ``(S,)`` bool, whether the step was clipped.
      kept: ``{step: params}``, the parameters step ``step`` started from,
        for each step of ``keep_params_at``.
    """

    params: Any
    losses: np.ndarray
    grad_norms: np.ndarray
    clipped: np.ndarray
    kept: Dict[int, Any]


def train_loop(
    step: TrainStep, params, batch_at: Callable[[int], Any], num_steps: int, *, keep_params_at: Sequence[int] = ()
) -> TrainRecord:
    """Run ``num_steps`` steps of ``step`` (a :func:`jaxrnn.train.make_train_step`) on ``batch_at(k)``.

    Steps whose loss or gradient is not finite are not applied (the step
    itself guarantees it); they are recorded like the others.
    """
    num_steps = check_index(num_steps, "num_steps", minimum=0)
    opt_state = step.init(params)
    keep = set(int(k) for k in keep_params_at)
    kept, metrics = {}, []
    for k in range(num_steps):
        if k in keep:
            kept[k] = params
        params, opt_state, m = step(params, opt_state, batch_at(k))
        metrics.append((m.loss, m.grad_norm, m.clipped))
    losses, norms, clipped = (np.asarray(jax.device_get(v)) for v in zip(*metrics)) if metrics else ([], [], [])
    return TrainRecord(params, np.asarray(losses, np.float64), np.asarray(norms, np.float64), np.asarray(clipped, bool), kept)


# --------------------------------------------------------------------------
# The model: a cell and a linear read-out at every step
# --------------------------------------------------------------------------
class ModelParams(NamedTuple):
    """``cell``: the cell's parameters; ``w`` ``(H, O)`` and ``b`` ``(O,)``: the read-out."""

    cell: Any
    w: jax.Array
    b: jax.Array


def init_model(cell, key, input_size: int, output_size: int) -> ModelParams:
    """The cell's own initialisation and a LeCun-normal read-out with zero bias."""
    k_cell, k_out = jax.random.split(key)
    H = cell.hidden_size
    w = jax.random.normal(k_out, (H, output_size), jnp.float32) / np.sqrt(H)
    return ModelParams(cell.init(k_cell, input_size), w, jnp.zeros((output_size,), jnp.float32))


def one_hot(tokens, num_symbols: int) -> jax.Array:
    """``(B, T)`` int tokens as ``(B, T, num_symbols)`` float32 one-hot inputs."""
    return jax.nn.one_hot(tokens, num_symbols, dtype=jnp.float32)


def model_logits(cell, params: ModelParams, xs, seq_lengths=None, impl="auto") -> jax.Array:
    """``(B, T, O)`` read-out of every step's hidden state (zero hidden state at padded steps)."""
    hs, _ = rnn(cell, params.cell, xs, seq_lengths=seq_lengths, impl=impl)
    logits = hs @ params.w
    return logits + expand_bias(params.b, logits)


@functools.partial(jax.jit, static_argnums=0)
def state_trajectory(cell, params, xs, initial_carry=None):
    """Every step's carry and gate activations of ``cell`` on ``(B, T, I)`` inputs, time-major: ``(carries, acts)``.

    ``carries`` has the carry's structure with leaves ``(T, B, H)`` (an
    LSTM's ``c`` included); ``acts`` are :meth:`jaxrnn.Cell.step_activations`'
    gate activations (LSTM: ``(i, f, g, o)``), each ``(T, B, H)``. No
    padding: every sequence runs for ``T`` steps.
    """
    carry0 = cell.zero_carry(xs.shape[:1]) if initial_carry is None else initial_carry
    xp = jnp.swapaxes(cell.input_projection(params, xs), 0, 1)

    def body(carry, xp_t):
        new, _, acts = cell.step_activations(params, carry, xp_t)
        return new, (new, acts)

    return lax.scan(body, carry0, xp)[1]


def adding_loss(cell, params: ModelParams, batch) -> jax.Array:
    """Mean squared error of the last step's first read-out against the adding problem's sum; ``batch = (inputs, targets)``."""
    inputs, targets = batch
    prediction = model_logits(cell, params, inputs)[:, -1, 0]
    return jnp.mean(jnp.square(prediction - targets))


def adding_batches(batch_size: int, seq_len: int, seed: int) -> Callable[[int], Any]:
    """``batch_at(k)``: the ``k``-th training batch ``(inputs, targets)`` of :func:`jaxrnn.tasks.adding`."""

    def batch_at(k):
        b = adding(batch_size, seq_len, seed=seed * 7919 + k)
        return b.inputs, b.targets

    return batch_at


# --------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------
def text_record(name: str, text: str) -> Dict[str, Any]:
    """What a result needs to name its text: the name, the length and the SHA-256 of the UTF-8 bytes (``"source"``
    changes with every edit of jaxrnn's code)."""
    return {"name": name, "chars": len(text), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def load_text(name: str, max_chars=None) -> str:
    """``"source"``: jaxrnn's ``.py`` files joined in path order; ``"corpus"``: the embedded prose; otherwise
    the path of a UTF-8 text file. The first ``max_chars`` characters (all with ``None`` or 0)."""
    if name == "source":
        root = Path(jaxrnn.__file__).parent
        text = "".join(path.read_text(encoding="utf-8") for path in sorted(root.rglob("*.py")))
    elif name == "corpus":
        text = DEFAULT_TEXT
    elif isinstance(name, str) and Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        raise ValueError(f"text: expected 'source', 'corpus' or the path of a text file, got {name!r}")
    return text[:max_chars] if max_chars else text


# --------------------------------------------------------------------------
# The pass rule
# --------------------------------------------------------------------------
def longest_passing(keys: Sequence[int], scores: Sequence[float], threshold: float) -> int:
    """The largest ``key`` whose score is ``>= threshold`` with every smaller key passing too; 0 if the first fails.

    ``keys`` must be increasing (distances ``ℓ``, lengths ``n``). This is the
    rule of ``max_distance`` (accuracy against the set accuracy) and of
    ``max_n`` (1 for a string predicted correctly, threshold 1).

    Example:
      >>> longest_passing([1, 2, 4, 8], [1.0, 0.95, 0.6, 0.97], 0.9)
      2
    """
    keys = [int(k) for k in keys]
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise ValueError(f"keys: expected increasing values, got {keys}")
    if len(scores) != len(keys):
        raise ValueError(f"scores: expected {len(keys)} values (one per key), got {len(scores)}")
    best = 0
    for key, score in zip(keys, scores):
        if not score >= threshold:  # NaN fails
            break
        best = key
    return best


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table: first column left-aligned, the others right-aligned."""
    cells = [[str(v) for v in row] for row in (header, *rows)]
    widths = [max(map(len, col)) for col in zip(*cells)]
    fmt = [lambda s, w=w, k=k: s.ljust(w) if k == 0 else s.rjust(w) for k, w in enumerate(widths)]
    lines = ["  ".join(f(s) for f, s in zip(fmt, row)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def environment() -> Mapping[str, Any]:
    """The device and the versions a result was computed with (the record's ``device`` and ``versions``)."""
    device = jax.devices()[0]
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("jaxrnn", "jax", "jaxlib", "optax", "numpy", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": f"{device.platform}: {device.device_kind}", "versions": versions}
