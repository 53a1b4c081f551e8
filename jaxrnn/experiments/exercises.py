"""``jaxrnn experiment exercises``: the lecture's four exercises, computed with jaxrnn and checked.

1. *Eigenvalue*: with largest eigenvalue 0.95 a linear RNN keeps
   ``0.95^50 = 7.7%`` of the gradient after 50 steps and ``0.95^100 = 0.59%``
   after 100 (measured: :func:`jaxrnn.analysis.linear_rnn_check`).
2. *Forget gate*: ``f = 0`` resets the cell every step, ``c_t = i_t ⊙ g_t``
   (a vanilla-like cell: the cell path's ``∏ f``, which is ``∂c_T/∂c_0``
   along it (:func:`jaxrnn.analysis.lstm_cell_path`), is 0); ``f = 1`` with
   ``i = 0`` keeps it forever, ``c_T = c_0`` (perfect memory). The gates are
   pinned by their biases (``±50``: ``σ`` is 1 or ``2e-22`` in float32) with
   zero weights.
3. *GRU as LSTM*: the GRU is the LSTM variant with tied gates (``i = u``,
   ``f = 1 - u``, i.e. the forget gate's weights are minus the update
   gate's), no output gate, cell state = hidden state, and a candidate that
   reads ``r ⊙ h``. The weights are built from a GRU's and both are run.
4. *Parameter counts* at input 256, hidden 512: the lectures' LSTM
   ``4(H(I+H)+H) = 1,574,912`` and GRU ``3(H(I+H)+H) = 1,181,184`` against
   :func:`jaxrnn.count_params` (GRU ``reset="before"`` is the lectures' form;
   ``reset="after"`` has ``H`` more, the recurrent candidate bias).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn.analysis import linear_rnn_check
from jaxrnn.cells import GRU, LSTM, LSTMCarry, count_params, expand_bias
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import Outcome, format_table, state_trajectory
from jaxrnn.runner import rnn

__all__ = ["CONFIGS", "PIN", "gru_as_tied_lstm", "pinned_forget_gate", "run"]

CONFIGS = {
    "small": {"eigen_hidden": 16, "eigen_lambda": 0.95, "eigen_steps": [50, 100], "lstm_hidden": 8, "input_size": 5,
              "forget_steps": 30, "batch": 4, "gru_hidden": 8, "gru_steps": 12, "count_input": 256,
              "count_hidden": 512, "tolerance": 1e-5},
    "full": {"eigen_hidden": 128, "eigen_lambda": 0.95, "eigen_steps": [50, 100], "lstm_hidden": 64, "input_size": 16,
             "forget_steps": 1000, "batch": 32, "gru_hidden": 64, "gru_steps": 200, "count_input": 256,
             "count_hidden": 512, "tolerance": 1e-5},
}  # fmt: skip

#: Gate bias that pins a sigmoid at 1 (``+PIN``) or at 0 (``-PIN``) in float32.
PIN = 50.0


def pinned_forget_gate(cell: LSTM, params, forget: float, input_gate=None):
    """``params`` with the forget gate pinned at ``forget`` (0 or 1) and, optionally, the input gate too.

    The gate's weights are zeroed and its bias set to ``±PIN``.
    """
    H = cell.hidden_size

    def pin(p, gate, value):
        cols = slice(gate * H, (gate + 1) * H)
        return p._replace(
            w_ih=p.w_ih.at[:, cols].set(0.0), w_hh=p.w_hh.at[:, cols].set(0.0), b=p.b.at[cols].set(PIN if value else -PIN)
        )

    params = pin(params, 1, forget)  # gates are stacked i, f, g, o
    return params if input_gate is None else pin(params, 0, input_gate)


@functools.partial(jax.jit, static_argnums=0)
def gru_as_tied_lstm(cell: GRU, params, xs):
    """Run a GRU (``reset="before"``) as the tied-gate LSTM of the exercise; ``(B, T, H)`` outputs.

    LSTM-form weights built from the GRU's: input gate ``i`` = the update
    gate's; forget gate ``f`` = minus the update gate's (``σ(-z) = 1 - σ(z)``,
    so ``f = 1 - i``); candidate ``g`` = the GRU candidate's, reading
    ``r ⊙ c``; no output gate and ``h = c``. Then ``c_t = f ⊙ c_{t-1} + i ⊙ g``.
    """
    w_r, w_u, w_n = cell.split_gates(params.w_ih)
    u_r, u_u, u_n = cell.split_gates(params.w_hh)
    b_r, b_u, b_n = cell.split_gates(params.b)
    lstm_form = {"i": (w_u, u_u, b_u), "f": (-w_u, -u_u, -b_u), "g": (w_n, u_n, b_n), "r": (w_r, u_r, b_r)}

    def pre(gate, x, h):
        w, u, b = lstm_form[gate]
        z = x @ w + h @ u
        return z + expand_bias(b, z)

    def step(c, x):
        i, f, r = (jax.nn.sigmoid(pre(k, x, c)) for k in "ifr")
        g = jnp.tanh(pre("g", x, r * c))
        c = f * c + i * g
        return c, c  # no output gate, no output tanh: h = c

    c0 = jnp.zeros((xs.shape[0], cell.hidden_size), jnp.float32)
    return jnp.swapaxes(lax.scan(step, c0, jnp.swapaxes(xs, 0, 1))[1], 0, 1)


def _eigenvalue(cfg, key):
    lam, steps = cfg["eigen_lambda"], cfg["eigen_steps"]
    check = linear_rnn_check(lam, max(steps) + 1, hidden_size=cfg["eigen_hidden"], key=key)
    rows = {}
    for n in steps:
        theory, measured = lam**n, float(check.measured[n])
        rows[str(n)] = {"theory": theory, "measured": measured, "percent": round(100 * theory, 2)}
    ok = all(abs(r["measured"] / r["theory"] - 1) < 1e-4 for r in rows.values())
    lecture = {"50": 7.7, "100": 0.59}
    ok &= all(round(rows[n]["percent"], 1 if n == "50" else 2) == v for n, v in lecture.items() if n in rows)
    return {"lambda": lam, "steps": rows, "lecture_percent": lecture, "passed": bool(ok)}, np.asarray(check.measured)


def _forget_gates(cfg, key):
    H, I, T, B = cfg["lstm_hidden"], cfg["input_size"], cfg["forget_steps"], cfg["batch"]
    k_p, k_x, k_c = jax.random.split(key, 3)
    cell = LSTM(H)
    params = cell.init(k_p, I)
    xs = jax.random.normal(k_x, (B, T, I))
    carry0 = LSTMCarry(*jax.random.normal(k_c, (2, B, H)))
    # f = 0: c_t = i_t ⊙ g_t at every step, and nothing flows along the cell path
    reset = pinned_forget_gate(cell, params, forget=0)
    carries, (i, f, g, _) = state_trajectory(cell, reset, xs, carry0)
    cs = carries.c
    reset_err = float(jnp.max(jnp.abs(cs - i * g)))
    # f = 1, i = 0: c_T = c_0
    keep = pinned_forget_gate(cell, params, forget=1, input_gate=0)
    cs_keep = state_trajectory(cell, keep, xs, carry0)[0].c
    keep_err = float(jnp.max(jnp.abs(cs_keep[-1] - carry0.c)))
    tol = cfg["tolerance"]
    results = {
        "forget_0": {"max_abs_c_minus_i_g": reset_err, "max_forget": float(jnp.max(f)),
                     "max_cell_path_product": float(jnp.max(jnp.prod(f, axis=0))), "passed": reset_err < tol},
        "forget_1_input_0": {"steps": T, "max_abs_cT_minus_c0": keep_err, "passed": keep_err < tol},
    }  # fmt: skip
    drift = np.asarray(jnp.max(jnp.abs(cs_keep - carry0.c[None]), axis=(1, 2)))
    return results, np.asarray(jnp.mean(jnp.abs(cs), axis=(1, 2))), drift


def _gru_as_lstm(cfg, key):
    k_p, k_x = jax.random.split(key)
    cell = GRU(cfg["gru_hidden"], reset="before")
    params = cell.init(k_p, cfg["input_size"])
    params = params._replace(b=jax.random.normal(k_x, params.b.shape))  # non-zero biases: every weight matters
    xs = jax.random.normal(k_x, (cfg["batch"], cfg["gru_steps"], cfg["input_size"]))
    gru_out = rnn(cell, params, xs, impl="reference")[0]
    tied_out = gru_as_tied_lstm(cell, params, xs)
    err = float(jnp.max(jnp.abs(gru_out - tied_out)))
    return {"max_abs_diff": err, "output_scale": float(jnp.max(jnp.abs(gru_out))), "passed": err < cfg["tolerance"]}


def _parameter_counts(cfg, key):
    I, H = cfg["count_input"], cfg["count_hidden"]
    cells = {"lstm": LSTM(H), "gru_before": GRU(H, reset="before"), "gru_after": GRU(H, reset="after")}
    # count_params of the initialised parameters' shapes (jax.eval_shape: nothing is computed)
    counted = {name: count_params(jax.eval_shape(lambda k, c=cell: c.init(k, I), key)) for name, cell in cells.items()}
    lecture = {"lstm": 4 * (H * (I + H) + H), "gru": 3 * (H * (I + H) + H)}
    torch_form = {"lstm": 4 * (H * (I + H) + 2 * H), "gru": 3 * (H * (I + H) + 2 * H)}  # b_ih and b_hh
    return {
        "input_size": I, "hidden_size": H, "count_params": counted, "lecture": lecture,
        "pytorch_two_biases": torch_form, "gru_over_lstm": counted["gru_before"] / counted["lstm"],
        "passed": counted["lstm"] == lecture["lstm"] == 1574912 and counted["gru_before"] == lecture["gru"] == 1181184,
    }  # fmt: skip


def run(cfg: dict, seed: int, out: str) -> Outcome:
    keys = jax.random.split(jax.random.key(seed), 4)
    eigen, ratios = _eigenvalue(cfg, keys[0])
    forget, reset_c, keep_drift = _forget_gates(cfg, keys[1])
    results = {"eigenvalue": eigen, **forget, "gru_as_lstm": _gru_as_lstm(cfg, keys[2])}
    results["parameter_counts"] = _parameter_counts(cfg, keys[3])
    results["all_passed"] = all(v["passed"] for v in results.values())

    fig, ax = plots.panels(2, title="Lecture exercises")
    ell = np.arange(len(ratios))
    ax[0, 0].semilogy(ell, ratios, label="measured (linear RNN, W = 0.95·Q)")
    ax[0, 0].semilogy(ell, eigen["lambda"] ** ell, "k--", label=r"$0.95^\ell$")
    for n, r in eigen["steps"].items():
        ax[0, 0].annotate(f"{r['percent']}%", (int(n), r["measured"]))
    ax[0, 0].set(xlabel="steps back ℓ", ylabel="gradient ratio", title="(1) eigenvalue 0.95")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].plot(reset_c, label="f = 0: mean |c_t| (reset each step)")
    ax[0, 1].semilogy(keep_drift + 1e-12, label="f = 1, i = 0: max |c_t - c_0| (+1e-12)")
    ax[0, 1].set(xlabel="step t", title="(2) forget gate pinned")
    ax[0, 1].legend(fontsize=8)
    figures = [plots.write_png(fig, out, "exercises")]

    pc = results["parameter_counts"]
    f0, f1, gru = results["forget_0"], results["forget_1_input_0"], results["gru_as_lstm"]
    yes = {True: "ok", False: "FAILED"}
    rows = [
        *[[f"0.95^{n}", f"{r['measured']:.5f} = {r['percent']}%", f"{r['theory']:.5f}", yes[eigen["passed"]]]
          for n, r in eigen["steps"].items()],
        ["f=0: max|c - i⊙g|", f"{f0['max_abs_c_minus_i_g']:.1e}", "0", yes[f0["passed"]]],
        [f"f=1,i=0: max|c_T - c_0| (T={f1['steps']})", f"{f1['max_abs_cT_minus_c0']:.1e}", "0", yes[f1["passed"]]],
        ["GRU vs tied-gate LSTM: max|Δh|", f"{gru['max_abs_diff']:.1e}", "0", yes[gru["passed"]]],
        ["params LSTM(256→512)", f"{pc['count_params']['lstm']:,}", f"{pc['lecture']['lstm']:,}", yes[pc["passed"]]],
        ["params GRU before (after)", f"{pc['count_params']['gru_before']:,} ({pc['count_params']['gru_after']:,})",
         f"{pc['lecture']['gru']:,}", yes[pc["passed"]]],
    ]  # fmt: skip
    return Outcome(results, figures, format_table(["exercise", "jaxrnn", "lecture", "check"], rows))
