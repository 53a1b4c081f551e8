"""``jaxrnn demo``: train a small character-level language model and show what it learned.

Trains an LSTM (``--cell``) on the embedded text of :mod:`jaxrnn.data` (or
``--text FILE``) for a few hundred Adam steps with gradient clipping, printing
a progress table; then prints text sampled before and after training, the
validation perplexity before and after against a unigram baseline, and saves
a figure of the training curves. Unless ``--no-compare``, GRU and Elman
models are trained with the identical budget (steps, batch, hidden size,
seed) and drawn on the same figure. About 30-60 s on two CPU cores.

Example:
  $ jaxrnn demo --steps 300 --out out/demo
  $ python -m jaxrnn demo --cell gru --hidden 64 --no-compare
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import data, lm
from jaxrnn.cells import GRU, LSTM, Elman
from jaxrnn.runner import IMPLS

CELLS = {"lstm": ("LSTM", LSTM), "gru": ("GRU", GRU), "elman": ("Elman", Elman)}
COLORS = {"lstm": "tab:blue", "gru": "tab:orange", "elman": "tab:green"}
FIGURE_NAME = "lm_curves.png"


class _ArgumentError(ValueError):
    """A bad command line (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentError(message)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxrnn demo", description="Train a small character-level language model and show what it learned.")
    p.add_argument("--steps", type=_positive(int), default=300, help="training steps per model (300)")
    p.add_argument("--cell", choices=sorted(CELLS), default="lstm", help="cell of the main model (lstm)")
    p.add_argument("--hidden", type=_positive(int), default=128, help="hidden size H (128)")
    p.add_argument("--layers", type=_positive(int), default=1, help="stacked layers (1)")
    p.add_argument("--embed", type=_positive(int), default=32, help="embedding size (32)")
    p.add_argument("--batch", type=_positive(int), default=32, help="windows per batch (32)")
    p.add_argument("--seq-len", type=_positive(int), default=64, help="characters read per window (64)")
    p.add_argument("--lr", type=_positive(float), default=3e-3, help="Adam learning rate (3e-3)")
    p.add_argument("--clip", type=_positive(float), default=1.0, help="global gradient-norm clip (1.0)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0.8; 0 is greedy)")
    p.add_argument("--prompt", default="The ", help="start of the samples ('The ')")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    p.add_argument("--text", default=None, metavar="FILE", help="train on this UTF-8 text instead")
    p.add_argument("--out", default=os.path.join("out", "demo"), metavar="DIR", help="figure folder (out/demo)")
    p.add_argument("--impl", choices=list(IMPLS), default="auto", help="recurrence implementation (auto)")
    p.add_argument("--no-compare", action="store_true", help="train only --cell, not all three cells")
    return p


# --------------------------------------------------------------------------
# Training one model
# --------------------------------------------------------------------------
def train(model, train_ids, val_windows, *, steps, batch, window, lr, clip, seed, on_eval=None):
    """Train ``model`` on random windows of ``train_ids``.

    Returns:
      ``(params_before, params, history)``; ``history`` has the per-step
      training ``loss`` (``(steps,)``), and ``eval_steps`` with the validation
      perplexity ``val_ppl`` at each.
    """
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = params0 = model.init(k_init)
    optimizer = lm.make_optimizer(lr, clip)
    opt_state = optimizer.init(params)
    train_step = lm.make_train_step(model, optimizer)
    ids = jnp.asarray(train_ids)

    @jax.jit
    def step(params, opt_state, key):
        return train_step(params, opt_state, data.sample_windows(key, ids, batch, window))

    every = max(1, steps // 10)
    losses, eval_steps, val_ppl = [], [0], [lm.perplexity(model, params, val_windows)]
    start = time.perf_counter()
    if on_eval:
        on_eval(0, float("nan"), val_ppl[0], 0.0)
    for i, key in enumerate(jax.random.split(k_data, steps), start=1):
        params, opt_state, metrics = step(params, opt_state, key)
        losses.append(metrics["loss"])
        if i % every == 0 or i == steps:
            recent = float(np.mean(jax.device_get(losses[-every:])))
            eval_steps.append(i)
            val_ppl.append(lm.perplexity(model, params, val_windows))
            if on_eval:
                on_eval(i, recent, val_ppl[-1], time.perf_counter() - start)
    history = {
        "loss": np.asarray(jax.device_get(losses)),
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
    from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: no global backend state)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: PLC0415

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
# Main
# --------------------------------------------------------------------------
def _indent(text, prefix="    "):
    return "\n".join(prefix + line for line in text.split("\n"))


def _prepare(args):
    """Validate the command line against the data; return everything training needs."""
    text = data.load_text(args.text)
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    window = args.seq_len + 1
    train_ids, val_ids = data.train_val_split(ids, 0.1)
    if val_ids.size < window or train_ids.size < window:
        raise ValueError(
            f"--seq-len: {args.seq_len} is too long for a text of {len(text)} characters "
            f"(the 10% validation part must hold seq_len + 1 = {window})"
        )
    if not args.prompt:
        raise ValueError("--prompt: expected at least one character")
    missing = sorted(set(args.prompt) - set(vocab.chars))
    if missing:
        raise ValueError(f"--prompt: characters {''.join(missing)!r} do not occur in the text")
    if args.temperature < 0:
        raise ValueError(f"--temperature: expected a value >= 0, got {args.temperature}")
    return text, vocab, train_ids, val_ids, window


def main(argv=None) -> int:
    """Run the demo; returns the exit status (2 for a bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        text, vocab, train_ids, val_ids, window = _prepare(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxrnn demo: {e}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    val_windows = data.split_windows(val_ids, window)
    source = "the embedded text" if args.text is None else repr(args.text)
    names = [args.cell] + ([] if args.no_compare else [n for n in CELLS if n != args.cell])
    budget = f"{args.steps} steps of {args.batch} x {args.seq_len} chars, Adam {args.lr:g}, clip {args.clip:g}"
    print(f"jaxrnn demo: character-level language model on {source} ({len(text):,} chars, {vocab.size} distinct)")
    print(f"  train {train_ids.size:,} chars, validate on the last {val_ids.size:,}; {budget}")

    models, results = {}, {}
    for n, name in enumerate(names):
        label, cell_type = CELLS[name]
        model = lm.LanguageModel(
            vocab.size, cell_type(args.hidden), num_layers=args.layers, embed_size=args.embed, impl=args.impl
        )
        models[name] = model
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(model.init(jax.random.key(0))))
        print(f"\n{label}: {args.layers} layer(s), hidden {args.hidden}, embed {args.embed}, {n_params:,} parameters")
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
            steps=args.steps,
            batch=args.batch,
            window=window,
            lr=args.lr,
            clip=args.clip,
            seed=args.seed,
            on_eval=on_eval,
        )
        h = results[name][2]
        if n > 0:
            print(f"  trained in {h['seconds']:.1f}s: final loss {np.mean(h['loss'][-10:]):.3f}")

    main_name = names[0]
    main_label, model = CELLS[main_name][0], models[main_name]
    params0, params, history = results[main_name]
    prompt = vocab.encode(args.prompt)
    key = jax.random.key(args.seed + 1)
    for when, p in (("before", params0), ("after", params)):
        ids = lm.generate(model, p, key, prompt, 240, temperature=args.temperature)
        print(f"\nSample {when} training ({main_label}, temperature {args.temperature:g}):")
        print(_indent(args.prompt + vocab.decode(np.asarray(ids))))

    unigram = lm.unigram_perplexity(train_ids, val_ids, vocab.size)
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

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, FIGURE_NAME)
    subtitle = f"{source}, hidden {args.hidden}, {budget}"
    save_figure(path, {n: (CELLS[n][0], results[n][2]) for n in names}, unigram, vocab.size, subtitle)
    print(f"\nFigure: {path}")
    print(f"Done in {time.perf_counter() - t_start:.1f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
