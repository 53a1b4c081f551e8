"""The persistent Mosaic GPU kernels (kernels/mosaic_gpu.py) against the reference.

In Mosaic GPU's interpreter on CPU (``plgpu.InterpretGPUParams`` with race
detection on, JAX >= 0.12; skipped on older JAX), the kernel-equivalence
grid of ``test_pallas.py``: every cell whose weight splits (Elman, LSTM, GRU
``reset="after"``) × {float32, bfloat16} × {full length, lengths with 0 and
T} × {forward, reverse} (bfloat16: two complementary ones), through ``jaxrnn.rnn(..., impl=Pallas(backend=
"mosaic_gpu", interpret=True))`` against ``impl="reference"``: outputs, final
carries and the VJP w.r.t. ``xs``, every parameter and the initial carry.
Tiny sizes: B=3 in two batch tiles of 2 (two grid points), H=5 padded to 8
units in two CTAs of 4 (a two-CTA cluster), T=3. Plus: a race is reported
when the barrier is removed; the dispatch rules; lowering for CUDA with
``jax.export``; and a ``gpu`` class for hardware.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxrnn
from _util import assert_close, make_cell, normal, randomize, via_rnn, vjp_variants
from jaxrnn.kernels import Pallas, common, mosaic_gpu, pallas
from jaxrnn.kernels.pallas import BlockSizes, rnn_pallas

B, T, H, I = 3, 3, 5, 4
LENGTHS = np.array([0, T, 2], np.int32)
VARIANTS = [(lengths, reverse) for lengths in (None, LENGTHS) for reverse in (False, True)]
BF16_VARIANTS = [(LENGTHS, True), (None, False)]  # two complementary ones; float32 runs all four
BLOCK = BlockSizes(batch=2, lanes=4, hidden=4)  # Bp = 4: two batch tiles; Hp = 8: two CTAs
CELLS = ("elman", "lstm", "gru_after")

needs_interpreter = pytest.mark.skipif(
    not mosaic_gpu.INTERPRETABLE,
    reason=f"jax {jax.__version__} has no Mosaic GPU interpreter that raises on races (plgpu.InterpretGPUParams(on_race=...), JAX >= 0.12)",
)
pytestmark = pytest.mark.filterwarnings("ignore:impl='pallas' on CPU:UserWarning")


def _problem(name, dtype=jnp.float32, seed=0):
    cell = make_cell(name, H)
    k = jax.random.split(jax.random.key(seed), 4)
    params = randomize(cell.init(k[0], I), k[1])
    xs = normal(k[2], (B, T, I)).astype(dtype)
    carry0 = randomize(cell.zero_carry(B), k[3], scale=1.0)
    return cell, params, xs, carry0


def _vjp_all(cell, impl, variants=VARIANTS):
    """Per variant, ``(ys, final, (dparams, dxs, dcarry0), plain)`` under random cotangents; one jit."""
    return jax.jit(vjp_variants(via_rnn(cell, impl), variants))


def _races_found():
    """Whether the interpreter's race detector has reported a race (its state is internal to JAX)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # noqa: PLC0415

    return interpret_pallas_call.get_races().races_found


def _reset_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # noqa: PLC0415

    interpret_pallas_call.reset_gpu_interpret_mode_state()


# --------------------------------------------------------------------------
# The kernels in Mosaic GPU's interpreter (CPU) and compiled (GPU)
# --------------------------------------------------------------------------
class _MosaicTests:
    """Kernel equivalence; subclasses choose the mode and block sizes."""

    INTERPRET = True
    PLATFORM = "cpu"
    BLOCK = BLOCK
    PRECISION = None
    TOLERANCE = {}  # dtype -> the dtype whose tolerance the comparison uses (default: its own)

    @pytest.fixture(autouse=True)
    def _mode(self):
        if jax.default_backend() != self.PLATFORM:
            pytest.skip(f"needs the {self.PLATFORM} backend, running on {jax.default_backend()}")
        with jax.default_matmul_precision(self.PRECISION):
            yield

    @property
    def impl(self):
        return Pallas(block=self.BLOCK, interpret=self.INTERPRET, backend="mosaic_gpu")

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("name", CELLS)
    def test_rnn_matches_reference(self, name, dtype):
        """Outputs, final carry and VJP (xs, every parameter, initial carry)
        of the Mosaic GPU kernels equal ``impl="reference"``, for every variant."""
        cell, params, xs, carry0 = _problem(name, dtype)
        args = (params, xs, carry0, jax.random.key(7))
        variants = VARIANTS if dtype == jnp.float32 else BF16_VARIANTS
        got = _vjp_all(cell, self.impl, variants)(*args)
        want = _vjp_all(cell, "reference", variants)(*args)
        tolerance = self.TOLERANCE.get(jnp.dtype(dtype), dtype)
        for variant in want:
            assert_close(got[variant], want[variant], dtype=tolerance, err_msg=f"(lengths, reverse) = {variant}")
        if self.INTERPRET:
            assert not _races_found()


@needs_interpreter
class TestInterpret(_MosaicTests):
    """Mosaic GPU's interpreter on CPU, race detection on (a race raises)."""

    def test_one_cta_default_block(self):
        """Without ``block.hidden`` (interpreted) one CTA holds every unit."""
        cell, params, xs, carry0 = _problem("lstm", seed=2)
        impl = Pallas(interpret=True, backend="mosaic_gpu")
        got = jaxrnn.rnn(cell, params, xs, initial_carry=carry0, seq_lengths=LENGTHS, impl=impl)
        want = jaxrnn.rnn(cell, params, xs, initial_carry=carry0, seq_lengths=LENGTHS, impl="reference")
        assert_close(got, want, dtype=jnp.float32)


@pytest.mark.gpu
class TestGPU(_MosaicTests):
    """Compiled on a GPU (Hopper: ``wgmma``; grid-wide semaphore barrier).

    Unverified: no GPU was available where this was written. Elman, LSTM and
    GRU (``reset="after"``) lower in bf16 and float32 (``test_lowers_for_cuda``);
    a case in ``LOWERING_GAPS`` is skipped. The reference runs float32 matmuls
    at full precision, the kernels' float32 ``wgmma`` is TF32 (a 10-bit
    mantissa, as float16's), so float32 is compared at float16's tolerance.
    """

    INTERPRET = False
    PLATFORM = "gpu"
    BLOCK = BlockSizes(batch=64, lanes=16, hidden=16)
    PRECISION = "highest"
    TOLERANCE = {jnp.dtype(jnp.float32): jnp.float16}  # TF32 wgmma

    @pytest.fixture(autouse=True)
    def _lowering_gaps(self, request, _mode):  # after _mode's platform check
        params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
        if (params.get("name"), jnp.dtype(params.get("dtype", jnp.float32))) in LOWERING_GAPS:
            pytest.skip("does not lower yet (LOWERING_GAPS)")


# --------------------------------------------------------------------------
# The barrier is what orders the h_t exchange: without it, a race
# --------------------------------------------------------------------------
@needs_interpreter
def test_race_detected_without_barrier(monkeypatch):
    """A test-only variant without the barrier between steps: the interpreter's
    race detector reports the unordered write and read of the exchange buffer
    (``on_race="raise"``: the kernel fails with ``RACE DETECTED``)."""
    monkeypatch.setattr(mosaic_gpu, "grid_barrier", lambda *args: None)
    cell, params, xs, carry0 = _problem("elman", seed=4)
    impl = Pallas(block=BLOCK, interpret=True, backend="mosaic_gpu")
    jax.clear_caches()  # a fresh trace without the barrier
    try:
        with pytest.raises(Exception, match="RACE DETECTED") as caught:
            jax.block_until_ready(jaxrnn.rnn(cell, params, xs[:, :2], initial_carry=carry0, impl=impl))
        assert "mosaic_gpu.py" in str(caught.value)  # the accesses are the kernel's (h_t published / read)
    finally:
        _reset_interpreter()  # required after an exception in the interpreter
        jax.clear_caches()


@needs_interpreter
def test_grid_sync_is_not_interpretable():
    """The semaphore (grid-wide) barrier cannot run in JAX 0.12's interpreter:
    it allocates no semaphores and runs grid points one after another."""
    cell = jaxrnn.Elman(4, compute_dtype=jnp.float32)
    cfg = common.Config(
        cell=cell, reverse=False, masked=False, batch=2, steps=T, interpret=True, platform="cpu", hidden=2
    )
    xp, carry0 = jnp.zeros((T, 2, 4)), cell.zero_carry(2)
    with pytest.raises(NotImplementedError, match="sync='grid' cannot be interpreted"):
        mosaic_gpu.forward_loop(cfg, None, xp, carry0, None, False, sync="grid")


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------
def test_dispatch(monkeypatch):
    """``backend=None`` picks Mosaic GPU compiled for a GPU on JAX >= 0.11 when
    the weight splits, once the kernels lower (``LOWERS``; until then the
    Triton kernels stay the GPU default)."""
    lstm, gru_before = jaxrnn.LSTM(8), jaxrnn.GRU(8, reset="before")
    newer = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)
    assert mosaic_gpu.PREFERRED == (newer and mosaic_gpu.LOWERS)
    assert pallas.resolve_backend(lstm, "gpu", False) == ("mosaic_gpu" if mosaic_gpu.PREFERRED else "portable")
    monkeypatch.setattr(mosaic_gpu, "PREFERRED", True)
    assert pallas.resolve_backend(lstm, "gpu", False) == "mosaic_gpu"
    assert pallas.resolve_backend(lstm, "cuda", False) == "mosaic_gpu"
    assert pallas.resolve_backend(lstm, "gpu", True) == "portable"  # interpret mode: the portable kernels
    assert pallas.resolve_backend(lstm, "cpu", True) == "portable"
    assert pallas.resolve_backend(lstm, "tpu", False) == "portable"
    assert pallas.resolve_backend(gru_before, "gpu", False) == "portable"  # cannot split


def test_backend_validation():
    with pytest.raises(ValueError, match=r"Pallas.backend: expected one of \('portable', 'mosaic_gpu'\)"):
        Pallas(backend="triton")
    cell, params, xs, _ = _problem("gru_before")
    with pytest.raises(ValueError, match="backend='mosaic_gpu': a GRU with reset='before' cannot split"):
        jaxrnn.rnn(cell, params, xs, impl=Pallas(backend="mosaic_gpu", interpret=True))


def test_gpu_block_fits_flashrnn():
    """The FlashRNN configuration (bf16 LSTM, H=768): the 4.7 MB weight in 48
    CTAs of 16 units, 98 KB each, next to a 98 KB h (or m̄) tile of 64 rows."""
    cell = jaxrnn.LSTM(768)
    block = mosaic_gpu.gpu_block(cell)
    n_cta = 768 // block.hidden
    weight = 768 * cell.num_gates * block.hidden * 2
    assert (n_cta, block.batch) == (48, 64) and n_cta <= mosaic_gpu.MAX_CTAS
    assert n_cta * weight == 768 * 3072 * 2  # the whole weight, once
    assert weight + 64 * 768 * 2 < mosaic_gpu.smem_bytes(cell, 64, 768, 16, jnp.bfloat16) <= mosaic_gpu.SMEM_BYTES
    assert mosaic_gpu.gpu_block(jaxrnn.Elman(768)).hidden == 32  # one gate: wider tiles fit
    assert mosaic_gpu.gpu_block(jaxrnn.Elman(8192)).hidden >= 64  # at most 132 CTAs


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name", CELLS)
def test_gpu_block_fits(name, dtype):
    """Wherever 16-unit CTAs fit, :func:`gpu_block`'s tile fits too, with the
    hidden units padded to whole tiles and the weight in ``dtype`` (float32
    tiles are twice bf16's)."""
    for hidden in (40, 80, 200, 300, 384, 500, 768, 1000):
        cell = make_cell(name, hidden)
        Hp = common.round_up(hidden, 16)
        if mosaic_gpu.smem_bytes(cell, 64, Hp, 16, dtype) > mosaic_gpu.SMEM_BYTES:
            continue
        tile = mosaic_gpu.gpu_block(cell, compute_dtype=dtype).hidden
        padded = common.round_up(Hp, tile)
        assert mosaic_gpu.smem_bytes(cell, 64, padded, tile, dtype) <= mosaic_gpu.SMEM_BYTES, (hidden, tile)
    lstm = jaxrnn.LSTM(384)
    assert mosaic_gpu.smem_bytes(lstm, 64, 384, 16, jnp.float32) == 229_384  # the largest float32 LSTM that fits
    assert mosaic_gpu.smem_bytes(jaxrnn.LSTM(400), 64, 400, 16, jnp.float32) > mosaic_gpu.SMEM_BYTES


# --------------------------------------------------------------------------
# Lowering for CUDA with jax.export (no GPU needed to lower Mosaic GPU)
# --------------------------------------------------------------------------
#: What does not lower yet with JAX 0.12.0.1, ``(name, dtype)``: Mosaic GPU's error.
#: Empty: float32 lowers since the weight tiles sit K-major in shared memory
#: (TF32 wgmma accepts no other layout: "Only f16 WGMMA supports transposes").
LOWERING_GAPS = {}
newer_jax = pytest.mark.skipif(
    tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 12), reason=f"jax {jax.__version__}: checked with 0.12"
)


def _export_cuda(name, dtype, hidden=40, batch=16, block=None):
    """Export forward + VJP of the compiled Mosaic GPU kernels for CUDA: the MLIR module."""
    cell = make_cell(name, hidden).resolve(dtype)
    params = cell.init(jax.random.key(0), I)
    xp = jax.ShapeDtypeStruct((8, batch, cell.gate_size), jnp.float32)
    carry0 = cell.zero_carry(batch)
    lengths = jnp.full((batch,), 8, jnp.int32)

    def f(params, xp, carry0):
        run = functools.partial(rnn_pallas, cell, interpret=False, platform="gpu", backend="mosaic_gpu", block=block)
        out, vjp = jax.vjp(lambda p, x, c: run(p, x, c, lengths, True), params, xp, carry0)
        return out, vjp(out)

    return export.export(jax.jit(f), platforms=["cuda"])(params, xp, carry0).mlir_module()


@newer_jax
@pytest.mark.parametrize(
    "name, dtype",
    [(name, dtype) for dtype in (jnp.bfloat16, jnp.float32) for name in CELLS],
    ids=[f"{name.replace('_', '-')}-{dtype}" for dtype in ("bf16", "f32") for name in CELLS],
)
def test_lowers_for_cuda(name, dtype):
    """Forward + VJP (lengths, reverse) lower to Mosaic GPU for CUDA: H=40 in
    two CTAs of 32 units (64 padded; :func:`gpu_block`), 64-row batch tiles,
    as ``wgmma`` of the dtype (float32: TF32); the known gaps fail with
    Mosaic GPU's error (``LOWERING_GAPS``)."""
    gap = LOWERING_GAPS.get((name, jnp.dtype(dtype)))
    if gap is not None:
        with pytest.raises(ValueError, match=gap):
            _export_cuda(name, dtype)
        return
    module = _export_cuda(name, dtype)
    assert module.count("rnn_forward_mosaic") and module.count("rnn_backward_mosaic")
    assert "mosaic_gpu" in module
    operands = "tf32.tf32" if dtype == jnp.float32 else "bf16.bf16"
    assert f"wgmma.mma_async.sync.aligned.m64n32k{32 // jnp.dtype(dtype).itemsize}.f32.{operands}" in module


@newer_jax
@pytest.mark.parametrize(
    "name, dtype, hidden", [("gru_after", jnp.bfloat16, 200), ("lstm", jnp.float32, 384)], ids=["gru-bf16", "lstm-f32"]
)
def test_default_block_lowers(name, dtype, hidden):
    """:func:`gpu_block`'s tile fits once the units are padded to whole tiles
    (GRU, H=200: 7 CTAs of 32 units, 224 padded), and a float32 LSTM of
    H=384 (the largest whose 16-unit CTA fits: 229,384 B) lowers."""
    module = _export_cuda(name, dtype, hidden=hidden)
    assert module.count("rnn_forward_mosaic") and module.count("rnn_backward_mosaic")


@newer_jax
@pytest.mark.parametrize(
    "name, dtype, hidden, tile, batch",
    [("lstm", jnp.float32, 224, 32, 16), ("gru_after", jnp.float32, 256, 16, 100)],
    ids=["lstm-f32", "gru-f32-128-rows"],
)
def test_smem_bytes_is_what_mosaic_reports(name, dtype, hidden, tile, batch):
    """``smem_bytes`` is exactly the shared memory Mosaic GPU allocates (every
    buffer rounded up to 1024 bytes, plus 8 bytes of barrier): in these
    configurations the forward fits and the backward, one staging tile
    larger, does not, and Mosaic GPU's error names its size."""
    rows = common.round_up(batch, mosaic_gpu.WGMMA_ROWS)
    want = mosaic_gpu.smem_bytes(make_cell(name, hidden), rows, hidden, tile, dtype)
    assert want - rows * tile * 4 <= mosaic_gpu.SMEM_BYTES < want  # the forward's fits, the backward's not
    block = BlockSizes(batch=batch, lanes=16, hidden=tile)
    with pytest.raises(ValueError, match=f"exceeds available shared memory: smem_bytes={want} > max_smem_bytes="):
        _export_cuda(name, dtype, hidden=hidden, batch=batch, block=block)


@newer_jax
def test_flashrnn_configuration_lowers():
    """The FlashRNN configuration (bf16 LSTM, B=16, H=768; T=8 here) lowers with
    the default blocks: 48 CTAs of 16 units whose shared memory (227,336 B, the
    backward's) fits the 232,448 B Mosaic GPU allows a block."""
    cell = jaxrnn.LSTM(768)
    block = mosaic_gpu.gpu_block(cell)
    assert block.hidden == 16 and 768 // block.hidden == 48
    assert mosaic_gpu.smem_bytes(cell, 64, 768, 16, jnp.bfloat16) == 227_336 <= mosaic_gpu.SMEM_BYTES
    assert mosaic_gpu.smem_bytes(cell, 64, 768, 32, jnp.bfloat16) > mosaic_gpu.SMEM_BYTES  # 24 CTAs do not fit
    module = _export_cuda("lstm", jnp.bfloat16, hidden=768)
    assert module.count("rnn_forward_mosaic") and module.count("rnn_backward_mosaic")
