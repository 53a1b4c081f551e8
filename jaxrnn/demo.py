"""The demo behind ``jaxrnn demo``: train small character-level language models and report what they learned.

Trains an LSTM (or the first of ``Config.cells``) on a text, by default the
corpus shipped in :mod:`jaxrnn.data`, for a few hundred Adam steps with
gradient clipping (the one training step of :mod:`jaxrnn.train`), printing a
progress table; then prints text sampled before and after training, the
validation perplexity before and after against a unigram baseline, and saves
a figure of the training curves. Further cells are trained with the
identical budget (steps, batch, hidden size, seed) and drawn on the same
figure. The command line (argument checks, ``main``) is
:mod:`jaxrnn.cli.demo`.

Example:
  >>> text = data.load_text()
  >>> demo.run(demo.split_corpus(text, "the shipped text"), demo.Config(steps=100, cells=("gru",)))
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import data
from jaxrnn.cells import GRU, LSTM, Elman
from jaxrnn.models import lm

CELLS = {"lstm": ("LSTM", LSTM), "gru": ("GRU", GRU), "elman": ("Elman", Elman)}
COLORS = {"lstm": "tab:blue", "gru": "tab:orange", "elman": "tab:green"}
FIGURE_NAME = "lm_curves.png"
VAL_FRACTION = 0.1
SAMPLE_LENGTH = 240


@dataclasses.dataclass(frozen=True)
class Config:
    """The demo's settings (the command line's options; checked there).

    Attributes:
      cells: names in :data:`CELLS`; the first is the main model (progress
        table, samples), the others are trained with the same budget.
      steps, batch, seq_len: training steps per model, windows per batch and
        characters read per window.
      hidden, layers, embed: the model's size.
      lr, clip: Adam's learning rate and the global gradient-norm clip.
      temperature, prompt: sampling.
      seed: PRNG seed.
      impl: recurrence implementation (:data:`jaxrnn.IMPLS`).
      out: folder of the figure.
    """

    cells: Tuple[str, ...] = tuple(CELLS)
    steps: int = 300
    hidden: int = 128
    layers: int = 1
    embed: int = 32
    batch: int = 32
    seq_len: int = 64
    lr: float = 3e-3
    clip: float = 1.0
    temperature: float = 0.8
    prompt: str = "The "
    seed: int = 0
    impl: str = "auto"
    out: str = os.path.join("out", "demo")


class Corpus(NamedTuple):
    """A text as the demo uses it: its vocabulary, and its token ids split into training and validation parts."""

    text: str
    source: str
    vocab: data.Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray


def split_corpus(text: str, source: str) -> Corpus:
    """The character vocabulary of ``text`` and its ids, the last :data:`VAL_FRACTION` held out for validation."""
    vocab = data.Vocab.from_text(text)
    train_ids, val_ids = data.train_val_split(vocab.encode(text), VAL_FRACTION)
    return Corpus(text, source, vocab, train_ids, val_ids)


# --------------------------------------------------------------------------
# Training one model
# --------------------------------------------------------------------------
def train(model, train_ids, val_windows, *, steps, batch, window, lr, clip, seed, on_eval=None):
    """Train ``model`` on random windows of ``train_ids``.

    Every step is :func:`jaxrnn.models.lm.make_train_step`'s (Adam after
    clipping the gradient norm to ``clip``); a step whose loss or gradient is
    not finite is skipped.

    Returns:
      ``(params_before, params, history)``; ``history`` has the per-step
      training ``loss`` (``(steps,)``), ``skipped`` (the number of non-finite
      steps, not applied), and ``eval_steps`` with the validation perplexity
      ``val_ppl`` at each.
    """
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = params0 = model.init(k_init)
    train_step = lm.make_train_step(model, lm.make_optimizer(lr, clip))
    opt_state = train_step.init(params)
    ids = jnp.asarray(train_ids)

    @jax.jit
    def step(params, opt_state, key):
        return train_step(params, opt_state, data.sample_windows(key, ids, batch, window))

    every = max(1, steps // 10)
    losses, finite, eval_steps, val_ppl = [], [], [0], [lm.perplexity(model, params, val_windows)]
    start = time.perf_counter()
    if on_eval:
        on_eval(0, float("nan"), val_ppl[0], 0.0)
    for i, key in enumerate(jax.random.split(k_data, steps), start=1):
        params, opt_state, metrics = step(params, opt_state, key)
        losses.append(metrics["loss"])
        finite.append(metrics["finite"])
        if i % every == 0 or i == steps:
            recent = float(np.mean(jax.device_get(losses[-every:])))
            eval_steps.append(i)
            val_ppl.append(lm.perplexity(model, params, val_windows))
            if on_eval:
                on_eval(i, recent, val_ppl[-1], time.perf_counter() - start)
    history = {
        "loss": np.asarray(jax.device_get(losses)),
        "skipped": int(np.sum(~np.asarray(jax.device_get(finite)))),
        "eval_steps": np.asarray(eval_steps),
        "val_ppl": np.asarray(val_ppl),
        "seconds": time.perf_counter() - start,
    }
    return params0, params, history


# --------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------
def _smooth(values):
    """Bias-corrected exponential moving average (as in Adam's moment estimates),
    averaging over about 10 steps, fewer for short runs."""
    weight = min(0.9, max(0.0, 1.0 - 10.0 / len(values)))
    out, avg = np.empty(len(values)), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def save_figure(path, histories, unigram_ppl, vocab_size, subtitle):
    """Training loss and validation perplexity of each model, side by side."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (heavy: `import jaxrnn` must not load matplotlib)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: PLC0415  (likewise)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_ppl = fig.subplots(1, 2)
    for name, (label, h) in histories.items():
        steps = np.arange(1, len(h["loss"]) + 1)
        ax_loss.plot(steps, h["loss"], color=COLORS[name], alpha=0.2, linewidth=0.8)
        ax_loss.plot(steps, _smooth(h["loss"]), color=COLORS[name], label=label)
        ax_ppl.plot(h["eval_steps"], h["val_ppl"], "o-", color=COLORS[name], markersize=3, label=label)
    ax_loss.axhline(math.log(unigram_ppl), color="gray", linestyle="--", label="unigram entropy")
    ax_loss.set(title="Training loss (teacher forcing)", xlabel="step", ylabel="cross-entropy (nats / char)")
    ax_ppl.axhline(unigram_ppl, color="gray", linestyle="--", label=f"unigram baseline ({unigram_ppl:.1f})")
    ax_ppl.axhline(vocab_size, color="gray", linestyle=":", label=f"uniform guess (V = {vocab_size})")
    ax_ppl.set_yscale("log")
    ax_ppl.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_ppl.yaxis.set_major_formatter(ScalarFormatter())
    ax_ppl.yaxis.set_minor_formatter(NullFormatter())
    ax_ppl.set(title="Validation perplexity (held-out text)", xlabel="step", ylabel="perplexity (log scale)")
    for ax in (ax_loss, ax_ppl):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=9)
    if len(histories) > 1:
        title = "Character-level RNN language models, identical budgets"
    else:
        title = f"Character-level {next(iter(histories.values()))[0]} language model"
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------
def _indent(text, prefix="    "):
    return "\n".join(prefix + line for line in text.split("\n"))


def run(corpus: Corpus, config: Config) -> None:
    """Train every cell of ``config`` on ``corpus``, print the report and save the figure in ``config.out``."""
    t_start = time.perf_counter()
    text, source, vocab, train_ids, val_ids = corpus
    window = config.seq_len + 1
    val_windows = data.split_windows(val_ids, window)
    names = list(config.cells)
    budget = f"{config.steps} steps of {config.batch} x {config.seq_len} chars, Adam {config.lr:g}, clip {config.clip:g}"
    print(f"jaxrnn demo: character-level language model on {source} ({len(text):,} chars, {vocab.size} distinct)")
    print(f"  train {train_ids.size:,} chars, validate on the last {val_ids.size:,}; {budget}")

    models, results = {}, {}
    for n, name in enumerate(names):
        label, cell_type = CELLS[name]
        model = lm.LanguageModel(
            vocab.size, cell_type(config.hidden), num_layers=config.layers, embed_size=config.embed, impl=config.impl
        )
        models[name] = model
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(model.init(jax.random.key(0))))
        print(
            f"\n{label}: {config.layers} layer(s), hidden {config.hidden}, embed {config.embed}, {n_params:,} parameters"
        )
        if n == 0:
            print(f"  {'step':>5}  {'loss':>6}  {'train ppl':>9}  {'val ppl':>8}  {'time':>6}")

            def on_eval(step, loss, val_ppl, seconds):
                shown = ("-", "-") if math.isnan(loss) else (f"{loss:.3f}", f"{math.exp(loss):.2f}")
                print(f"  {step:>5}  {shown[0]:>6}  {shown[1]:>9}  {val_ppl:>8.2f}  {seconds:>5.1f}s", flush=True)

        else:
            on_eval = None
        results[name] = train(
            model,
            train_ids,
            val_windows,
            steps=config.steps,
            batch=config.batch,
            window=window,
            lr=config.lr,
            clip=config.clip,
            seed=config.seed,
            on_eval=on_eval,
        )
        h = results[name][2]
        if n > 0:
            print(f"  trained in {h['seconds']:.1f}s: final loss {np.mean(h['loss'][-10:]):.3f}")
        if h["skipped"]:
            print(f"  {h['skipped']} step(s) skipped: their loss or gradient was not finite")

    main_name = names[0]
    main_label, model = CELLS[main_name][0], models[main_name]
    params0, params, history = results[main_name]
    prompt = vocab.encode(config.prompt)
    key = jax.random.key(config.seed + 1)
    for when, p in (("before", params0), ("after", params)):
        ids = lm.generate(model, p, key, prompt, SAMPLE_LENGTH, temperature=config.temperature)
        print(f"\nSample {when} training ({main_label}, temperature {config.temperature:g}):")
        print(_indent(config.prompt + vocab.decode(np.asarray(ids))))

    unigram = lm.unigram_perplexity(train_ids, val_ids[1:], vocab.size)  # the predictions evaluate makes
    print("\nValidation perplexity (lower is better; exp of the mean cross-entropy per character):")
    print(f"  uniform guess (V)             {vocab.size:8.2f}")
    print(f"  perplexity before training    {history['val_ppl'][0]:8.2f}   ({main_label})")
    print(f"  unigram baseline              {unigram:8.2f}")
    print(f"  perplexity after training     {history['val_ppl'][-1]:8.2f}   ({main_label})")
    for name in names[1:]:
        h = results[name][2]
        print(f"  after training, {CELLS[name][0]:<13} {h['val_ppl'][-1]:8.2f}")
    best = {n: int(np.argmin(results[n][2]["val_ppl"])) for n in names}
    if any(b < len(results[n][2]["val_ppl"]) - 1 for n, b in best.items()):
        listed = ", ".join(
            f"{CELLS[n][0]} {results[n][2]['val_ppl'][b]:.2f} (step {results[n][2]['eval_steps'][b]})"
            for n, b in best.items()
        )
        print(f"  best seen: {listed};\n  past its best a model memorises the training text (more text would help)")

    os.makedirs(config.out, exist_ok=True)
    path = os.path.join(config.out, FIGURE_NAME)
    subtitle = f"{source}, hidden {config.hidden}, {budget}"
    save_figure(path, {n: (CELLS[n][0], results[n][2]) for n in names}, unigram, vocab.size, subtitle)
    print(f"\nFigure: {path}")
    print(f"Done in {time.perf_counter() - t_start:.1f}s.")
