"""Every notebook in notebooks/ is valid nbformat-4 JSON and all its code runs.

Code cells are executed in order in one namespace per notebook, in-process,
with IPython magics and shell lines (``%pip ...``, ``!...``) skipped. The
notebooks check themselves with ``assert`` (e.g. ``jaxrnn.rnn`` against a
loop over ``cell.step``), so a change in the library that breaks what they
teach fails here.
"""

import json
import os
import pathlib
import warnings

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert {"01_quickstart.ipynb", "02_vanishing_gradients.ipynb"} <= {p.name for p in NOTEBOOKS}


def load(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and isinstance(nb["cells"], list) and nb["cells"]
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code"), cell["cell_type"]
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit notebooks without outputs"
    return nb


def code_of(cell):
    lines = "".join(cell["source"]).splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = load(path)
    first = "".join(nb["cells"][1]["source"])
    assert "%pip install -q -e .." in first, "the first code cell installs the checkout"
    monkeypatch.chdir(path.parent)
    namespace = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")
                exec(compile(code_of(cell), f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102
    finally:
        plt.close("all")
    assert os.getcwd() == str(path.parent)
