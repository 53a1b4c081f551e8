"""Figures of vanishing and exploding gradients (the PNGs of ``jaxrnn gradients``).

Each ``plot_*`` function takes the data computed by :mod:`jaxrnn.analysis`
(or by the ``*_data`` helpers here), writes one PNG and returns its path.
Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg
canvas, so importing this module never changes pyplot's backend. It is the
only module of :mod:`jaxrnn.analysis` that imports matplotlib, and
``jaxrnn.analysis`` imports it only on first use (``import jaxrnn`` does not
load matplotlib).

Example:
  >>> from jaxrnn.analysis import figures
  >>> figures.plot_cliff(*figures.cliff_data(), "out/cliff.png")
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from jaxrnn.analysis.clipping import CliffCurve, scalar_rnn_cliff
from jaxrnn.analysis.gradients import grad_norms_through_time, gradient_ratios, memory_horizon
from jaxrnn.analysis.jacobians import spectral_radius
from jaxrnn.analysis.profile import TrainingProfile
from jaxrnn.analysis.saturation import tanh_saturation
from jaxrnn.cells import GRU, LSTM, Elman

__all__ = [
    "cliff_data",
    "gradients_through_time_data",
    "lambda_grid_data",
    "plot_cliff",
    "plot_gradients_through_time",
    "plot_lambda_grid",
    "plot_training_profile",
]

_LECTURE_POINTS = ((0.9, 100), (0.95, 50), (0.95, 100), (1.1, 100))


def _figure(width=7.5, height=4.8, **kwargs):
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


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
    impl: Any = None,
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

    ``impl`` is deprecated and ignored, as in
    :func:`jaxrnn.analysis.grad_norms_through_time` (passed on to it, which warns).

    Returns:
      label -> dict with ``ratio_h (T,)``, ``ratio_c (T,) or None``,
      ``horizon``, ``radius`` (max over gates), ``saturation`` (``(2,)``:
      fractions with ``tanh'`` below 0.19 and 0.02, averaged over sites).
    """
    H = hidden_size
    k_x, k_p = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(k_x, (batch_size, seq_len, input_size))
    gru = GRU(H)
    gru_params = gru.init(k_p, input_size)
    models = {
        "Elman (tanh)": (Elman(H), None),
        "LSTM, forget bias 1": (LSTM(H), None),
        "LSTM, forget bias 3": (LSTM(H, forget_bias=3.0), None),
        "GRU": (gru, gru_params),
        "GRU, update bias -3": (gru, gru_params._replace(b=gru_params.b.at[H : 2 * H].set(-3.0))),
    }
    out = {}
    for label, (cell, params) in models.items():
        params = cell.init(k_p, input_size) if params is None else params
        norms = grad_norms_through_time(cell, params, xs, reduce="mean", impl=impl)
        sat = tanh_saturation(cell, params, xs)
        ratio_c = None
        if norms.c is not None:
            ratio_c = np.array(jnp.flip(norms.c) / norms.h[-1])
            ratio_c[0] = np.nan  # ∂J/∂c_{T-1} = 0: a last-step loss reads h_T, already computed from c_{T-1}
        out[label] = dict(
            ratio_h=np.asarray(gradient_ratios(norms.h)),
            ratio_c=ratio_c,
            horizon=int(memory_horizon(norms.h, threshold)),
            radius=float(np.max(spectral_radius(cell, params))),
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
    cell = Elman(hidden_size, activation="linear")
    k_p, k_x = jax.random.split(jax.random.key(seed))
    params = cell.init(k_p, 4)  # orthogonal W_hh = Q (gain 1)
    xs = jax.random.normal(k_x, (T, 4))
    measured = []
    for lam in lams:
        p = params._replace(w_hh=lam * params.w_hh)
        ratios = gradient_ratios(grad_norms_through_time(cell, p, xs).h)
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
def plot_training_profile(run: TrainingProfile, path: str, label: str = "") -> str:
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
    tanh = scalar_rnn_cliff(jnp.linspace(0.0, 2.5, num), seq_len=seq_len, impl=impl)
    linear = scalar_rnn_cliff(
        jnp.linspace(0.5, 1.3, num), activation="linear", bias=0.0, h0=1.0, seq_len=seq_len, impl=impl
    )
    return tanh, linear


def plot_cliff(
    tanh: CliffCurve, linear: CliffCurve, path: str, max_norm: float = 1.0, seq_len: int = 50
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
