"""Cost of ``jaxrnn.analysis.grad_norms_through_time`` against one forward+backward pass.

The claim: the gradient norms ``‖∂J/∂h_t‖`` for *every* step cost no more
than about 3x one training step's forward+backward pass of the same model,
because they come from one reverse pass (zero perturbations added to each
``h_t`` inside the scan) instead of ``T`` Jacobians.

Both sides use the same cell, parameters, inputs ``(B, T, I)`` and loss (the
sum of the last step's outputs):

* forward+backward: ``jax.jit(jax.value_and_grad(J))`` with respect to the
  parameters, the model run by ``jaxrnn.rnn(..., impl=impl)``;
* all-t norms: ``grad_norms_through_time(cell, params, xs, impl=impl)`` called
  as a user calls it (argument validation included).

Each is compiled and warmed up, then timed ``--repeats`` times with
``jax.block_until_ready``; the median is reported. Writes JSON to
``benchmarks/results/<platform>/analysis_cost.json``.

Example:
  $ python -m benchmarks.analysis_cost                      # T=1000, H=256, B=32
  $ python benchmarks/analysis_cost.py --seq-len 100 --repeats 2 --out /tmp/cost.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxrnn
from jaxrnn.analysis import grad_norms_through_time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CELLS = {"elman": jaxrnn.Elman, "lstm": jaxrnn.LSTM, "gru": jaxrnn.GRU}


def _time(fn, repeats):
    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(name, *, seq_len, hidden, batch, input_size, repeats, impl, seed=0):
    """Median seconds of forward+backward and of the all-t norms for one cell."""
    cell = CELLS[name](hidden)
    k_p, k_x = jax.random.split(jax.random.key(seed))
    params = cell.init(k_p, input_size)
    xs = jax.random.normal(k_x, (batch, seq_len, input_size))

    def loss(p, x):
        return jnp.sum(jaxrnn.rnn(cell, p, x, impl=impl)[0][:, -1])

    fwdbwd = jax.jit(jax.value_and_grad(loss))
    t_train, all_train = _time(lambda: fwdbwd(params, xs), repeats)
    t_norms, all_norms = _time(lambda: grad_norms_through_time(cell, params, xs, impl=impl).h, repeats)
    return {
        "fwd_bwd_s": t_train,
        "grad_norms_s": t_norms,
        "ratio": t_norms / t_train,
        "fwd_bwd_runs_s": all_train,
        "grad_norms_runs_s": all_norms,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.analysis_cost", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impl", default="reference", choices=jaxrnn.IMPLS)
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--out", help="JSON path (default: benchmarks/results/<platform>/analysis_cost.json)")
    args = p.parse_args(argv)

    platform = jax.default_backend()
    device = jax.devices()[0]
    config = dict(seq_len=args.seq_len, hidden=args.hidden, batch=args.batch, input_size=args.input_size)
    results = {}
    for name in args.cells:
        r = measure(name, repeats=args.repeats, impl=args.impl, **config)
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
            "platform": platform,
            "kind": device.device_kind,
            "count": jax.device_count(),
            "cpus": os.cpu_count(),
        },
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        "jaxrnn_version": jaxrnn.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "impl": args.impl,
        "config": {**config, "dtype": "float32", "loss": "sum of the last step's outputs", "repeats": args.repeats},
        "method": "median wall time after compile + 1 warm-up call, jax.block_until_ready; "
        "fwd+bwd = jit(value_and_grad) w.r.t. params through jaxrnn.rnn",
        "results": results,
        "max_ratio": max(r["ratio"] for r in results.values()),
    }
    path = args.out or os.path.join(RESULTS, platform, "analysis_cost.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"max ratio {record['max_ratio']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
