"""Cost of ``jaxrnn.analysis.grad_norms_through_time`` against one forward+backward pass.

The claim: the gradient norms ``‖∂J/∂h_t‖`` for *every* step cost no more
than about 3x one training step's forward+backward pass of the same model,
because they come from one reverse pass (zero perturbations added to each
``h_t`` inside the scan) instead of ``T`` Jacobians.

Both sides use the same cell, parameters, inputs ``(B, T, I)`` (the suites'
cells and random draws: :func:`benchmarks.impls.jaxrnn_setup`; GRU with
``reset="after"``) and loss (the sum of the last step's outputs):

* forward+backward: ``jax.value_and_grad(J)`` with respect to the
  parameters, compiled ahead of time, the model run by
  ``jaxrnn.rnn(..., impl=impl)``;
* all-t norms: ``grad_norms_through_time(cell, params, xs)`` (always the reference recurrence) called
  as a user calls it (argument validation included).

Timing is the suites' (:func:`benchmarks.measure.time_rounds`): each is
compiled (first call) and warmed up with one more call, then the two are
timed in ``--repeats`` interleaved rounds, each call ending in
``jax.block_until_ready``; the median is reported. Writes JSON to
``benchmarks/results/<device>/analysis_cost.json`` (``cpu`` on CPU).

Example:
  $ python -m benchmarks.studies.analysis_cost                     # T=1000, H=256, B=32
  $ python -m benchmarks.studies.analysis_cost --seq-len 100 --repeats 2 --out /tmp/cost.json
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

import jaxrnn
from benchmarks import impls, measure, report
from benchmarks.suites import CELLS, Case
from jaxrnn.analysis import grad_norms_through_time


def measure_cell(name, *, seq_len, hidden, batch, input_size, repeats, impl, seed=0):
    """Median seconds of forward+backward and of the all-t norms for one cell."""
    case = Case(name, "fwdbwd", batch, seq_len, input_size, hidden)
    cell, _, params, xs, _ = impls.jaxrnn_setup(case, impls.Context(platform=jax.default_backend(), seed=seed))

    def loss(p, x):
        return jnp.sum(jaxrnn.rnn(cell, p, x, impl=impl)[0][:, -1])

    _, fwd_bwd = impls.JaxWork(jax.value_and_grad(loss), (params, xs), "jaxrnn.rnn value_and_grad").compile()

    def norms():
        return jax.block_until_ready(grad_norms_through_time(cell, params, xs).h)

    times = measure.time_rounds({"fwd_bwd": fwd_bwd, "grad_norms": norms}, repeats, warmup=1)
    t_train = measure.summarize_times(times["fwd_bwd"])["median_s"]
    t_norms = measure.summarize_times(times["grad_norms"])["median_s"]
    return {
        "fwd_bwd_s": t_train,
        "grad_norms_s": t_norms,
        "ratio": t_norms / t_train,
        "fwd_bwd_runs_s": times["fwd_bwd"],
        "grad_norms_runs_s": times["grad_norms"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.analysis_cost", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impl", default="reference", choices=jaxrnn.IMPLS)
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--out", help="JSON path (default: benchmarks/results/<device>/analysis_cost.json)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: expected at least 1")

    env = measure.environment()
    config = dict(seq_len=args.seq_len, hidden=args.hidden, batch=args.batch, input_size=args.input_size)
    results = {}
    for name in args.cells:
        r = measure_cell(name, repeats=args.repeats, impl=args.impl, **config)
        results[name] = r
        print(
            f"{name:6s} fwd+bwd {r['fwd_bwd_s'] * 1e3:8.1f} ms   all-t norms {r['grad_norms_s'] * 1e3:8.1f} ms   "
            f"ratio {r['ratio']:.2f}",
            flush=True,
        )
    record = {
        "benchmark": "analysis_cost",
        "claim": "grad_norms_through_time (all T gradient norms) costs <= ~3x one forward+backward pass",
        "device": {
            "platform": env["platform"],
            "kind": env["device_kind"],
            "count": env["device_count"],
            "cpus": env["cpu_count"],
        },
        "jax_version": env["jax"],
        "jaxlib_version": env["jaxlib"],
        "jaxrnn_version": env["jaxrnn"],
        "date": env["date_utc"],
        "impl": args.impl,
        "config": {**config, "dtype": "float32", "loss": "sum of the last step's outputs", "repeats": args.repeats},
        "method": "median wall time after compile + 1 warm-up call, the two interleaved (benchmarks.measure), "
        "jax.block_until_ready; fwd+bwd = value_and_grad w.r.t. params through jaxrnn.rnn, compiled ahead of time; "
        "GRU reset='after'",
        "results": results,
        "max_ratio": max(r["ratio"] for r in results.values()),
    }
    path = args.out or os.path.join(report.RESULTS_DIR, measure.device_dir_name(env), "analysis_cost.json")
    report.save_json(path, record, indent=2)
    print(f"max ratio {record['max_ratio']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
