"""jaxrnn.host: keeping freed memory makes repeated JAX CPU calls stop faulting their buffers in."""

import json
import os
import subprocess
import sys

import pytest

import jaxrnn.host as host

# One child per setting: the allocator setting is process-wide. The child calls a jitted gradient with a
# 32 MiB temporary (the matmul's output, kept for the backward) and reports the fewest minor page faults of
# its last eight calls. Measured per call: 8,193 by default; retained, 0 on most calls and 8,192 (the block
# mapped afresh) on some, more often on a loaded machine: the mean of four calls, which this test used to
# compare, reached 4,096-4,933 in two runs of the whole suite and failed the bound below.
_CHILD = r"""
import json, resource, sys
import jaxrnn.host as host
retained = host.retain_freed_memory() if sys.argv[1] == "retain" else None
import jax, jax.numpy as jnp
x = jnp.full((4096, 256), 0.01, jnp.float32)
w = jnp.full((256, 2048), 0.01, jnp.float32)
f = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w))))  # the backward keeps x @ w: a 32 MiB temporary
assert f.lower(x, w).compile().memory_analysis().temp_size_in_bytes >= 32 * 2**20
for _ in range(12):
    f(x, w).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"retained": retained, "faults_per_call": min(faults), "each": faults}))
"""


def _faults(mode):
    # Without the test run's compilation cache (tests/conftest.py): each child compiles its own program.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "JAX_COMPILATION_CACHE"))}
    env["JAX_PLATFORMS"] = "cpu"
    # One arena for every thread, in both modes. XLA may run the call on a pool thread, and glibc gives such a
    # thread its own heaps of at most 64 MiB, deleted as soon as they are empty: there the 32 MiB block is
    # mapped afresh at every call whatever the thresholds (the limit the module docstring names). Which thread
    # allocates varies with the load, so the measurement pins the arena to measure the thresholds alone.
    env["MALLOC_ARENA_MAX"] = "1"
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host._glibc() is None, reason="needs glibc (mallopt)")
def test_retained_memory_stops_the_page_faults():
    default, retained = _faults("default"), _faults("retain")
    assert retained["retained"] is True
    # 32 MiB of 4 KiB pages is 8192 faults; the default allocator maps the block afresh at every call.
    assert default["faults_per_call"] > 4000, default
    # Measured: 8,193-10,181 faults per call by default (the fewest: 8,193), retained 0 on most calls.
    assert retained["faults_per_call"] < 0.4 * default["faults_per_call"], (default, retained)


@pytest.mark.parametrize(
    "value, error, needle",
    [
        (1.5, TypeError, "limit_bytes: expected an int, got float"),
        (True, TypeError, "limit_bytes: expected an int, got bool"),
        (0, ValueError, r"limit_bytes: expected 1 to 2147483647 \(2\*\*31 - 1\), got 0"),
        (2**31, ValueError, "got 2147483648"),
    ],
)
def test_bad_limits_are_refused_before_anything_changes(value, error, needle):
    with pytest.raises(error, match=needle):
        host.retain_freed_memory(value)


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(host, "_glibc", lambda: None)
    assert host.retain_freed_memory() is False
