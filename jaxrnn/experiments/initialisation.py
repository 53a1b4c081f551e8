"""``jaxrnn experiment initialisation``: how the initial weights shape the gradient through time, and learning.

The lectures' partial fixes: an orthogonal ``W_hh`` (every singular value 1)
keeps the gradient's norm at initialisation better than a Gaussian one
(``N(0, 1/H)``: singular values spread up to about 2 and down to 0); for
ReLU, the identity (IRNN, Le et al. 2015); for the LSTM, a forget-gate bias
of 1 (Gers et al. 2000) or larger keeps ``f ≈ 1`` so that the cell path
``∏ f`` decays slowly.

Each variant's gradient-through-time profile at initialisation is measured
with :func:`jaxrnn.analysis.grad_norms_through_time` (loss: the sum of the
last outputs, random inputs): ``profile[ℓ] = ‖∂J/∂h_{T-1-ℓ}‖ / ‖∂J/∂h_{T-1}‖``
and the memory horizon at ``threshold``. Then each variant learns the adding
problem (:func:`jaxrnn.tasks.adding`) with the same Adam budget.

Variants are built from one cell per kind so that they share compilations:
the Gaussian Elman is the orthogonal Elman's parameters with ``w_hh``
replaced, the forget-bias variants are one LSTM's parameters with ``b_f``
set (the same as ``jaxrnn.LSTM(H, forget_bias=b)``'s initialisation).

Results: ``results[variant] = {"description", "profile", "horizon",
"losses", "final_loss"}`` (Elman variants also ``"singular_values"``:
``[min, max]`` of ``W_hh``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.analysis import grad_norms_through_time, gradient_ratios, memory_horizon
from jaxrnn.cells import LSTM, Elman
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import Outcome, adding_batches, adding_loss, format_table, init_model, train_loop
from jaxrnn.train import make_train_step

__all__ = ["CONFIGS", "VARIANTS", "variant", "run"]

CONFIGS = {
    "small": {"variants": ["elman_orthogonal", "elman_gaussian", "irnn", "lstm_forget_0", "lstm_forget_1",
                           "lstm_forget_3"], "hidden_size": 16, "profile_len": 40, "profile_batch": 8,
              "threshold": 0.01, "seq_len": 10, "batch_size": 32, "steps": 30, "learning_rate": 0.01},
    "full": {"variants": ["elman_orthogonal", "elman_gaussian", "irnn", "lstm_forget_0", "lstm_forget_1",
                          "lstm_forget_3", "lstm_forget_5"], "hidden_size": 128, "profile_len": 200,
             "profile_batch": 32, "threshold": 0.01, "seq_len": 100, "batch_size": 64, "steps": 3000,
             "learning_rate": 0.001},
}  # fmt: skip

#: Variant name -> description.
VARIANTS = {
    "elman_orthogonal": "Elman tanh, W_hh orthogonal",
    "elman_gaussian": "Elman tanh, W_hh ~ N(0, 1/H)",
    "irnn": "Elman ReLU, W_hh = I (IRNN)",
    "lstm_forget_0": "LSTM, forget bias 0",
    "lstm_forget_1": "LSTM, forget bias 1",
    "lstm_forget_3": "LSTM, forget bias 3",
    "lstm_forget_5": "LSTM, forget bias 5",
}


def variant(name: str, hidden_size: int, input_size: int, output_size: int, key):
    """``(cell, ModelParams)`` of initialisation ``name`` (a key of :data:`VARIANTS`)."""
    H = hidden_size
    k_model, k_gauss = jax.random.split(key)
    if name == "irnn":
        cell = Elman(H, activation="relu", recurrent_init="identity", kernel_init="irnn")
        return cell, init_model(cell, k_model, input_size, output_size)
    if name.startswith("elman"):
        cell = Elman(H)
        params = init_model(cell, k_model, input_size, output_size)
        if name == "elman_gaussian":
            w_hh = jax.random.normal(k_gauss, (H, H), jnp.float32) / np.sqrt(H)
            params = params._replace(cell=params.cell._replace(w_hh=w_hh))
        return cell, params
    if name.startswith("lstm_forget_"):
        cell = LSTM(H)
        params = init_model(cell, k_model, input_size, output_size)
        b = params.cell.b.at[H : 2 * H].set(float(name.rsplit("_", 1)[1]))  # gates i, f, g, o
        return cell, params._replace(cell=params.cell._replace(b=b))
    raise ValueError(f"name: expected one of {tuple(VARIANTS)}, got {name!r}")


def run(cfg: dict, seed: int, out: str) -> Outcome:
    H, T = cfg["hidden_size"], cfg["profile_len"]
    key = jax.random.key(seed)
    xs = jax.random.normal(jax.random.fold_in(key, 1), (cfg["profile_batch"], T, 2))
    results = {"threshold": cfg["threshold"], "profile_len": T}
    rows, steps = [], {}  # one training step per cell: variants of a cell share its compilation
    for name in cfg["variants"]:
        cell, params = variant(name, H, 2, 1, key)
        norms = grad_norms_through_time(cell, params.cell, xs, reduce="mean").h
        profile = np.asarray(gradient_ratios(norms), np.float64)
        horizon = int(memory_horizon(norms, cfg["threshold"]))
        if cell not in steps:
            steps[cell] = make_train_step(functools.partial(adding_loss, cell), optax.adam(cfg["learning_rate"]))
        step = steps[cell]
        record = train_loop(step, params, adding_batches(cfg["batch_size"], cfg["seq_len"], seed), cfg["steps"])
        entry = {"description": VARIANTS[name], "profile": profile.tolist(), "horizon": horizon,
                 "losses": record.losses.tolist(), "final_loss": float(np.mean(record.losses[-10:]))}  # fmt: skip
        if isinstance(cell, Elman):
            sv = np.linalg.svd(np.asarray(params.cell.w_hh, np.float64), compute_uv=False)
            entry["singular_values"] = [float(sv.min()), float(sv.max())]
        results[name] = entry
        far = profile[T - 1]
        rows.append([VARIANTS[name], f"{profile[min(10, T - 1)]:.3g}", f"{far:.3g}",
                     horizon if horizon < T else f">={T}", f"{record.losses[0]:.4f}", f"{entry['final_loss']:.4f}"])  # fmt: skip

    fig, ax = plots.panels(2, width=5.5, title=f"Initialisation: gradient through time at init (H = {H}) and "
                           f"learning the adding problem (T = {cfg['seq_len']})")  # fmt: skip
    for name in cfg["variants"]:
        ax[0, 0].semilogy(results[name]["profile"], label=VARIANTS[name])
        ax[0, 1].semilogy(results[name]["losses"], label=VARIANTS[name])
    ax[0, 0].axhline(cfg["threshold"], color="k", ls="--", lw=1)
    ax[0, 0].set(xlabel="steps back ℓ", ylabel="‖∂J/∂h_(T-1-ℓ)‖ / ‖∂J/∂h_(T-1)‖", title="at initialisation")
    ax[0, 1].set(xlabel="step", ylabel="loss (MSE)", title="learning curve")
    ax[0, 0].legend(fontsize=7)
    figures = [plots.write_png(fig, out, "initialisation")]
    header = ["variant", "ratio ℓ=10", f"ratio ℓ={T - 1}", f"horizon@{cfg['threshold']:g}", "first loss", "final loss"]
    return Outcome(results, figures, format_table(header, rows))
