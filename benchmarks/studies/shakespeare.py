"""Tiny Shakespeare quality benchmark: validation loss of a character LSTM after a wall-clock training budget, on CPU.

The task (the models-and-training issue): character-level Tiny Shakespeare
(``../shared/data/tinyshakespeare.txt`` beside the checkout; the package
itself does not need it), split by position, the first 90% for training and
the last 10% for validation; the score is the validation loss in nats per
character over the **whole** validation split (every character after the
first given everything before it: :func:`jaxrnn.models.lm.evaluate`, the
recurrent state carried across the whole split, read as ``--eval-streams``
parallel streams, i.e. ``streams - 1`` state resets among ~111k
predictions), after ``--minutes`` (10) of training on the CPU.

Configurations (:data:`CONFIGS`):

* ``baseline``: the issue's measurement (1.52 nats/char in 10 min at ~17.7k
  tokens/s): a 2-layer LSTM, hidden 256, embedding 64, random windows of 128
  characters, batch 32, Adam 2e-3, gradient clipping at norm 1, no dropout,
  a constant learning rate.
* ``improved``: 1.424 nats/char in the same 10 minutes (measured on the
  2-core CPU, ``benchmarks/results/cpu/shakespeare_improved.json``):
  stateful truncated BPTT (32 consecutive-window streams, the state carried,
  so training sees the long contexts that the evaluation uses, and no
  prediction is made from a zero state), hidden 384 (about 1.7x the compute
  per character of hidden 256 on CPU), variational dropout 0.25 between the
  layers (one mask per stream and window) and dropout 0.1 on the embedded
  characters, a warm-up over the first :data:`PROBE_STEPS` steps to a peak
  of 3e-3, then a cosine decay to 5% of it at the end of the budget. The
  same with dropout 0.1 and no embedding dropout reached 1.455: the training
  loss fell to 1.05 while the validation loss stalled from the 60% mark on,
  i.e. it overfitted. Weight tying is left out: at 65 characters the output
  matrix is 65 x H, tying saves nothing and would force the embedding width
  to H.

How the wall clock is kept: :func:`jaxrnn.train.fit` has no time-based stop,
but ends a run when its batch iterator ends, so the batches come from an
iterator that ends once the training time (``time.perf_counter`` since the
start, compilation and checkpoint writes included, validations excluded) is
spent. A learning-rate schedule needs the number of steps in advance: the
run is two ``fit`` calls on one checkpoint directory. The first runs
:data:`PROBE_STEPS` steps (the warm-up, which does not depend on the total)
and measures the time per step; the total is then the probe plus what the
rest of the budget holds at that rate (less one more compilation), and the
second call resumes from the first's checkpoint to that total (or to the end
of the budget, whichever comes first). ``--steps N`` replaces the budget by
a fixed number of steps (smoke tests).

Baselines on the same validation split (the same predictions):

* an interpolated Kneser-Ney n-gram (:class:`jaxrnn.models.KneserNey`,
  discount 0.75) of the order among ``--kn-orders`` (3..7) that scores best
  on the last 10% of the training split when fitted on the rest; refitted
  on the whole training split with that order;
* a fixed-window neural LM (:class:`jaxrnn.models.WindowLM`, the previous 10
  characters, embedding 16, tanh layer of 512) trained with ``fit`` for
  ``--window-lm-minutes`` (1) on random windows;
* the add-one unigram model.

Writes ``<out>/shakespeare_<config>.json`` (``benchmark``: "shakespeare",
``val_loss``, ``config``, ``seconds``, ``tokens_per_second``, ``device``,
``versions``, ``curve``, ``baselines``, ...) and ``shakespeare_<config>.png``
(validation loss against training minutes, with the baselines).
``--checkpoint-dir`` keeps the checkpoints (metadata as ``jaxrnn train``
writes it, so ``jaxrnn eval`` and ``jaxrnn sample`` read them).

Example:
  $ python -m benchmarks.studies.shakespeare --config baseline            # 10 minutes
  $ python -m benchmarks.studies.shakespeare --config improved --minutes 0.3 --out /tmp/sh
  $ python -m benchmarks.studies.shakespeare --hidden 32 --layers 1 --batch 8 --window 32 --steps 20 --out /tmp/sh
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from benchmarks import measure, report
from jaxrnn import data, train
from jaxrnn.cli import lm_common
from jaxrnn.cli.args import Parser, positive_float, positive_int, rate
from jaxrnn.models import KneserNey, WindowLM, lm
from jaxrnn.runner import IMPLS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TEXT = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
#: Steps of the timing probe, which are also the learning-rate warm-up of a schedule.
PROBE_STEPS = 50
#: The issue's measurement of ``baseline`` and its target for ``improved``.
ISSUE = {"baseline_val_loss": 1.52, "baseline_tokens_per_second": 17700, "target_val_loss": 1.45, "minutes": 10}
CONFIGS = {
    "baseline": dict(
        cell="lstm", layers=2, hidden=256, embed=64, window=128, batch=32, lr=2e-3, clip=1.0,
        dropout=0.0, dropout_mode="per_step", embedding_dropout=0.0, tie_weights=False,
        stateful=False, schedule="constant",
    ),
    "improved": dict(
        cell="lstm", layers=2, hidden=384, embed=64, window=128, batch=32, lr=3e-3, clip=1.0,
        dropout=0.25, dropout_mode="variational", embedding_dropout=0.1, tie_weights=False,
        stateful=True, schedule="cosine",
    ),
}  # fmt: skip
#: The fixed-window LM baseline: (context, embedding, hidden, batch, learning rate).
WINDOW_LM = dict(context=10, embed=16, hidden=512, batch=64, lr=2e-3)
FINAL_LR_FRACTION = 0.05


# --------------------------------------------------------------------------
# The wall clock
# --------------------------------------------------------------------------
class Budget:
    """Training time: wall-clock seconds since :meth:`start`, less the time spent in :meth:`paused` blocks."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.begin = None
        self.excluded = 0.0

    def start(self):
        self.begin = time.perf_counter()
        return self

    def spent(self) -> float:
        return time.perf_counter() - self.begin - self.excluded

    def left(self) -> float:
        return self.seconds - self.spent()

    def paused(self, fn, *args):
        """``fn(*args)``, its time not counted."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.excluded += time.perf_counter() - t0


class UntilSpent:
    """Iterator of ``batches(0), batches(1), ...`` that ends once ``budget`` is spent (fit then stops and checkpoints).

    The first ``max(replay, 1)`` batches always come: at least one step, and
    the batches a resumed fit draws again to skip them (``replay``: the
    position it resumes from).
    """

    def __init__(self, batches, budget: Budget, replay: int = 0):
        self.batches, self.budget, self.replay, self.i = batches, budget, replay, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= max(self.replay, 1) and self.budget.left() <= 0:
            raise StopIteration
        batch = self.batches(self.i)
        self.i += 1
        return batch


def lr_schedule(kind: str, warmup: int, total: int):
    """The learning-rate multiplier per step: ``None`` (constant), or a linear warm-up from 0.1 to 1 over
    ``warmup`` steps and a cosine decay to :data:`FINAL_LR_FRACTION` at step ``total``."""
    if kind == "constant":
        return None
    warm = optax.linear_schedule(0.1, 1.0, warmup)
    decay = optax.cosine_decay_schedule(1.0, max(total - warmup, 1), alpha=FINAL_LR_FRACTION)
    return optax.join_schedules([warm, decay], [warmup])


def optimizer_factory(schedule):
    """``lambda lr: Adam(lr × schedule)`` for fit (which may lower ``lr`` after a fault)."""
    if schedule is None:
        return lambda lr: optax.adam(lr)
    return lambda lr: optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(schedule), optax.scale(-lr))


def step_seconds(history) -> float:
    """Seconds per step after the first (compiling) one, from fit's step records."""
    times = [r["time"] for r in history.steps()]
    return (times[-1] - times[0]) / max(len(times) - 1, 1)


# --------------------------------------------------------------------------
# The recurrent model, against the clock
# --------------------------------------------------------------------------
def train_lm(corpus, settings, args, checkpoint_dir):
    """Train the configuration; ``(model, params, run)`` with the curve, timing and step counts in ``run``."""
    config = lm_common.model_config(
        corpus.vocab.size, cell=settings["cell"], hidden=settings["hidden"], layers=settings["layers"],
        embed=settings["embed"], tie_weights=settings["tie_weights"], dropout=settings["dropout"],
        dropout_mode=settings["dropout_mode"], embedding_dropout=settings["embedding_dropout"], impl=args.impl,
    )  # fmt: skip
    model = lm_common.build_model(config)
    batch, window, stateful = settings["batch"], settings["window"], settings["stateful"]
    metadata = lm_common.make_metadata(config, corpus, batch=batch, window=window, stateful=stateful, seed=args.seed)
    budget = Budget(float("inf") if args.steps else args.minutes * 60.0)
    curve = []

    def eval_fn(params):
        val = budget.paused(lm_common.evaluate_split, model, params, corpus.val_ids, args.eval_streams)
        curve.append({"seconds": budget.spent(), "val_loss": val.nll})
        return {"val_loss": val.nll}

    common = dict(
        batch=batch, window=window, stateful=stateful, seed=args.seed, learning_rate=settings["lr"], clip=settings["clip"],
        batches=UntilSpent(lm_common.training_batches(corpus.train_ids, batch=batch, window=window, stateful=stateful,
                                                      seed=args.seed), budget),
        eval_fn=eval_fn, checkpoint_dir=checkpoint_dir, checkpoint_every=10**9, metadata=metadata, progress=args.progress,
    )  # fmt: skip
    params0 = model.init(jax.random.key(args.seed))
    warmup = PROBE_STEPS if not args.steps else max(1, min(PROBE_STEPS, args.steps // 10))
    budget.start()
    histories = []
    total, done, probe_rate = args.steps, 0, None
    if not args.steps:  # probe: the warm-up steps, timed
        optimizer = optimizer_factory(lr_schedule(settings["schedule"], warmup, warmup + 1))
        params, history = lm_common.fit_lm(model, params0, corpus.train_ids, corpus.val_ids, steps=PROBE_STEPS,
                                           optimizer=optimizer, **common)  # fmt: skip
        histories.append(history)
        probe_rate = step_seconds(history)
        first_step = history.steps()[0]["time"] if history.steps() else 0.0  # compilation and the first step
        done = history.steps()[-1]["step"] if history.steps() else 0
        total = done + max(0, int((budget.left() - first_step) / max(probe_rate, 1e-9)))
        # from its start again: fit draws and drops the batches of the probe
        common["batches"] = UntilSpent(common["batches"].batches, budget, replay=common["batches"].i)
    if total > done:  # the run (resumed after the probe), to the total or the end of the budget
        optimizer = optimizer_factory(lr_schedule(settings["schedule"], warmup, total))
        params, history = lm_common.fit_lm(model, params0, corpus.train_ids, corpus.val_ids, steps=total, optimizer=optimizer,
                                           eval_every=max(1, (total - done) // args.eval_points), **common)  # fmt: skip
        histories.append(history)
    seconds = budget.spent()
    steps = [r for h in histories for r in h.steps()]
    evals = [r for h in histories for r in h.evals()]
    tokens_per_step = batch * window
    for point, record in zip(curve, evals):
        point.update(step=record["step"], tokens=record["step"] * tokens_per_step)
    final_step = steps[-1]["step"] if steps else 0
    diffs = np.diff([r["time"] for r in history.steps()])
    run = {
        "val_loss": curve[-1]["val_loss"],
        "steps": final_step,
        "planned_steps": total,
        "seconds": seconds,
        "tokens": final_step * tokens_per_step,
        "tokens_per_second": tokens_per_step / float(np.median(diffs)) if diffs.size else None,
        "tokens_per_second_overall": final_step * tokens_per_step / seconds if seconds > 0 else None,
        "probe_seconds_per_step": probe_rate,
        "eval_seconds": budget.excluded,
        "curve": curve,
        "train_loss": [[r["step"], r["time"], r["loss"]] for r in steps],
        "faults": [r for h in histories for r in h.faults()],
        "stops": [r for h in histories for r in h if "stop" in r],
        "config": config,
    }
    return model, params, run


# --------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------
def kneser_ney(corpus, orders):
    """The order scoring best on the last 10% of the training split (fitted on the rest), refitted on all of it."""
    fit_ids, held_ids = data.train_val_split(corpus.train_ids, lm_common.VAL_FRACTION)
    held = {n: KneserNey(n).fit(fit_ids, corpus.vocab.size).evaluate(held_ids).nll for n in orders}
    best = min(held, key=held.get)
    val = KneserNey(best).fit(corpus.train_ids, corpus.vocab.size).evaluate(corpus.val_ids)
    return {"val_loss": val.nll, "order": best, "discount": 0.75, "held_out_loss_by_order": {str(n): v for n, v in held.items()},
            "selection": "best order on the last 10% of the training split, fitted on the rest; then refitted on all of it"}  # fmt: skip


def window_lm(corpus, args):
    """The fixed-window neural LM trained with fit for ``--window-lm-minutes`` (or ``--steps`` steps)."""
    s = WINDOW_LM
    model = WindowLM(corpus.vocab.size, window=s["context"], embed_size=s["embed"], hidden_size=s["hidden"])
    window = min(128, corpus.train_ids.size - 1)
    budget = Budget(float("inf") if args.steps else args.window_lm_minutes * 60.0).start()
    batches = UntilSpent(lm_common.random_windows(corpus.train_ids, s["batch"], window, args.seed), budget)
    params, history = train.fit(model.loss, model.init(jax.random.key(args.seed)), lambda lr: optax.adam(lr), batches,
                                steps=args.steps or 10**9, learning_rate=s["lr"], max_grad_norm=1.0, progress=False)  # fmt: skip
    val = model.evaluate(params, corpus.val_ids)
    return {"val_loss": val.nll, "steps": len(history.steps()), "seconds": budget.spent(), "window": s["context"],
            "embed": s["embed"], "hidden": s["hidden"], "batch": s["batch"], "lr": s["lr"]}  # fmt: skip


# --------------------------------------------------------------------------
# Figure and command line
# --------------------------------------------------------------------------
def plot(result, path):
    from matplotlib.figure import Figure  # noqa: PLC0415  (matplotlib only for the figure)

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    run = result["run"]
    train_loss = np.asarray(run["train_loss"]) if run["train_loss"] else np.zeros((0, 3))
    if train_loss.size:
        k = max(1, len(train_loss) // 50)
        smooth = np.convolve(train_loss[:, 2], np.ones(k) / k, mode="valid")
        ax.plot(train_loss[k - 1 :, 0], smooth, lw=1, alpha=0.6, label="train loss (smoothed)")
    ax.plot([p["step"] for p in run["curve"]], [p["val_loss"] for p in run["curve"]], "o-", label="validation loss")
    for p in run["curve"][1:-1]:
        ax.annotate(f"{p['seconds'] / 60:.1f} min", (p["step"], p["val_loss"]), fontsize="x-small", xytext=(2, 4), textcoords="offset points")
    for (name, b), color in zip(result["baselines"].items(), ("tab:red", "tab:green", "tab:gray")):
        ax.axhline(b["val_loss"], color=color, ls="--", lw=1, label=f"{name} {b['val_loss']:.3f}")
    ax.axhline(ISSUE["baseline_val_loss"], color="k", ls="-.", lw=1, label=f"issue's baseline {ISSUE['baseline_val_loss']}")
    ax.axhline(ISSUE["target_val_loss"], color="k", ls=":", lw=1, label=f"target {ISSUE['target_val_loss']}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per character")
    ax.set_ylim(top=max(3.0, ISSUE["baseline_val_loss"] + 0.5), bottom=1.0)
    ax.set_title(f"Tiny Shakespeare, {result['config_name']}: {result['val_loss']:.3f} nats/char after {result['seconds'] / 60:.1f} min")
    ax.legend(loc="upper right", fontsize="small")
    fig.savefig(path)
    return path


def build_parser() -> Parser:
    p = Parser(prog="python -m benchmarks.studies.shakespeare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=tuple(CONFIGS), default="baseline")
    p.add_argument("--text", default=DEFAULT_TEXT, metavar="FILE", help="Tiny Shakespeare (default: ../shared/data/ beside the checkout)")
    p.add_argument("--max-chars", type=positive_int, default=None, help="use only the first N characters (smoke tests)")
    p.add_argument("--minutes", type=positive_float, default=10.0, help="training budget (%(default)s)")
    p.add_argument("--steps", type=positive_int, default=None, help="train exactly N steps instead of the budget")
    for name in ("layers", "hidden", "embed", "batch", "window"):
        p.add_argument(f"--{name}", type=positive_int, default=None, help=f"override the configuration's {name}")
    p.add_argument("--lr", type=positive_float, default=None, help="override the configuration's (peak) learning rate")
    p.add_argument("--dropout", type=rate, default=None, help="override the configuration's dropout")
    p.add_argument("--impl", choices=IMPLS, default="auto", help="recurrence implementation (%(default)s)")
    p.add_argument("--eval-points", type=positive_int, default=5, help="validations along the way (%(default)s)")
    p.add_argument("--eval-streams", type=positive_int, default=16, help="parallel streams of a validation (%(default)s)")
    p.add_argument("--kn-orders", type=positive_int, nargs="+", default=[3, 4, 5, 6, 7], help="Kneser-Ney orders to choose from")
    p.add_argument("--window-lm-minutes", type=positive_float, default=1.0, help="training budget of the window LM (%(default)s)")
    p.add_argument("--seed", type=lm_common.seed, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: benchmarks/results/<device>)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="keep the checkpoints here (default: a temporary folder)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="fit's progress line (default: on a terminal)")
    return p


def prepare(args):
    """``(corpus, settings)``: the text and the configuration with the overrides, checked before any work."""
    corpus = lm_common.load_corpus(args.text, "char", limit=args.max_chars)
    settings = dict(CONFIGS[args.config])
    settings.update({k: getattr(args, k) for k in ("layers", "hidden", "embed", "batch", "window", "lr", "dropout")
                     if getattr(args, k) is not None})  # fmt: skip
    lm_common.check_windows(corpus.train_ids, settings["batch"], settings["window"], settings["stateful"])
    return corpus, settings


def main(argv=None) -> int:
    """Run the benchmark; exit status 2 (one line on stderr) for a bad command line or text."""
    return lm_common.run_command("shakespeare", build_parser, prepare, run, argv)


def run(args, corpus, settings) -> int:
    """Train against the clock, score the baselines, write the JSON and the figure."""
    env = measure.environment()
    out = args.out or os.path.join(report.RESULTS_DIR, measure.device_dir_name(env))
    print(f"{corpus.source}: {len(corpus.text):,} characters ({corpus.vocab.size} distinct), "
          f"{corpus.train_ids.size:,} train / {corpus.val_ids.size:,} validation; {args.config}: {settings}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model, params, run = train_lm(corpus, settings, args, args.checkpoint_dir or os.path.join(tmp, "checkpoints"))
    print(f"{args.config}: {run['val_loss']:.4f} nats/char after {run['steps']} steps, {run['seconds']:.0f} s "
          f"({run['tokens_per_second'] or 0:,.0f} tokens/s)", flush=True)  # fmt: skip
    baselines = {
        "kneser_ney": kneser_ney(corpus, sorted(set(args.kn_orders))),
        "window_lm": window_lm(corpus, args),
        "unigram": {"val_loss": math.log(lm.unigram_perplexity(corpus.train_ids, corpus.val_ids[1:], corpus.vocab.size))},
    }
    result = {
        "benchmark": "shakespeare",
        "task": "Tiny Shakespeare, character level, 90/10 split by position; validation loss in nats per character over "
                "the whole validation split after a wall-clock training budget",
        "config_name": args.config,
        "config": dict(settings, model=run.pop("config"), impl=args.impl, seed=args.seed, minutes=args.minutes,
                       steps_override=args.steps, eval_streams=args.eval_streams, eval_window=lm_common.EVAL_WINDOW,
                       final_lr_fraction=FINAL_LR_FRACTION, probe_steps=PROBE_STEPS),
        "val_loss": run["val_loss"],
        "val_bits_per_char": run["val_loss"] / math.log(2),
        "seconds": run["seconds"],
        "steps": run["steps"],
        "tokens_per_second": run["tokens_per_second"],
        "curve": run["curve"],
        "baselines": baselines,
        "issue": ISSUE,
        "data": corpus.data,
        "device": {"platform": env["platform"], "kind": env["device_kind"], "cpu": env["cpu_model"], "cores": env["cpu_count"],
                   "load_average_start": env["loadavg_start"], "load_average_end": measure.loadavg()},
        "versions": {k: env[k] for k in ("jax", "jaxlib", "jaxrnn", "numpy", "python", "git_commit", "git_dirty")},
        "run": run,
    }  # fmt: skip
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"shakespeare_{args.config}")
    report.save_json(base + ".json", result)
    plot(result, base + ".png")
    for name, b in baselines.items():
        print(f"  {name:<10} {b['val_loss']:.4f} nats/char")
    print(f"wrote {base}.json and {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
