"""The notebooks: executed by a real Jupyter kernel, committed with current outputs.

``notebooks/execute.py`` runs each notebook with nbclient in an ipykernel of
this interpreter (a temporary kernel spec pointing at ``sys.executable``),
failing on any error, with a 300 s limit per notebook. Setting
``JAXRNN_NOTEBOOK_RUNS=0`` skips the executions (only), and a comma-separated
list of names (``03``) runs only the notebooks whose names contain one of
them. CI's first stage runs only ``03``, for its PyTorch section: its second
stage executes every notebook on the newest JAX, the one Colab runs, without
PyTorch (its PyPI builds for that Python are CUDA ones, several GB), and the
executions are a sixth of the suite's time. The notebooks check
themselves with ``assert``, so a library change that breaks what they teach
fails here. The committed notebooks carry their outputs; each code cell
records the hash of the source that produced them, and a cell whose source
changed since fails :func:`test_committed_outputs_are_current` (refresh with
``python notebooks/execute.py --write``).
"""

import importlib.util
import json
import os
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("notebook_execute", REPO / "notebooks" / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

NOTEBOOKS = execute.notebooks()
EXPECTED = {"01_quickstart.ipynb", "02_vanishing_gradients.ipynb", "03_cells_and_stacks.ipynb",
            "04_char_language_model.ipynb", "05_long_range_dependencies.ipynb", "06_tagging_and_elmo.ipynb",
            "07_kernels_and_benchmarks.ipynb"}
ids = lambda p: p.name  # noqa: E731


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_structure(path):
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    badge = re.search(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
                      r"\(https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/main/notebooks/([\w.-]+)\)",
                      first.source)
    assert badge and badge.group(1) == path.name, "the first cell opens with an Open-in-Colab badge to this notebook"
    install = code_cells(nb)[0].source
    assert re.search(r'^JAXRNN_SOURCE = "', install, re.M), "the install cell names its source once"
    assert 'importlib.util.find_spec("jaxrnn") is None or "google.colab" in sys.modules' in install
    assert 'Path("../pyproject.toml").exists()' in install and '"-e .."' in install
    assert re.search(r"^\s+%pip install -q \{source\} \{keep\}$", install, re.M), "%pip runs, guarded, keeping JAX"
    assert '("jax", "jaxlib")' in install


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_outputs_are_current(path):
    problems = execute.check([path])
    assert not problems, "\n".join(problems + [f"refresh the outputs: {execute.REFRESH_COMMAND} {path.stem[:2]}"])
    nb = load(path)
    outputs = [o for c in code_cells(nb) for o in c["outputs"]]
    assert outputs, f"{path.name} is committed without outputs; run {execute.REFRESH_COMMAND}"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    if any("plt.show()" in "".join(c["source"]) for c in code_cells(nb)):
        assert images, f"{path.name}: its figures are missing from the committed outputs"


def test_stale_cell_is_detected():
    nb = load(NOTEBOOKS[0])
    cell = code_cells(nb)[1]
    cell["source"] = "".join(cell["source"]) + "\nprint('edited')"
    problems = execute.stale_cells(nb)
    assert len(problems) == 1 and "source changed" in problems[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs(path):
    """Execute the notebook (a temporary copy in memory; nothing is written) and compare with the committed one."""
    runs = os.environ.get("JAXRNN_NOTEBOOK_RUNS", "1")
    if runs == "0":
        pytest.skip("JAXRNN_NOTEBOOK_RUNS=0: the notebooks are executed in another run (CI: on the newest JAX)")
    if runs != "1" and not any(name and name in path.name for name in runs.split(",")):
        pytest.skip(f"JAXRNN_NOTEBOOK_RUNS={runs}: only the notebooks whose names contain one of these run here")
    executed, seconds = execute.execute(path, timeout=execute.DEFAULT_TIMEOUT, log=lambda *_: None)
    print(f"{path.name}: {seconds:.1f} s")
    committed = load(path)
    ran = [c for c in executed.cells if c.cell_type == "code"]
    assert [execute.source_hash(c) for c in code_cells(committed)] == [
        c.metadata[execute.META_KEY][execute.HASH_KEY] for c in ran
    ], "the executed code differs from the committed code"
    assert not any(o.output_type == "error" for c in ran for o in c.outputs)
    if path.name == "03_cells_and_stacks.ipynb" and importlib.util.find_spec("torch") is not None:
        printed = "".join(o.get("text", "") for c in ran for o in c.outputs)
        assert printed.count("largest difference to PyTorch") == 4, "with PyTorch installed, its section runs"


def _tiny_notebook(folder: pathlib.Path, source: str) -> pathlib.Path:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    path = folder / "tiny.ipynb"
    nbformat.write(nb, str(path))
    return path


def _counting_kernel_managers(monkeypatch, busy_port=None):
    """Patch jupyter_client's AsyncKernelManager to count instances; the first binds ``busy_port``."""
    import jupyter_client.manager

    made = []

    class Counting(jupyter_client.manager.AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if busy_port is not None and not made:
                self.cache_ports = False  # else the provisioner picks the ports itself
                self.control_port = busy_port  # the collision CI saw: another process holds the port
            made.append(self)

    monkeypatch.setattr(jupyter_client.manager, "AsyncKernelManager", Counting)
    return made


@pytest.mark.slow
def test_a_kernel_that_dies_at_start_up_is_started_again(tmp_path, monkeypatch):
    """A port taken between jupyter_client choosing it and the kernel binding it kills the kernel: start anew."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        made = _counting_kernel_managers(monkeypatch, busy_port=busy.getsockname()[1])
        logged = []
        path = _tiny_notebook(tmp_path, "print(6 * 7)")
        executed, _ = execute.execute(path, timeout=120, log=logged.append)
    assert len(made) == 2
    assert "died at start-up" in logged[0] and "starting a new one" in logged[0]
    assert executed.cells[0].outputs[0]["text"] == "42\n"

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        made = _counting_kernel_managers(monkeypatch, busy_port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="died at start-up 1 times"):
            execute.execute(path, timeout=120, log=logged.append, start_attempts=1)
    assert len(made) == 1
    with pytest.raises(ValueError, match="start_attempts"):
        execute.execute(path, start_attempts=0)


@pytest.mark.slow
def test_an_error_in_a_cell_is_not_retried(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    made = _counting_kernel_managers(monkeypatch)
    path = _tiny_notebook(tmp_path, "raise RuntimeError('from the cell')")
    with pytest.raises(CellExecutionError, match="from the cell"):
        execute.execute(path, timeout=120, log=lambda *_: None)
    assert len(made) == 1
