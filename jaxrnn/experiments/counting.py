"""``jaxrnn experiment counting``: LSTM and GRU on ``aⁿbⁿ`` (and ``aⁿbⁿcⁿ``): which one counts.

The lectures (after Weiss, Goldberg & Yahav 2018): LSTMs can store
unboundedly large values in their cell and count; trained on small ``n`` an
LSTM recognises ``a^{1000} b^{1000}`` with one unit that counts up on ``a``
and down on ``b``, while a GRU (whose state is bounded in ``(-1, 1)``) does
not.

Task (:func:`jaxrnn.tasks.counting_strings`): read ``$ a^n b^n`` and predict,
at every step, the set of allowed next symbols (one sigmoid per symbol of
``$abc``). A string is *accepted* when every valid step's predicted set
(logit > 0) equals the allowed set. Each cell is trained on ``n`` uniform in
``[1, train_max_n]`` and tested on every ``n`` in ``[1, eval_max_n]``.

Results: ``results[cell] = {"max_n", "counting_unit", ...}`` for ``aⁿbⁿ``
(and the same under ``results[cell]["anbncn"]`` where configured):

* ``max_n``: the largest ``n`` such that every ``n' <= n`` is accepted
  (:func:`jaxrnn.experiments.common.longest_passing` with threshold 1).
* ``accepted``: per ``n = 1..eval_max_n``, whether the string was accepted.
* ``counting_unit``: the state dimension (LSTM: ``c``, GRU: ``h``) whose
  activation along ``a^N b^N`` (``N = eval_max_n``) correlates best with the
  count ``#a - #b`` read so far, and that correlation. The figure draws it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn.cells import GRU, LSTM, LSTMParams
from jaxrnn.checks import check_index
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import (
    ModelParams,
    Outcome,
    format_table,
    init_model,
    longest_passing,
    model_logits,
    one_hot,
    state_trajectory,
    train_loop,
)
from jaxrnn.scan import sequence_mask
from jaxrnn.tasks import COUNTING_SYMBOLS, counting_strings, sample_ns
from jaxrnn.train import make_train_step

__all__ = ["CELLS", "CONFIGS", "LANGUAGES", "CountingEval", "counter_lstm", "evaluate_counting", "run"]

CELLS = {"lstm": LSTM, "gru": GRU}
LANGUAGES = {"anbn": 2, "anbncn": 3}
V = len(COUNTING_SYMBOLS)
CONFIGS = {
    "small": {"cells": ["lstm", "gru"], "languages": ["anbn"], "hidden_size": 4, "train_max_n": 6, "steps": 150,
              "batch_size": 16, "learning_rate": 0.03, "eval_max_n": 50},
    "full": {"cells": ["lstm", "gru"], "languages": ["anbn", "anbncn"], "hidden_size": 10, "train_max_n": 50,
             "steps": 5000, "batch_size": 32, "learning_rate": 0.005, "eval_max_n": 1000},
}  # fmt: skip


def counting_loss(cell, params, batch):
    """Mean sigmoid cross-entropy of every valid step's allowed-symbol prediction; ``batch = (inputs, targets, lengths)``."""
    inputs, targets, lengths = batch
    logits = model_logits(cell, params, one_hot(inputs, V), seq_lengths=lengths)
    mask = sequence_mask(lengths, inputs.shape[1])[..., None].astype(logits.dtype)
    losses = optax.sigmoid_binary_cross_entropy(logits, targets.astype(logits.dtype))
    return jnp.sum(losses * mask) / (jnp.sum(mask) * V)


class CountingEval:
    """What :func:`evaluate_counting` found: ``ns``, ``accepted`` (per ``n``), ``max_n``, ``states`` along the longest string."""

    def __init__(self, ns, accepted, states, counts):
        self.ns, self.accepted, self.states, self.counts = ns, accepted, states, counts
        self.max_n = longest_passing(ns, accepted.astype(float), 1.0)

    def counting_unit(self):
        """``(unit, correlation)``: the state dimension most correlated (in absolute value) with ``#a - #b``."""
        s = self.states - self.states.mean(0)
        c = self.counts - self.counts.mean()
        denom = np.sqrt((s**2).sum(0) * (c**2).sum())
        corr = np.where(denom > 0, (s * c[:, None]).sum(0) / np.where(denom > 0, denom, 1.0), 0.0)
        unit = int(np.argmax(np.abs(corr)))
        return unit, float(corr[unit])


@functools.partial(jax.jit, static_argnums=0)
def _accept(cell, params, inputs, targets, lengths):
    carries, _ = state_trajectory(cell, params.cell, one_hot(inputs, V))
    logits = carries.h @ params.w  # (T, B, V)
    logits = logits + params.b.reshape(1, 1, V)
    valid = sequence_mask(lengths, inputs.shape[1], time_major=True)[..., None]  # (T, B, 1)
    right = jnp.all(((logits > 0) == jnp.swapaxes(targets, 0, 1)) | ~valid, axis=(0, 2))
    longest = jnp.argmax(lengths)
    counter = getattr(carries, "c", carries.h)  # the LSTM's cell, the GRU's hidden state
    return right, counter[:, longest]


def evaluate_counting(cell, params: ModelParams, max_n: int, letters: int = 2) -> CountingEval:
    """Run the model on every string ``n = 1..max_n`` at once; which are accepted, and the states along ``n = max_n``."""
    ns = np.arange(1, check_index(max_n, "max_n") + 1)
    batch = counting_strings(ns, letters)
    accepted, states = _accept(cell, params, batch.inputs, batch.targets, batch.seq_lengths)
    tokens = batch.inputs[-1]
    counts = np.cumsum((tokens == 1).astype(np.int64) - (tokens == 2))  # #a - #b after each step
    return CountingEval(ns, np.asarray(accepted), np.asarray(states, np.float64), counts.astype(np.float64))


def counter_lstm(scale: float = 50.0) -> tuple:
    """A hand-set 2-unit LSTM that recognises ``aⁿbⁿ`` for every ``n`` (float32 counts exactly to 2²⁴).

    Unit 0 counts: ``i = f = o = 1`` (biases ``+scale``), ``g = +1`` on ``a``,
    ``-1`` on ``b``, 0 on ``$``; so ``c_0 = #a - #b``. Unit 1 records that a
    ``b`` was seen (``g = +1`` on ``b``, so ``c_1 = #b``). With
    ``h = tanh(c)`` (0, or at least ``tanh 1 = 0.76``): ``a`` is allowed
    while ``h_1 = 0``, ``b`` while ``h_0 > 0``, ``$`` when ``h_1 > 0`` and
    ``h_0 = 0``. Returns ``(cell, ModelParams)``.
    """
    H, s = 2, scale
    cell = LSTM(H)
    w_ih = np.zeros((V, 4 * H), np.float32)  # gates i, f, g, o; columns gate*H + unit
    w_ih[1, 2 * H + 0] = s  # a: g_0 = +1
    w_ih[2, 2 * H + 0] = -s  # b: g_0 = -1
    w_ih[2, 2 * H + 1] = s  # b: g_1 = +1
    b = np.zeros(4 * H, np.float32)
    b[0:H] = b[H : 2 * H] = b[3 * H :] = s  # i = f = o = 1
    lstm = LSTMParams(jnp.asarray(w_ih), jnp.zeros((H, 4 * H)), jnp.asarray(b))
    k = 10.0  # read-out: thresholds half-way between 0 and tanh(1)
    w = np.zeros((H, V), np.float32)
    out_b = np.zeros(V, np.float32)
    w[1, 1], out_b[1] = -k, 0.38 * k  # a allowed iff no b yet
    w[0, 2], out_b[2] = k, -0.38 * k  # b allowed iff the count is positive
    w[1, 0], w[0, 0], out_b[0] = k, -k, -0.38 * k  # $ allowed iff a b was seen and the count is 0
    out_b[3] = -k  # c never
    return cell, ModelParams(lstm, jnp.asarray(w), jnp.asarray(out_b))


def _train(name, letters, cfg, seed):
    cell = CELLS[name](cfg["hidden_size"])
    T = letters * cfg["train_max_n"] + 1
    step = make_train_step(functools.partial(counting_loss, cell), optax.adam(cfg["learning_rate"]), max_grad_norm=1.0)

    def batch_at(i):
        b = counting_strings(sample_ns(cfg["batch_size"], cfg["train_max_n"], seed=seed * 7919 + i), letters, length=T)
        return b.inputs, b.targets, b.seq_lengths

    record = train_loop(step, init_model(cell, jax.random.key(seed), V, V), batch_at, cfg["steps"])
    return cell, record


def run(cfg: dict, seed: int, out: str) -> Outcome:
    results = {"eval_max_n": cfg["eval_max_n"], "train_max_n": cfg["train_max_n"],
               "rule": "max_n: the largest n such that every n' <= n is accepted (every valid step's predicted "
                       "set of next symbols, logit > 0, equals the allowed set)"}  # fmt: skip
    evals, rows = {}, []
    for name in cfg["cells"]:
        results[name] = {}
        for lang in cfg["languages"]:
            cell, record = _train(name, LANGUAGES[lang], cfg, seed)
            ev = evaluate_counting(cell, record.params, cfg["eval_max_n"], LANGUAGES[lang])
            unit, corr = ev.counting_unit()
            entry = {"max_n": ev.max_n, "accepted_fraction": float(ev.accepted.mean()),
                     "accepted": [bool(a) for a in ev.accepted],
                     "counting_unit": {"state": "c" if name == "lstm" else "h", "index": unit, "correlation": corr},
                     "final_loss": float(np.mean(record.losses[-10:]))}  # fmt: skip
            if lang == "anbn":
                results[name].update(entry)
            else:
                results[name][lang] = entry
            evals[name, lang] = ev
            rows.append([f"{name} {lang}", entry["max_n"], f"{entry['accepted_fraction']:.2f}",
                         f"{entry['counting_unit']['state']}[{unit}]", f"{corr:+.3f}", f"{entry['final_loss']:.4f}"])  # fmt: skip

    N = cfg["eval_max_n"]
    fig, ax = plots.panels(len(cfg["languages"]), len(cfg["cells"]), width=5.5, height=3.2,
                           title=f"State along the longest test string (n = {N}); the counting unit in colour")  # fmt: skip
    for r, name in enumerate(cfg["cells"]):
        for c, lang in enumerate(cfg["languages"]):
            ev, entry = evals[name, lang], results[name] if lang == "anbn" else results[name][lang]
            unit = entry["counting_unit"]["index"]
            ax[r, c].plot(ev.states, color="0.8", lw=0.7)
            ax[r, c].plot(ev.states[:, unit], color="tab:red", lw=1.5, label=f"{entry['counting_unit']['state']}[{unit}]")
            ax[r, c].set(title=f"{name.upper()} on {lang} (max n = {entry['max_n']})", xlabel="step")
            ax[r, c].legend(fontsize=8)
    figures = [plots.write_png(fig, out, "counting")]
    header = ["cell / language", "max n", "accepted", "counting unit", "corr(#a-#b)", "final loss"]
    return Outcome(results, figures, format_table(header, rows))
