"""Figures and tables for vanishing and exploding gradients (``jaxrnn gradients``).

Each ``plot_*`` function takes the data computed by :mod:`jaxrnn.analysis`
(or by the ``*_data`` helpers here), writes one PNG and returns its path.
Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg
canvas, so importing this module never changes pyplot's backend.

Command line::

    jaxrnn gradients [--out DIR] [--figures time lambda training cliff] ...

writes ``gradients_through_time.png``, ``lambda_grid.png``,
``training_profile.png`` and ``cliff.png`` and prints a table for each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

import jaxrnn
from jaxrnn import analysis

__all__ = [
    "cliff_data",
    "gradients_through_time_data",
    "lambda_grid_data",
    "main",
    "plot_cliff",
    "plot_gradients_through_time",
    "plot_lambda_grid",
    "plot_training_profile",
]

FIGURES = ("time", "lambda", "training", "cliff")
_LECTURE_POINTS = ((0.9, 100), (0.95, 50), (0.95, 100), (1.1, 100))


def _figure(width=7.5, height=4.8, **kwargs):
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    cols = [header, *rows]
    widths = [max(len(str(r[k])) for r in cols) for k in range(len(header))]

    def line(row):
        return "  ".join(str(v).rjust(w) if k else str(v).ljust(w) for k, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _sci(x) -> str:
    x = float(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


# --------------------------------------------------------------------------
# (a) gradient magnitude through time, Elman vs LSTM vs GRU
# --------------------------------------------------------------------------
def gradients_through_time_data(
    seq_len: int = 100,
    hidden_size: int = 32,
    input_size: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    threshold: float = 0.01,
    impl: str = "reference",
) -> Dict[str, dict]:
    """Gradient ratios of several cells on the same inputs.

    Every model sees the same ``xs ~ N(0, 1)`` ``(B, T, I)``; the loss is
    :func:`jaxrnn.analysis.sum_of_outputs` at the last step. For each model:
    the batch-mean norms ``‖∂J/∂h_t‖`` turned into ratios
    ``r[ℓ] = ‖∂J/∂h_{T-1-ℓ}‖ / ‖∂J/∂h_{T-1}‖``, the LSTM's cell-state ratio
    ``‖∂J/∂c_{T-1-ℓ}‖ / ‖∂J/∂h_{T-1}‖``, the memory horizon, the spectral
    radius of ``W_hh`` and the tanh saturation.

    Models: Elman (tanh, orthogonal ``W_hh``), LSTM with the default forget
    bias 1 (``f ≈ σ(1) = 0.73`` at initialisation) and with forget bias 3
    (``f ≈ 0.95``, the open highway), GRU with default initialisation and with
    update-gate bias -3 (``u ≈ 0.05``: ``h`` mostly copied).

    Returns:
      label -> dict with ``ratio_h (T,)``, ``ratio_c (T,) or None``,
      ``horizon``, ``radius`` (max over gates), ``saturation`` (``(2,)``:
      fractions with ``tanh'`` below 0.19 and 0.02, averaged over sites).
    """
    H = hidden_size
    k_x, k_p = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(k_x, (batch_size, seq_len, input_size))
    gru = jaxrnn.GRU(H)
    gru_params = gru.init(k_p, input_size)
    models = {
        "Elman (tanh)": (jaxrnn.Elman(H), None),
        "LSTM, forget bias 1": (jaxrnn.LSTM(H), None),
        "LSTM, forget bias 3": (jaxrnn.LSTM(H, forget_bias=3.0), None),
        "GRU": (gru, gru_params),
        "GRU, update bias -3": (gru, gru_params._replace(b=gru_params.b.at[H : 2 * H].set(-3.0))),
    }
    out = {}
    for label, (cell, params) in models.items():
        params = cell.init(k_p, input_size) if params is None else params
        norms = analysis.grad_norms_through_time(cell, params, xs, reduce="mean", impl=impl)
        sat = analysis.tanh_saturation(cell, params, xs)
        ratio_c = None
        if norms.c is not None:
            ratio_c = np.array(jnp.flip(norms.c) / norms.h[-1])
            ratio_c[0] = np.nan  # ∂J/∂c_{T-1} = 0: a last-step loss reads h_T, already computed from c_{T-1}
        out[label] = dict(
            ratio_h=np.asarray(analysis.gradient_ratios(norms.h)),
            ratio_c=ratio_c,
            horizon=int(analysis.memory_horizon(norms.h, threshold)),
            radius=float(np.max(analysis.spectral_radius(cell, params))),
            saturation=np.mean(np.stack([np.asarray(v) for v in sat.overall.values()]), axis=0),
        )
    return out


def plot_gradients_through_time(data: Dict[str, dict], path: str, threshold: float = 0.01, subtitle: str = "") -> str:
    """Figure (a): gradient ratio against distance from the loss, log scale."""
    fig = _figure()
    ax = fig.add_subplot()
    colors = dict(zip(data, ["tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:olive"]))
    for label, d in data.items():
        ell = np.arange(len(d["ratio_h"]))
        ax.semilogy(ell, d["ratio_h"], color=colors[label], lw=2, label=f"{label}: hidden state h")
        if d["ratio_c"] is not None:
            ax.semilogy(ell, d["ratio_c"], color=colors[label], lw=1.3, ls="--", label=f"{label}: cell state c")
    ax.axhline(threshold, color="gray", lw=1, ls=":")
    T = len(next(iter(data.values()))["ratio_h"])
    note = f"{threshold:g} of the gradient: the memory horizon"
    ax.text(T - 1, threshold * 1.4, note, color="gray", fontsize=8, ha="right")
    ax.set_xlabel(r"$\ell$: steps back from the loss at the last step $T$")
    ax.set_ylabel(r"gradient ratio  $\Vert\partial J/\partial h_{T-\ell}\Vert\ /\ \Vert\partial J/\partial h_T\Vert$")
    ax.set_ylim(bottom=max(1e-12, min(np.nanmin(d["ratio_h"][d["ratio_h"] > 0]) for d in data.values()) / 3))
    title = "How much gradient reaches ℓ steps back (same input, freshly initialised cells)"
    ax.set_title(title + subtitle, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower left", ncol=1)
    return _save(fig, path)


# --------------------------------------------------------------------------
# (b) the λ × T grid
# --------------------------------------------------------------------------
def lambda_grid_data(lams: Sequence[float], lengths: Sequence[int], hidden_size: int = 16, seed: int = 0):
    """The theory ``λ^T`` and its measurement on a linear RNN with ``W_hh = λ·Q``.

    Measured with :func:`jaxrnn.analysis.grad_norms_through_time` (loss at the
    last step) on ``Elman(H, activation="linear")`` whose ``W_hh`` is set to
    ``λ`` times one orthogonal ``Q`` (one compilation for all ``λ``).

    Returns:
      ``(theory, measured)``, both ``(len(lams), len(lengths))``.
    """
    lengths = [int(n) for n in lengths]
    T = max(lengths) + 1
    cell = jaxrnn.Elman(hidden_size, activation="linear")
    k_p, k_x = jax.random.split(jax.random.key(seed))
    params = cell.init(k_p, 4)  # orthogonal W_hh = Q (gain 1)
    xs = jax.random.normal(k_x, (T, 4))
    measured = []
    for lam in lams:
        p = params._replace(w_hh=lam * params.w_hh)
        ratios = analysis.gradient_ratios(analysis.grad_norms_through_time(cell, p, xs).h)
        measured.append(np.asarray(ratios)[lengths])
    theory = np.asarray(lams, np.float64)[:, None] ** np.asarray(lengths, np.float64)[None, :]
    return theory, np.stack(measured)


def plot_lambda_grid(path: str, lams: Optional[np.ndarray] = None, lengths: Optional[np.ndarray] = None) -> str:
    """Figure (b): the lecture's interactive λ × T figure as a static heatmap of ``log10 λ^T``."""
    lams = np.linspace(0.8, 1.2, 161) if lams is None else np.asarray(lams)
    lengths = np.arange(1, 201) if lengths is None else np.asarray(lengths)
    logr = lengths[None, :] * np.log10(lams[:, None])
    fig = _figure(7.5, 5.0)
    ax = fig.add_subplot()
    lim = 6.0
    norm = TwoSlopeNorm(0.0, -lim, lim)
    mesh = ax.pcolormesh(lengths, lams, np.clip(logr, -lim, lim), cmap="RdBu_r", norm=norm, shading="auto")
    cbar = fig.colorbar(mesh, ax=ax)
    cbar.set_label(r"$\log_{10}$ of the gradient ratio $\lambda^T$  (blue: vanishes, red: explodes)")
    cs = ax.contour(lengths, lams, logr, levels=[-4, -2, 2, 4], colors="k", linewidths=0.8)
    ax.clabel(cs, fmt={-4: "10⁻⁴", -2: "1%", 2: "100×", 4: "10⁴×"}, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    for lam, T in _LECTURE_POINTS:
        ax.plot(T, lam, "o", color="gold", mec="k", ms=6)
        text = f"${lam}^{{{T}}}$ = {lam**T:.3g}"
        ax.annotate(text, (T, lam), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("T: number of steps the gradient travels back")
    ax.set_ylabel(r"$\lambda$: scale of the orthogonal $W_{hh} = \lambda Q$ (its |eigenvalues|)")
    ax.set_title(
        r"Linear RNN: fraction of the gradient left after $T$ steps, "
        r"$\Vert\partial J/\partial h_{t-T}\Vert / \Vert\partial J/\partial h_t\Vert = \lambda^T$",
        fontsize=10,
    )
    return _save(fig, path)


# --------------------------------------------------------------------------
# (c) the profile while training
# --------------------------------------------------------------------------
def plot_training_profile(run: analysis.TrainingProfile, path: str, label: str = "") -> str:
    """Figure (c): heatmap of ``log10 ‖∂h_T/∂h_{T-ℓ}‖`` over training steps, and the loss."""
    steps = np.asarray(run.steps)
    prof = np.log10(np.maximum(np.asarray(run.profiles)[:, ::-1], 1e-30))  # (K, T), column ℓ
    fig = _figure(9.0, 4.4)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[3, 1.4])
    edges = np.concatenate([steps, [steps[-1] + max(1, steps[-1] - steps[-2] if len(steps) > 1 else 1)]])
    mesh = ax.pcolormesh(edges, np.arange(prof.shape[1] + 1) - 0.5, prof.T, cmap="viridis", shading="flat")
    cbar = fig.colorbar(mesh, ax=ax)
    cbar.set_label(r"$\log_{10} \Vert\partial h_T/\partial h_{T-\ell}\Vert_2$  (largest singular value)")
    ax.set_xlabel("training step (profile recorded at the start of each column)")
    ax.set_ylabel(r"$\ell$: steps back from the last state $h_T$")
    ax.set_title(f"Jacobian profile while training{label}", fontsize=10)
    ax2.plot(np.arange(len(run.losses)), np.asarray(run.losses), color="k")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("training loss (MSE)")
    ax2.set_title(r"task: output $x_0$ at step $T$", fontsize=10)
    ax2.grid(True, alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------
# (d) exploding gradients: the cliff
# --------------------------------------------------------------------------
def cliff_data(num: int = 801, seq_len: int = 50, impl: str = "reference"):
    """The tanh and linear scalar-RNN loss curves of :func:`jaxrnn.analysis.scalar_rnn_cliff`."""
    tanh = analysis.scalar_rnn_cliff(jnp.linspace(0.0, 2.5, num), seq_len=seq_len, impl=impl)
    linear = analysis.scalar_rnn_cliff(
        jnp.linspace(0.5, 1.3, num), activation="linear", bias=0.0, h0=1.0, seq_len=seq_len, impl=impl
    )
    return tanh, linear


def plot_cliff(
    tanh: analysis.CliffCurve, linear: analysis.CliffCurve, path: str, max_norm: float = 1.0, seq_len: int = 50
) -> str:
    """Figure (d): loss against the recurrent weight and the gradient before/after clipping."""
    fig = _figure(9.0, 6.0)
    axes = fig.subplots(2, 2, sharex="col")
    names = [r"tanh: $h_t = \tanh(w\, h_{t-1} - 0.1)$, $h_0 = 0.5$", r"linear: $h_t = w\, h_{t-1}$, $h_0 = 1$"]
    for col, (curve, name) in enumerate(zip((tanh, linear), names)):
        ws, loss, slope = (np.asarray(a) for a in curve)
        top, bottom = axes[0, col], axes[1, col]
        top.plot(ws, loss, color="k")
        top.set_yscale("log" if col == 1 else "linear")
        top.set_ylabel(r"loss $(h_T - 0.5)^2$")
        top.set_title(name, fontsize=10)
        top.grid(True, alpha=0.3)
        bottom.semilogy(ws, np.abs(slope) + 1e-30, color="tab:red", label=r"$|dL/dw|$ (raw gradient)")
        clipped = np.minimum(np.abs(slope), max_norm) + 1e-30
        bottom.semilogy(ws, clipped, color="tab:blue", ls="--", label=f"clipped to norm {max_norm:g}")
        bottom.set_xlabel("recurrent weight w")
        bottom.set_ylabel("gradient magnitude (log scale)")
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=8)
    title = f"Exploding gradients: a one-unit RNN (T = {seq_len}) has a cliff in its loss; clipping bounds the step"
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(message)


def _number(kind, check, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive = _number(float, lambda v: v > 0, "a positive number")
_ratio = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxrnn gradients`` argument parser (errors raise instead of exiting)."""
    p = _Parser(
        prog="jaxrnn gradients",
        description="Vanishing/exploding-gradient figures (PNG) and tables: how much of the gradient "
        "from the last step reaches ℓ steps back, for Elman, LSTM and GRU.",
    )
    add = p.add_argument
    add("--out", default=os.path.join("out", "gradients"), help="output folder (default: out/gradients)")
    add("--figures", nargs="+", choices=FIGURES, default=list(FIGURES), help="which figures (default: all)")
    add("--seq-len", type=_positive_int, default=100, help="T of the through-time figure (default 100)")
    add("--hidden", type=_positive_int, default=32, help="hidden size H (default 32)")
    add("--batch", type=_positive_int, default=8, help="batch size of the through-time figure (default 8)")
    add("--threshold", type=_ratio, default=0.01, help="gradient ratio defining the memory horizon (default 0.01)")
    add("--train-cell", choices=("elman", "lstm", "gru"), default="elman", help="cell of the training figure")
    add("--train-steps", type=_positive_int, default=80, help="optimiser steps of the training figure (default 80)")
    add("--every", type=_positive_int, default=5, help="record the profile every K steps (default 5)")
    add("--train-seq-len", type=_positive_int, default=15, help="T of the training task (default 15)")
    add("--learning-rate", type=_positive, default=1e-2, help="Adam step size of the training figure (default 0.01)")
    add("--max-norm", type=_positive, default=1.0, help="clipping threshold in the cliff figure (default 1)")
    add("--seed", type=int, default=0, help="random seed (default 0)")
    add("--impl", choices=jaxrnn.IMPLS, default="reference", help="runner implementation (default reference)")
    return p


def _horizon(value, available):
    return str(value) if value < available else f">={available}"


def _report_time(args, out):
    T, thr = args.seq_len, args.threshold
    data = gradients_through_time_data(
        T, args.hidden, batch_size=args.batch, seed=args.seed, threshold=thr, impl=args.impl
    )
    subtitle = f"\nH = {args.hidden}, T = {T}, batch {args.batch}"
    path = plot_gradients_through_time(data, os.path.join(out, "gradients_through_time.png"), thr, subtitle)
    ells = [ell for ell in (10, 50, T - 1) if ell < T]
    rows = []
    for label, d in data.items():
        ratios = [_sci(d["ratio_h"][ell]) for ell in ells]
        c = "" if d["ratio_c"] is None else _sci(d["ratio_c"][T - 1])
        sat = [f"{v:.3f}" for v in d["saturation"]]
        rows.append([label, *ratios, c, _horizon(d["horizon"], T), f"{d['radius']:.3f}", *sat])
    header = ["cell", *[f"r(ℓ={ell})" for ell in ells], f"c(ℓ={T - 1})", f"horizon@{thr:g}", "ρ(W_hh)"]
    header += ["tanh'<.19", "tanh'<.02"]
    print(f"(a) gradient ratio r(ℓ) = ‖∂J/∂h_(T-ℓ)‖/‖∂J/∂h_T‖, loss at the last step  [{path}]")
    print(_table(header, rows))


def _report_lambda(args, out):
    lams, lengths = (0.9, 0.95, 1.0, 1.1), (10, 50, 100)
    theory, measured = lambda_grid_data(lams, lengths, seed=args.seed)
    path = plot_lambda_grid(os.path.join(out, "lambda_grid.png"))
    rows = [
        [f"{lam:g}", *[f"{_sci(m)} ({_sci(t)})" for m, t in zip(ms, ts)]] for lam, ms, ts in zip(lams, measured, theory)
    ]
    err = float(np.max(np.abs(measured / theory - 1)))
    print(f"(b) linear RNN, W_hh = λ·Q: measured ratio (theory λ^ℓ), max rel. error {err:.1e}  [{path}]")
    print(_table(["λ", *[f"ℓ={n}" for n in lengths]], rows))


def _report_training(args, out):
    cell = {"elman": jaxrnn.Elman, "lstm": jaxrnn.LSTM, "gru": jaxrnn.GRU}[args.train_cell](args.hidden)
    T = args.train_seq_len
    run = analysis.profile_during_training(
        cell, seq_len=T, num_steps=args.train_steps, every=args.every,
        learning_rate=args.learning_rate, key=jax.random.key(args.seed), impl=args.impl,
    )  # fmt: skip
    name = type(cell).__name__
    label = f": {name}, H = {args.hidden}, T = {T}"
    path = plot_training_profile(run, os.path.join(out, "training_profile.png"), label=label)
    losses = np.asarray(run.losses)
    rows = []
    for step, prof in zip(np.asarray(run.steps), run.profiles):
        loss = losses[min(int(step), len(losses) - 1)]
        horizon = int(analysis.memory_horizon(prof, args.threshold))
        rows.append([str(int(step)), f"{loss:.4f}", _sci(prof[0]), _horizon(horizon, T)])
    print(f"(c) {name} trained to recall x_0 after {T} steps: ‖∂h_T/∂h_0‖ over training  [{path}]")
    print(_table(["step", "loss", "‖∂h_T/∂h_0‖", f"horizon@{args.threshold:g}"], rows))


def _report_cliff(args, out):
    tanh, linear = cliff_data(impl=args.impl)
    path = plot_cliff(tanh, linear, os.path.join(out, "cliff.png"), args.max_norm)
    rows = []
    for name, curve in (("tanh, b = -0.1", tanh), ("linear", linear)):
        slope = np.abs(np.asarray(curve.slope))
        i = int(np.argmax(slope))
        clipped = min(slope[i], args.max_norm)
        rows.append([name, f"{float(curve.ws[i]):.4f}", _sci(slope[i]), _sci(np.median(slope)), _sci(clipped)])
    print(f"(d) one-unit RNN, loss (h_T - 0.5)² against w: steepest point, clipped to {args.max_norm:g}  [{path}]")
    print(_table(["activation", "w", "max |dL/dw|", "median |dL/dw|", "clipped"], rows))


def main(argv=None) -> int:
    """``jaxrnn gradients``: write the figures and print the tables; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as e:
        print(f"jaxrnn gradients: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    start = time.perf_counter()
    reports = {"time": _report_time, "lambda": _report_lambda, "training": _report_training, "cliff": _report_cliff}
    for name in FIGURES:
        if name in args.figures:
            reports[name](args, args.out)
            print()
    print(f"wrote {len(set(args.figures))} figure(s) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
