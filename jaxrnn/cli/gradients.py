"""``jaxrnn gradients``: the vanishing/exploding-gradient figures (PNG) and their tables.

Writes ``gradients_through_time.png``, ``lambda_grid.png``,
``training_profile.png`` and ``cliff.png`` (the figures of
:mod:`jaxrnn.analysis.figures`) and prints a table for each. Every argument
is checked before any work starts (numbers, choices, the ``--out`` folder);
a bad one is one line on stderr and exit status 2.

Example:
  $ jaxrnn gradients --out out/gradients
  $ python -m jaxrnn gradients --figures time cliff --seq-len 200 --hidden 64
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import jax
import numpy as np

from jaxrnn.analysis import figures
from jaxrnn.analysis.gradients import memory_horizon
from jaxrnn.analysis.profile import profile_during_training
from jaxrnn.cells import GRU, LSTM, Elman
from jaxrnn.cli.args import Parser, number, output_dir, parse, positive_float, positive_int, ratio
from jaxrnn.runner import IMPLS

__all__ = ["FIGURES", "build_parser", "main"]

FIGURES = ("time", "lambda", "training", "cliff")
CELLS = {"elman": Elman, "lstm": LSTM, "gru": GRU}
seed = number(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")


def build_parser() -> Parser:
    """The ``jaxrnn gradients`` argument parser (errors raise :class:`jaxrnn.cli.args.UsageError`)."""
    p = Parser(
        prog="jaxrnn gradients",
        description="Vanishing/exploding-gradient figures (PNG) and tables: how much of the gradient "
        "from the last step reaches ℓ steps back, for Elman, LSTM and GRU.",
    )
    add = p.add_argument
    add("--out", type=output_dir, default=os.path.join("out", "gradients"), metavar="DIR",
        help="output folder (default: out/gradients)")  # fmt: skip
    add("--figures", nargs="+", choices=FIGURES, default=list(FIGURES), help="which figures (default: all)")
    add("--seq-len", type=positive_int, default=100, help="T of the through-time figure (default 100)")
    add("--hidden", type=positive_int, default=32, help="hidden size H (default 32)")
    add("--batch", type=positive_int, default=8, help="batch size of the through-time figure (default 8)")
    add("--threshold", type=ratio, default=0.01, help="gradient ratio defining the memory horizon (default 0.01)")
    add("--train-cell", choices=tuple(CELLS), default="elman", help="cell of the training figure")
    add("--train-steps", type=positive_int, default=80, help="optimiser steps of the training figure (default 80)")
    add("--every", type=positive_int, default=5, help="record the profile every K steps (default 5)")
    add("--train-seq-len", type=positive_int, default=15, help="T of the training task (default 15)")
    add("--learning-rate", type=positive_float, default=1e-2, help="Adam step size of the training figure (default 0.01)")
    add("--max-norm", type=positive_float, default=1.0, help="clipping threshold in the cliff figure (default 1)")
    add("--seed", type=seed, default=0, help="random seed (default 0)")
    add("--impl", choices=IMPLS, default="reference",
        help="runner implementation of the training and cliff figures (default reference); gradients "
        "through time always use the reference recurrence")  # fmt: skip
    return p


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------
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


def _horizon(value, available):
    return str(value) if value < available else f">={available}"


# --------------------------------------------------------------------------
# One report per figure
# --------------------------------------------------------------------------
def _report_time(args, out):
    T, thr = args.seq_len, args.threshold
    data = figures.gradients_through_time_data(T, args.hidden, batch_size=args.batch, seed=args.seed, threshold=thr)
    subtitle = f"\nH = {args.hidden}, T = {T}, batch {args.batch}"
    path = figures.plot_gradients_through_time(data, os.path.join(out, "gradients_through_time.png"), thr, subtitle)
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
    theory, measured = figures.lambda_grid_data(lams, lengths, seed=args.seed)
    path = figures.plot_lambda_grid(os.path.join(out, "lambda_grid.png"))
    rows = [
        [f"{lam:g}", *[f"{_sci(m)} ({_sci(t)})" for m, t in zip(ms, ts)]] for lam, ms, ts in zip(lams, measured, theory)
    ]
    err = float(np.max(np.abs(measured / theory - 1)))
    print(f"(b) linear RNN, W_hh = λ·Q: measured ratio (theory λ^ℓ), max rel. error {err:.1e}  [{path}]")
    print(_table(["λ", *[f"ℓ={n}" for n in lengths]], rows))


def _report_training(args, out):
    cell = CELLS[args.train_cell](args.hidden)
    T = args.train_seq_len
    run = profile_during_training(
        cell, seq_len=T, num_steps=args.train_steps, every=args.every,
        learning_rate=args.learning_rate, key=jax.random.key(args.seed), impl=args.impl,
    )  # fmt: skip
    name = type(cell).__name__
    label = f": {name}, H = {args.hidden}, T = {T}"
    path = figures.plot_training_profile(run, os.path.join(out, "training_profile.png"), label=label)
    losses = np.asarray(run.losses)
    rows = []
    for step, prof in zip(np.asarray(run.steps), run.profiles):
        loss = losses[min(int(step), len(losses) - 1)]
        horizon = int(memory_horizon(prof, args.threshold))
        rows.append([str(int(step)), f"{loss:.4f}", _sci(prof[0]), _horizon(horizon, T)])
    print(f"(c) {name} trained to recall x_0 after {T} steps: ‖∂h_T/∂h_0‖ over training  [{path}]")
    print(_table(["step", "loss", "‖∂h_T/∂h_0‖", f"horizon@{args.threshold:g}"], rows))


def _report_cliff(args, out):
    tanh, linear = figures.cliff_data(impl=args.impl)
    path = figures.plot_cliff(tanh, linear, os.path.join(out, "cliff.png"), args.max_norm)
    rows = []
    for name, curve in (("tanh, b = -0.1", tanh), ("linear", linear)):
        slope = np.abs(np.asarray(curve.slope))
        i = int(np.argmax(slope))
        clipped = min(slope[i], args.max_norm)
        rows.append([name, f"{float(curve.ws[i]):.4f}", _sci(slope[i]), _sci(np.median(slope)), _sci(clipped)])
    print(f"(d) one-unit RNN, loss (h_T - 0.5)² against w: steepest point, clipped to {args.max_norm:g}  [{path}]")
    print(_table(["activation", "w", "max |dL/dw|", "median |dL/dw|", "clipped"], rows))


REPORTS = {"time": _report_time, "lambda": _report_lambda, "training": _report_training, "cliff": _report_cliff}


def main(argv=None) -> int:
    """``jaxrnn gradients``: write the figures and print the tables; returns the exit status.

    Every argument is parsed and checked before any computation; a bad one
    prints one line on stderr and returns 2.
    """
    args, status = parse(build_parser(), argv)
    if status is not None:
        return status
    start = time.perf_counter()
    for name in FIGURES:
        if name in args.figures:
            REPORTS[name](args, args.out)
            print()
    print(f"wrote {len(set(args.figures))} figure(s) to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
