"""CPU benchmark of the recurrence backends against Flax and PyTorch.

For each cell (LSTM, GRU, Elman) at the issue's size (``T=256, B=32``, input
128, hidden 256, float32) it times, side by side in one process:

* ``flax``: ``nn.RNN`` over ``nn.OptimizedLSTMCell`` / ``nn.GRUCell`` /
  ``nn.SimpleCell``;
* ``torch``: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on CPU with
  ``torch.set_num_threads(2)`` (its native time-major layout), in a worker
  process (see :func:`torch_times`);
* ``reference`` and ``xla``: ``jaxrnn.rnn(..., impl=...)`` (batch-major, the
  default layout, like Flax);
* ``xla_hoisted``: the xla backend with its forward-only pass projecting all
  steps before the loop (see :func:`xla_hoisted_impl`), to measure the
  in-loop projection that ``xla`` uses on CPU.

Two workloads: ``forward`` (the outputs) and ``fwd+bwd`` (loss = sum of the
outputs; gradients w.r.t. all parameters and the inputs). Every function is
compiled and warmed up first; then the JAX implementations run in
interleaved rounds (so machine load hits all of them alike), PyTorch half of
its rounds just before and half just after, and the median (and minimum) of
the rounds is reported. The same run measures this machine's large-matmul
rate (a 2048×2048 float32 matmul) and reports each implementation's achieved
FLOP/s as a fraction of it. FLOPs count the matmuls only:
``2·T·B·(I+H)·G`` forward and three times that forward+backward
(``G`` = gates × hidden).

Usage::

    python -m benchmarks.kernels_cpu                 # all cells, writes the JSON
    python -m benchmarks.kernels_cpu --cells lstm --rounds 5 --out /tmp/x.json

Results: ``benchmarks/results/cpu/kernels_xla.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn
from benchmarks.measure import _cpu_model

T, B, I, H = 256, 32, 128, 256
TORCH_THREADS = 2
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "cpu", "kernels_xla.json")
GATES = {"lstm": 4, "gru": 3, "elman": 1}


# --------------------------------------------------------------------------
# The implementations: each returns {workload: (fn, args)}; fn(*args) blocks.
# --------------------------------------------------------------------------
def _jax_pair(forward, params, xs):
    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x)), argnums=(0, 1)))
    block = lambda f: lambda *a: jax.block_until_ready(f(*a))  # noqa: E731
    return {"forward": (block(fwd), (params, xs)), "fwd+bwd": (block(grad), (params, xs))}


def jaxrnn_impl(name, impl, xs):
    cell = {"lstm": jaxrnn.LSTM(H), "gru": jaxrnn.GRU(H, reset="after"), "elman": jaxrnn.Elman(H)}[name]
    params = cell.init(jax.random.key(0), I)
    return _jax_pair(lambda p, x: jaxrnn.rnn(cell, p, x, impl=impl)[0], params, xs)


def xla_hoisted_impl(name, xs):
    """``impl="xla"`` with ``projection="hoisted"``: the forward projects all steps before the loop.

    What ``impl="xla"`` did before the forward-only pass learnt to project
    inside the loop on CPU (``jaxrnn.kernels.xla.IN_LOOP_MIN_BATCH``);
    fwd+bwd is the same computation as ``xla``.
    """
    from jaxrnn.kernels.xla import rnn_xla  # noqa: PLC0415

    cell = {"lstm": jaxrnn.LSTM(H), "gru": jaxrnn.GRU(H, reset="after"), "elman": jaxrnn.Elman(H)}[name]
    params = cell.init(jax.random.key(0), I)
    cell = cell.resolve(xs.dtype)

    def forward(p, x):
        hs, _ = rnn_xla(cell, p, jnp.swapaxes(x, 0, 1), cell.zero_carry(B), None, False, projection="hoisted")
        return jnp.swapaxes(hs, 0, 1)

    return _jax_pair(forward, params, xs)


def flax_impl(name, xs):
    import flax.linen as nn  # noqa: PLC0415

    cell = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "elman": nn.SimpleCell}[name](H)
    model = nn.RNN(cell)
    variables = model.init(jax.random.key(0), xs)
    return _jax_pair(model.apply, variables, xs)


def torch_impl(name, xs):
    import torch  # noqa: PLC0415

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[name](I, H)
    x = torch.from_numpy(np.ascontiguousarray(np.swapaxes(xs, 0, 1)))  # (T, B, I)
    xg = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        xg.grad = None
        out, _ = module(xg)
        out.sum().backward()

    return {"forward": (forward, ()), "fwd+bwd": (fwd_bwd, ())}


def _time(impls, rounds, warmup=2):
    """Interleaved rounds over ``{impl: {workload: (fn, args)}}``: per-call seconds."""
    times = {impl: {w: [] for w in fns} for impl, fns in impls.items()}
    for fns in impls.values():  # compile and warm up
        for fn, args in fns.values():
            for _ in range(warmup):
                fn(*args)
    for _ in range(rounds):
        for impl, fns in impls.items():
            for workload, (fn, args) in fns.items():
                t0 = time.perf_counter()
                fn(*args)
                times[impl][workload].append(time.perf_counter() - t0)
    return times


def torch_times(name, rounds):
    """PyTorch timings from a worker process.

    In one process with XLA, PyTorch's OpenMP workers (which spin after each
    parallel region) and XLA's thread pool take the cores from each other;
    making OpenMP wait passively instead slows PyTorch by about 30%. So
    PyTorch runs alone, with its default settings, in a child process.
    """
    cmd = [sys.executable, "-m", "benchmarks.kernels_cpu", "--torch-worker", name, "--rounds", str(rounds)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root).stdout
    return json.loads(out.strip().splitlines()[-1])


def _torch_worker(name, rounds):
    xs = np.asarray(jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32))
    print(json.dumps(_time({"torch": torch_impl(name, xs)}, rounds)["torch"]))


def matmul_rate(rounds):
    """Large-matmul FLOP/s of this machine (jax, 2048² float32), median of ``rounds``."""
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a))
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / float(np.median(times))


def run_cell(name, rounds, proposal=True):
    """Times of every implementation; PyTorch's half before and half after the JAX rounds."""
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    impls = {
        "flax": flax_impl(name, xs),
        "reference": jaxrnn_impl(name, "reference", xs),
        "xla": jaxrnn_impl(name, "xla", xs),
    }
    if proposal:
        impls["xla_hoisted"] = xla_hoisted_impl(name, xs)
    before = torch_times(name, (rounds + 1) // 2)
    times = _time(impls, rounds)
    after = torch_times(name, rounds // 2)
    times["torch"] = {w: before[w] + after[w] for w in before}
    return times


def summarize(name, times, rate):
    G = GATES[name] * H
    flops = {"forward": 2 * T * B * (I + H) * G}
    flops["fwd+bwd"] = 3 * flops["forward"]
    out = {"flops": flops, "ms": {}, "ms_min": {}, "gflops": {}, "fraction_of_matmul": {}, "speedup_of_xla": {}}
    for impl, per in times.items():
        for workload, ts in per.items():
            med = float(np.median(ts))
            out["ms"].setdefault(workload, {})[impl] = round(1e3 * med, 2)
            out["ms_min"].setdefault(workload, {})[impl] = round(1e3 * float(np.min(ts)), 2)
            out["gflops"].setdefault(workload, {})[impl] = round(flops[workload] / med / 1e9, 1)
            out["fraction_of_matmul"].setdefault(workload, {})[impl] = round(flops[workload] / med / rate, 3)
    for workload, ms in out["ms"].items():
        out["speedup_of_xla"][workload] = {
            f"vs_{other}": round(ms[other] / ms["xla"], 3) for other in ms if other != "xla"
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(GATES), choices=list(GATES))
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per implementation")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path ('' to skip)")
    parser.add_argument("--no-proposal", action="store_true", help="skip the xla_hoisted variant")
    parser.add_argument("--torch-worker", metavar="CELL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        return _torch_worker(args.torch_worker, args.rounds)

    import flax  # noqa: PLC0415
    import torch  # noqa: PLC0415

    rate_before = matmul_rate(args.rounds)
    results = {name: run_cell(name, args.rounds, proposal=not args.no_proposal) for name in args.cells}
    rate_after = matmul_rate(args.rounds)
    rate = max(rate_before, rate_after)  # the less disturbed of the two
    report = {
        "benchmark": "python -m benchmarks.kernels_cpu",
        "config": {"T": T, "B": B, "input": I, "hidden": H, "dtype": "float32", "rounds": args.rounds,
                   "torch_threads": TORCH_THREADS,
                   "torch_process": "separate worker process, run before and after the JAX rounds",
                   "layout": "jax: batch-major (B, T, I); torch: (T, B, I)"},
        "device": {"platform": jax.default_backend(), "cpu": _cpu_model(), "cores": os.cpu_count(),
                   "load_average": list(os.getloadavg())},
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__, "flax": flax.__version__,
                     "torch": torch.__version__, "jaxrnn": jaxrnn.__version__, "python": platform.python_version()},
        "matmul_2048_gflops": round(rate / 1e9, 1),
        "matmul_2048_gflops_before_after": [round(rate_before / 1e9, 1), round(rate_after / 1e9, 1)],
        "cells": {name: summarize(name, times, rate) for name, times in results.items()},
    }
    for name, summary in report["cells"].items():
        for workload, ms in summary["ms"].items():
            line = "  ".join(f"{k} {v:8.1f}" for k, v in ms.items())
            print(f"{name:6s} {workload:8s} ms: {line}   xla speedup: {summary['speedup_of_xla'][workload]}")
    print(f"matmul 2048² f32: {report['matmul_2048_gflops']} GFLOP/s; load average {report['device']['load_average']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print("wrote", args.out)
    return report


if __name__ == "__main__":
    main()
