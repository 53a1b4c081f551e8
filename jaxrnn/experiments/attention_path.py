"""``jaxrnn experiment attention-path``: the gradient from a token ``ℓ`` steps back, RNNs against one attention layer.

The lectures' "connection to Transformers": in an RNN the gradient from the
last output to the input ``ℓ`` steps back goes through a product of ``ℓ``
step Jacobians (Elman: ``∏ diag(tanh') W_hh``, it vanishes geometrically;
LSTM: ``∏ f`` along the cell path, much slower), while in self-attention
every earlier token is one step away (``∂y_T/∂x_{T-ℓ}`` is one attention
weight and one value projection): no product, no geometric decay.

Measured with ``jax.grad`` of ``J = Σ y_{T-1}`` (the last position's
outputs summed) with respect to the inputs: ``norms[ℓ] = mean_b
‖∂J/∂x_{T-1-ℓ}‖`` for an Elman RNN, an LSTM (through :func:`jaxrnn.rnn`)
and one causal single-head self-attention layer (:func:`attention_last`,
random weights). ``ℓ = 0`` is special for attention (the query reads
``x_{T-1}``), so the decay is summarised from ``ℓ = 1``: ``far_over_near =
norms[T-1] / norms[1]`` and ``rate``, the geometric factor per step of a
least-squares line through ``log norms[ℓ]`` for ``ℓ >= 1`` up to the first
norm that underflowed to 0 in float32.

Results: ``results[arch] = {"norms", "far_over_near", "rate"}`` for
``elman``, ``lstm``, ``attention``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn.cells import LSTM, Elman
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import Outcome, format_table
from jaxrnn.runner import rnn

__all__ = ["AttentionParams", "CONFIGS", "attention_last", "decay_summary", "init_attention", "input_gradient_norms", "run"]

CONFIGS = {
    "small": {"seq_len": 40, "batch_size": 8, "input_size": 8, "hidden_size": 16, "head_size": 16},
    "full": {"seq_len": 500, "batch_size": 32, "input_size": 32, "hidden_size": 128, "head_size": 64},
}


class AttentionParams(NamedTuple):
    """One head: ``wq``, ``wk``, ``wv``, each ``(I, D)``."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array


def init_attention(key, input_size: int, head_size: int) -> AttentionParams:
    """LeCun-normal projections (``N(0, 1/I)``)."""
    return AttentionParams(*(jax.random.normal(k, (input_size, head_size)) / np.sqrt(input_size)
                             for k in jax.random.split(key, 3)))  # fmt: skip


def attention_last(params: AttentionParams, xs) -> jax.Array:
    r"""The last position's output of causal self-attention: ``y_{T-1} = Σ_s softmax_s(q·k_s/√D) v_s``; ``(B, D)``.

    ``q = x_{T-1} W_q``, ``k_s = x_s W_k``, ``v_s = x_s W_v``; the last
    position attends to every position (all are in its past).
    """
    q = xs[:, -1] @ params.wq  # (B, D)
    k, v = xs @ params.wk, xs @ params.wv  # (B, T, D)
    scores = jnp.einsum("bd,btd->bt", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bt,btd->bd", jax.nn.softmax(scores, axis=-1), v)


def input_gradient_norms(apply_last, params, xs) -> np.ndarray:
    """``norms[ℓ] = mean_b ‖∂J/∂x_{T-1-ℓ}‖`` with ``J = Σ apply_last(params, xs)`` (one backward pass); ``(T,)``."""
    grads = jax.grad(lambda x: jnp.sum(apply_last(params, x)))(xs)  # (B, T, I)
    return np.asarray(jnp.mean(jnp.linalg.norm(grads, axis=-1), axis=0))[::-1]


@functools.partial(jax.jit, static_argnums=0)
def _rnn_last(cell, params, xs):
    return rnn(cell, params, xs)[0][:, -1]


def decay_summary(norms: np.ndarray):
    """``(far_over_near, rate)``; the rate is fitted over ``ℓ >= 1`` up to the first norm that underflowed to 0
    (float32 reaches 0 long before a geometric decay ends), so it stays defined at any length."""
    norms = np.asarray(norms, np.float64)
    far_over_near = float(norms[-1] / norms[1])
    ell = np.arange(1, len(norms))
    zero = np.nonzero(norms[1:] <= 0)[0]
    n = int(zero[0]) if len(zero) else len(ell)
    if n < 2:
        return far_over_near, float("nan")
    slope = np.polyfit(ell[:n], np.log(norms[1 : 1 + n]), 1)[0]
    return far_over_near, float(np.exp(slope))


def run(cfg: dict, seed: int, out: str) -> Outcome:
    T, I, H = cfg["seq_len"], cfg["input_size"], cfg["hidden_size"]
    k_x, k_e, k_l, k_a = jax.random.split(jax.random.key(seed), 4)
    xs = jax.random.normal(k_x, (cfg["batch_size"], T, I))
    models = {
        "elman": (functools.partial(_rnn_last, Elman(H)), Elman(H).init(k_e, I)),
        "lstm": (functools.partial(_rnn_last, LSTM(H)), LSTM(H).init(k_l, I)),
        "attention": (jax.jit(attention_last), init_attention(k_a, I, cfg["head_size"])),
    }
    results, rows = {}, []
    paths = {"elman": "∏ diag(tanh') W_hh over ℓ steps", "lstm": "∏ f over ℓ steps (cell path)",
             "attention": "one attention weight and W_v"}  # fmt: skip
    for name, (apply_last, params) in models.items():
        norms = input_gradient_norms(apply_last, params, xs)
        far_over_near, rate = decay_summary(norms)
        results[name] = {"norms": norms.tolist(), "far_over_near": far_over_near, "rate": rate, "path": paths[name]}
        rows.append([name, paths[name], f"{norms[1]:.3g}", f"{norms[-1]:.3g}", f"{far_over_near:.3g}", f"{rate:.3f}"])

    fig, ax = plots.panels(1, width=6.5, title=f"Gradient from the last output to the input ℓ tokens back (T = {T})")
    for name in models:
        ax[0, 0].semilogy(results[name]["norms"], label=f"{name}: {paths[name]}")
    ax[0, 0].set(xlabel="distance ℓ", ylabel="mean ‖∂J/∂x_(T-1-ℓ)‖")
    ax[0, 0].legend(fontsize=8)
    figures = [plots.write_png(fig, out, "attention-path")]
    header = ["model", "gradient path", "‖g‖ ℓ=1", f"‖g‖ ℓ={T - 1}", "far/near", "rate per step"]
    return Outcome(results, figures, format_table(header, rows))
