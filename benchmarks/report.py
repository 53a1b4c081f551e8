"""Write a suite's results: ``<suite>.json``, ``<suite>.md`` and ``<suite>.png``."""

from __future__ import annotations

import json
import math
import os

__all__ = ["RESULTS_DIR", "markdown", "paths", "plot", "save_json", "write_json", "write_all"]

#: Where committed results live: ``benchmarks/results/<device>/``.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def paths(out_dir, results):
    """``{"json", "md", "png"}`` paths under ``out_dir/<device>/``."""
    folder = os.path.join(out_dir, results["device_dir"])
    tag = results["settings"].get("tag")
    base = os.path.join(folder, results["suite"] + (f"-{tag}" if tag else ""))
    return {"dir": folder, "json": base + ".json", "md": base + ".md", "png": base + ".png"}


def _clean(x):
    """JSON-safe: NaN/inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def save_json(path, data, *, indent=1):
    """Write ``data`` to ``path`` atomically (NaN/inf as null), creating its folder; return ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=indent, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_json(out_dir, results):
    """Write ``<suite>.json`` atomically; return its path."""
    return save_json(paths(out_dir, results)["json"], results)


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _si(x, unit=""):
    if x is None:
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _case_label(r):
    struct = ("" if r["structure"] == "single" else " bidir×2") + (" padded" if r.get("padded") else "")
    T = "" if r["mode"] == "step" else f" T={r['seq_len']}"
    return f"{r['cell']} {r['mode']}{struct} B={r['batch']}{T} I={r['input_size']} H={r['hidden_size']} {r['dtype']}"


def markdown(results):
    """The results as a markdown report (summary, table of measured rows, skipped rows)."""
    env = results["environment"]
    lines = [f"# Benchmark suite `{results['suite']}`", "", results["description"], ""]
    lines += [
        f"- device: **{env['device_kind']}** ({env['platform']}), CPU {env['cpu_model']} × {env['cpu_count']} cores",
        f"- jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, equinox {env['equinox']}, "
        f"torch {env['torch']}, numpy {env['numpy']}, python {env['python']}",
        f"- date {env['date_utc']}, commit {str(env.get('git_commit'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}, "
        f"load average at start {env.get('loadavg_start')} and end {env.get('loadavg_end')}",
        f"- elapsed {results.get('elapsed_s', 0):.0f} s{'' if results.get('complete') else ' (INCOMPLETE: partial results)'}",
        "",
    ]
    if env["platform"] == "cpu":
        lines += [
            "> CPU numbers come from a shared machine (other jobs ran at the same time; see the load "
            "averages above): single runs are noisy, compare ratios within this run rather than absolute "
            f"times. `torch` runs {env['cpu_count']} threads, `torch:1thread` one: on an oversubscribed "
            "machine PyTorch's OpenMP threads wait on each other and the multi-thread numbers inflate.",
            "",
        ]
    ceil = results["matmul_ceiling"]
    lines += ["Large-matmul ceiling measured in this run (JAX, random operands, fastest call, best of the "
              "run's start and end): " + ", ".join(
        f"{d}: " + ", ".join(f"{n}²: {_si(v, 'FLOP/s')}" for n, v in c["by_size"].items()) for d, c in ceil.items()
    ), ""]
    lines += ["FLOP model: " + results["flop_model"], ""]
    lines += ["Timing: " + results["settings"]["timing"].replace("\n", " ").replace("``", "`"), ""]
    if results["summary"]:
        lines += [
            "## jaxrnn time / peer time (geometric mean over cases; below 1: jaxrnn faster)",
            "",
            "| jaxrnn | peer | mode | geomean | min | max | cases |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for s in results["summary"]:
            lines.append(
                f"| {s['jaxrnn']} | {s['peer']} | {s['mode']} | {s['geomean_time_ratio']:.2f} | "
                f"{s['min']:.2f} | {s['max']:.2f} | {s['n_cases']} |"
            )
        lines.append("")
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    mine = [r for r in ok if r["impl"].startswith("jaxrnn:") and r["compile_s"] is not None]
    if mine:
        slowest = max(mine, key=lambda r: r["compile_s"])
        again = [r for r in mine if r["notes"].get("recompiled_on_second_call")]
        checked = [r for r in mine if "recompiled_on_second_call" in r["notes"]]
        lines += [
            f"Compilation (jaxrnn rows): longest {slowest['compile_s']:.2f} s ({_case_label(slowest)}, "
            f"{slowest['impl']}); a second `jax.jit` call with the same shapes recompiled in "
            f"{len(again)} of {len(checked)} rows"
            + (": " + ", ".join(f"{_case_label(r)} {r['impl']}" for r in again) if again else "")
            + ".",
            "",
        ]
    lines += [
        "## Measured rows",
        "",
        "Columns: median time per call with its interquartile range; model FLOP/s and its percentage of the "
        "matmul ceiling; compile s (JAX: lower+compile; PyTorch: first call minus median); memory (device peak "
        "on GPU, else XLA's compiled footprint, marked xla); rel. err of jaxrnn's fast paths against "
        "impl='reference' on the same inputs.",
        "",
        "| case | impl | ms median [q25, q75] | µs/step | tokens/s | FLOP/s | % matmul | compile s | memory | rel. err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ok:
        mem = r["peak_memory_bytes"] if r["peak_memory_bytes"] is not None else r["xla_memory_bytes"]
        mem_s = _si(mem, "B") + ("" if r["peak_memory_bytes"] is not None or mem is None else " (xla)")
        frac = None if r["matmul_fraction"] is None else 100 * r["matmul_fraction"]
        capped = f" (capped: {r['n_reps']} calls)" if r["notes"].get("capped") else ""
        lines.append(
            f"| {_case_label(r)} | {r['impl']} | {r['ms_median']:.3f} [{r['ms_q25']:.3f}, {r['ms_q75']:.3f}]{capped} | "
            f"{r['us_per_step']:.1f} | {_si(r['tokens_per_s'])} | {_si(r['flop_per_s'])} | {_fmt(frac, '.1f')} | "
            f"{_fmt(r['compile_s'], '.2f')} | {mem_s} | {_fmt(r['rel_err_vs_reference'], '.1e')} |"
        )
    lines.append("")
    notes = [r for r in ok if any(k.startswith("cudnn") for k in r["notes"])]
    if notes:
        lines += [
            "## cuDNN algorithm (PyTorch's heuristic, computed; see notes.profile.top_kernels in the JSON)",
            "",
            "| case | impl | forward | backward | persistent |",
            "|---|---|---|---|---|",
        ]
        for r in notes:
            n = r["notes"]
            lines.append(
                f"| {_case_label(r)} | {r['impl']} | {n.get('cudnn_algo_forward')} | {n.get('cudnn_algo_backward', '–')} | "
                f"{n.get('cudnn_persistent')} |"
            )
        lines.append("")
    profiled = [r for r in ok if (r["notes"].get("profile") or {}).get("ops")]
    if profiled:
        lines += [
            "## PyTorch operators and kernels seen (torch profiler, one call)",
            "",
            "| case | impl | operators | top CUDA kernels |",
            "|---|---|---|---|",
        ]
        for r in profiled:
            prof = r["notes"]["profile"]
            kernels = ", ".join(f"`{k[:60]}`" for k in prof.get("top_kernels", [])[:3]) or "–"
            lines.append(f"| {_case_label(r)} | {r['impl']} | {', '.join(prof['ops'])} | {kernels} |")
        lines.append("")
    other = [r for r in results["rows"] if r["status"] != "ok"]
    if other:
        groups = {}
        for r in other:
            groups.setdefault((r["impl"], r["status"], r["reason"]), []).append(r["case_id"])
        lines += ["## Skipped and failed rows", "", "| impl | status | reason | cases |", "|---|---|---|---:|"]
        for (impl, status, reason), ids in groups.items():
            lines.append(f"| {impl} | {status} | {str(reason).replace('|', '/')} | {len(ids)} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    """Tokens/s against each sweep's axis, one line per implementation (matplotlib Agg)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = {(r["case_id"], r["impl"]): r for r in results["rows"]}
    impls = results["settings"]["impls"]
    panels = [s for s in results["sweeps"] if s["axis"]]
    n = max(len(panels), 1)
    cols = min(n, 2)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 4 * ((n + cols - 1) // cols)), squeeze=False)
    for ax, sweep in zip(axes.flat, panels):
        for impl in impls:
            pts = [rows.get((cid, impl)) for cid in sweep["case_ids"]]
            pts = [r for r in pts if r is not None and r["status"] == "ok"]
            if pts:
                ax.plot(
                    [r[sweep["axis"]] for r in pts],
                    [r["tokens_per_s"] for r in pts],
                    marker="o",
                    linestyle="-" if impl.startswith("jaxrnn:") else "--",
                    color=f"C{impls.index(impl) % 10}",
                    label=impl,
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sweep["axis"])
        ax.set_ylabel("tokens/s")
        ax.set_title(sweep["name"], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no sweeps in this suite", ha="center")
    env = results["environment"]
    fig.suptitle(f"{results['suite']} on {env['device_kind']} ({env['date_utc']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out_dir, results):
    """Write the JSON, the markdown and the plot; return their paths."""
    p = paths(out_dir, results)
    write_json(out_dir, results)
    with open(p["md"], "w") as f:
        f.write(markdown(results) + "\n")
    plot(results, p["png"])
    return p
