"""``jaxrnn experiment clipping``: one exploding training run with and without gradient-norm clipping.

The lectures (Pascanu et al. 2013): where the recurrent weights are large
the loss has cliffs on which the gradient is huge, and one SGD step there
throws the parameters far away; clipping the gradient's norm to a threshold
keeps the direction and bounds the step. Here an Elman RNN with a large
recurrent scale (``W_hh = scale·Q``) learns the adding problem
(:func:`jaxrnn.tasks.adding`, squared error of the last step's read-out) by
plain SGD twice, from the same initialisation on the same batches: once
unclipped, once with ``max_norm``. Each step records the loss, the global
gradient norm *before* clipping and whether it was clipped
(:func:`jaxrnn.train.make_train_step`'s metrics). The figure puts both runs
next to the scalar RNN's cliff (:func:`jaxrnn.analysis.scalar_rnn_cliff`).

Results: ``results["clipped"]`` and ``results["unclipped"]``: ``losses``,
``grad_norms`` (before clipping), ``clipped`` (per step), ``clipped_fraction``,
``final_loss`` (mean of the last 10 steps), ``nonfinite_steps`` (a step with a non-finite loss or
gradient is not applied; JSON writes such numbers as ``NaN``/``Infinity``); ``results["cliff"]``: the cliff's
steepest slope against its median; ``results["norm_check"]``: one recorded
norm recomputed with ``optax.tree.norm`` at the parameters that step started from;
``results["mean_predictor_loss"]``: the loss of always predicting the mean sum (the
targets' variance, about 1/6), the bar a run must beat to have learned anything.

The full configuration was chosen by a scan (800-1500 SGD steps each): with
``W_hh = 1.5·Q``, learning rate 0.1 and ``T = 20`` the unclipped run
overflows within a few dozen steps while the clipped one learns well below the
mean predictor; with ``T >= 50`` the clipped Elman stays finite but learns
nothing in the budget (the vanishing gradient, which clipping cannot fix).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.analysis import scalar_rnn_cliff
from jaxrnn.cells import Elman
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import (
    Outcome,
    TrainRecord,
    adding_batches,
    adding_loss,
    format_table,
    init_model,
    train_loop,
)
from jaxrnn.train import make_train_step

__all__ = ["CONFIGS", "train_run", "run"]

CONFIGS = {
    "small": {"hidden_size": 16, "recurrent_scale": 3.0, "seq_len": 20, "batch_size": 32, "steps": 40,
              "learning_rate": 0.2, "max_norm": 1.0, "check_step": 20, "cliff_points": 801},
    "full": {"hidden_size": 64, "recurrent_scale": 1.5, "seq_len": 20, "batch_size": 64, "steps": 3000,
             "learning_rate": 0.1, "max_norm": 1.0, "check_step": 1500, "cliff_points": 2001},
}  # fmt: skip


def train_run(cfg: dict, seed: int, clip: bool):
    """One SGD run (clipped to ``max_norm`` or not); ``(cell, TrainRecord)``.

    The parameters are kept at ``check_step`` and the step after it.
    """
    cell = Elman(cfg["hidden_size"], recurrent_scale=cfg["recurrent_scale"])
    loss = functools.partial(adding_loss, cell)
    step = make_train_step(loss, optax.sgd(cfg["learning_rate"]), max_grad_norm=cfg["max_norm"] if clip else None)
    params = init_model(cell, jax.random.key(seed), 2, 1)
    batch_at = adding_batches(cfg["batch_size"], cfg["seq_len"], seed)
    return cell, train_loop(step, params, batch_at, cfg["steps"], keep_params_at=[cfg["check_step"], cfg["check_step"] + 1])


def _summary(record: TrainRecord):
    finite = np.isfinite(record.losses) & np.isfinite(record.grad_norms)
    tail = record.losses[-10:]
    return {"losses": record.losses.tolist(), "grad_norms": record.grad_norms.tolist(),
            "clipped": record.clipped.tolist(), "clipped_fraction": float(record.clipped.mean()),
            "final_loss": float(np.mean(tail)) if np.all(np.isfinite(tail)) else float("nan"),
            "max_grad_norm": float(np.nanmax(record.grad_norms)), "nonfinite_steps": int((~finite).sum())}  # fmt: skip


def run(cfg: dict, seed: int, out: str) -> Outcome:
    targets = adding_batches(4096, cfg["seq_len"], seed + 1)(0)[1]
    results = {"max_norm": cfg["max_norm"], "mean_predictor_loss": float(np.var(np.asarray(targets, np.float64)))}
    runs = {}
    for label, clip in (("unclipped", False), ("clipped", True)):
        cell, record = train_run(cfg, seed, clip)
        runs[label] = record
        results[label] = _summary(record)
    k = cfg["check_step"]
    kept = runs["clipped"].kept[k]
    batch = adding_batches(cfg["batch_size"], cfg["seq_len"], seed)(k)
    grads = jax.grad(functools.partial(adding_loss, cell))(kept, batch)
    results["norm_check"] = {"step": k, "recorded": float(runs["clipped"].grad_norms[k]),
                             "optax_tree_norm": float(optax.tree.norm(grads))}  # fmt: skip
    cliff = scalar_rnn_cliff(jnp.linspace(0.0, 2.5, cfg["cliff_points"]))
    slope = np.abs(np.asarray(cliff.slope))
    i = int(np.argmax(slope))
    results["cliff"] = {"w_at_steepest": float(cliff.ws[i]), "max_abs_slope": float(slope[i]),
                        "median_abs_slope": float(np.median(slope))}  # fmt: skip

    fig, ax = plots.panels(3, width=4.5, height=3.6, title=f"Elman (scale {cfg['recurrent_scale']:g}) on the adding "
                           f"problem, T = {cfg['seq_len']}: SGD with and without clipping")  # fmt: skip
    for label, color in (("unclipped", "tab:red"), ("clipped", "tab:blue")):
        ax[0, 0].semilogy(runs[label].losses, color=color, label=label)
        ax[0, 1].semilogy(runs[label].grad_norms, color=color, label=label)
    ax[0, 0].set(xlabel="step", ylabel="loss", title="loss")
    ax[0, 1].axhline(cfg["max_norm"], color="k", ls="--", lw=1, label="threshold")
    ax[0, 1].set(xlabel="step", ylabel="‖g‖ before clipping", title="gradient norm")
    ax[0, 2].plot(cliff.ws, cliff.loss, color="k", label="loss")
    twin = ax[0, 2].twinx()
    twin.semilogy(cliff.ws, slope + 1e-30, color="tab:red", lw=0.8, label="|dL/dw|")
    ax[0, 2].set(xlabel="recurrent weight w", ylabel="loss", title="Pascanu's cliff: one tanh unit")
    for a in ax[0, :2]:
        a.legend(fontsize=8)
    figures = [plots.write_png(fig, out, "clipping")]
    rows = [[label, f"{r['final_loss']:.4g}", f"{r['max_grad_norm']:.3g}", f"{np.median(r['grad_norms']):.3g}",
             f"{r['clipped_fraction']:.2f}", r["nonfinite_steps"]] for label, r in ((n, results[n]) for n in runs)]  # fmt: skip
    table = format_table(["run", "final loss", "max ‖g‖", "median ‖g‖", "clipped", "non-finite"], rows)
    table += (f"\ncliff: max |dL/dw| {slope[i]:.3g} at w = {float(cliff.ws[i]):.4f} "
              f"(median {np.median(slope):.3g})")  # fmt: skip
    return Outcome(results, figures, table)
