"""``jaxrnn experiment dependency-length``: the longest dependency Elman, LSTM and GRU learn with one budget.

The lectures: a vanilla RNN remembers about 7 steps, an LSTM about 100; a
vanilla RNN works below 20 tokens, struggles at 20–50 and fails beyond 50.
Here each cell is trained on the distance task (:func:`jaxrnn.tasks.distance_task`:
the answer is the symbol ``ℓ`` steps before the last, every other symbol is
noise) for each ``ℓ``, with the same hidden size, optimiser, steps and batch,
and tested on fresh sequences. Each ``ℓ`` has its own length ``ℓ + 1``: the
answer is the first symbol, so the model knows which symbol to keep (2 bits
for 4 symbols) and must carry it across exactly ``ℓ`` steps, the lectures'
question. (One length for all ``ℓ`` would share one compiled step, but then
the answer sits ``ℓ`` steps before an end the model cannot see coming: it must
either count to ``T - 1 - ℓ`` or keep the last ``ℓ`` symbols, a capacity test
that an earlier run of this experiment showed even an LSTM fails beyond
``ℓ ≈ 7`` with 64 units.)

Rule. ``max_distance`` is the largest ``ℓ`` whose test accuracy is at least
``target_accuracy`` *and* every smaller tested ``ℓ`` passes too
(:func:`jaxrnn.experiments.common.longest_passing`); 0 if the smallest fails.

Results: ``results[cell] = {"max_distance", "accuracy_by_distance": {ℓ: acc},
"final_loss_by_distance": {ℓ: loss}}`` plus the rule's settings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.ticker import NullLocator

from jaxrnn.cells import GRU, LSTM, Elman
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import Outcome, format_table, init_model, longest_passing, model_logits, one_hot, train_loop
from jaxrnn.tasks import distance_task
from jaxrnn.train import make_train_step

__all__ = ["CELLS", "CONFIGS", "distance_accuracy", "last_step_loss", "run"]

#: Cell name -> constructor of a cell of hidden size H. ``lstm_bias3``: forget-gate bias 3 instead of 1 (the
#: initialisation experiment measures a 1% gradient horizon of 16 steps at bias 1 and over 200 at bias 3).
CELLS = {"elman": Elman, "lstm": LSTM, "gru": GRU, "lstm_bias3": functools.partial(LSTM, forget_bias=3.0)}
CONFIGS = {
    "small": {"cells": ["elman", "lstm", "gru"], "distances": [1, 2, 4], "hidden_size": 16, "num_symbols": 4,
              "steps": 60, "batch_size": 32, "learning_rate": 0.01, "eval_size": 256, "target_accuracy": 0.9},
    "full": {"cells": ["elman", "lstm", "gru", "lstm_bias3"], "distances": [1, 2, 4, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200],
             "hidden_size": 64, "num_symbols": 4, "steps": 3000, "batch_size": 64, "learning_rate": 0.003,
             "eval_size": 2000, "target_accuracy": 0.9},
}  # fmt: skip
#: Offset between training and test seeds (test sequences are never trained on).
EVAL_SEED = 10**6


def last_step_loss(cell, num_symbols, params, batch):
    """Mean cross-entropy of the prediction at the last step; ``batch = (tokens (B, T), targets (B,))``."""
    tokens, targets = batch
    logits = model_logits(cell, params, one_hot(tokens, num_symbols))[:, -1]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict(cell, num_symbols, params, tokens):
    return jnp.argmax(model_logits(cell, params, one_hot(tokens, num_symbols))[:, -1], axis=-1)


def distance_accuracy(cell, params, distance, *, seq_len, num_symbols, size, seed) -> float:
    """Accuracy at the last step on ``size`` fresh sequences of :func:`jaxrnn.tasks.distance_task`."""
    batch = distance_task(size, distance, seq_len=seq_len, num_symbols=num_symbols, seed=seed)
    return float(np.mean(np.asarray(_predict(cell, num_symbols, params, batch.inputs)) == batch.targets))


def run(cfg: dict, seed: int, out: str) -> Outcome:
    distances, K = cfg["distances"], cfg["num_symbols"]
    B, steps = cfg["batch_size"], cfg["steps"]
    results = {"target_accuracy": cfg["target_accuracy"], "chance": 1 / K, "seq_len": "ℓ + 1 (the answer is the first symbol)",
               "rule": "max_distance: the largest ℓ with accuracy >= target_accuracy and every smaller ℓ passing; "
                       "0 if the smallest ℓ fails",
               "lecture": {"elman": 7, "lstm": 100, "vanilla": "< 20 works, 20-50 struggles, > 50 fails"}}  # fmt: skip
    for name in cfg["cells"]:
        cell = CELLS[name](cfg["hidden_size"])
        step = make_train_step(functools.partial(last_step_loss, cell, K), optax.adam(cfg["learning_rate"]))
        accs, losses = {}, {}
        for k, ell in enumerate(distances):
            data_seed, T = seed * 7919 + 1000 * k, ell + 1

            def batch_at(i, ell=ell, data_seed=data_seed, T=T):
                b = distance_task(B, ell, seq_len=T, num_symbols=K, seed=data_seed + i)
                return b.inputs, b.targets

            params = init_model(cell, jax.random.key(seed), K, K)
            record = train_loop(step, params, batch_at, steps)
            accs[str(ell)] = distance_accuracy(cell, record.params, ell, seq_len=T, num_symbols=K,
                                               size=cfg["eval_size"], seed=EVAL_SEED + data_seed)  # fmt: skip
            losses[str(ell)] = float(np.mean(record.losses[-10:]))
        best = longest_passing(distances, [accs[str(e)] for e in distances], cfg["target_accuracy"])
        results[name] = {"max_distance": best, "accuracy_by_distance": accs, "final_loss_by_distance": losses}

    fig, ax = plots.panels(1, width=6.5, title=f"Accuracy against dependency length (H = {cfg['hidden_size']}, "
                           f"{steps} steps each)")  # fmt: skip
    for name in cfg["cells"]:
        ax[0, 0].plot(distances, [results[name]["accuracy_by_distance"][str(e)] for e in distances], "o-", label=name)
    ax[0, 0].axhline(cfg["target_accuracy"], color="k", ls="--", lw=1, label="set accuracy")
    ax[0, 0].axhline(1 / K, color="gray", ls=":", lw=1, label="chance")
    ax[0, 0].set(xscale="log", xlabel="distance ℓ", ylabel="test accuracy", ylim=(0, 1.02))
    ax[0, 0].set_xticks(distances, [str(e) for e in distances], minor=False)
    ax[0, 0].xaxis.set_minor_locator(NullLocator())
    ax[0, 0].legend(fontsize=8)
    figures = [plots.write_png(fig, out, "dependency-length")]
    header = ["cell", *[f"ℓ={e}" for e in distances], "max ℓ"]
    rows = [[n, *[f"{results[n]['accuracy_by_distance'][str(e)]:.2f}" for e in distances], results[n]["max_distance"]]
            for n in cfg["cells"]]  # fmt: skip
    return Outcome(results, figures, format_table(header, rows))
