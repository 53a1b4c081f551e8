"""The lectures' experiments at full size, one after the other: ``benchmarks/results/experiments/NAME.json`` and figures.

Each is ``jaxrnn experiment NAME --config full`` (see :mod:`jaxrnn.experiments`);
this runs the chosen ones in sequence, prints each table as it finishes, and
then a one-line summary per experiment read back from the JSON files (so it
also summarises earlier runs: ``--summary-only``).

Example:
  $ python -m benchmarks.studies.experiments                         # all, about an hour on a 2-core CPU
  $ python -m benchmarks.studies.experiments --only depth interpret
  $ python -m benchmarks.studies.experiments --summary-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxrnn import experiments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "benchmarks", "results", "experiments")
#: Shortest first, so that a long run stopped early still leaves the others.
ORDER = ("exercises", "attention-path", "clipping", "counting", "interpret", "initialisation", "depth",
         "dependency-length")  # fmt: skip


def summary(name: str, results: dict) -> str:
    """One line of what a full run measured (the numbers the results table quotes)."""
    r = results
    if name == "dependency-length":
        return "; ".join(f"{c}: max ℓ {v['max_distance']}" for c, v in r.items() if isinstance(v, dict) and "max_distance" in v)
    if name == "counting":
        return "; ".join(f"{k}: aⁿbⁿ max n {v['max_n']}, aⁿbⁿcⁿ max n {v['anbncn']['max_n']} (unit "
                         f"{v['counting_unit']['state']}[{v['counting_unit']['index']}], r = "
                         f"{v['counting_unit']['correlation']:+.3f})"
                         for k, v in r.items() if isinstance(v, dict) and "max_n" in v)  # fmt: skip
    if name == "attention-path":
        return "; ".join(f"{k}: far/near {v['far_over_near']:.3g}, rate per step {v['rate']:.3f}"
                         for k, v in r.items() if isinstance(v, dict) and "rate" in v)  # fmt: skip
    if name == "exercises":
        return "all checks passed" if all(v.get("passed", True) for v in r.values() if isinstance(v, dict)) else \
            "some checks failed: " + ", ".join(k for k, v in r.items() if isinstance(v, dict) and not v.get("passed", True))
    if name == "clipping":
        return "; ".join(f"{k}: final loss {r[k]['final_loss']:.4g}, clipped {r[k]['clipped_fraction']:.0%}, "
                         f"non-finite steps {r[k]['nonfinite_steps']}" for k in ("unclipped", "clipped"))  # fmt: skip
    if name == "initialisation":
        return "; ".join(f"{k}: horizon {v['horizon']}, final loss {v['final_loss']:.3g}"
                         for k, v in r.items() if isinstance(v, dict) and "horizon" in v)  # fmt: skip
    if name == "depth":
        return "; ".join(f"{k}: val {v['val_loss']:.3f}" for k, v in r["runs"].items())
    if name == "interpret":
        feats = "; ".join(f"{k}: unit {v['unit']} r={v['r']:+.2f} (untrained {v['untrained_r']:+.2f})"
                          for k, v in r["features"].items() if not v["constant"])  # fmt: skip
        return f"{feats}; interpretable {r['interpretable_units']}/{r['units']}; val {r['val_loss']:.3f} nats/char"
    return json.dumps(r)[:300]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT)
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    if not args.summary_only:
        for name in [n for n in ORDER if n in args.only]:
            start = time.perf_counter()
            print(f"== {name} (full) ...", flush=True)
            out = os.path.relpath(args.out)  # the record names its figures by this path: relative, when it can be
            record = experiments.run_experiment(name, "full", seed=args.seed, out=out)
            print(record["table"], f"\n   {time.perf_counter() - start:.0f} s", flush=True)
    for name in ORDER:
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            print(f"{name} ({record['seconds']:.0f} s): {summary(name, record['results'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
