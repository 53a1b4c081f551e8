"""The API reference builds from the docstrings with pdoc, without warnings or broken references."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "make_api.py"


def _load():
    spec = importlib.util.spec_from_file_location("make_api", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_builds(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(SCRIPT), "-o", str(tmp_path / "api")], capture_output=True,
                            text=True, timeout=240, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    pages = {p.relative_to(tmp_path / "api").as_posix() for p in (tmp_path / "api").rglob("*.html")}
    for page in ("jaxrnn.html", "jaxrnn/analysis.html", "jaxrnn/kernels.html", "jaxrnn/nnx.html", "jaxrnn/models/lm.html"):
        assert page in pages, sorted(pages)
    assert "jaxrnn.rnn" in (tmp_path / "api" / "jaxrnn.html").read_text() or "def rnn" in (tmp_path / "api" / "jaxrnn.html").read_text()


def test_broken_reference_is_reported(tmp_path, monkeypatch):
    import pdoc.doc

    (tmp_path / "docref_probe.py").write_text(textwrap.dedent('''
        """Probe: :func:`good` resolves, :func:`missing_function` and :class:`jaxrnn.NoSuchCell` do not."""

        def good():
            """See :func:`jaxrnn.rnn` and :meth:`jaxrnn.Stack.apply`."""
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    problems = _load().broken_references([pdoc.doc.Module.from_name("docref_probe")])
    assert len(problems) == 2 and "missing_function" in problems[0] + problems[1], problems
