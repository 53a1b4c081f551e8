"""``jaxrnn experiment NAME``: reproduce one lecture claim, write ``DIR/NAME.json`` and figures, print a table.

Example:
  $ jaxrnn experiment exercises --config small --out /tmp/exp
  $ python -m jaxrnn experiment dependency-length --config full --seed 1
"""

from __future__ import annotations

import os
import sys

from jaxrnn import experiments
from jaxrnn.cli.args import Parser, number, output_dir, parse

__all__ = ["build_parser", "main"]

seed = number(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")


def build_parser() -> Parser:
    """The ``jaxrnn experiment`` argument parser (errors raise :class:`jaxrnn.cli.args.UsageError`)."""
    names = "; ".join(f"{name}: {text}" for name, (_, text) in experiments.EXPERIMENTS.items())
    p = Parser(prog="jaxrnn experiment", description=f"Reproduce a lecture claim. Experiments: {names}.")
    p.add_argument("name", choices=tuple(experiments.EXPERIMENTS), metavar="NAME",
                   help=f"one of {', '.join(experiments.EXPERIMENTS)}")  # fmt: skip
    p.add_argument("--config", choices=experiments.CONFIG_NAMES, default="small",
                   help="small: seconds (default); full: the real run")  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=output_dir, default=os.path.join("out", "experiments"), metavar="DIR",
                   help="output folder (default out/experiments)")  # fmt: skip
    return p


def main(argv=None) -> int:
    """Parse and check every argument first (one line on stderr, exit 2), then run and report."""
    args, status = parse(build_parser(), argv)
    if status is not None:
        return status
    print(f"running {args.name} ({args.config} config, seed {args.seed}) ...", file=sys.stderr, flush=True)
    record = experiments.run_experiment(args.name, args.config, seed=args.seed, out=args.out)
    print(f"{args.name} ({args.config} config, seed {args.seed}, {record['device']})")
    print(record["table"])
    written = [os.path.join(args.out, f"{args.name}.json"), *record["figures"]]
    print(f"wrote {', '.join(written)} in {record['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
