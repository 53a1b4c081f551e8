"""Timing, the FLOP model, the matmul ceiling and the environment record.

Every implementation, JAX and PyTorch alike, is timed by the host wall clock
(``time.perf_counter``) around one call that ends with the device idle
(``jax.block_until_ready`` for JAX, ``torch.cuda.synchronize`` for PyTorch on
GPU), after compilation, one untimed first call and ``warmup`` untimed calls
(at least 2 for eager PyTorch; warm-up continues for up to ``target_s`` while a
call is still 1.5x slower than the fastest so far, as oneDNN builds its
primitives over the first calls). The implementations of one case are then
timed interleaved, in round-robin rounds (one call each per round, rotating
the order), so that load drifts on a shared machine hit all alike; rounds
repeat until both ``min_reps`` rounds and ``target_s`` seconds per
implementation have passed (at most ``max_reps``); calls shorter than 0.5 s
are re-warmed right before each timed one by untimed calls for at least 20 ms
(at least one call), so that they run with warm caches, and after their own
threads rather than another library's, as in a loop. The report gives the
median, the quartiles and min/max. Times include dispatch/launch overhead, as
a user sees it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time

import numpy as np

__all__ = [
    "FLOP_MODEL",
    "REWARM_BELOW_S",
    "cpu_model",
    "device_dir_name",
    "environment",
    "loadavg",
    "matmul_ceiling",
    "merge_ceilings",
    "model_flops",
    "summarize_times",
    "time_calls",
    "time_interleaved",
    "time_rounds",
    "time_together",
    "version",
    "warm_up",
]

FLOP_MODEL = (
    "Matmul FLOPs only (elementwise gate math is ignored). Per layer and direction, "
    "forward = 2*B*T*G*(I_l + H) with G = gates*H (LSTM 4, GRU 3, Elman 1) and I_l the "
    "layer's input width (I for layer 0, 2H above a bidirectional layer): the input "
    "projection x@W_ih plus the recurrent h@W_hh. fwd+bwd = 3x forward (the backward pass "
    "does two matmuls per forward matmul: the input gradient and the weight gradient; "
    "an approximation that ignores recomputation). step = the forward formula with T=1. "
    "Achieved FLOP/s = model FLOPs / median time; its fraction is taken of the large-matmul "
    "rate of the same dtype measured in the same run."
)


def model_flops(case, gates: int) -> float:
    """Model FLOPs of one call of ``case`` (see :data:`FLOP_MODEL`)."""
    H, G = case.hidden_size, gates * case.hidden_size
    directions = 2 if case.bidirectional else 1
    total = 0.0
    for layer in range(case.num_layers):
        width = case.input_size if layer == 0 else directions * H
        total += directions * 2.0 * case.batch * case.seq_len * G * (width + H)
    return 3.0 * total if case.mode == "fwdbwd" else total


def warm_up(run, *, warmup: int, target_s: float, max_warmup: int = 20, cap_s: float = float("inf")):
    """Call ``run()`` once and then ``warmup`` more times; return ``(first_s, best_s)``.

    Warm-up continues (up to ``max_warmup`` calls and ``target_s`` seconds)
    while the last call is more than 1.5x the fastest so far, i.e. still
    settling: eager libraries build kernels over their first calls. Once the
    calls have taken ``cap_s`` in all, warm-up stops (a pathologically slow
    implementation must not eat a suite's time budget).
    """
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    best, last, n, spent = first, first, 0, 0.0
    while first + spent < cap_s and (n < warmup or (last > 1.5 * best and n < max_warmup and spent < target_s)):
        t0 = time.perf_counter()
        run()
        last = time.perf_counter() - t0
        best, n, spent = min(best, last), n + 1, spent + last
    return first, best


#: Calls shorter than this are re-warmed right before each timed call (every
#: call of the CPU suites; see :data:`REWARM_S`). It was 50 ms until the
#: ``ffi`` backend: a call whose time loop runs on both cores is slowed by the previous
#: implementation's threads, which keep spinning for a while after their call
#: (measured: jaxrnn's LSTM fwd+bwd at B=32 T=256 H=256 took 64 ms after its
#: own call, 100-106 ms right after PyTorch's, 63 ms after PyTorch's and a
#: 50 ms pause), whereas in a training loop it follows itself.
REWARM_BELOW_S = 0.5

#: A re-warm lasts at least this long (untimed calls repeat until it has
#: passed; at least one call). PyTorch's OpenMP worker keeps spinning for about
#: 10 ms after PyTorch's call (the process burned 9-11 ms of CPU over a 16 or
#: 50 ms sleep after an LSTM fwd+bwd), so one re-warm call shorter than that
#: leaves the timed call beside it. Measured on 2 cores, jaxrnn's LSTM fwd+bwd
#: at B=64 T=50 H=64 right after PyTorch's call, medians of 150: 4.33 ms after
#: one re-warm call, 3.83 after two, 2.85 after 20 ms of calls, and 2.99 with
#: no PyTorch call at all.
REWARM_S = 0.02


def time_interleaved(
    runs, *, min_reps: int, max_reps: int, target_s: float, rewarm=(), cap_s=float("inf"), rewarm_s: float = REWARM_S
):
    """Time several warmed-up callables in round-robin rounds.

    Each round calls every ``runs[name]()`` once, starting one position later
    than the previous round, so that slow drifts of a shared machine's load hit
    every implementation alike. A name in ``rewarm`` gets untimed calls right
    before its timed call, for at least ``rewarm_s`` seconds (at least one
    call): otherwise a short call would run with its data evicted from the
    caches by the previous implementation (seen on CPU: a 0.08 ms LSTM step
    takes 0.5 ms right after another library's call), or beside that
    implementation's still-spinning threads (see :data:`REWARM_BELOW_S`),
    whereas in a loop it follows itself. Rounds repeat until both ``min_reps``
    rounds and ``target_s`` seconds per callable have passed (at most
    ``max_reps``). A callable that raises is dropped from later rounds, and so
    is one whose timed calls have taken ``cap_s`` in all (it keeps the calls it
    has: fewer than ``min_reps``).

    Returns:
      ``(times, errors)``: ``{name: [seconds, ...]}`` and ``{name: exception}``.
    """
    names = list(runs)
    times, errors = {n: [] for n in names}, {}
    start, rounds = time.perf_counter(), 0
    while names and rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < target_s * len(names)):
        k = rounds % len(names)
        for name in names[k:] + names[:k]:
            try:
                if name in rewarm:
                    t0 = time.perf_counter()
                    runs[name]()
                    while time.perf_counter() - t0 < rewarm_s:
                        runs[name]()
                t0 = time.perf_counter()
                runs[name]()
            except Exception as e:  # noqa: BLE001
                errors[name] = e
                continue
            times[name].append(time.perf_counter() - t0)
        names = [n for n in names if n not in errors and sum(times[n]) < cap_s]
        rounds += 1
    return times, errors


def summarize_times(times):
    """Median, quartiles, min and max (seconds) of a list of call times."""
    a = np.asarray(times)
    return {
        "median_s": float(np.median(a)),
        "q25_s": float(np.percentile(a, 25)),
        "q75_s": float(np.percentile(a, 75)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
    }


def time_together(runs, *, warmup: int, min_reps: int, max_reps: int, target_s: float, cap_s=float("inf")):
    """:func:`warm_up` each of ``runs`` (``{name: callable}``), then :func:`time_interleaved` them.

    A callable whose fastest warm-up call is shorter than
    :data:`REWARM_BELOW_S` is re-warmed before each timed call, as in a
    suite. Returns ``(first_s, times, errors)``: ``{name: first-call
    seconds}`` and :func:`time_interleaved`'s two dicts.
    """
    first, rewarm = {}, set()
    for name, run in runs.items():
        first[name], best = warm_up(run, warmup=warmup, target_s=target_s, cap_s=cap_s)
        if best < REWARM_BELOW_S:
            rewarm.add(name)
    times, errors = time_interleaved(
        runs, min_reps=min_reps, max_reps=max_reps, target_s=target_s, rewarm=rewarm, cap_s=cap_s
    )
    return first, times, errors


def time_rounds(runs, rounds: int, *, warmup: int = 2):
    """:func:`time_together` for exactly ``rounds`` rounds (no time target); ``{name: [seconds]}``.

    A callable that raises makes this raise (a study has no row to mark failed).
    """
    if rounds <= 0:
        return {name: [] for name in runs}
    _, times, errors = time_together(runs, warmup=warmup, min_reps=rounds, max_reps=rounds, target_s=0.0)
    if errors:
        name, error = next(iter(errors.items()))
        raise RuntimeError(f"{name} failed while timed: {error}") from error
    return times


def time_calls(run, *, warmup: int, min_reps: int, max_reps: int, target_s: float):
    """:func:`warm_up` then time ``run()`` alone; returns ``first_s``, ``times_s`` and :func:`summarize_times`."""
    first, _ = warm_up(run, warmup=warmup, target_s=target_s)
    times, errors = time_interleaved({"run": run}, min_reps=min_reps, max_reps=max_reps, target_s=target_s)
    if errors:
        raise errors["run"]
    return {"first_s": first, "times_s": times["run"], **summarize_times(times["run"])}


def matmul_ceiling(dtypes, sizes, *, min_reps=5, max_reps=50, target_s=1.0):
    """FLOP/s of square ``n x n @ n x n`` matmuls in JAX, per dtype and size.

    Random normal operands (not zeros); the rate of the fastest call (a
    ceiling: on a shared machine the median drifts with other jobs' load).
    Returns ``{dtype: {"by_size": {n: flop_s}, "ceiling_flop_s": max}}``.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    out = {}
    for dtype in dtypes:
        by_size = {}
        for n in sizes:
            ka, kb = jax.random.split(jax.random.key(n))
            a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
            b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
            f = jax.jit(jnp.matmul).lower(a, b).compile()
            stats = time_calls(
                lambda: jax.block_until_ready(f(a, b)),  # noqa: B023
                warmup=2,
                min_reps=min_reps,
                max_reps=max_reps,
                target_s=target_s,
            )
            by_size[str(n)] = 2.0 * n**3 / stats["min_s"]
            del a, b, f
        out[dtype] = {"by_size": by_size, "ceiling_flop_s": max(by_size.values())}
    return out


def merge_ceilings(*measurements):
    """Element-wise maximum of several :func:`matmul_ceiling` results (e.g. start and end of a run)."""
    out = {}
    for m in measurements:
        for dtype, c in m.items():
            d = out.setdefault(dtype, {"by_size": {}, "ceiling_flop_s": 0.0})
            for n, v in c["by_size"].items():
                d["by_size"][n] = max(d["by_size"].get(n, 0.0), v)
            d["ceiling_flop_s"] = max(d["ceiling_flop_s"], c["ceiling_flop_s"])
    return out


def version(module_name):
    """``module_name.__version__``, or why it is unavailable."""
    try:
        module = __import__(module_name)
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({type(e).__name__})"
    return getattr(module, "__version__", "unknown")


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args):
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def loadavg():
    """The 1, 5 and 15 minute load averages, or ``None``."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


#: What :func:`retain_freed_memory` returned in this process (``None``: not called), for :func:`environment`.
_RETAINED_FREED_MEMORY = None


def retain_freed_memory():
    """:func:`jaxrnn.host.retain_freed_memory` for the whole process (every library timed in it), recorded.

    Process-wide: a run with it times every implementation, peers included,
    with freed memory kept for reuse (see :mod:`jaxrnn.host`). Returns what
    glibc said (``False`` without glibc).
    """
    global _RETAINED_FREED_MEMORY
    from jaxrnn import host  # noqa: PLC0415

    _RETAINED_FREED_MEMORY = host.retain_freed_memory()
    return _RETAINED_FREED_MEMORY


def environment():
    """Device, library versions and machine state, recorded with every result."""
    import jax  # noqa: PLC0415

    dev = jax.devices()[0]
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "equinox": version("equinox"),
        "jaxrnn": version("jaxrnn"),
        "numpy": np.__version__,
        "torch": version("torch"),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": loadavg(),
        # The C allocator's settings change CPU times by up to 2x (page faults of fresh buffers; jaxrnn.host).
        "retain_freed_memory": _RETAINED_FREED_MEMORY,
        "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
    }
    try:
        import torch  # noqa: PLC0415

        env["torch_num_threads"] = torch.get_num_threads()
        env["torch_cuda"] = torch.version.cuda
        env["torch_cuda_available"] = torch.cuda.is_available()
        env["torch_cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        env["torch_mkldnn"] = torch.backends.mkldnn.is_available()
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return env


def device_dir_name(env) -> str:
    """Folder name for a device: ``cpu`` or a slug of the GPU's name (``nvidia-h100-80gb-hbm3``)."""
    if env["platform"] == "cpu":
        return "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in env["device_kind"].lower())
    return "-".join(p for p in slug.split("-") if p) or env["platform"]
