"""``jaxrnn demo``: train a small character-level language model and show what it learned.

The command line of :mod:`jaxrnn.demo`: every argument is checked before any
work starts (numbers, choices, the ``--text`` file, the ``--out`` folder,
then ``--seq-len`` and ``--prompt`` against the text), and a bad one is one
line on stderr and exit status 2. About 30-60 s on two CPU cores with the
defaults.

Example:
  $ jaxrnn demo --steps 300 --out out/demo
  $ python -m jaxrnn demo --cell gru --hidden 64 --no-compare
"""

from __future__ import annotations

import dataclasses
import sys

from jaxrnn import data, demo
from jaxrnn.cli.args import (
    Parser,
    UsageError,
    number,
    output_dir,
    parse,
    positive_float,
    positive_int,
    text_file,
)
from jaxrnn.runner import IMPLS

temperature = number(float, lambda v: v >= 0, "a finite number >= 0")
seed = number(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")


def build_parser() -> Parser:
    defaults = demo.Config()
    p = Parser(prog="jaxrnn demo", description="Train a small character-level language model and show what it learned.")
    p.add_argument("--steps", type=positive_int, default=defaults.steps, help="training steps per model (%(default)s)")
    p.add_argument("--cell", choices=sorted(demo.CELLS), default="lstm", help="cell of the main model (%(default)s)")
    p.add_argument("--hidden", type=positive_int, default=defaults.hidden, help="hidden size H (%(default)s)")
    p.add_argument("--layers", type=positive_int, default=defaults.layers, help="stacked layers (%(default)s)")
    p.add_argument("--embed", type=positive_int, default=defaults.embed, help="embedding size (%(default)s)")
    p.add_argument("--batch", type=positive_int, default=defaults.batch, help="windows per batch (%(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=defaults.seq_len, help="characters read per window (%(default)s)")
    p.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam learning rate (%(default)s)")
    p.add_argument("--clip", type=positive_float, default=defaults.clip, help="global gradient-norm clip (%(default)s)")
    p.add_argument(
        "--temperature", type=temperature, default=defaults.temperature, help="sampling temperature (%(default)s; 0 is greedy)"
    )
    p.add_argument("--prompt", default=defaults.prompt, help="start of the samples (%(default)r)")
    p.add_argument("--seed", type=seed, default=defaults.seed, help="PRNG seed (%(default)s)")
    p.add_argument("--text", type=text_file, default=None, metavar="FILE", help="train on this UTF-8 text instead")
    p.add_argument("--out", type=output_dir, default=defaults.out, metavar="DIR", help="figure folder (%(default)s)")
    p.add_argument("--impl", choices=list(IMPLS), default=defaults.impl, help="recurrence implementation (%(default)s)")
    p.add_argument("--no-compare", action="store_true", help="train only --cell, not all three cells")
    return p


def prepare(args) -> tuple[demo.Corpus, demo.Config]:
    """Check the parsed arguments against the text; the demo's corpus and settings."""
    text = data.load_text(args.text)
    corpus = demo.split_corpus(text, "the embedded text" if args.text is None else repr(args.text))
    window = args.seq_len + 1
    if min(corpus.train_ids.size, corpus.val_ids.size) < window:
        raise UsageError(
            f"--seq-len: {args.seq_len} is too long for a text of {len(text)} characters "
            f"(the {demo.VAL_FRACTION:.0%} validation part must hold seq_len + 1 = {window})"
        )
    if not args.prompt:
        raise UsageError("--prompt: expected at least one character")
    missing = sorted(set(args.prompt) - set(corpus.vocab.chars))
    if missing:
        raise UsageError(f"--prompt: characters {''.join(missing)!r} do not occur in the text")
    cells = (args.cell,) + (() if args.no_compare else tuple(n for n in demo.CELLS if n != args.cell))
    # Every option but --cell/--no-compare/--text is the Config field of the same name.
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(demo.Config) if f.name != "cells"}
    return corpus, demo.Config(cells=cells, **settings)


def main(argv=None) -> int:
    """Run the demo; returns the exit status (2 for a bad command line, before any training)."""
    prepared, status = parse(build_parser(), argv, prepare)  # a text too short to predict is a usage error too
    if status is not None:
        return status
    corpus, config = prepared
    demo.run(corpus, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
