"""Benchmark cases and the named suites (configuration grids).

A :class:`Case` is one workload: a cell, a mode, a layer structure and the
sizes. A :class:`Sweep` is a list of cases that vary along one axis (batch,
hidden size, ...); the plot draws one panel per sweep. A :class:`Suite` is a
named set of sweeps with its timing settings.

Modes:

* ``fwd``: the whole sequence, forward only.
* ``fwdbwd``: forward and backward; the loss is the sum of the outputs and
  the gradient is taken with respect to the parameters and the inputs.
* ``step``: one jitted ``cell.step`` (streaming inference with a carry), the
  call blocks on its result as a streaming loop would.

Structures: ``single`` (one unidirectional layer) and ``bidir2`` (a
bidirectional stack of two layers, :class:`jaxrnn.Stack`).

The published grids the suites follow:

* ``flashrnn``: FlashRNN (Pöppel et al. 2024) on H100: LSTM, bf16, B=16,
  T=1024, hidden 768; batch sweep 2-256 and length sweep 256-2048.
* ``haste``: HASTE (lmnt-com/haste) benchmarks: f32, T=50, batch 1-128,
  hidden 128-2048, input 64-512.
* ``small_batch``: latency-bound inference/training, batch 1-8, hidden 512-1536.
* ``cpu``: a grid that finishes in a few minutes on a 2-core CPU; its base
  point (B=32, T=256, I=128, H=256) is the one in ``shared/perf-notes.md``;
  bidirectional stacks with and without padding.
* ``cpu_small``: the small models the lectures' experiments train hundreds
  of times (hidden 32-128, batch 32-128, length 50-500, input 1-64), fwd+bwd.
* ``smoke``: tiny, seconds; exercises every mode, cell, structure and both
  plot axes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

CELLS = ("lstm", "gru", "elman")
MODES = ("fwd", "fwdbwd", "step")
STRUCTURES = ("single", "bidir2")
GATES = {"lstm": 4, "gru": 3, "elman": 1}

__all__ = ["CELLS", "MODES", "SUITES", "Case", "Suite", "Sweep", "get_suite"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One workload.

    Attributes:
      cell: ``"lstm"``, ``"gru"`` (reset after the matmul, as cuDNN) or ``"elman"`` (tanh).
      mode: ``"fwd"``, ``"fwdbwd"`` or ``"step"``.
      batch: ``B``.
      seq_len: ``T`` (1 for ``step``).
      input_size: ``I``.
      hidden_size: ``H``.
      dtype: ``"float32"``, ``"bfloat16"`` (inputs, parameters and matmul operands).
      structure: ``"single"`` or ``"bidir2"``.
      padded: a padded batch: sequence ``b`` has :func:`seq_lengths` ``[b]``
        valid steps (from ``T`` down to about ``T/2``); jaxrnn and flax get
        ``seq_lengths``, PyTorch packs the batch (``pack_padded_sequence``).
    """

    cell: str
    mode: str
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    dtype: str = "float32"
    structure: str = "single"
    padded: bool = False

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {self.cell!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure: expected one of {STRUCTURES}, got {self.structure!r}")
        if self.mode == "step" and (self.structure != "single" or self.seq_len != 1 or self.padded):
            raise ValueError("step cases are single-layer with seq_len=1, unpadded")

    @property
    def num_layers(self) -> int:
        return 2 if self.structure == "bidir2" else 1

    @property
    def bidirectional(self) -> bool:
        return self.structure == "bidir2"

    @property
    def id(self) -> str:
        return (
            f"{self.cell}/{self.mode}/{self.structure}/B{self.batch}/T{self.seq_len}"
            f"/I{self.input_size}/H{self.hidden_size}/{self.dtype}"
        ) + ("/padded" if self.padded else "")

    def seq_lengths(self):
        """The valid lengths of a padded case, ``(B,)`` ints from ``T`` down to about ``T/2``; ``None`` unpadded.

        Evenly spread and the same for every implementation; the longest
        sequence is the full length ``T`` (PyTorch's packed batch then has
        ``T`` steps, as the padded arrays do).
        """
        if not self.padded:
            return None
        T, B = self.seq_len, self.batch
        return tuple(T - (b * (T // 2)) // max(B, 1) for b in range(B))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Cases varying along ``axis`` (a :class:`Case` field, or ``None`` for a plain list)."""

    name: str
    cases: Tuple[Case, ...]
    axis: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named grid with its timing settings.

    Attributes:
      name: the suite's name (``--suite``).
      description: one line.
      sweeps: the sweeps; a case in several sweeps is measured once.
      warmup: untimed calls after compilation.
      min_reps, max_reps: bounds on timed calls per row.
      target_s: time per row's timed calls (reps stop at ``max(min_reps, target_s)``).
      matmul_sizes: square matmul sizes timed for the device's ceiling.
      budget_s: default wall-clock budget; rows after it are skipped with a reason.
      platform: where the grid is meant to run (``"cpu"``, ``"gpu"`` or ``"any"``).
      profile_torch: record the operators/kernels PyTorch runs (one profiled call per row).
      row_cap_s: time after which an implementation's warm-up and timed calls stop
        (it then has fewer than ``min_reps`` calls; flagged ``notes.capped``).
    """

    name: str
    description: str
    sweeps: Tuple[Sweep, ...]
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 100
    target_s: float = 1.0
    matmul_sizes: Tuple[int, ...] = (2048,)
    budget_s: Optional[float] = None
    platform: str = "any"
    profile_torch: bool = True
    row_cap_s: float = 30.0

    def cases(self):
        """Unique cases in sweep order."""
        seen, out = set(), []
        for sweep in self.sweeps:
            for case in sweep.cases:
                if case not in seen:
                    seen.add(case)
                    out.append(case)
        return out


def _vary(base: Case, axis: str, values, **extra):
    return tuple(dataclasses.replace(base, **{axis: v}, **extra) for v in values)


def _step(cell, B, I, H, dtype):
    return Case(cell, "step", B, 1, I, H, dtype)


def _smoke():
    gru = Case("gru", "fwd", 2, 8, 8, 16)
    elman = Case("elman", "fwd", 2, 8, 8, 16)
    lstm = Case("lstm", "fwdbwd", 2, 8, 8, 16)
    return Suite(
        "smoke",
        "tiny sizes, every mode, cell and structure and both plot axes; seconds",
        (
            Sweep("gru fwd: batch", _vary(gru, "batch", (2, 4)), "batch"),
            Sweep("elman fwd: hidden", _vary(elman, "hidden_size", (16, 32)), "hidden_size"),
            Sweep(
                "lstm: fwd+bwd, bidirectional stack, step",
                (lstm, dataclasses.replace(lstm, mode="fwd", structure="bidir2"), _step("lstm", 2, 8, 16, "float32")),
            ),
        ),
        warmup=1,
        min_reps=3,
        max_reps=5,
        target_s=0.02,
        matmul_sizes=(256,),
        profile_torch=False,
    )


def _cpu():
    base = Case("lstm", "fwdbwd", 32, 256, 128, 256)
    sweep = Case("lstm", "fwd", 16, 64, 128, 256)
    bidir = Case("lstm", "fwd", 16, 64, 64, 128, structure="bidir2")
    return Suite(
        "cpu",
        "2-core CPU grid, f32; base point B=32 T=256 I=128 H=256 (perf-notes); a few minutes",
        (
            Sweep(
                "base point B=32 T=256 I=128 H=256, fwd and fwd+bwd",
                tuple(dataclasses.replace(base, cell=c, mode=m) for c in CELLS for m in ("fwd", "fwdbwd")),
            ),
            Sweep(
                "bidirectional 2-layer stack (B=16 T=64 I=64 H=128)",
                (bidir, dataclasses.replace(bidir, mode="fwdbwd")),
            ),
            Sweep(
                "bidirectional 2-layer stacks, fwd+bwd, padded batch (lengths 64 down to 34; PyTorch packed)",
                tuple(dataclasses.replace(bidir, cell=c, mode="fwdbwd", padded=True) for c in ("lstm", "gru")),
            ),
            Sweep("single step (B=1 I=128 H=256)", tuple(_step(c, 1, 128, 256, "float32") for c in CELLS)),
            Sweep("lstm fwd: batch (T=64 I=128 H=256)", _vary(sweep, "batch", (1, 8, 32, 64)), "batch"),
            Sweep("lstm fwd: hidden (B=16 T=64 I=128)", _vary(sweep, "hidden_size", (64, 128, 256, 512)), "hidden_size"),
        ),
        warmup=0,  # the first (untimed) call after AOT compilation is the warm-up
        min_reps=5,
        max_reps=20,
        target_s=0.4,
        matmul_sizes=(2048,),
        budget_s=230.0,  # a case started before the deadline still finishes: < 5 minutes in all
        platform="cpu",
        row_cap_s=4.0,  # PyTorch with 2 threads on a busy 2-core machine can take seconds per call
    )


#: The base point of ``cpu_small``: a dependency-length experiment's shapes (B=64, T=200, one-hot input 16, H=64).
SMALL_BASE = Case("lstm", "fwdbwd", 64, 200, 16, 64)


def _cpu_small():
    sweeps = []
    for cell in CELLS:
        b = dataclasses.replace(SMALL_BASE, cell=cell)
        sweeps += [
            Sweep(f"{cell} fwd+bwd: hidden (B=64 T=200 I=16)", _vary(b, "hidden_size", (32, 64, 128)), "hidden_size"),
            Sweep(f"{cell} fwd+bwd: batch (T=200 I=16 H=64)", _vary(b, "batch", (32, 64, 128)), "batch"),
            Sweep(f"{cell} fwd+bwd: length (B=64 I=16 H=64)", _vary(b, "seq_len", (50, 200, 500)), "seq_len"),
            Sweep(f"{cell} fwd+bwd: input (B=64 T=200 H=64)", _vary(b, "input_size", (1, 16, 64)), "input_size"),
        ]
    return Suite(
        "cpu_small",
        "the experiments' regime on a 2-core CPU: Elman, LSTM, GRU fwd+bwd, f32, hidden 32-128, batch 32-128, "
        "length 50-500, input 1-64 (base B=64 T=200 I=16 H=64)",
        tuple(sweeps),
        warmup=0,
        min_reps=7,
        max_reps=40,
        target_s=0.4,
        matmul_sizes=(2048,),
        budget_s=420.0,
        platform="cpu",
        profile_torch=False,
        row_cap_s=4.0,
    )


#: Timing settings shared by the GPU suites (each fits one 10-minute device call).
GPU_TIMING = dict(
    warmup=3,
    min_reps=10,
    max_reps=200,
    target_s=0.3,
    matmul_sizes=(2048, 8192),
    budget_s=480.0,
    platform="gpu",
)


def _flashrnn():
    base = Case("lstm", "fwd", 16, 1024, 768, 768, "bfloat16")
    sweeps = [
        Sweep(
            "base point B=16 T=1024 H=768, fwd and fwd+bwd",
            tuple(dataclasses.replace(base, cell=c, mode=m) for c in CELLS for m in ("fwd", "fwdbwd")),
        )
    ]
    # Forward sweeps in full; forward+backward sweeps thinned to fit one 10-minute device call.
    for mode, batches, lengths in (
        ("fwd", (2, 4, 8, 16, 32, 64, 128, 256), (256, 512, 1024, 2048)),
        ("fwdbwd", (4, 16, 64, 256), (256, 1024, 2048)),
    ):
        b = dataclasses.replace(base, mode=mode)
        sweeps.append(Sweep(f"lstm {mode}: batch (T=1024 H=768)", _vary(b, "batch", batches), "batch"))
        sweeps.append(Sweep(f"lstm {mode}: length (B=16 H=768)", _vary(b, "seq_len", lengths), "seq_len"))
    sweeps.append(
        Sweep(
            "bidirectional 2-layer stack and single step",
            (
                dataclasses.replace(base, structure="bidir2"),
                dataclasses.replace(base, structure="bidir2", mode="fwdbwd"),
                _step("lstm", 16, 768, 768, "bfloat16"),
            ),
        )
    )
    return Suite(
        "flashrnn",
        "FlashRNN's grid (GPU): LSTM bf16 B=16 T=1024 H=768; batch 2-256; length 256-2048",
        tuple(sweeps),
        **GPU_TIMING,
    )


def _haste():
    base = Case("lstm", "fwd", 64, 50, 256, 512)
    sweeps = [
        Sweep(
            "base point B=64 T=50 I=256 H=512, fwd and fwd+bwd",
            tuple(dataclasses.replace(base, cell=c, mode=m) for c in CELLS for m in ("fwd", "fwdbwd")),
        )
    ]
    # Forward sweeps in full; forward+backward sweeps thinned to fit one 10-minute device call.
    for mode, batches, hiddens, inputs in (
        ("fwd", (1, 2, 4, 8, 16, 32, 64, 128), (128, 256, 512, 1024, 2048), (64, 128, 256, 512)),
        ("fwdbwd", (1, 16, 64, 128), (128, 512, 2048), ()),
    ):
        b = dataclasses.replace(base, mode=mode)
        sweeps.append(Sweep(f"lstm {mode}: batch (T=50 I=256 H=512)", _vary(b, "batch", batches), "batch"))
        sweeps.append(Sweep(f"lstm {mode}: hidden (B=64 T=50 I=256)", _vary(b, "hidden_size", hiddens), "hidden_size"))
        if inputs:
            sweeps.append(Sweep(f"lstm {mode}: input (B=64 T=50 H=512)", _vary(b, "input_size", inputs), "input_size"))
    return Suite(
        "haste",
        "HASTE's grid (GPU): f32, T=50, batch 1-128, hidden 128-2048, input 64-512",
        tuple(sweeps),
        **GPU_TIMING,
    )


def _small_batch():
    base = Case("lstm", "fwd", 4, 512, 1024, 1024, "bfloat16")
    sweeps = []
    for cell in ("lstm", "gru"):
        b = dataclasses.replace(base, cell=cell)
        sweeps.append(Sweep(f"{cell} fwd: batch (T=512 H=1024)", _vary(b, "batch", (1, 2, 4, 8)), "batch"))
        sweeps.append(
            Sweep(
                f"{cell} fwd: hidden (B=4 T=512, I=H)",
                tuple(dataclasses.replace(b, hidden_size=h, input_size=h) for h in (512, 768, 1024, 1536)),
                "hidden_size",
            )
        )
    train = dataclasses.replace(base, mode="fwdbwd")
    sweeps.append(Sweep("lstm fwd+bwd: batch (T=512 H=1024)", _vary(train, "batch", (1, 2, 4, 8)), "batch"))
    sweeps.append(Sweep("single step", tuple(_step(c, b, 1024, 1024, "bfloat16") for c in CELLS for b in (1, 8))))
    return Suite(
        "small_batch",
        "small-batch grid (GPU): bf16, batch 1-8, hidden 512-1536, T=512",
        tuple(sweeps),
        **GPU_TIMING,
    )


SUITES = {s.name: s for s in (_smoke(), _cpu(), _cpu_small(), _flashrnn(), _haste(), _small_batch())}


def get_suite(name: str) -> Suite:
    """The suite called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in SUITES:
        raise ValueError(f"--suite: unknown suite {name!r} (expected one of {', '.join(SUITES)})")
    return SUITES[name]
