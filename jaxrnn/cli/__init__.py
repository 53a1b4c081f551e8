"""Command line: ``jaxrnn demo | gradients | bench`` (also ``python -m jaxrnn``).

Each subcommand lives in its own module of this package (``demo``,
``gradients``, ...), builds its arguments on :class:`jaxrnn.cli.args.Parser`
and exposes ``main(argv)``; every error prints one line on stderr and exits
non-zero.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "demo": ("jaxrnn.cli.demo", "train a small LSTM language model on an embedded text (the default)"),
    "gradients": ("jaxrnn.cli.gradients", "vanishing/exploding-gradient figures and tables"),
    "experiment": ("jaxrnn.cli.experiment", "reproduce a lecture claim: jaxrnn experiment NAME"),
    "train": ("jaxrnn.cli.train", "train a language model on a text, with checkpoints (jaxrnn train --help)"),
    "sample": ("jaxrnn.cli.sample", "print text sampled from a checkpoint of jaxrnn train"),
    "eval": ("jaxrnn.cli.eval", "perplexity and bits per character of a checkpoint next to a Kneser-Ney n-gram"),
    "bench": ("benchmarks.__main__", "the benchmark suite (from a source checkout)"),
}


def usage() -> str:
    lines = ["usage: jaxrnn [COMMAND] [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command not in COMMANDS:
        print(f"jaxrnn: unknown command {command!r} (expected one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[command]
    if command == "bench":  # benchmarks/ lives beside the package in a source checkout
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.isdir(os.path.join(checkout, "benchmarks")) and checkout not in sys.path:
            sys.path.insert(0, checkout)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"jaxrnn {command}: cannot import {e.name!r} (run from a source checkout?)", file=sys.stderr)
        return 2
    try:
        return int(module.main(argv) or 0)
    except (ValueError, TypeError, OSError) as e:
        print(f"jaxrnn {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
