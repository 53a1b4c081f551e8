"""``jaxrnn eval``: score a checkpointed language model next to a Kneser-Ney n-gram baseline.

Both models score the same predictions: every token after the first of the
split, given everything before it. The language model reads the whole split
with :func:`jaxrnn.models.lm.evaluate` (carry kept across windows); the
baseline is :class:`jaxrnn.models.KneserNey` of order ``--ngram-order``,
fitted on the training split of the run's text. The split is the run's
validation split (the last 10% of its text, read again and checked against
the checkpoint's SHA-256), or the whole ``--text`` file. It prints a table of
nats, perplexity and bits per token (per character at character level), or
with ``--json`` the same numbers as JSON.

Example:
  $ jaxrnn eval --checkpoint-dir runs/lm
  $ jaxrnn eval --checkpoint-dir runs/lm --text held_out.txt --ngram-order 3 --json
"""

from __future__ import annotations

import json
import os
import sys

from jaxrnn.cli import lm_common
from jaxrnn.cli.args import Parser, UsageError, positive_int, ratio, read_text_file, text_file
from jaxrnn.models import KneserNey

__all__ = ["build_parser", "main", "prepare", "run", "scores"]


def build_parser() -> Parser:
    p = Parser(prog="jaxrnn eval", description="Score a language model checkpointed by jaxrnn train next to a Kneser-Ney n-gram.")
    p.add_argument("--checkpoint-dir", default=os.path.join("runs", "lm"), metavar="DIR", help="the run's checkpoints (%(default)s)")
    p.add_argument("--text", type=text_file, default=None, metavar="FILE",
                   help="score this whole UTF-8 file (default: the run's validation split)")  # fmt: skip
    p.add_argument("--ngram-order", type=positive_int, default=5, help="order of the Kneser-Ney baseline (%(default)s)")
    p.add_argument("--discount", type=ratio, default=0.75, help="its discount (%(default)s)")
    p.add_argument("--streams", type=positive_int, default=1,
                   help="parallel streams of the LM's pass (%(default)s: exact; more resets the state streams - 1 times)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def prepare(args):
    """``(loaded model, training corpus, ids to score, description of them)``, everything checked."""
    loaded = lm_common.load_lm(args.checkpoint_dir)
    corpus = lm_common.corpus_of_metadata(loaded.metadata, loaded.vocab)
    if args.text is None:
        return loaded, corpus, corpus.val_ids, f"the validation split of {corpus.source}"
    text = read_text_file(args.text, "--text")
    vocab = loaded.vocab
    if vocab.level == "char" and vocab.unk is None:
        missing = sorted(set(text) - set(vocab.chars))
        if missing:
            shown = "".join(missing[:10]) + ("..." if len(missing) > 10 else "")
            raise UsageError(f"--text: characters {shown!r} of {args.text!r} are not in the model's vocabulary")
    ids = vocab.encode(text)
    if ids.size < 2:
        raise UsageError(f"--text: expected at least 2 tokens in {args.text!r}, got {ids.size}")
    return loaded, corpus, ids, repr(args.text)


def scores(loaded, corpus, ids, *, order: int, discount: float, streams: int):
    """``{"model": Evaluation, "ngram": Evaluation}`` on ``ids``."""
    ngram = KneserNey(order, discount).fit(corpus.train_ids, loaded.vocab.size)
    return {
        "model": lm_common.evaluate_split(loaded.model, loaded.params, ids, streams),
        "ngram": ngram.evaluate(ids),
    }


def main(argv=None) -> int:
    """Print the table (or JSON); returns the exit status (2 for a bad command line or checkpoint)."""
    return lm_common.run_command("jaxrnn eval", build_parser, prepare, run, argv)


def run(args, loaded, corpus, ids, where) -> int:
    """Score and print."""
    results = scores(loaded, corpus, ids, order=args.ngram_order, discount=args.discount, streams=args.streams)
    names = {
        "model": f"{lm_common.describe_model(loaded.metadata['config'])} (step {loaded.step})",
        "ngram": f"Kneser-Ney {args.ngram_order}-gram (D={args.discount:g})",
    }
    unit = "char" if loaded.vocab.level == "char" else "token"
    if args.json:
        record = {
            "split": where,
            "level": loaded.vocab.level,
            "count": int(ids.size - 1),
            "checkpoint_dir": os.path.abspath(args.checkpoint_dir),
            "step": loaded.step,
            "streams": args.streams,
        }
        for key, evaluation in results.items():
            record[key] = dict(evaluation._asdict(), name=names[key])
        record["ngram"].update(order=args.ngram_order, discount=args.discount)
        print(json.dumps(record, indent=1))
        return 0
    print(f"{where}: {ids.size - 1:,} predictions")
    width = max(len(n) for n in names.values())
    print(f"{'model':<{width}}  {'nats/' + unit:>10}  {'perplexity':>10}  {'bits/' + unit:>10}")
    for key, evaluation in results.items():
        print(f"{names[key]:<{width}}  {evaluation.nll:>10.4f}  {evaluation.perplexity:>10.3f}  {evaluation.bits_per_token:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
