"""Packaging: ``kernels/`` imports as ``jaxrnn.kernels`` from an editable install and a built
wheel, never as a top-level ``kernels``; a bare checkout says to install; the CLI's error contract."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import jaxrnn

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, jaxrnn, jaxrnn.kernels as k; "
    "print(k.__file__); print(importlib.util.find_spec('kernels') is None or "
    "'jaxrnn' not in (importlib.util.find_spec('kernels').origin or ''))"
)


def _run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_public_api_is_exported():
    for name in jaxrnn.__all__:
        assert hasattr(jaxrnn, name), name


def test_editable_install_maps_kernels(tmp_path):
    """From outside the checkout the installed mapping must resolve jaxrnn.kernels to kernels/."""
    out = _run([sys.executable, "-c", PROBE], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    origin, top_level_ok = out.stdout.split()
    assert Path(origin).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert top_level_ok == "True"


def test_source_checkout_without_install_says_to_install(tmp_path):
    """With only the repository on sys.path (no install finders), importing jaxrnn gives one
    clear ImportError that says how to install, not a ModuleNotFoundError from deep inside."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__name__.lower() "
        "and 'editable' not in getattr(f, '__name__', '').lower()]; "
        f"sys.path.insert(0, {str(REPO)!r}); import jaxrnn"
    )
    out = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "pip install -e ." in last, out.stderr


@pytest.mark.slow
def test_wheel_contains_jaxrnn_kernels_and_imports(tmp_path):
    wheel_dir = tmp_path / "wheel"
    out = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = wheel_dir.glob("jaxrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxrnn/kernels/__init__.py" in names
    assert "jaxrnn/kernels/rnn_cpu.cc" in names, "impl='ffi' builds its library from this source on first use"
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' package would clash on PyPI"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    code = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; " + PROBE
    out = _run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.split()[0]).resolve() == (site / "jaxrnn" / "kernels" / "__init__.py").resolve()


def test_cli_unknown_command_prints_one_line_and_fails(tmp_path):
    out = _run([sys.executable, "-m", "jaxrnn", "frobnicate"], cwd=tmp_path)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "frobnicate" in out.stderr


def test_cli_help(tmp_path):
    out = _run([sys.executable, "-m", "jaxrnn", "--help"], cwd=tmp_path)
    assert out.returncode == 0 and "demo" in out.stdout and "gradients" in out.stdout
