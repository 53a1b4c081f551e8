"""What a training run shows and writes: the progress line, JSON-lines metrics, the loss-curve figure.

* :func:`describe` formats a step record as the progress line's text:
  ``loss 1.234  ppl 3.43  |g| 0.81 (clipped)  12.3k tok/s`` (the perplexity
  only for a per-token negative log-likelihood, ``loss_is_nll=True``; the
  throughput only when the tokens per batch are known).
* :class:`ProgressLine` shows it with rich, on a terminal only (``enabled=None``).
* :class:`MetricsWriter` appends every history record to a JSON-lines file.
* :func:`plot_history` draws the loss curve (matplotlib is imported inside
  it, so that ``import jaxrnn`` does not load matplotlib).

Example:
  >>> params, history = fit(..., metrics_path="run/metrics.jsonl", loss_is_nll=True, tokens_per_batch=32 * 128)
  >>> plot_history(history, "run/loss.png")
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

__all__ = ["History", "MetricsWriter", "ProgressLine", "describe", "plot_history"]


class History(list):
    """The records of a training run, in the order they happened (a ``list`` of JSON-serialisable dicts).

    Record kinds (every record has ``"step"``):

    * a step: ``{"step", "batch", "loss", "grad_norm", "clipped", "lr", "time"}``
      (``grad_norm`` measured before clipping; ``lr`` the learning rate used,
      where the optimiser has one; ``batch`` the data position the step
      read); ``"rolled_back": True`` is added when a later fault restored an
      earlier state, so that the step is not on the final trajectory;
    * a fault: ``{"step", "batch", "fault", "action", "loss", "grad_norm"}``;
    * a validation: ``{"step", "eval": {...}}``;
    * an end of data: ``{"step", "stop": "batches exhausted after N batches"}``.
    """

    def steps(self) -> List[Dict[str, Any]]:
        """The step records on the final trajectory (rolled-back ones excluded), one per step."""
        return [r for r in self if "loss" in r and "fault" not in r and not r.get("rolled_back")]

    def faults(self) -> List[Dict[str, Any]]:
        """The fault records."""
        return [r for r in self if "fault" in r]

    def evals(self) -> List[Dict[str, Any]]:
        """The validation records on the final trajectory."""
        return [r for r in self if "eval" in r and not r.get("rolled_back")]

    def losses(self) -> np.ndarray:
        """``(n,)`` float64: the loss of each step on the final trajectory."""
        return np.asarray([r["loss"] for r in self.steps()], np.float64)

    def roll_back(self, step: int) -> None:
        """Mark the step and validation records after ``step`` as rolled back."""
        for r in self:
            if r["step"] > step and "fault" not in r and "stop" not in r:
                r["rolled_back"] = True


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def describe(record: Dict[str, Any], *, loss_is_nll: bool = False, tokens_per_second: Optional[float] = None) -> str:
    """The progress text of a step record: loss, perplexity (``loss_is_nll``), gradient norm, throughput.

    Example:
      >>> describe({"loss": 1.0, "grad_norm": 2.0, "clipped": True}, loss_is_nll=True, tokens_per_second=1500)
      'loss 1.0000  ppl 2.718  |g| 2 (clipped)  1.5k tok/s'
    """
    parts = [f"loss {record['loss']:.4f}"]
    if loss_is_nll:
        parts.append(f"ppl {math.exp(min(record['loss'], 700.0)):.4g}")
    if "grad_norm" in record:
        parts.append(f"|g| {record['grad_norm']:.3g}{' (clipped)' if record.get('clipped') else ''}")
    if tokens_per_second is not None:
        parts.append(f"{_si(tokens_per_second)} tok/s")
    return "  ".join(parts)


class ProgressLine:
    """A rich progress bar with the latest step's text; silent when disabled.

    Args:
      total: the number of steps of the run.
      start: the step the run starts from (a resumed run).
      enabled: ``True``/``False``; ``None``: on exactly when stdout is a terminal.
    """

    def __init__(self, total: int, start: int = 0, enabled: Optional[bool] = None):
        self.enabled = sys.stdout.isatty() if enabled is None else bool(enabled)
        self.progress = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415  (rich only for a terminal)

            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn()
            )
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)

    def log(self, message: str) -> None:
        """Print a line above the bar (faults, validations)."""
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class MetricsWriter:
    """Append records as JSON lines to ``path`` (``None``: write nothing).

    Args:
      path: the file; its directory is created.
      append: keep what the file holds (a resumed run) instead of starting it afresh.
    """

    def __init__(self, path, append: bool = False):
        self.file = None
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"metrics_path: expected a path (str or os.PathLike), got {type(path).__name__}")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115  (closed by close())

    def write(self, record: Dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def plot_history(history: Iterable[Dict[str, Any]], path, *, title: Optional[str] = None, loss_is_nll: bool = False):
    """Draw the loss curve of ``history`` (from :func:`jaxrnn.train.fit`) and save it to ``path``.

    The training loss of each step on the final trajectory (rolled-back steps
    faint), every validation metric, and a dashed vertical line at each fault.

    Args:
      history: the records (a :class:`History` or a list of dicts, e.g. read back from ``metrics_path``).
      path: the image file (its suffix picks the format: ``.png``, ``.pdf``, ``.svg``).
      title: the figure's title.
      loss_is_nll: label the axis as a per-token negative log-likelihood.

    Returns:
      ``path``.

    Example:
      >>> plot_history(history, "loss.png")
    """
    from matplotlib.figure import Figure  # noqa: PLC0415  (matplotlib only when a figure is drawn)

    history = History(history)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    steps = history.steps()
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", lw=1)
    gone = [r for r in history if "loss" in r and "fault" not in r and r.get("rolled_back")]
    if gone:
        ax.plot([r["step"] for r in gone], [r["loss"] for r in gone], ".", alpha=0.3, label="rolled back")
    names = sorted({k for r in history.evals() for k in r["eval"]})
    for name in names:
        rows = [r for r in history.evals() if name in r["eval"]]
        ax.plot([r["step"] for r in rows], [r["eval"][name] for r in rows], "o-", ms=3, label=f"eval {name}")
    for i, r in enumerate(history.faults()):
        ax.axvline(r["step"], color="red", ls="--", lw=0.8, label="fault" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)" if loss_is_nll else "loss")
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return path
