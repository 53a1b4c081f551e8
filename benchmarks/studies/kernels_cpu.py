"""CPU benchmark of the recurrence backends against Flax and PyTorch.

For each cell (LSTM, GRU, Elman) at the issue's size (``T=256, B=32``, input
128, hidden 256, float32) it times, side by side, the suites'
implementations (:mod:`benchmarks.impls`, same parameters and inputs):

* ``flax``: the ``flax.linen`` row, ``nn.RNN`` over ``nn.OptimizedLSTMCell``
  / ``nn.GRUCell`` / ``nn.SimpleCell``;
* ``torch``: the ``torch`` row, ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` on CPU
  (``batch_first=True``, ``os.cpu_count()`` threads), in a worker process
  (see :func:`torch_times`);
* ``reference`` and ``xla``: the ``jaxrnn:reference`` and ``jaxrnn:xla``
  rows, ``jaxrnn.rnn(..., impl=...)`` (batch-major, like Flax);
* ``xla_hoisted``: ``impl=jaxrnn.kernels.XLA(projection="hoisted")``, the xla
  backend with its forward-only pass projecting all steps before the loop,
  to measure the in-loop projection that ``xla`` uses on CPU.

Two workloads: ``forward`` (the suites' ``fwd``: the outputs) and
``fwd+bwd`` (``fwdbwd``: loss = sum of the outputs; gradients w.r.t. all
parameters and the inputs). Timing is the suites' (:mod:`benchmarks.measure`):
every function is compiled and warmed up, then the JAX implementations run
``--rounds`` interleaved rounds (so machine load hits all of them alike),
PyTorch half of its rounds just before and half just after, and the median
(and minimum) of the rounds is reported. The same run measures this
machine's large-matmul rate (a 2048×2048 float32 matmul, fastest call, the
better of the start and the end: :func:`benchmarks.measure.matmul_ceiling`)
and reports each implementation's achieved FLOP/s as a fraction of it. FLOPs
are the suites' model (:func:`benchmarks.measure.model_flops`, matmuls only):
``2·T·B·(I+H)·G`` forward and three times that forward+backward (``G`` =
gates × hidden).

Usage::

    python -m benchmarks.studies.kernels_cpu             # all cells, writes the JSON
    python -m benchmarks.studies.kernels_cpu --cells lstm --rounds 5 --out /tmp/x.json

Results: ``benchmarks/results/cpu/kernels_xla.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax

from benchmarks import impls, measure, report
from benchmarks.suites import CELLS, GATES, Case

T, B, I, H = 256, 32, 128, 256
MATMUL_SIZE = 2048
DEFAULT_OUT = os.path.join(report.RESULTS_DIR, "cpu", "kernels_xla.json")
#: The study's workloads and the suite modes they are.
WORKLOADS = {"forward": "fwd", "fwd+bwd": "fwdbwd"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def builders(proposal=True):
    """``{name: builder}`` of the JAX implementations (:mod:`benchmarks.impls` builders)."""
    from jaxrnn.kernels import XLA  # noqa: PLC0415

    out = {
        "flax": impls.IMPLEMENTATIONS["flax.linen"],
        "reference": impls.IMPLEMENTATIONS["jaxrnn:reference"],
        "xla": impls.IMPLEMENTATIONS["jaxrnn:xla"],
    }
    if proposal:
        out["xla_hoisted"] = impls.jaxrnn_builder(XLA(projection="hoisted"))
    return out


def case(cell, workload, size):
    """The suites' :class:`~benchmarks.suites.Case` of ``workload`` at ``size = (B, T, I, H)``."""
    batch, seq_len, input_size, hidden = size
    return Case(cell, WORKLOADS[workload], batch, seq_len, input_size, hidden)


def _context():
    return impls.Context(platform=jax.default_backend())


def torch_times(name, rounds, size):
    """PyTorch timings ``({workload: [seconds]}, threads)`` from a worker process.

    In one process with XLA, PyTorch's OpenMP workers (which spin after each
    parallel region) and XLA's thread pool take the cores from each other;
    making OpenMP wait passively instead slows PyTorch by about 30%. So
    PyTorch runs alone, with its default settings, in a child process.
    """
    if rounds <= 0:
        return {w: [] for w in WORKLOADS}, None
    cmd = [sys.executable, "-m", "benchmarks.studies.kernels_cpu", "--torch-worker", name, "--rounds", str(rounds)]
    cmd += ["--batch", str(size[0]), "--seq-len", str(size[1]), "--input-size", str(size[2]), "--hidden", str(size[3])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["times"], result["threads"]


def _torch_worker(name, rounds, size):
    ctx = _context()
    works = {w: impls.IMPLEMENTATIONS["torch"](case(name, w, size), ctx) for w in WORKLOADS}
    times = measure.time_rounds({w: work.run for w, work in works.items()}, rounds)
    print(json.dumps({"times": times, "threads": works["forward"].notes["threads"]}))


def matmul_rate(rounds):
    """Large-matmul FLOP/s of this machine (jax, 2048² float32), fastest of ``rounds`` calls."""
    rounds = max(rounds, 1)
    ceiling = measure.matmul_ceiling(["float32"], (MATMUL_SIZE,), min_reps=rounds, max_reps=rounds, target_s=0.0)
    return ceiling["float32"]["ceiling_flop_s"]


def run_cell(name, rounds, size, proposal=True):
    """Times of every implementation; PyTorch's half before and half after the JAX rounds."""
    ctx = _context()
    runs = {}
    for impl, build in builders(proposal).items():
        for workload in WORKLOADS:
            _, runs[(impl, workload)] = build(case(name, workload, size), ctx).compile()
    before, threads = torch_times(name, (rounds + 1) // 2, size)
    flat = measure.time_rounds({f"{impl}/{w}": run for (impl, w), run in runs.items()}, rounds)
    after, _ = torch_times(name, rounds // 2, size)
    times = {}
    for (impl, workload) in runs:
        times.setdefault(impl, {})[workload] = flat[f"{impl}/{workload}"]
    times["torch"] = {w: before[w] + after[w] for w in WORKLOADS}
    return times, threads


def summarize(name, times, rate, size):
    flops = {w: measure.model_flops(case(name, w, size), GATES[name]) for w in WORKLOADS}
    out = {"flops": flops, "ms": {}, "ms_min": {}, "gflops": {}, "fraction_of_matmul": {}, "speedup_of_xla": {}}
    medians = {}
    for impl, per in times.items():
        for workload, ts in per.items():
            stats = measure.summarize_times(ts)
            med = medians.setdefault(workload, {})[impl] = stats["median_s"]
            out["ms"].setdefault(workload, {})[impl] = round(1e3 * med, 2)
            out["ms_min"].setdefault(workload, {})[impl] = round(1e3 * stats["min_s"], 2)
            out["gflops"].setdefault(workload, {})[impl] = round(flops[workload] / med / 1e9, 1)
            out["fraction_of_matmul"].setdefault(workload, {})[impl] = round(flops[workload] / med / rate, 3)
    for workload, med in medians.items():
        out["speedup_of_xla"][workload] = {f"vs_{other}": round(med[other] / med["xla"], 3) for other in med if other != "xla"}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.kernels_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per implementation")
    parser.add_argument("--batch", type=int, default=B)
    parser.add_argument("--seq-len", type=int, default=T)
    parser.add_argument("--input-size", type=int, default=I)
    parser.add_argument("--hidden", type=int, default=H)
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path ('' to skip)")
    parser.add_argument("--no-proposal", action="store_true", help="skip the xla_hoisted variant")
    parser.add_argument("--torch-worker", metavar="CELL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = (args.batch, args.seq_len, args.input_size, args.hidden)
    if args.torch_worker:
        return _torch_worker(args.torch_worker, args.rounds, size)

    env = measure.environment()
    rate_before = matmul_rate(args.rounds)
    results, threads = {}, None
    for name in args.cells:
        results[name], cell_threads = run_cell(name, args.rounds, size, proposal=not args.no_proposal)
        threads = threads or cell_threads
    rate_after = matmul_rate(args.rounds)
    rate = max(rate_before, rate_after)  # the less disturbed of the two
    report_ = {
        "benchmark": "python -m benchmarks.studies.kernels_cpu",
        "config": {
            "T": args.seq_len,
            "B": args.batch,
            "input": args.input_size,
            "hidden": args.hidden,
            "dtype": "float32",
            "rounds": args.rounds,
            "torch_threads": threads,
            "torch_process": "separate worker process, run before and after the JAX rounds",
            "layout": "batch-major (B, T, I) everywhere (torch: batch_first=True)",
        },
        "device": {
            "platform": env["platform"],
            "cpu": env["cpu_model"],
            "cores": env["cpu_count"],
            "load_average": measure.loadavg(),
        },
        "versions": {k: env[k] for k in ("jax", "jaxlib", "flax", "torch", "jaxrnn", "python")},
        "matmul_2048_gflops": round(rate / 1e9, 1),
        "matmul_2048_gflops_before_after": [round(rate_before / 1e9, 1), round(rate_after / 1e9, 1)],
        "cells": {name: summarize(name, times, rate, size) for name, times in results.items()},
    }
    for name, summary in report_["cells"].items():
        for workload, ms in summary["ms"].items():
            line = "  ".join(f"{k} {v:8.1f}" for k, v in ms.items())
            print(f"{name:6s} {workload:8s} ms: {line}   xla speedup: {summary['speedup_of_xla'][workload]}")
    print(f"matmul 2048² f32: {report_['matmul_2048_gflops']} GFLOP/s; load average {report_['device']['load_average']}")
    if args.out:
        report.save_json(args.out, report_, indent=2)
        print("wrote", args.out)
    return report_


if __name__ == "__main__":
    main()
