"""Execute the notebooks with a real Jupyter kernel, check and refresh their committed outputs.

The committed notebooks carry their outputs (text and small PNG figures), so they
read well on GitHub. Each executed code cell records the SHA-256 of the source
that produced its outputs in its metadata (``metadata["jaxrnn"]["source_sha256"]``);
a cell whose source no longer matches that hash has stale outputs.

Commands (run from the repository root, with the virtualenv's Python)::

    python notebooks/execute.py --write            # re-execute every notebook, write the outputs in place
    python notebooks/execute.py --write 03         # only notebooks whose file name contains "03"
    python notebooks/execute.py --check            # fast: fail if a committed notebook's outputs are stale
    python notebooks/execute.py                    # execute every notebook in a temporary copy, write nothing

Execution is done by ``nbclient`` with an ``ipykernel`` that runs *this*
interpreter (``sys.executable``): a kernel spec written to a temporary folder,
so whatever ``python3`` kernel spec happens to be installed elsewhere is never
used. Any error fails the run, and each notebook has a total time limit
(``--timeout``, default 300 s). The kernel runs on CPU unless ``JAX_PLATFORMS``
is set, with the notebook's folder as its working directory, and figures are
rendered at 70 dpi (a ``matplotlibrc`` for the kernel only) to keep the
committed notebooks small.

The tests (``tests/notebooks/test_notebooks.py``) import this file.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Iterable, List, Optional

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
REPO = NOTEBOOK_DIR.parent
REFRESH_COMMAND = "python notebooks/execute.py --write"
META_KEY = "jaxrnn"
HASH_KEY = "source_sha256"
DEFAULT_TIMEOUT = 300.0
FIGURE_DPI = 70
KERNEL_NAME = "jaxrnn-notebooks"
MAX_NOTEBOOK_BYTES = 300_000
KERNEL_START_ATTEMPTS = 3


def notebooks(selection: Iterable[str] = ()) -> List[pathlib.Path]:
    """The notebooks in notebooks/ (sorted), or those whose name contains one of ``selection``."""
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    selection = list(selection)
    if selection:
        paths = [p for p in paths if any(s in p.name for s in selection)]
    return paths


def source_of(cell) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def source_hash(cell) -> str:
    """SHA-256 of a cell's source, as recorded in its metadata when it is executed."""
    return hashlib.sha256(source_of(cell).encode("utf-8")).hexdigest()


def stale_cells(nb) -> List[str]:
    """Why a notebook's committed outputs do not belong to its code: one line per problem, empty if current."""
    problems = []
    count = 0
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        count += 1
        recorded = cell.get("metadata", {}).get(META_KEY, {}).get(HASH_KEY)
        first = source_of(cell).strip().splitlines()[:1]
        where = f"cell {index} ({first[0][:60]!r})" if first else f"cell {index} (empty)"
        if recorded is None:
            problems.append(f"{where}: never executed (no recorded source hash)")
        elif recorded != source_hash(cell):
            problems.append(f"{where}: source changed since its outputs were produced")
        elif cell.get("execution_count") != count:
            problems.append(f"{where}: execution_count {cell.get('execution_count')}, expected {count} (run top to bottom)")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"{where}: committed with an error output ({output.get('ename')})")
    return problems


def kernel_spec_dir(root: pathlib.Path) -> pathlib.Path:
    """Write a kernel spec that runs this interpreter's ipykernel; return the folder holding it."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (jaxrnn)",
              "language": "python", "metadata": {"debugger": False}}
    (spec / "kernel.json").write_text(json.dumps(kernel, indent=1))
    return spec.parent


def kernel_env(tmp: pathlib.Path) -> dict:
    """The kernel's environment: ours, CPU unless JAX_PLATFORMS says otherwise, small figures, no GUI backend."""
    rc_dir = tmp / "mplrc"
    rc_dir.mkdir(exist_ok=True)
    (rc_dir / "matplotlibrc").write_text(f"figure.dpi: {FIGURE_DPI}\nsavefig.dpi: {FIGURE_DPI}\n")
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["MATPLOTLIBRC"] = str(rc_dir)
    env.pop("MPLBACKEND", None)  # the kernel picks its inline backend
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS", "")
    return env


class NotebookTimeout(RuntimeError):
    pass


def execute(path: pathlib.Path, timeout: float = DEFAULT_TIMEOUT, log=print, start_attempts: int = KERNEL_START_ATTEMPTS):
    """Run every cell of ``path`` in a fresh kernel of this interpreter, in the notebook's folder.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first error and
    :class:`NotebookTimeout` when the whole notebook takes longer than
    ``timeout`` seconds. Returns ``(executed notebook, seconds)``; each code
    cell's metadata records the hash of the source that produced its outputs.

    A kernel that dies before its first cell runs is started again, up to
    ``start_attempts`` times in all, with fresh ports: jupyter_client picks free
    ports and the kernel binds them a moment later, so two processes starting
    kernels at once can collide (``ZMQError: Address already in use``).
    A failure once a cell has run is never retried.
    """
    if start_attempts < 1:
        raise ValueError(f"start_attempts: expected at least 1, got {start_attempts}")
    for attempt in range(1, start_attempts + 1):
        try:
            return _execute_once(path, timeout, log)
        except _KernelStartFailed as failure:
            if attempt == start_attempts:
                raise RuntimeError(f"{path.name}: the kernel died at start-up {attempt} times") from failure.__cause__
            log(f"{path.name}: the kernel died at start-up ({failure.__cause__}); starting a new one")
    raise AssertionError("unreachable")


class _KernelStartFailed(Exception):
    """The kernel died before any cell ran (raised from the jupyter_client error)."""


def _execute_once(path: pathlib.Path, timeout: float, log):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError

    nb = nbformat.read(str(path), as_version=4)
    deadline = time.monotonic() + timeout
    cells_started = []

    class Client(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            cells_started.append(cell_index)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotebookTimeout(f"{path.name}: exceeded the {timeout:g} s limit before cell {cell_index}")
            self.timeout = max(1, int(left + 1))
            if cell.cell_type == "code":
                cell.metadata.setdefault(META_KEY, {})[HASH_KEY] = source_hash(cell)
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

    with tempfile.TemporaryDirectory(prefix="jaxrnn-nb-") as tmp:
        tmp = pathlib.Path(tmp)
        ksm = KernelSpecManager(kernel_dirs=[str(kernel_spec_dir(tmp))], ensure_native_kernel=False)
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        client = Client(
            nb,
            km=km,
            timeout=int(timeout),
            startup_timeout=120,
            allow_errors=False,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.monotonic()
        try:
            client.execute(env=kernel_env(tmp))
        except CellTimeoutError as error:
            raise NotebookTimeout(f"{path.name}: exceeded the {timeout:g} s limit\n{error}") from error
        except RuntimeError as error:
            if cells_started:
                raise
            # nbclient leaves its exit-time clean-up registered when the start fails; it has cleaned up already.
            atexit.unregister(client._cleanup_kernel)
            raise _KernelStartFailed() from error
        seconds = time.monotonic() - start
    # The kernel spec is a temporary one: record the standard one, as Colab and Jupyter expect.
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata.get("language_info", {}).pop("version", None)
    log(f"{path.name}: executed in {seconds:.1f} s")
    return nb, seconds


def write(nb, path: pathlib.Path) -> int:
    import nbformat

    nbformat.validate(nb)
    text = nbformat.writes(nb) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def check(paths: List[pathlib.Path]) -> List[str]:
    """Staleness and size problems of the committed notebooks (no execution)."""
    problems = []
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        problems += [f"{path.name}: {p}" for p in stale_cells(nb)]
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            problems.append(f"{path.name}: {size:,} bytes, over the {MAX_NOTEBOOK_BYTES:,} limit (fewer/smaller figures)")
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose file name contains one of these")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the executed outputs into the notebooks")
    mode.add_argument("--check", action="store_true", help="only check that the committed outputs are current")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per notebook (default 300)")
    args = parser.parse_args(argv)
    paths = notebooks(args.names)
    if not paths:
        parser.error(f"no notebook matches {args.names}")
    if args.check:
        problems = check(paths)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"stale notebook outputs: refresh them with `{REFRESH_COMMAND}`", file=sys.stderr)
            return 1
        print(f"{len(paths)} notebooks: outputs current")
        return 0
    for path in paths:
        nb, _ = execute(path, timeout=args.timeout)
        if args.write:
            size = write(nb, path)
            print(f"  wrote {path.relative_to(REPO)} ({size / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
