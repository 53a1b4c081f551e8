"""The CPU-performance issue's targets, read off the committed CPU results: what is met, what is not, by how much.

Reads ``<results>/cpu.json`` and ``cpu_small.json`` (``python -m benchmarks
--suite cpu|cpu_small``) and ``lm_cpu.json`` (``python -m
benchmarks.studies.lm_cpu``), measures nothing itself, and writes
``<results>/cpu_targets.md`` and ``cpu_targets.json``: per target the
threshold, the measured speed-ups (peer time / jaxrnn time, or jaxrnn
tokens/s over PyTorch's), the worst case, and whether it is met. jaxrnn's
row of a case is the one ``impl="auto"`` runs on CPU: ``jaxrnn:ffi`` where
the case has it (float32 LSTM, GRU, Elman), else
``jaxrnn:xla``. Target 6 (compilation) is checked on both of those backends;
``jaxrnn:reference`` (plain autodiff through ``lax.scan``, the correctness
oracle, not a backend ``"auto"`` picks) is reported beside it.

The targets (issue "Performance where users feel it"):

1. training step of a cell, fwd+bwd, f32, at B=32 T=256 I=128 H=256:
   >= 1.3x PyTorch and flax, and no fwd+bwd case of the ``cpu`` suite below
   1.0x PyTorch;
2. the experiments' regime (``cpu_small``): >= 1.5x PyTorch and flax for
   Elman, LSTM and GRU;
3. bidirectional 2-layer LSTM and GRU stacks, fwd+bwd, padded batch:
   >= 1.3x PyTorch (packed sequences) and >= 2x flax;
4. the character LM's training throughput: >= 1.3x a PyTorch training loop;
5. generation of 1,000 characters at batch 1 and 32: >= 5x a PyTorch
   per-token loop;
6. compilation under 1 s for every ``cpu`` case, and no recompilation.

Example:
  $ python -m benchmarks.studies.cpu_targets            # reads and writes benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from benchmarks import report

__all__ = ["evaluate", "main", "markdown", "short_handed"]

#: jaxrnn's rows in order of preference: the first one a case has is what ``impl="auto"`` runs on CPU.
JAXRNN = ("jaxrnn:ffi", "jaxrnn:xla")
PEERS = ("torch", "flax.linen")


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def short_handed(row):
    """The fraction of a ``jaxrnn:ffi`` row's thread-team calls that ran short-handed, or ``None`` (no record, no team).

    ``notes.thread_teams`` (see ``benchmarks/README.md``): a call whose helper
    thread started too late ran on one thread, up to 2x slower.
    """
    teams = row.get("notes", {}).get("thread_teams") or {}
    calls = teams.get("team_calls") or 0
    return teams.get("short_handed_calls", 0) / calls if calls else None


def _speedups(results, keep):
    """``[(case_id, {peer: peer time / jaxrnn time}, short-handed fraction)]`` for the jaxrnn rows ``keep(row)`` selects."""
    chosen = {}
    for row in results["rows"]:
        if row["status"] == "ok" and row["impl"] in JAXRNN and keep(row):
            held = chosen.get(row["case_id"])
            if held is None or JAXRNN.index(row["impl"]) < JAXRNN.index(held["impl"]):
                chosen[row["case_id"]] = row
    out = []
    for case_id, row in chosen.items():
        ratios = {p: 1.0 / r for p, r in row["time_ratio_vs_peers"].items() if p in PEERS and r}
        out.append((case_id, ratios, short_handed(row)))
    return out


def _target(name, description, cases, thresholds):
    """One target over ``cases`` (``[(case_id, {peer: speed-up}, short-handed fraction)]``) with per-peer ``thresholds``."""
    worst = {}
    for peer in thresholds:
        values = [(r[peer], cid) for cid, r, _ in cases if peer in r]
        worst[peer] = min(values) if values else (math.nan, None)
    short = {cid: f for cid, _, f in cases}
    met = bool(cases) and all(worst[p][0] >= t for p, t in thresholds.items())
    return {
        "target": name,
        "description": description,
        "thresholds": thresholds,
        "cases": [{"case_id": cid, "speedup": r, "short_handed": f} for cid, r, f in cases],
        "worst": {p: {"speedup": v, "case_id": cid, "short_handed": short.get(cid)} for p, (v, cid) in worst.items()},
        "met": met,
    }


def evaluate(folder):
    """The targets as a list of records (see :func:`_target`), from the JSON files in ``folder``."""
    cpu, small, lm = _load(folder, "cpu.json"), _load(folder, "cpu_small.json"), _load(folder, "lm_cpu.json")
    targets = []
    if cpu is not None:
        base = _speedups(cpu, lambda r: r["mode"] == "fwdbwd" and r["structure"] == "single" and r["batch"] == 32
                         and r["seq_len"] == 256 and r["hidden_size"] == 256)  # fmt: skip
        targets.append(_target("1", "training step at B=32 T=256 I=128 H=256 (Elman, LSTM, GRU)", base,
                               {"torch": 1.3, "flax.linen": 1.3}))  # fmt: skip
        every = _speedups(cpu, lambda r: r["mode"] == "fwdbwd")
        targets.append(_target("1b", "no fwd+bwd case of the cpu suite below PyTorch", every, {"torch": 1.0}))
        padded = _speedups(cpu, lambda r: r["mode"] == "fwdbwd" and r["structure"] == "bidir2" and r.get("padded"))
        targets.append(_target("3", "bidirectional 2-layer LSTM and GRU stacks, fwd+bwd, padded batch (PyTorch packed)",
                               padded, {"torch": 1.3, "flax.linen": 2.0}))  # fmt: skip
        ok = [r for r in cpu["rows"] if r["status"] == "ok"]
        mine = [r for r in ok if r["impl"] in ("jaxrnn:ffi", "jaxrnn:xla")]
        oracle = [r for r in ok if r["impl"] == "jaxrnn:reference"]
        slow = [r["case_id"] + " " + r["impl"] for r in mine if (r["compile_s"] or 0) >= 1.0]
        again = [r["case_id"] + " " + r["impl"] for r in mine if r["notes"].get("recompiled_on_second_call")]
        targets.append({
            "target": "6",
            "description": "compilation under 1 s for every cpu case (jaxrnn:ffi and jaxrnn:xla), and no "
                           "recompilation on a second call",
            "longest_compile_s": max((r["compile_s"] or 0) for r in mine) if mine else None,
            "reference_longest_compile_s": max((r["compile_s"] or 0) for r in oracle) if oracle else None,
            "over_1s": slow,
            "recompiled": again,
            "met": bool(mine) and not slow and not again,
        })  # fmt: skip
    if small is not None:
        for cell in ("elman", "lstm", "gru"):
            cases = _speedups(small, lambda r, c=cell: r["cell"] == c)
            targets.append(_target(f"2-{cell}", f"the experiments' regime (cpu_small), {cell}", cases,
                                   {"torch": 1.5, "flax.linen": 1.5}))  # fmt: skip
    if lm is not None:
        for key, tg in lm["targets"].items():
            targets.append({"target": "4" if key.startswith("train") else "5", "description": tg["description"],
                            "ratio": tg["ratio"], "threshold": tg.get("threshold"), "met": bool(tg["met"]),
                            "detail": {k: v for k, v in tg.items() if k not in ("description", "ratio", "met")}})  # fmt: skip
    return targets


def _fmt(x):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _short(fraction):
    """``"; short-handed in 21% of its calls"`` for a row whose thread team fell short, else ``""``."""
    return f"; short-handed in {fraction:.0%} of its calls" if fraction else ""


def markdown(targets, sources) -> str:
    """The targets as a Markdown table, with where each number comes from."""
    lines = [
        "# CPU-performance targets: measured",
        "",
        "Read from " + ", ".join(f"`{s}`" for s in sources) + " (their device, versions, load averages and method "
        "are recorded there). Speed-up = peer time / jaxrnn time (what `impl=\"auto\"` runs on CPU: `jaxrnn:ffi` for "
        "float32 LSTM, GRU and Elman cells, else `jaxrnn:xla`); "
        "for the language model, jaxrnn tokens/s over PyTorch's. \"Short-handed\": the share of the `jaxrnn:ffi` "
        "row's thread-team calls that ran on fewer threads than planned, because XLA's pool thread started too late "
        "(`notes.thread_teams`; each such call is up to 2x slower).",
        "",
        "| target | what | threshold | worst measured | met |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        if "thresholds" in t:
            thr = ", ".join(f"{p} >= {v}x" for p, v in t["thresholds"].items())
            worst = "; ".join(f"{p} {_fmt(w['speedup'])}x ({w['case_id']}{_short(w.get('short_handed'))})"
                              for p, w in t["worst"].items())
        elif t["target"] == "6":
            thr = "< 1 s, no recompilation"
            worst = f"longest {_fmt(t['longest_compile_s'])} s; over 1 s: {len(t['over_1s'])}; recompiled: {len(t['recompiled'])}"
            if t.get("reference_longest_compile_s") is not None:
                worst += f" (jaxrnn:reference, not a backend `auto` picks: longest {_fmt(t['reference_longest_compile_s'])} s)"
        else:
            thr = ">= " + (f"{t['threshold']}x" if t.get("threshold") else "target")
            by_batch = t["detail"].get("ratio_by_batch")
            worst = f"{_fmt(t['ratio'])}x" + (
                " (" + ", ".join(f"batch {b}: {_fmt(r)}x" for b, r in by_batch.items()) + ")" if by_batch else "")
            if t["detail"].get("ratio_at_ceiling") is not None:  # lm_cpu's bound: every matmul at the machine's rate
                worst += f"; at most {_fmt(t['detail']['ratio_at_ceiling'])}x at the float32 matmul ceiling"
        lines.append(f"| {t['target']} | {t['description']} | {thr} | {worst} | {'**yes**' if t['met'] else 'no'} |")
    lines += ["", "Per case (speed-ups against PyTorch and flax linen):", ""]
    for t in targets:
        for c in t.get("cases", []):
            lines.append(f"- {t['target']}: `{c['case_id']}`: " + ", ".join(f"{p} {_fmt(v)}x" for p, v in c["speedup"].items())
                         + _short(c.get("short_handed")))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.cpu_targets", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(report.RESULTS_DIR, "cpu"), help="folder of the CPU results")
    args = p.parse_args(argv)
    sources = [n for n in ("cpu.json", "cpu_small.json", "lm_cpu.json") if os.path.exists(os.path.join(args.results, n))]
    if not sources:
        print(f"cpu_targets: no CPU results in {args.results!r} (run the cpu suites and lm_cpu first)", file=sys.stderr)
        return 2
    targets = evaluate(args.results)
    report.save_json(os.path.join(args.results, "cpu_targets.json"), {"sources": sources, "targets": targets}, indent=2)
    with open(os.path.join(args.results, "cpu_targets.md"), "w") as f:
        f.write(markdown(targets, sources))
    for t in targets:
        print(f"target {t['target']:>7}: {'met' if t['met'] else 'not met'}  {t['description']}")
    print(f"wrote {os.path.join(args.results, 'cpu_targets.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
