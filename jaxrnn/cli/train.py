"""``jaxrnn train``: train a recurrent language model with :func:`jaxrnn.train.fit`, checkpointed for ``sample`` and ``eval``.

The text (``--text FILE``, or the embedded corpus) is split by position, 90%
for training and the last 10% for validation; every ``--eval-every`` steps
the whole validation split is scored with :func:`jaxrnn.models.lm.evaluate`.
Training windows are random, or with ``--stateful`` consecutive windows of
``--batch`` parallel streams with the recurrent state carried from one to the
next (truncated BPTT). ``--devices N`` trains data-parallel over the first N
devices. The checkpoint's metadata holds the vocabulary, the model's
configuration and where the text came from (see :mod:`jaxrnn.cli.lm_common`),
so that ``jaxrnn sample`` and ``jaxrnn eval`` rebuild the model. A second run
on the same ``--checkpoint-dir`` resumes (``--no-resume`` refuses a directory
with checkpoints). On CPU, freed memory is kept for reuse
(:func:`jaxrnn.host.retain_freed_memory`; ``--no-retain-memory`` leaves the C
library's default). Every argument is checked before any work; a bad one is
one line on stderr and exit status 2.

Example:
  $ jaxrnn train --steps 500 --hidden 128 --checkpoint-dir runs/lm --out runs/lm-out
  $ jaxrnn train --text input.txt --cell gru --layers 2 --dropout 0.2 --dropout-mode variational --stateful
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax

from jaxrnn import host, train
from jaxrnn.cli import lm_common
from jaxrnn.cli.args import Parser, UsageError, output_dir, positive_float, positive_int, rate, text_file
from jaxrnn.data import LEVELS
from jaxrnn.runner import IMPLS
from jaxrnn.stack import DROPOUT_MODES

__all__ = ["build_parser", "main", "prepare", "run"]

METRICS_FILE = "metrics.jsonl"
FIGURE_FILE = "loss.png"


def build_parser() -> Parser:
    p = Parser(prog="jaxrnn train", description="Train a recurrent language model; checkpoints for jaxrnn sample / eval.")
    p.add_argument("--text", type=text_file, default=None, metavar="FILE", help="UTF-8 training text (default: the embedded corpus)")
    p.add_argument("--level", choices=LEVELS, default="char", help="tokens: characters or words (%(default)s)")
    p.add_argument("--min-count", type=positive_int, default=1, help="rarer tokens become <unk> (%(default)s)")
    p.add_argument("--model", choices=(lm_common.MODEL,), default=lm_common.MODEL, help="model kind (%(default)s)")
    p.add_argument("--cell", choices=tuple(lm_common.CELLS), default="lstm", help="recurrent cell (%(default)s)")
    p.add_argument("--layers", type=positive_int, default=1, help="stacked layers (%(default)s)")
    p.add_argument("--hidden", type=positive_int, default=128, help="hidden size (%(default)s)")
    p.add_argument("--embed", type=positive_int, default=None, help="embedding size (32, or --hidden with --tie-weights)")
    p.add_argument("--tie-weights", action="store_true", help="the embedding is the output matrix (needs --embed = --hidden)")
    p.add_argument("--dropout", type=rate, default=0.0, help="dropout between layers (%(default)s)")
    p.add_argument("--dropout-mode", choices=DROPOUT_MODES, default="per_step", help="dropout masks (%(default)s)")
    p.add_argument("--embedding-dropout", type=rate, default=0.0, help="dropout on the embedded inputs (%(default)s)")
    p.add_argument("--impl", choices=IMPLS, default="auto", help="recurrence implementation (%(default)s)")
    p.add_argument("--steps", type=positive_int, default=500, help="optimiser steps, counted over resumes (%(default)s)")
    p.add_argument("--batch", type=positive_int, default=32, help="windows (streams) per step (%(default)s)")
    p.add_argument("--window", type=positive_int, default=64, help="tokens predicted per window (%(default)s)")
    p.add_argument("--stateful", action="store_true", help="truncated BPTT: consecutive windows, state carried")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="Adam learning rate (%(default)s)")
    p.add_argument("--clip", type=positive_float, default=1.0, help="global gradient-norm clip (%(default)s)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="steps between validations (default: steps / 10)")
    p.add_argument("--devices", type=positive_int, default=1, help="data parallel over the first N devices (%(default)s)")
    p.add_argument("--checkpoint-dir", type=output_dir, default=os.path.join("runs", "lm"), metavar="DIR",
                   help="checkpoints (%(default)s)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=positive_int, default=100, help="steps between checkpoints (%(default)s)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the latest checkpoint in --checkpoint-dir (default: yes)")  # fmt: skip
    p.add_argument("--seed", type=lm_common.seed, default=0, help="PRNG seed (%(default)s)")
    p.add_argument("--out", type=output_dir, default=None, metavar="DIR", help=f"write {METRICS_FILE} and {FIGURE_FILE} here")
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, keep freed memory for reuse (jaxrnn.host.retain_freed_memory; default: yes)")  # fmt: skip
    return p


def prepare(args):
    """Check the parsed arguments against the text and the checkpoint directory; ``(corpus, config, metadata, mesh)``."""
    corpus = lm_common.load_corpus(args.text, args.level, args.min_count)
    embed = args.embed if args.embed is not None else args.hidden if args.tie_weights else 32
    if args.tie_weights and embed != args.hidden:
        raise UsageError(f"--tie-weights: needs --embed equal to --hidden, got --embed {embed} and --hidden {args.hidden}")
    lm_common.check_windows(corpus.train_ids, args.batch, args.window, args.stateful)
    mesh = lm_common.make_mesh(args.devices)
    if args.batch % args.devices:
        raise UsageError(f"--batch: {args.batch} is not divisible by --devices {args.devices}")
    config = lm_common.model_config(
        corpus.vocab.size, cell=args.cell, hidden=args.hidden, layers=args.layers, embed=embed,
        tie_weights=args.tie_weights, dropout=args.dropout, dropout_mode=args.dropout_mode,
        embedding_dropout=args.embedding_dropout, impl=args.impl,
    )  # fmt: skip
    metadata = lm_common.make_metadata(config, corpus, batch=args.batch, window=args.window, stateful=args.stateful, seed=args.seed)
    if os.path.isdir(args.checkpoint_dir):
        step, saved = lm_common.read_metadata(args.checkpoint_dir)
        if step is not None and not args.resume:
            raise UsageError(f"--checkpoint-dir: {args.checkpoint_dir!r} holds checkpoints (up to step {step}); "
                             "pass --resume to continue, or another directory")  # fmt: skip
        if step is not None:
            difference = lm_common.same_run(saved, metadata)
            if difference:
                raise UsageError(f"--checkpoint-dir: {args.checkpoint_dir!r} holds a checkpoint of another run "
                                 f"({difference}); pass another directory")  # fmt: skip
    return corpus, config, metadata, mesh


def main(argv=None) -> int:
    """Train; returns the exit status (2 for a bad command line, before any training)."""
    return lm_common.run_command("jaxrnn train", build_parser, prepare, run, argv)


def run(args, corpus, config, metadata, mesh) -> int:
    """Train, print the validations and write the figure."""
    if args.retain_memory and jax.default_backend() == "cpu":
        host.retain_freed_memory()  # fewer page faults per step (see jaxrnn.host); without glibc a no-op
    model = lm_common.build_model(config)
    level = "characters" if args.level == "char" else "words"
    print(f"text: {corpus.source}, {corpus.data['length']:,} characters; {corpus.vocab.size} distinct {level}; "
          f"{corpus.train_ids.size:,} train / {corpus.val_ids.size:,} validation tokens")  # fmt: skip
    print(f"model: {lm_common.describe_model(config)}; {'stateful' if args.stateful else 'random'} windows of "
          f"{args.window} x {args.batch}; Adam {args.lr:g}, clip {args.clip:g}; {args.devices} device(s)")  # fmt: skip
    metrics_path = None
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        metrics_path = os.path.join(args.out, METRICS_FILE)
    try:
        params, history = lm_common.fit_lm(
            model, model.init(jax.random.key(args.seed)), corpus.train_ids, corpus.val_ids,
            batch=args.batch, window=args.window, steps=args.steps, stateful=args.stateful, seed=args.seed,
            learning_rate=args.lr, clip=args.clip, eval_every=args.eval_every or max(1, args.steps // 10), mesh=mesh,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
            metadata=metadata, metrics_path=metrics_path,
        )  # fmt: skip
    except train.FaultLimitError as e:  # the loss diverged again and again: lower --lr or --clip
        print(f"jaxrnn train: {e} (try a lower --lr)", file=sys.stderr)
        return 1
    steps = {r["step"]: r for r in history.steps()}
    print(f"{'step':>7}  {'train loss':>10}  {'val loss':>9}  {'val ppl':>8}  {'val bits':>8}")
    for record in history.evals():
        val = record["eval"]["val_loss"]
        train_loss = steps[record["step"]]["loss"] if record["step"] in steps else float("nan")
        print(f"{record['step']:>7}  {train_loss:>10.4f}  {val:>9.4f}  {math.exp(val):>8.3f}  {val / math.log(2):>8.4f}")
    for fault in history.faults():
        print(f"fault at step {fault['step']}: {fault['fault']}; {fault['action']}")
    if args.out is not None:
        figure = train.plot_history(history, os.path.join(args.out, FIGURE_FILE), title=lm_common.describe_model(config), loss_is_nll=True)
        print(f"metrics: {metrics_path}; figure: {figure}")
    print(f"checkpoint: {os.path.abspath(args.checkpoint_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
