"""``jaxrnn experiment depth``: deep stacks with and without skip connections, same task, same budget.

The lectures (multi-layer RNNs; Britz et al. 2017): 2-4 layers help, and
deeper stacks (8 layers) need skip connections to train at all. Here a
character language model (:class:`jaxrnn.models.LanguageModel`: embedding of
width ``H``, a :class:`jaxrnn.Stack` of LSTM layers, a linear read-out) learns
jaxrnn's own Python source (:func:`jaxrnn.experiments.common.load_text`,
about 570k characters, split 90/10 by position: enough text that the
validation loss measures generalisation, unlike the 11k-character embedded
corpus, which a 64-wide stack memorises) for every depth in ``depths`` and every connection in
``connections`` (``"none"``, ``"residual"``, ``"dense"``, ``"highway"``; see
:mod:`jaxrnn.stack`), from the same seed, on the same batches, with the same
Adam budget and clipping. The embedding has the stack's width, so residual
and highway connections join at every layer, the first included.

Measured per run:

* the training loss at every step and the validation loss at the end
  (:func:`jaxrnn.models.lm.evaluate`, the state carried over the whole split);
* the gradient that reaches each layer: ``‖∂J/∂θ_l‖`` (global norm of layer
  ``l``'s parameters, its highway gate included) on a fixed probe batch, at
  initialisation and every ``probe_every`` steps. ``first_layer_grad`` is
  layer 1's (index 0) at initialisation, ``first_layer_grad_final`` at the
  end, ``first_to_last`` layer 1's over the last layer's at initialisation.
  (At initialisation a plain stack's bottom layer is not starved; after a
  few hundred steps a plain 8-layer stack's is, by two orders of magnitude,
  stuck near the unigram solution: the full run's figure shows it.)

Results: ``results["runs"]["{connection}-{depth}"] = {"connection", "depth",
"losses", "final_loss" (mean of the last 10 steps), "val_loss",
"grad_norms" (global, before clipping), "probe_steps", "layer_grad_norms"
(one list of ``depth`` norms per probe step), "first_layer_grad",
"first_layer_grad_final", "first_to_last"}``; ``results["best_by_depth"][depth]``: the connection with
the lowest validation loss (``results["best_train_by_depth"][depth]``: the
lowest final training loss); ``results["gap_at_deepest"]``: the plain
stack's validation loss minus the best connection's at the largest depth.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from jaxrnn.cells import GRU, LSTM, Elman
from jaxrnn.data import Vocab, sample_windows, train_val_split
from jaxrnn.experiments import plots
from jaxrnn.experiments.common import Outcome, format_table, load_text, text_record, train_loop
from jaxrnn.models import lm
from jaxrnn.stack import Stack
from jaxrnn.train import make_train_step

__all__ = ["CELLS", "CONFIGS", "CONNECTIONS", "build_model", "layer_grad_norms", "run"]

CELLS = {"elman": Elman, "lstm": LSTM, "gru": GRU}
#: Connection names of this experiment -> ``Stack(connection=...)``.
CONNECTIONS = {"none": None, "residual": "residual", "dense": "dense", "highway": "highway"}
CONFIGS = {
    "small": {"text": "source", "max_chars": 20000, "cell": "lstm", "depths": [2], "connections": ["none", "residual", "dense", "highway"],
              "hidden_size": 8, "window": 16, "batch_size": 8, "steps": 12, "learning_rate": 0.003,
              "max_grad_norm": 1.0, "probe_every": 6, "eval_window": 64},
    "full": {"text": "source", "max_chars": 0, "cell": "lstm", "depths": [2, 4, 8], "connections": ["none", "residual", "dense", "highway"],
             "hidden_size": 64, "window": 64, "batch_size": 32, "steps": 800, "learning_rate": 0.003,
             "max_grad_norm": 1.0, "probe_every": 100, "eval_window": 256},
}  # fmt: skip


def build_model(cfg: dict, depth: int, connection: str, vocab_size: int) -> lm.LanguageModel:
    """The language model of one run: embedding width = hidden size, a ``depth``-layer stack with ``connection``."""
    H = cfg["hidden_size"]
    stack = Stack(CELLS[cfg["cell"]](H), num_layers=depth, connection=CONNECTIONS[connection])
    return lm.LanguageModel(vocab_size, stack, embed_size=H)


@functools.partial(jax.jit, static_argnums=0)
def layer_grad_norms(model: lm.LanguageModel, params: lm.LMParams, tokens) -> jax.Array:
    """``(L,)``: ``‖∂J/∂θ_l‖`` for every layer ``l`` of the stack, ``J`` = :func:`jaxrnn.models.lm.loss` on ``tokens``."""
    grads = jax.grad(lambda p: lm.loss(model, p, tokens))(params)
    return jax.numpy.stack([optax.tree.norm(layer) for layer in grads.rnn])


def run(cfg: dict, seed: int, out: str) -> Outcome:
    text = load_text(cfg["text"], cfg["max_chars"])
    vocab = Vocab.from_text(text)
    train_ids, val_ids = (jax.numpy.asarray(a) for a in train_val_split(vocab.encode(text)))
    B, W, steps = cfg["batch_size"], cfg["window"] + 1, cfg["steps"]
    data_key = jax.random.fold_in(jax.random.key(seed), 1)

    def batch_at(k):
        return sample_windows(jax.random.fold_in(data_key, k), train_ids, B, W), None

    probe = sample_windows(jax.random.fold_in(jax.random.key(seed), 2), train_ids, B, W)  # never trained on as such
    probe_steps = list(range(0, steps, cfg["probe_every"])) + [steps]
    results = {"text": text_record(cfg["text"], text), "vocab_size": vocab.size, "train_chars": int(train_ids.size),
               "val_chars": int(val_ids.size), "runs": {}, "best_by_depth": {}, "best_train_by_depth": {},
               "lecture": "Britz et al. 2017: 8-layer stacks need skip (residual/dense) connections to train"}  # fmt: skip
    rows = []
    for depth in cfg["depths"]:
        for connection in cfg["connections"]:
            model = build_model(cfg, depth, connection, vocab.size)
            params = model.init(jax.random.key(seed))
            step = make_train_step(lambda p, b, model=model: lm.loss(model, p, b[0], b[1]),
                                   optax.adam(cfg["learning_rate"]), max_grad_norm=cfg["max_grad_norm"])  # fmt: skip
            record = train_loop(step, params, batch_at, steps, keep_params_at=probe_steps[:-1])
            kept = {**record.kept, steps: record.params}
            norms = [np.asarray(layer_grad_norms(model, kept[k], probe), np.float64).tolist() for k in probe_steps]
            val = lm.evaluate(model, record.params, val_ids, window=cfg["eval_window"]).nll
            entry = {"connection": connection, "depth": depth, "losses": record.losses.tolist(),
                     "final_loss": float(np.mean(record.losses[-10:])), "val_loss": float(val),
                     "grad_norms": record.grad_norms.tolist(), "probe_steps": probe_steps,
                     "layer_grad_norms": norms, "first_layer_grad": norms[0][0],
                     "first_layer_grad_final": norms[-1][0], "first_to_last": norms[0][0] / norms[0][-1]}  # fmt: skip
            results["runs"][f"{connection}-{depth}"] = entry
            rows.append([f"{connection}, {depth} layers", f"{record.losses[0]:.3f}", f"{entry['final_loss']:.3f}",
                         f"{val:.3f}", f"{norms[0][0]:.3g}", f"{norms[-1][0]:.3g}", f"{entry['first_to_last']:.3g}"])  # fmt: skip
        by_val = {c: results["runs"][f"{c}-{depth}"]["val_loss"] for c in cfg["connections"]}
        by_train = {c: results["runs"][f"{c}-{depth}"]["final_loss"] for c in cfg["connections"]}
        results["best_by_depth"][str(depth)] = min(by_val, key=by_val.get)
        results["best_train_by_depth"][str(depth)] = min(by_train, key=by_train.get)
    deepest = max(cfg["depths"])
    if "none" in cfg["connections"]:
        vals = [results["runs"][f"{c}-{deepest}"]["val_loss"] for c in cfg["connections"]]
        results["gap_at_deepest"] = results["runs"][f"none-{deepest}"]["val_loss"] - min(vals)

    figures = [_figure(cfg, results, out)]
    header = ["stack", "first loss", "final loss", "val loss", "‖∂J/∂θ_1‖ at init", "at the end", "layer 1 / L at init"]
    return Outcome(results, figures, format_table(header, rows))


def _figure(cfg, results, out):
    depths, connections = cfg["depths"], cfg["connections"]
    fig, ax = plots.panels(len(depths) + 1, width=4.5, title=f"Depth and skip connections: {cfg['cell'].upper()} "
                           f"character LM, H = {cfg['hidden_size']}, {cfg['steps']} Adam steps each")  # fmt: skip
    colours = dict(zip(CONNECTIONS, ("k", "C0", "C1", "C2")))
    for j, depth in enumerate(depths):
        for c in connections:
            losses = np.asarray(results["runs"][f"{c}-{depth}"]["losses"])
            w = min(10, losses.size)
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")  # smooth[k]: the mean of steps k .. k+w-1
            ax[0, j].plot(np.arange(w - 1, losses.size), smooth, color=colours[c], label=c)
        ax[0, j].set(xlabel="step", ylabel="training loss (nats/char, 10-step mean)", title=f"{depth} layer{'s' if depth > 1 else ''}")
        ax[0, j].legend(fontsize=8)
    last, deepest = ax[0, len(depths)], max(depths)
    for c in connections:
        run = results["runs"][f"{c}-{deepest}"]
        last.semilogy(run["probe_steps"], [n[0] for n in run["layer_grad_norms"]], "o-", color=colours[c], label=c)
    last.set(xlabel="step", ylabel="‖∂J/∂θ_1‖ (probe batch)", title=f"gradient reaching layer 1 of {deepest}")
    last.legend(fontsize=8)
    return plots.write_png(fig, out, "depth")
