"""``jaxrnn experiment interpret``: which units of a character LSTM track quotes, line position and indentation.

The lectures (Karpathy, Johnson & Fei-Fei 2015, "Visualizing and
understanding recurrent networks"): some cells of a character LSTM trained
on source code or prose turn on inside quotes, count the position in the
line, or follow the indentation, while most cells are not interpretable.

Here a one-layer character LSTM language model
(:class:`jaxrnn.models.LanguageModel`) learns a text split 90/10 by
position: ``text = "source"``, jaxrnn's own Python source (every ``.py``
file of the installed package, sorted by path; nothing is downloaded), or
``"corpus"``, the embedded prose :data:`jaxrnn.data.DEFAULT_TEXT`, or the
path of a text file (``interpret.run(dict(CONFIGS["full"], text=path), 0,
out)``). Then
every unit's cell state ``c_t`` (the LSTM's memory) is recorded over the
whole validation split, read from its start with a zero state, and
correlated (Pearson) with three features of the text, each defined by what
has been read up to and including character ``t`` (what a unit can know):

* ``in_quotes``: 1 inside a string literal (:func:`inside_quotes`: Python
  rules for source, ``"``-pairs for prose), the opening quote included and the
  closing one excluded;
* ``line_position``: characters read since the last newline (0 on it);
* ``indentation``: leading spaces read so far on the current line.

For each feature the unit with the largest ``|r|`` is reported with ``r``,
next to the same measurement on the untrained network (a control: a random
LSTM already correlates with some features) and a coloured-text heatmap of
that unit's standardised cell state (:func:`standardise`: red above the
unit's mean over the validation text, blue below; Karpathy's colours, but
a unit that saturates, ``|c| >> 1``, would be one colour in ``tanh(c)``) over
an excerpt of the validation text, as ``interpret.html`` and
``interpret.png``. A unit counts as interpretable when its largest ``|r|``
with any feature reaches ``threshold``; the others are reported as such.

Results: ``results["features"][name] = {"unit", "r", "untrained_r",
"constant"}`` (``constant``: the feature does not vary on this text, so no
correlation is defined), ``results["interpretable_units"]``,
``results["not_interpretable_units"]``, ``results["units"]`` (``H``),
``results["threshold"]``, ``results["max_abs_r"]`` (per unit),
``results["losses"]``, ``results["val_loss"]``.
"""

from __future__ import annotations

import html
import os
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.cells import LSTM
from jaxrnn.data import Vocab, sample_windows, train_val_split
from jaxrnn.embedded import lookup
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import Outcome, format_table, load_text, text_record, state_trajectory, train_loop
from jaxrnn.models import lm
from jaxrnn.train import make_train_step

__all__ = [
    "CONFIGS",
    "FEATURES",
    "best_unit",
    "cell_states",
    "column",
    "feature_arrays",
    "heatmap_html",
    "indentation",
    "inside_quotes",
    "load_text",
    "run",
    "standardise",
    "unit_correlations",
]

CONFIGS = {
    "small": {"text": "source", "max_chars": 20000, "hidden_size": 16, "embed_size": 16, "window": 32,
              "batch_size": 8, "steps": 10, "learning_rate": 0.003, "max_grad_norm": 1.0, "threshold": 0.5,
              "excerpt_lines": 12, "excerpt_cols": 60},
    "full": {"text": "source", "max_chars": 0, "hidden_size": 256, "embed_size": 32, "window": 128,
             "batch_size": 32, "steps": 2500, "learning_rate": 0.003, "max_grad_norm": 1.0, "threshold": 0.5,
             "excerpt_lines": 30, "excerpt_cols": 80},
}  # fmt: skip
#: Feature name -> description.
FEATURES = {
    "in_quotes": "inside a string literal",
    "line_position": "characters since the last newline",
    "indentation": "leading spaces of the current line",
}


# --------------------------------------------------------------------------
# The text and its features
# --------------------------------------------------------------------------
def inside_quotes(text: str, python: bool = True) -> np.ndarray:
    """``(len(text),)`` 0/1: whether character ``t`` leaves the reader inside a string literal.

    ``python=True``: ``'``, ``"`` and their triple forms, backslash escapes,
    and ``#`` comments (quotes in a comment open nothing). ``python=False``:
    only ``"`` pairs (apostrophes in prose are not quotes). The opening quote
    is inside (after reading it the reader is in the string), the closing one
    is not.

    Example:
      >>> inside_quotes('a = "b\\\\"c" # "').tolist()
      [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    """
    out = np.zeros(len(text), np.int8)
    quotes = ("'", '"') if python else ('"',)
    delim, comment, i = None, False, 0
    while i < len(text):
        ch = text[i]
        if delim is not None:
            if ch == "\\":
                out[i : i + 2] = 1
                i += 2
                continue
            if text.startswith(delim, i):
                i += len(delim)  # closing delimiter: outside again
                delim = None
                continue
            out[i] = 1
        elif comment:
            comment = ch != "\n"
        elif python and ch == "#":
            comment = True
        elif ch in quotes:
            delim = ch * 3 if python and text.startswith(ch * 3, i) else ch
            out[i : i + len(delim)] = 1
            i += len(delim)
            continue
        i += 1
    return out


def column(text: str) -> np.ndarray:
    """``(len(text),)``: characters read since the last newline (0 at a newline).

    Example:
      >>> column("ab\\ncd").tolist()
      [1, 2, 0, 1, 2]
    """
    out, col = np.zeros(len(text), np.int32), 0
    for i, ch in enumerate(text):
        col = 0 if ch == "\n" else col + 1
        out[i] = col
    return out


def indentation(text: str) -> np.ndarray:
    """``(len(text),)``: leading spaces read so far on the current line (0 at a newline).

    Example:
      >>> indentation("a\\n  b c\\n ").tolist()
      [0, 0, 1, 2, 2, 2, 2, 0, 1]
    """
    out, indent, leading = np.zeros(len(text), np.int32), 0, True
    for i, ch in enumerate(text):
        if ch == "\n":
            indent, leading = 0, True
        elif leading and ch == " ":
            indent += 1
        else:
            leading = False
        out[i] = indent
    return out


def feature_arrays(text: str, python: bool = True, start: int = 0) -> Dict[str, np.ndarray]:
    """Every feature of :data:`FEATURES` over ``text[start:]``, each ``(len(text) - start,)`` float64.

    The features are computed on the whole ``text`` and then cut, so that a
    part that starts inside a string literal or a line gets its true values
    (computed on ``text[start:]`` alone, every later quote would pair the
    wrong way round).
    """
    return {"in_quotes": inside_quotes(text, python)[start:].astype(np.float64),
            "line_position": column(text)[start:].astype(np.float64),
            "indentation": indentation(text)[start:].astype(np.float64)}  # fmt: skip


def unit_correlations(units: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """``(H,)`` Pearson correlation of each column of ``units`` ``(T, H)`` with ``feature`` ``(T,)``.

    A constant unit gets 0; a constant feature gets NaN everywhere (no correlation is defined).
    """
    units, feature = np.asarray(units, np.float64), np.asarray(feature, np.float64)
    if units.ndim != 2 or feature.shape != units.shape[:1]:
        raise ValueError(f"units, feature: expected shapes (T, H) and (T,), got {units.shape} and {feature.shape}")
    du, df = units - units.mean(0), feature - feature.mean()
    norm_f = np.sqrt(df @ df)
    if norm_f == 0:
        return np.full(units.shape[1], np.nan)
    norm_u = np.sqrt(np.einsum("th,th->h", du, du))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (df @ du) / (norm_u * norm_f)
    return np.where(norm_u > 0, r, 0.0)


def best_unit(units: np.ndarray, feature: np.ndarray):
    """``(unit, r)``: the column of ``units`` ``(T, H)`` with the largest ``|r|`` against ``feature``; ``(None, None)``
    when the feature is constant."""
    r = unit_correlations(units, feature)
    if np.all(np.isnan(r)):
        return None, None
    unit = int(np.nanargmax(np.abs(r)))
    return unit, float(r[unit])


# --------------------------------------------------------------------------
# The model's units
# --------------------------------------------------------------------------
def cell_states(model: lm.LanguageModel, params: lm.LMParams, token_ids) -> np.ndarray:
    """``(T, H)``: the (single-layer LSTM) model's cell state ``c_t`` after each of ``token_ids`` ``(T,)``, from zero."""
    embedded = lookup(params.embed, jnp.asarray(token_ids)[None])
    (_, c), _ = state_trajectory(model.cell, params.rnn[0].fwd, embedded)
    return np.asarray(c[:, 0], np.float64)


def standardise(values, reference=None) -> np.ndarray:
    """``(values - mean) / (2 std)`` of ``reference`` (``values`` by default), clipped to [-1, 1]; zeros if constant."""
    values = np.asarray(values, np.float64)
    reference = values if reference is None else np.asarray(reference, np.float64)
    std = reference.std()
    if std == 0:
        return np.zeros_like(values)
    return np.clip((values - reference.mean()) / (2 * std), -1.0, 1.0)


def _colour(v: float) -> str:
    """Karpathy's map: red for positive, blue for negative, white at 0 (``v`` in [-1, 1])."""
    v = float(np.clip(v, -1.0, 1.0))
    fade = int(round(255 * (1 - abs(v))))
    return f"rgb(255,{fade},{fade})" if v >= 0 else f"rgb({fade},{fade},255)"


def heatmap_html(text: str, values) -> str:
    """``text`` as an HTML ``<pre>`` with each character's background coloured by ``values`` (in [-1, 1])."""
    spans = []
    for ch, v in zip(text, values):
        shown = "⏎\n" if ch == "\n" else html.escape(ch)
        spans.append(f'<span style="background:{_colour(v)}" title="{float(v):+.3f}">{shown}</span>')
    return '<pre style="font-size:12px;line-height:1.3">' + "".join(spans) + "</pre>"


def _excerpt(text: str, lines: int):
    """Start and end offsets of ``lines`` whole lines of ``text``, from its first line start."""
    start = text.find("\n") + 1 if "\n" in text else 0
    end = start
    for _ in range(lines):
        nxt = text.find("\n", end)
        if nxt < 0:
            return start, len(text)
        end = nxt + 1
    return start, end


# --------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------
def run(cfg: dict, seed: int, out: str) -> Outcome:
    text = load_text(cfg["text"], cfg["max_chars"])
    python = cfg["text"] == "source" or str(cfg["text"]).endswith(".py")  # Python's quotes, else prose's
    vocab = Vocab.from_text(text)
    train_ids, val_ids = train_val_split(vocab.encode(text))
    split = len(text) - val_ids.size
    val_text = text[split:]
    model = lm.LanguageModel(vocab.size, LSTM(cfg["hidden_size"]), embed_size=cfg["embed_size"])
    init = model.init(jax.random.key(seed))
    step = make_train_step(lambda p, b: lm.loss(model, p, b), optax.adam(cfg["learning_rate"]),
                           max_grad_norm=cfg["max_grad_norm"])  # fmt: skip
    data_key, train_dev = jax.random.fold_in(jax.random.key(seed), 1), jnp.asarray(train_ids)
    batch_at = lambda k: sample_windows(jax.random.fold_in(data_key, k), train_dev, cfg["batch_size"], cfg["window"] + 1)  # noqa: E731
    record = train_loop(step, init, batch_at, cfg["steps"])
    val_loss = lm.evaluate(model, record.params, val_ids, window=256).nll

    features = feature_arrays(text, python, start=split)
    trained, untrained = cell_states(model, record.params, val_ids), cell_states(model, init, val_ids)
    H, thr = cfg["hidden_size"], cfg["threshold"]
    corr = {name: unit_correlations(trained, f) for name, f in features.items()}
    max_abs = np.nan_to_num(np.abs(np.stack(list(corr.values()))), nan=0.0).max(axis=0)  # a constant feature: r = 0
    results = {"text": text_record(cfg["text"], text), "train_chars": int(train_ids.size), "val_chars": int(val_ids.size),
               "units": H, "threshold": thr, "losses": record.losses.tolist(),
               "final_loss": float(np.mean(record.losses[-10:])), "val_loss": float(val_loss), "features": {},
               "max_abs_r": max_abs.tolist(), "interpretable_units": int(np.sum(max_abs >= thr)),
               "not_interpretable_units": int(np.sum(max_abs < thr))}  # fmt: skip
    rows = []
    for name, feature in features.items():
        unit, r = best_unit(trained, feature)
        constant = unit is None
        entry = {"description": FEATURES[name], "constant": constant, "unit": unit, "r": r,
                 "untrained_r": best_unit(untrained, feature)[1]}  # fmt: skip
        results["features"][name] = entry
        rows.append([FEATURES[name], "-" if constant else unit, "constant" if constant else f"{entry['r']:+.3f}",
                     "-" if constant else f"{entry['untrained_r']:+.3f}"])  # fmt: skip
    rows.append([f"units with max |r| >= {thr:g}", f"{results['interpretable_units']} of {H}", "", ""])

    start, end = _excerpt(val_text, cfg["excerpt_lines"])
    shown = {name: e for name, e in results["features"].items() if not e["constant"]}
    figures = [_write_html(out, val_text[start:end], trained[start:end], trained, shown, results),
               _write_png(out, val_text[start:end], trained[start:end], trained, shown, cfg)]  # fmt: skip
    header = ["feature", "best unit", "r (trained)", "best r (untrained)"]
    return Outcome(results, figures, format_table(header, rows))


def _write_html(out, excerpt, states, reference, shown, results) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>jaxrnn: interpretable LSTM cells</title>",
             f"<h1>Cells of a character LSTM (H = {results['units']}), validation text</h1>",
             f"<p>{results['interpretable_units']} of {results['units']} units reach |r| &ge; "
             f"{results['threshold']:g} with one of the features; the other "
             f"{results['not_interpretable_units']} are not interpretable by them. Colour: the unit's cell state "
             "standardised over the validation text, (c - mean) / (2 std), red above its mean, blue below.</p>"]  # fmt: skip
    for name, e in shown.items():
        parts.append(f"<h2>{html.escape(FEATURES[name])}: unit {e['unit']}, r = {e['r']:+.3f} "
                     f"(untrained best {e['untrained_r']:+.3f})</h2>")  # fmt: skip
        parts.append(heatmap_html(excerpt, standardise(states[:, e["unit"]], reference[:, e["unit"]])))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "interpret.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _write_png(out, excerpt, states, reference, shown, cfg) -> str:
    lines = excerpt.split("\n")[: cfg["excerpt_lines"]]
    cols = cfg["excerpt_cols"]
    n = max(len(shown), 1)
    fig, axes = plots.panels(1, n, width=cols * 0.11, height=len(lines) * 0.2 + 0.6,
                             title="Character LSTM cells ((c - mean) / (2 std); red above the mean, blue below)")  # fmt: skip
    for ax, (name, e) in zip(axes[:, 0], shown.items()):
        grid, values = np.full((len(lines), cols), np.nan), standardise(states[:, e["unit"]], reference[:, e["unit"]])
        offset = 0
        for row, line in enumerate(lines):
            for col, ch in enumerate(line[:cols]):
                grid[row, col] = values[offset + col]
                if not ch.isspace():
                    ax.text(col, row, ch, ha="center", va="center", fontsize=6, family=["DejaVu Sans Mono", "DejaVu Sans"])
            offset += len(line) + 1
        ax.imshow(grid, cmap="bwr", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{FEATURES[name]}: unit {e['unit']}, r = {e['r']:+.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return plots.write_png(fig, out, "interpret")
