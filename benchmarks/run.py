"""Run a suite: every case with every implementation, one row each.

A row is measured (``status="ok"`` with numbers), ``"skipped"`` (with the
reason: no GPU, no such cell in that library, a jaxrnn backend not built yet,
the time budget spent) or ``"failed"`` (an unexpected error, with its message).
Every row has every field of :data:`ROW_FIELDS`; fields that do not apply are
``None``.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
import traceback
from typing import Any, Callable, Optional

import jax
import numpy as np

from benchmarks import impls as impls_lib
from benchmarks import measure
from benchmarks.suites import GATES

__all__ = ["MEASURED_FIELDS", "ROW_FIELDS", "run_suite", "summarize"]

#: Measured fields that must be numbers in every ``ok`` row.
MEASURED_FIELDS = (
    "ms_median",
    "ms_q25",
    "ms_q75",
    "ms_min",
    "ms_max",
    "n_reps",
    "first_call_ms",
    "us_per_step",
    "tokens_per_s",
    "model_flops",
    "flop_per_s",
    "matmul_fraction",
    "compile_s",
)

ROW_FIELDS = (
    "case_id",
    "sweeps",
    "cell",
    "mode",
    "structure",
    "padded",
    "seq_lengths",
    "num_layers",
    "bidirectional",
    "batch",
    "seq_len",
    "input_size",
    "hidden_size",
    "dtype",
    "impl",
    "library",
    "status",
    "reason",
    *MEASURED_FIELDS,
    "compile_method",
    "peak_memory_bytes",
    "memory_method",
    "xla_memory_bytes",
    "rel_err_vs_reference",
    "time_ratio_vs_peers",
    "notes",
)

SKIP_ERRORS = (ImportError, NotImplementedError)


def _empty_row(case, impl, sweeps):
    row = dict.fromkeys(ROW_FIELDS)
    row.update(
        case_id=case.id,
        sweeps=sweeps,
        cell=case.cell,
        mode=case.mode,
        structure=case.structure,
        padded=case.padded,
        seq_lengths=case.seq_lengths(),
        num_layers=case.num_layers,
        bidirectional=case.bidirectional,
        batch=case.batch,
        seq_len=case.seq_len,
        input_size=case.input_size,
        hidden_size=case.hidden_size,
        dtype=case.dtype,
        impl=impl,
        time_ratio_vs_peers={},
        notes={},
    )
    return row


def _first_line(e):
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300]


def _jax_memory_state():
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None


def _rel_err(out, ref):
    """``‖out − ref‖ / ‖ref‖`` over all leaves, in float64 on the host."""
    a = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(out)]
    b = [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(ref)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(np.sum(y**2)) for y in b))
    return num / den if den > 0 else num


@dataclasses.dataclass
class _Prepared:
    """A built, compiled and warmed-up implementation of one case."""

    run: Callable[[], Any]
    first_s: float
    best_s: float
    eager: bool
    output: Any = None  # jaxrnn implementations: one call's result, for the reference check
    rerun: Optional[Callable[[], Any]] = None  # eager: the raw call, for the profiler


def _prepare(row, case, impl, ctx, suite):
    """Build, compile and warm up one (case, implementation); fill the row's static fields."""
    mem0 = _jax_memory_state()
    t_build = time.perf_counter()
    work = impls_lib.IMPLEMENTATIONS[impl](case, ctx)
    row["notes"]["build_s"] = round(time.perf_counter() - t_build, 3)
    row["library"] = work.library
    row["notes"].update(work.notes)
    row["dtype"] = row["notes"].get("dtype", case.dtype)  # torch:fp16 runs a bf16 case in float16
    if isinstance(work, impls_lib.TorchWork):
        warmup = max(suite.warmup, work.min_warmup)
        first, best = measure.warm_up(work.run, warmup=warmup, target_s=suite.target_s, cap_s=suite.row_cap_s)
        row["peak_memory_bytes"] = work.peak_memory() if work.peak_memory else None
        row["memory_method"] = work.memory_method
        row["compile_method"] = "eager (no compilation): first call minus steady-state median"
        return _Prepared(work.run, first, best, eager=True, rerun=work.run)

    t0 = time.perf_counter()
    compiled, run = work.compile()
    row["compile_s"] = time.perf_counter() - t0
    row["compile_method"] = "jax.jit(f).lower(*args).compile() wall time"
    try:
        m = compiled.memory_analysis()
        row["xla_memory_bytes"] = int(
            m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001
        row["xla_memory_bytes"] = None
    first, best = measure.warm_up(run, warmup=suite.warmup, target_s=suite.target_s, cap_s=suite.row_cap_s)
    mem1 = _jax_memory_state()
    if mem0 and mem1 and "peak_bytes_in_use" in mem1:
        if mem1["peak_bytes_in_use"] > mem0.get("peak_bytes_in_use", 0):
            row["peak_memory_bytes"] = int(mem1["peak_bytes_in_use"] - mem0.get("bytes_in_use", 0))
            row["memory_method"] = "device peak_bytes_in_use minus bytes_in_use before the row (JAX allocator)"
        else:
            row["memory_method"] = (
                "not attributable: an earlier row set a higher device peak and JAX cannot reset the "
                "peak counter; see xla_memory_bytes"
            )
    else:
        row["memory_method"] = (
            f"not available on {ctx.platform} (no allocator statistics); xla_memory_bytes is the "
            "compiled footprint (arguments + outputs + temporaries)"
        )
    output = None
    if impl.startswith("jaxrnn:"):
        output = run()
        row["notes"]["recompiled_on_second_call"] = _recompiles(work)
    return _Prepared(run, first, best, eager=False, output=output)


def _recompiles(work):
    """Whether ``jax.jit(work.fn)`` compiles again when called a second time with the same arguments.

    The timed calls go through an ahead-of-time compiled executable, which
    cannot show this; here the function runs twice through ``jax.jit`` as
    users call it, and the jit cache must then hold one entry.
    """
    jitted = jax.jit(work.fn)
    jax.block_until_ready(jitted(*work.args))
    jax.block_until_ready(jitted(*work.args))
    return jitted._cache_size() != 1


def _finish(row, case, times, prep, ctx, suite, profiled, reference_out):
    """Fill the measured fields of ``row`` from its timed calls."""
    stats = measure.summarize_times(times)
    if len(times) < suite.min_reps:
        row["notes"]["capped"] = f"stopped after {len(times)} timed calls: its calls took over row_cap_s={suite.row_cap_s} s"
    t = stats["median_s"]
    flops = measure.model_flops(case, GATES[case.cell])
    row.update(
        status="ok",
        ms_median=1e3 * t,
        ms_q25=1e3 * stats["q25_s"],
        ms_q75=1e3 * stats["q75_s"],
        ms_min=1e3 * stats["min_s"],
        ms_max=1e3 * stats["max_s"],
        n_reps=len(times),
        first_call_ms=1e3 * prep.first_s,
        us_per_step=1e6 * t / case.seq_len,
        tokens_per_s=case.batch * case.seq_len / t,
        model_flops=flops,
        flop_per_s=flops / t,
    )
    if prep.eager:
        row["compile_s"] = max(prep.first_s - t, 0.0)
        key = (row["impl"], case.cell, case.mode, case.structure)
        if suite.profile_torch and (ctx.platform != "cpu" or key not in profiled):
            profiled.add(key)
            row["notes"]["profile"] = impls_lib.torch_kernels(prep.rerun, ctx.platform == "gpu")
    if prep.output is not None and reference_out is not None and row["impl"] != "jaxrnn:reference":
        row["rel_err_vs_reference"] = _rel_err(prep.output, reference_out)


def _set_fractions(rows, ceiling):
    for r in rows:
        peak = ceiling.get(r["dtype"], {}).get("ceiling_flop_s")
        if r["status"] == "ok":
            r["matmul_fraction"] = r["flop_per_s"] / peak if peak else None


def _team_stats():
    """The C++ kernel's thread-team counters (:func:`jaxrnn.kernels.ffi.team_stats`), or ``None`` without it.

    Only ``jaxrnn:ffi`` calls form teams, so their difference over a case's
    timed rounds (re-warm calls included) is that row's: of the ``team_calls``
    that planned two threads or more, ``short_handed_calls`` ran with fewer
    (a pool thread started too late to take any work), each up to 2x slower.
    """
    from jaxrnn.kernels import ffi  # noqa: PLC0415

    return ffi.team_stats() if ffi.available() else None


def _run_case(case, impls, ctx, suite, sweeps, profiled, deadline, log):
    """All rows of one case: prepare each implementation, time them interleaved, finish.

    ``deadline``: ``(perf_counter time, budget_s)`` after which rows are skipped, or ``None``.
    """
    rows, prepared = {}, {}
    for impl in impls:
        row = rows[impl] = _empty_row(case, impl, sweeps)
        if deadline is not None and time.perf_counter() > deadline[0]:
            row.update(status="skipped", reason=f"time budget exhausted ({deadline[1]:.0f} s; see --budget-s)")
            continue
        t_row = time.perf_counter()
        try:
            prepared[impl] = _prepare(row, case, impl, ctx, suite)
        except impls_lib.Unavailable as e:
            row.update(status="skipped", reason=str(e))
        except SKIP_ERRORS as e:
            row.update(status="skipped", reason=f"not available: {_first_line(e)}")
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", reason=_first_line(e))
            row["notes"]["traceback"] = traceback.format_exc(limit=6)[-2000:]
        row["notes"]["prepare_wall_s"] = round(time.perf_counter() - t_row, 3)
    timing = dict(min_reps=suite.min_reps, max_reps=suite.max_reps, target_s=suite.target_s)
    rewarm = {i for i, p in prepared.items() if p.best_s < measure.REWARM_BELOW_S}
    runs = {i: p.run for i, p in prepared.items()}
    teams_before = _team_stats() if "jaxrnn:ffi" in prepared else None
    times, errors = measure.time_interleaved(runs, rewarm=rewarm, cap_s=suite.row_cap_s, **timing)
    if teams_before is not None:
        teams_after = _team_stats()
        rows["jaxrnn:ffi"]["notes"]["thread_teams"] = {k: teams_after[k] - teams_before[k] for k in teams_before}
    reference = prepared.get("jaxrnn:reference")
    for impl, prep in prepared.items():
        row = rows[impl]
        if impl in errors:
            row.update(status="failed", reason=_first_line(errors[impl]))
            continue
        try:
            _finish(row, case, times[impl], prep, ctx, suite, profiled, reference and reference.output)
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", reason=_first_line(e))
    for impl, row in rows.items():
        if row["status"] == "ok":
            log(f"{case.id:<52} {impl:<17} {row['ms_median']:10.3f} ms")
        else:
            log(f"{case.id:<52} {impl:<17} {row['status']}: {row['reason']}")
    return list(rows.values())


def _torch_empty_cache():
    import sys  # noqa: PLC0415

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ratios(rows):
    """Fill ``time_ratio_vs_peers`` (jaxrnn time / peer time, same case) and return the flat list."""
    flat = []
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case_id"], []).append(r)
    for case_rows in by_case.values():
        ok = [r for r in case_rows if r["status"] == "ok"]
        for mine in (r for r in ok if r["impl"].startswith("jaxrnn:")):
            for peer in (r for r in ok if not r["impl"].startswith("jaxrnn:")):
                ratio = mine["ms_median"] / peer["ms_median"]
                mine["time_ratio_vs_peers"][peer["impl"]] = ratio
                flat.append(
                    {
                        "case_id": mine["case_id"],
                        "mode": mine["mode"],
                        "jaxrnn": mine["impl"],
                        "peer": peer["impl"],
                        "time_ratio": ratio,
                    }
                )
    return flat


def summarize(ratios):
    """Geometric mean of ``time_ratio`` per (jaxrnn impl, peer, mode), with min, max and count."""
    groups = {}
    for r in ratios:
        groups.setdefault((r["jaxrnn"], r["peer"], r["mode"]), []).append(r["time_ratio"])
    return [
        {
            "jaxrnn": j,
            "peer": p,
            "mode": m,
            "geomean_time_ratio": float(np.exp(np.mean(np.log(v)))),
            "min": float(min(v)),
            "max": float(max(v)),
            "n_cases": len(v),
        }
        for (j, p, m), v in sorted(groups.items())
    ]


def run_suite(
    suite, *, impls=None, cells=None, modes=None, budget_s=None, pallas_interpret=False, tag=None, on_case=None, log=None
):
    """Run ``suite`` and return the results dict (see :mod:`benchmarks.report`).

    Args:
      suite: a :class:`~benchmarks.suites.Suite`.
      impls: implementation names to run (default: all of ``IMPLEMENTATIONS``).
      cells, modes: keep only these cells / modes (default: all).
      budget_s: wall-clock budget; rows after it are skipped with a reason
        (default: the suite's own).
      pallas_interpret: time ``impl="pallas"`` on CPU in interpret mode anyway.
      tag: suffix of the output files (``<suite>-<tag>.json``), for partial runs.
      on_case: called with the partial results after each case (for
        incremental writes).
      log: called with one progress line per row.
    """
    impls = list(impls_lib.IMPLEMENTATIONS) if impls is None else list(impls)
    budget_s = suite.budget_s if budget_s is None else budget_s
    log = log or (lambda line: None)
    start = time.perf_counter()
    try:
        import torch  # noqa: PLC0415

        torch.set_num_threads(os.cpu_count() or 1)  # the torch rows set their own; this is what env records
    except ImportError:
        pass
    env = measure.environment()
    ctx = impls_lib.Context(platform=env["platform"], pallas_interpret=pallas_interpret)
    cases = [c for c in suite.cases() if (cells is None or c.cell in cells) and (modes is None or c.mode in modes)]
    dtypes = sorted({c.dtype for c in cases} | ({"float16"} if "torch:fp16" in impls and ctx.platform == "gpu" else set()))
    log(f"matmul ceiling: {dtypes} at sizes {suite.matmul_sizes}")
    ceiling_s = min(1.0, max(suite.target_s, 0.05))
    ceiling = measure.matmul_ceiling(dtypes, suite.matmul_sizes, target_s=ceiling_s)
    sweeps_of = {}
    for sweep in suite.sweeps:
        for c in sweep.cases:
            sweeps_of.setdefault(c, []).append(sweep.name)
    results = {
        "schema": 1,
        "suite": suite.name,
        "description": suite.description,
        "device_dir": measure.device_dir_name(env),
        "environment": env,
        "settings": {
            "warmup": suite.warmup,
            "min_reps": suite.min_reps,
            "max_reps": suite.max_reps,
            "target_s": suite.target_s,
            "budget_s": budget_s,
            "impls": impls,
            "cells": cells,
            "modes": modes,
            "tag": tag,
            "timing": measure.__doc__.split("\n\n", 1)[1].strip(),
            "time_ratio": "jaxrnn median time / peer median time in the same case and run (below 1: jaxrnn faster)",
        },
        "flop_model": measure.FLOP_MODEL,
        "matmul_ceiling": ceiling,
        "matmul_ceiling_start": ceiling,
        "matmul_ceiling_end": None,
        "sweeps": [{"name": s.name, "axis": s.axis, "case_ids": [c.id for c in s.cases]} for s in suite.sweeps],
        "rows": [],
        "ratios": [],
        "summary": [],
        "complete": False,
    }
    profiled = set()
    deadline = None if budget_s is None else (start + budget_s, budget_s)
    for case in cases:
        results["rows"] += _run_case(case, impls, ctx, suite, sweeps_of.get(case, []), profiled, deadline, log)
        if ctx.platform != "cpu":  # free device memory before the next case (slow: ~0.5 s)
            gc.collect()
            _torch_empty_cache()
        _set_fractions(results["rows"], ceiling)
        results["ratios"] = _ratios(results["rows"])
        results["summary"] = summarize(results["ratios"])
        if on_case is not None:
            on_case(results)
    log("matmul ceiling again (the ceiling is the better of the two)")
    results["matmul_ceiling_end"] = measure.matmul_ceiling(dtypes, suite.matmul_sizes, target_s=ceiling_s)
    ceiling = measure.merge_ceilings(results["matmul_ceiling_start"], results["matmul_ceiling_end"])
    results["matmul_ceiling"] = ceiling
    _set_fractions(results["rows"], ceiling)
    results["ratios"] = _ratios(results["rows"])
    results["summary"] = summarize(results["ratios"])
    env["loadavg_end"] = measure.loadavg()
    results["elapsed_s"] = time.perf_counter() - start
    results["complete"] = True
    return results
