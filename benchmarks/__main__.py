"""Command line: ``python -m benchmarks --suite NAME --out DIR`` (also ``jaxrnn bench ...``).

Bad arguments print one line on stderr and return 2.
"""

from __future__ import annotations

import argparse
import os
import sys

# JAX must not grab 75% of the GPU before PyTorch runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from benchmarks.report import RESULTS_DIR as DEFAULT_OUT  # noqa: E402  (imports no JAX)


class UsageError(Exception):
    """A bad command line; the message is the one line printed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def parser():
    from benchmarks.impls import IMPLEMENTATIONS  # noqa: PLC0415
    from benchmarks.suites import CELLS, MODES, SUITES  # noqa: PLC0415

    p = _Parser(prog="python -m benchmarks", description="jaxrnn benchmark suites")
    p.add_argument("--suite", help=f"one of: {', '.join(SUITES)}")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder; files go to OUT/<device>/<suite>.{json,md,png}")
    p.add_argument("--impls", type=_list, help=f"comma-separated subset of: {', '.join(IMPLEMENTATIONS)}")
    p.add_argument("--cells", type=_list, help=f"comma-separated subset of: {', '.join(CELLS)}")
    p.add_argument("--modes", type=_list, help=f"comma-separated subset of: {', '.join(MODES)}")
    p.add_argument("--budget-s", type=float, help="wall-clock budget; later rows are skipped (default: the suite's)")
    p.add_argument("--tag", help="suffix for the output files (<suite>-<tag>.json), e.g. for a --modes subset")
    p.add_argument("--pallas-interpret", action="store_true", help="time impl='pallas' on CPU in interpret mode")
    p.add_argument("--retain-memory", action="store_true",
                   help="keep freed memory for reuse in this process, for every implementation (jaxrnn.host)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _check_subset(name, values, allowed):
    if values is None:
        return None
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UsageError(f"{name}: unknown {bad or values!r} (expected a subset of {', '.join(allowed)})")
    return values


def main(argv=None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from benchmarks.impls import IMPLEMENTATIONS  # noqa: PLC0415
        from benchmarks.suites import CELLS, MODES, SUITES, get_suite  # noqa: PLC0415

        try:
            args = parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.list:
            for s in SUITES.values():
                print(f"{s.name:<12} {s.description}")
            return 0
        if not args.suite:
            raise UsageError("--suite is required (or --list)")
        suite = get_suite(args.suite)
        impls = _check_subset("--impls", args.impls, list(IMPLEMENTATIONS))
        cells = _check_subset("--cells", args.cells, CELLS)
        modes = _check_subset("--modes", args.modes, MODES)
        if args.budget_s is not None and args.budget_s <= 0:
            raise UsageError(f"--budget-s: expected a positive number, got {args.budget_s}")
        if args.tag is not None and (not args.tag or not all(c.isalnum() or c in "_." for c in args.tag)):
            raise UsageError(f"--tag: expected letters, digits, '_' or '.', got {args.tag!r}")
    except (UsageError, ValueError) as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2

    from benchmarks import measure, report  # noqa: PLC0415
    from benchmarks.run import run_suite  # noqa: PLC0415

    if args.retain_memory:
        measure.retain_freed_memory()

    log = None if args.quiet else (lambda line: print(line, flush=True))
    if impls is not None:  # keep the registry's order (reference first)
        impls = [i for i in IMPLEMENTATIONS if i in impls]
    results = run_suite(
        suite,
        impls=impls,
        cells=cells,
        modes=modes,
        budget_s=args.budget_s,
        pallas_interpret=args.pallas_interpret,
        tag=args.tag,
        on_case=lambda partial: report.write_json(args.out, partial),
        log=log,
    )
    paths = report.write_all(args.out, results)
    failed = sum(r["status"] == "failed" for r in results["rows"])
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}" + (f" ({failed} rows failed)" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
