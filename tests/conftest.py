"""Test configuration: strict rank promotion everywhere, 64-bit off, CPU only, one compilation cache per run."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test run, shared by the xdist workers and the subprocesses (CLI, notebook
# kernels) through the environment: a program compiled by one test is loaded, not compiled again, by
# the next that builds the same one (compiling is most of the suite's time). Fresh each run, so every
# run still compiles every program once; removed at exit by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrnn-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, but each notebook execution is a unit of its own.

    A file's tests share a worker (and the programs their module-level setup
    compiled); the executions of ``tests/notebooks/test_notebooks.py`` are
    independent Jupyter kernels of one to several minutes each, which one
    worker would otherwise run one after another while the other sits idle.
    """
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling  # noqa: PLC0415

    class _NotebooksApart(LoadFileScheduling):
        def _split_scope(self, nodeid):
            if "::test_notebook_runs[" in nodeid:
                return nodeid
            return super()._split_scope(nodeid)

    return _NotebooksApart(config, log)
