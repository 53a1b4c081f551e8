"""The Pallas fused recurrence (kernels/pallas.py) against the reference.

The kernel tests live in :class:`_KernelTests`, run by two subclasses: one in
Pallas interpret mode (CPU, what CI runs) and one compiled on a GPU (marked
``gpu``; skipped without one). Every cell × dtype is checked through
``jaxrnn.rnn(..., impl=Pallas(block=..., interpret=...))`` against ``impl="reference"`` for
{full length, lengths with 0 and T} × {forward, reverse} (bfloat16: two complementary ones): outputs, final
carries and the VJP w.r.t. ``xs``, every parameter and the initial carry,
with block sizes that do not divide the problem (batch tiles of 2 for B=3,
time chunks of 2 for T=5, hidden 5 padded to 8 lanes per gate). Direct calls
of :func:`rnn_pallas` cover other block sizes. The same tests run the step
kernels of ``kernels/pallas_split.py`` (the recurrent weight split across
programs, ``BlockSizes(hidden=...)``), with several hidden tiles. Plus
validation errors, the interpret-mode warning, tracing, and lowering for TPU
/ GPU without hardware.
"""

import ast
import dataclasses
import functools
import inspect
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxrnn
from _util import MAIN_CELLS, assert_close, compile_run, make_cell, normal, randomize, via_rnn, vjp_variants
from jaxrnn import checks
from jaxrnn.kernels import Pallas, common, gates, pallas, pallas_split
from jaxrnn.kernels.pallas import BlockSizes, rnn_pallas
from jaxrnn.scan import mask_step

B, T, H, I = 3, 5, 5, 4
LENGTHS = np.array([0, T, 2], np.int32)
VARIANTS = [(lengths, reverse) for lengths in (None, LENGTHS) for reverse in (False, True)]
# bfloat16 runs two complementary variants: float32 runs all four, and the variants exercise the same
# padding and direction code in either dtype (what bfloat16 adds is its rounding).
BF16_VARIANTS = [(LENGTHS, True), (None, False)]
SMALL = BlockSizes(batch=2, time=2, lanes=4)  # nothing divides: B=3, T=5, H=5
DEFAULTS = {platform: BlockSizes.get_default(platform) for platform in ("cpu", "gpu")}  # before patching

CELLS = {name: functools.partial(make_cell, name) for name in MAIN_CELLS}
SPLIT_CELLS = ("elman", "lstm", "gru_after")  # a GRU with reset="before" cannot split


pytestmark = pytest.mark.filterwarnings("ignore:impl='pallas' on CPU:UserWarning")




def _problem(name, dtype=jnp.float32, seed=0, hidden=H):
    cell = CELLS[name](hidden)
    k = jax.random.split(jax.random.key(seed), 4)
    params = randomize(cell.init(k[0], I), k[1])
    xs = normal(k[2], (B, T, I)).astype(dtype)
    carry0 = randomize(cell.zero_carry(B), k[3], scale=1.0)
    return cell, params, xs, carry0


def _via_backend(cell, backend):
    """The runner's data flow (input projection, then the backend), time-major."""

    def run(p, x, c, lengths, reverse):
        resolved = cell.resolve(x.dtype)
        xp = resolved.input_projection(p, jnp.swapaxes(x, 0, 1))
        lens = None if lengths is None else jnp.asarray(lengths)
        return backend(resolved, p, xp, c, lens, reverse)

    return run


def _assert_variants_close(got, want, dtype):
    for variant in want:
        assert_close(got[variant], want[variant], dtype=dtype, err_msg=f"(lengths, reverse) = {variant}")


# --------------------------------------------------------------------------
# The kernel, in interpret mode (CPU) and compiled (GPU)
# --------------------------------------------------------------------------
class _KernelTests:
    """Kernel equivalence tests; subclasses choose the mode and the block sizes."""

    INTERPRET = True
    PLATFORM = "cpu"
    BLOCK = SMALL  # the runner's block sizes (None: the platform's defaults)
    CELLS = tuple(CELLS)  # the cells this mode supports
    PRECISION = None  # matmul precision of kernel and reference
    BLOCK_CASES = [  # (cell, block sizes) of test_block_sizes; None: the platform's default
        ("lstm", None),  # one time chunk, one batch tile
        ("gru_before", BlockSizes(batch=1, time=1)),  # one row per tile, one step per chunk
        ("gru_after", BlockSizes(batch=4, time=3, lanes=8)),  # padded rows, steps, lanes
    ]

    @pytest.fixture(autouse=True)
    def _mode(self, request, monkeypatch):
        if jax.default_backend() != self.PLATFORM:
            pytest.skip(f"needs the {self.PLATFORM} backend, running on {jax.default_backend()}")
        name = getattr(request.node, "callspec", None) and request.node.callspec.params.get("name")
        if name and name not in self.CELLS:
            pytest.skip(f"{name} is not supported in this mode")
        with jax.default_matmul_precision(self.PRECISION):
            yield

    @property
    def impl(self):
        """The runner's ``impl``: this mode's block sizes and interpret flag."""
        return Pallas(block=self.BLOCK, interpret=self.INTERPRET)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("name", list(CELLS))
    def test_rnn_matches_reference(self, name, dtype):
        """Outputs, final carry and VJP (xs, every parameter, initial carry)
        of ``impl="pallas"`` equal ``impl="reference"``, for every variant (two in bfloat16)."""
        cell, params, xs, carry0 = _problem(name, dtype)
        args = (params, xs, carry0, jax.random.key(7))
        variants = VARIANTS if dtype == jnp.float32 else BF16_VARIANTS
        got = compile_run(vjp_variants(via_rnn(cell, self.impl), variants), *args)
        want = compile_run(vjp_variants(via_rnn(cell, "reference"), variants), *args)
        _assert_variants_close(got, want, dtype)

    @pytest.mark.parametrize("case", range(3))
    def test_block_sizes(self, case):
        """Direct calls of ``rnn_pallas`` with other tilings agree with the reference backend."""
        name, block = self.BLOCK_CASES[case]
        cell, params, xs, carry0 = _problem(name, seed=3)
        block = DEFAULTS[self.PLATFORM] if block is None else block
        kernel = functools.partial(rnn_pallas, interpret=self.INTERPRET, block=block)
        variants = [(LENGTHS, False), (None, True)]
        args = (params, xs, carry0, jax.random.key(8))
        got = compile_run(vjp_variants(_via_backend(cell, kernel), variants), *args)
        want = compile_run(vjp_variants(_via_backend(cell, pallas.reference), variants), *args)
        _assert_variants_close(got, want, jnp.float32)

    def test_no_retrace(self, monkeypatch):
        """A second call with the same shapes reuses the trace: the kernel body
        (which calls ``gates.forward_gates``) is not traced again."""
        traced = []
        original = gates.forward_gates
        monkeypatch.setattr(gates, "forward_gates", lambda *a, **k: (traced.append(1), original(*a, **k))[1])
        cell, params, xs, _ = _problem("elman")
        run = jax.jit(lambda p, x: jaxrnn.rnn(cell, p, x, impl=self.impl))
        run(params, xs)
        first = len(traced)
        run(params, xs + 1.0)
        assert first > 0 and len(traced) == first
        jaxrnn.rnn(cell, params, xs, seq_lengths=LENGTHS, impl=self.impl)
        second = len(traced)
        jaxrnn.rnn(cell, params, xs + 1.0, seq_lengths=LENGTHS[::-1].copy(), impl=self.impl)
        assert len(traced) == second
        jaxrnn.rnn(cell, params, xs[:2], impl=self.impl)  # a new shape does trace
        assert len(traced) > second


class TestInterpret(_KernelTests):
    """Pallas interpret mode on CPU: the kernel bodies run as XLA loops."""


@pytest.mark.gpu
class TestGPU(_KernelTests):
    """Compiled on a GPU (Triton lowering) with the GPU's default block sizes.

    Unverified so far: no GPU was available where this was written; every
    cell lowers (see ``test_lowers_for_gpu``). Float32 matmuls at full
    precision (not TF32) in kernel and reference, for the float32 tolerance.
    """

    INTERPRET = False
    PLATFORM = "gpu"
    BLOCK = None
    PRECISION = "highest"


class _SplitTests(_KernelTests):
    """The step kernels (weight split across programs, ``block.hidden``)."""

    CELLS = SPLIT_CELLS
    WIDE = 40  # test_several_tiles' hidden size
    WIDE_BLOCK = None  # test_several_tiles' block sizes

    def test_several_tiles(self):
        """A wider LSTM and GRU, split into several hidden tiles, agree with the reference."""
        impl = Pallas(block=self.WIDE_BLOCK, interpret=self.INTERPRET)
        for name in ("lstm", "gru_after"):
            cell, params, xs, carry0 = _problem(name, seed=5, hidden=self.WIDE)
            args = (params, xs, carry0, jax.random.key(9))
            variants = [(LENGTHS, True), (None, False)]
            got = compile_run(vjp_variants(via_rnn(cell, impl), variants), *args)
            want = compile_run(vjp_variants(via_rnn(cell, "reference"), variants), *args)
            _assert_variants_close(got, want, jnp.float32)


class TestInterpretSplit(_SplitTests):
    """Interpret mode, H=5 in two tiles of 4 units (padded to 8), batch tiles of 2 (B=3)."""

    BLOCK = BlockSizes(batch=2, lanes=4, hidden=4)
    WIDE_BLOCK = BlockSizes(batch=2, hidden=16)  # H=40: three tiles of 16 (48 padded)
    BLOCK_CASES = [
        ("lstm", BlockSizes(batch=4, hidden=16)),  # a tile wider than H: one tile of all units
        ("gru_after", BlockSizes(batch=1, lanes=1, hidden=1)),  # five one-unit tiles, one row each
        ("elman", BlockSizes(batch=2, lanes=2, hidden=3)),  # units padded to lcm(2, 3) = 6: two tiles
    ]


@pytest.mark.gpu
class TestGPUSplit(_SplitTests):
    """Compiled on a GPU: the step kernels (H=5: one tile; H=40: four tiles of 16)."""

    INTERPRET = False
    PLATFORM = "gpu"
    BLOCK = BlockSizes(batch=16, lanes=16, hidden=16)
    WIDE_BLOCK = BLOCK  # H=40: four tiles of 16 (64 padded)
    PRECISION = "highest"
    BLOCK_CASES = [
        ("lstm", BlockSizes(batch=16, hidden=16)),
        ("gru_after", BlockSizes(batch=32, hidden=32)),
        ("elman", BlockSizes(batch=16, lanes=16, hidden=64)),
    ]


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(batch=0), ValueError, r"BlockSizes.batch: expected a positive int, got 0"),
        (dict(time=-2), ValueError, r"BlockSizes.time: expected a positive int, got -2"),
        (dict(lanes=0), ValueError, r"BlockSizes.lanes"),
        (dict(batch=2.0), TypeError, r"BlockSizes.batch: expected a positive int, got 2.0"),
        (dict(lanes=True), TypeError, r"BlockSizes.lanes"),
        (dict(time="8"), TypeError, r"BlockSizes.time"),
        (dict(hidden=0), ValueError, r"BlockSizes.hidden: expected a positive int, got 0"),
        (dict(hidden=2.5), TypeError, r"BlockSizes.hidden: expected a positive int, got 2.5"),
    ],
)
def test_block_sizes_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        BlockSizes(**kwargs)


def test_block_sizes_hashable_and_valid_defaults():
    for platform in ("cpu", "gpu", "tpu"):
        block = BlockSizes.get_default(platform)
        assert hash(block) == hash(BlockSizes(block.batch, block.time, block.lanes, block.hidden))
        assert block.hidden is None  # no platform splits the weight by default


def _wrapper_inputs(name="lstm"):
    cell, params, xs, carry0 = _problem(name)
    cell = cell.resolve(jnp.float32)
    xp = cell.input_projection(params, jnp.swapaxes(xs, 0, 1))
    return cell, params, xp, carry0


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "xp": a["xp"][0]}, ValueError, r"xp: expected shape \(T, B, 20\).*got \(3, 20\)"),
        (lambda a: {**a, "xp": a["xp"][..., :-1]}, ValueError, r"xp: expected shape \(T, B, 20\).*got \(5, 3, 19\)"),
        (lambda a: {**a, "xp": a["xp"].astype(jnp.int32)}, TypeError, r"xp: expected a floating-point array"),
        (
            lambda a: {**a, "carry0": a["carry0"]._replace(c=a["carry0"].c[:2])},
            ValueError,
            r"carry0.c: expected shape \(3, 5\), got \(2, 5\)",
        ),
        (lambda a: {**a, "carry0": jaxrnn.Carry(a["carry0"].h)}, TypeError, r"carry0: expected LSTMCarry"),
        (lambda a: {**a, "lengths": LENGTHS[:2]}, ValueError, r"lengths: expected shape \(3,\), got \(2,\)"),
        (lambda a: {**a, "lengths": LENGTHS.astype(np.float32)}, TypeError, r"lengths: expected an integer array"),
        (lambda a: {**a, "lengths": LENGTHS + T}, ValueError, r"lengths: expected values in \[0, 5\]"),
        (
            lambda a: {**a, "params": a["params"]._replace(w_hh=a["params"].w_hh[:, :8])},
            ValueError,
            r"params.w_hh: expected shape \(5, 20\)",
        ),
        (lambda a: {**a, "block": (2, 2)}, TypeError, r"block: expected a BlockSizes, got tuple"),
    ],
    ids=["xp-rank", "xp-gates", "xp-dtype", "carry-shape", "carry-type", "len-shape", "len-dtype", "len-range",
         "w_hh", "block"],
)
def test_wrapper_errors(change, error, match):
    cell, params, xp, carry0 = _wrapper_inputs()
    args = change(dict(params=params, xp=xp, carry0=carry0, lengths=LENGTHS, block=None))
    with pytest.raises(error, match=match):
        rnn_pallas(cell, args["params"], args["xp"], args["carry0"], args["lengths"], False, block=args["block"])


def _is_power_of_2(n):
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("T_, B_, H_", [(5, 3, 20), (1, 17, 5), (9, 8, 128)])
def test_padding_rules(T_, B_, H_):
    """Padded sizes: whole tiles, chunks and lane multiples, each less than
    one block more than needed; compiled for GPU also powers of two (at least
    16) and a single time chunk."""
    block = BlockSizes(batch=2, time=2, lanes=8)
    Tp, Bp, Hp, rows, steps, tile = common.padded_sizes(T_, B_, H_, block, "tpu", False)
    assert tile is None and (rows, steps) == (2, min(2, T_))
    assert Tp % steps == 0 and T_ <= Tp < T_ + steps
    assert Bp % rows == 0 and B_ <= Bp < B_ + rows
    assert Hp % 8 == 0 and H_ <= Hp < H_ + 8
    block = BlockSizes(batch=2, lanes=8)
    Tp, Bp, Hp, rows, steps, _ = common.padded_sizes(T_, B_, H_, block, "gpu", False)
    assert _is_power_of_2(rows) and rows >= 16 and Bp % rows == 0 and B_ <= Bp < B_ + rows
    lanes = -(-H_ // 8) * 8
    assert _is_power_of_2(Hp) and Hp >= max(16, lanes) and Hp // 2 < max(16, lanes)
    assert Tp == steps == T_
    interpreted = common.padded_sizes(T_, B_, H_, block, "gpu", True)  # interpret mode: no GPU rules
    assert interpreted == common.padded_sizes(T_, B_, H_, block, "cpu", True)


@pytest.mark.parametrize("T_, B_, H_", [(5, 3, 20), (1, 17, 5), (9, 8, 128)])
def test_padding_rules_split(T_, B_, H_):
    """With ``block.hidden``: units padded to whole tiles (and lanes), one time
    chunk (the time loop is outside the kernels), a tile at most all units."""
    block = BlockSizes(batch=2, time=2, lanes=4, hidden=6)
    sizes = common.padded_sizes(T_, B_, H_, block, "tpu", False)
    lanes = -(-H_ // 4) * 4
    tile = min(6, lanes)
    assert sizes.tile == tile and sizes.Hp % tile == 0 and sizes.Hp % 4 == 0
    assert H_ <= sizes.Hp < H_ + 12 and sizes.Tp == sizes.steps == T_
    sizes = common.padded_sizes(T_, B_, H_, dataclasses.replace(block, time=1), "gpu", False)
    assert _is_power_of_2(sizes.tile) and 16 <= sizes.tile <= sizes.Hp and sizes.Hp % sizes.tile == 0
    assert sizes.tile == min(16, sizes.Hp) and sizes.Tp == T_  # block.time is unused: no error


def test_gpu_hidden_tile():
    """The GPU's default split: none while the weight fits one program, else
    the widest power-of-two tile whose weight columns fit, at least 16."""
    bf16 = jnp.bfloat16
    assert pallas.gpu_hidden_tile(jaxrnn.LSTM(64), bf16) is None  # 64·256·2 B = 32 KiB
    assert pallas.gpu_hidden_tile(jaxrnn.LSTM(768), bf16) == 16  # Hp 1024: 1024·4·16·2 B = 128 KiB
    assert pallas.gpu_hidden_tile(jaxrnn.Elman(768), bf16) == 64  # 1024·1·64·2 B = 128 KiB
    assert pallas.gpu_hidden_tile(jaxrnn.GRU(1024, reset="after"), jnp.float32) == 16  # the floor
    assert pallas.gpu_hidden_tile(jaxrnn.GRU(1024, reset="before"), bf16) is None  # cannot split
    for cell in (jaxrnn.LSTM(768), jaxrnn.Elman(768), jaxrnn.GRU(300, reset="after")):
        tile = pallas.gpu_hidden_tile(cell, bf16)
        Hp = pallas.pl.next_power_of_2(cell.hidden_size)
        assert Hp * cell.num_gates * tile * 2 <= pallas.GPU_RESIDENT_BYTES < Hp * cell.num_gates * tile * 4


def test_gru_before_cannot_split():
    cell, params, xs, _ = _problem("gru_before")
    message = r"block.hidden: a GRU with reset='before' cannot split its recurrent weight across programs"
    with pytest.raises(ValueError, match=message):
        jaxrnn.rnn(cell, params, xs, impl=Pallas(block=BlockSizes(hidden=2), interpret=True))


def test_gpu_rejects_time_chunks():
    with pytest.raises(ValueError, match=r"block.time: the GPU \(Triton\) lowering runs the whole sequence"):
        common.padded_sizes(5, 3, 20, BlockSizes(time=2), "gpu", False)


# --------------------------------------------------------------------------
# The shared pieces (kernels/common.py) and the modules' import order
# --------------------------------------------------------------------------
def test_block_sizes_is_shared():
    """Both kernel families and the backend configuration see one ``BlockSizes``."""
    assert pallas.BlockSizes is common.BlockSizes is jaxrnn.kernels.BlockSizes


def test_pad_gates_and_join_gates():
    """Each gate's block is padded with zero columns; split, sliced back and
    joined, the padded array is the original."""
    cell = jaxrnn.GRU(2)  # 3 gates
    a = jnp.arange(12.0).reshape(2, 6)
    padded = common.pad_gates(a, 3, 2, 4, pad_rows=True)
    assert padded.shape == (4, 12)
    assert not np.any(padded[2:]) and not np.any(padded[:, 2:4])
    back = common.join_gates(tuple(g[:2, :2] for g in gates.split_gates(cell, padded)))
    np.testing.assert_array_equal(back, a)
    assert common.join_gates((a,)) is a


def test_unselect_inverts_compress():
    values, flags = ("a", "b", "c"), (True, False, True)
    assert common.unselect(itertools.compress(values, flags), flags, values) == values
    assert common.unselect(["x"], (False, True), ("p", "q")) == ("p", "x")


def test_select_carry_is_mask_step_on_a_column():
    """The kernels' ``(rows, 1)`` form of the bottom layer's ``mask_step``."""
    valid = jnp.array([True, False, True])
    new = jaxrnn.LSTMCarry(jnp.ones((3, 4)), jnp.full((3, 4), 2.0))
    old = jax.tree.map(jnp.zeros_like, new)
    want = mask_step(valid, new, old)
    got = common.select_carry(valid[:, None], new, old)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _imports(module):
    """``(module imported, names, at module level)`` of every import of ``module``'s source."""
    tree = ast.parse(inspect.getsource(module))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], id(node) in top) for a in node.names)
    return found


def test_kernel_modules_import_one_way():
    """``common`` <- ``pallas_split`` <- ``pallas``: all at module level, no
    private names across modules, and neither lower module imports a higher one."""
    above = {common: ("pallas", "pallas_split"), pallas_split: ("pallas",), pallas: ()}
    for module, higher in above.items():
        for name, names, top_level in _imports(module):
            if not name.startswith("jaxrnn"):
                continue
            assert top_level, f"{module.__name__}: function-level import of {name}"
            assert not [n for n in names if n.startswith("_")], f"{module.__name__}: private {names} of {name}"
            imported = {name.rsplit(".", 1)[-1], *(names if name == "jaxrnn.kernels" else ())}
            assert not imported & set(higher), f"{module.__name__} imports {imported & set(higher)}"


# --------------------------------------------------------------------------
# Runner integration
# --------------------------------------------------------------------------
def test_cpu_warns_once(monkeypatch):
    # A fresh record of the warnings given, so that earlier tests' warning does not count.
    monkeypatch.setattr(jaxrnn.kernels, "warn_once", functools.partial(checks.warn_once, _seen=set()))
    cell, params, xs, _ = _problem("elman")
    with pytest.warns(UserWarning, match="interpret mode"):
        jaxrnn.rnn(cell, params, xs[:, :3], impl="pallas")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jaxrnn.rnn(cell, params, xs[:, :4], impl="pallas")  # a new trace, no second warning
    assert not [w for w in caught if "interpret mode" in str(w.message)]


def test_qualifies_on_a_verified_platform(monkeypatch):
    """Once a platform is verified, ``qualifies`` admits the cells whose weight fits on chip."""
    monkeypatch.setattr(pallas, "VERIFIED_PLATFORMS", ("gpu", "tpu"))
    small, large = jaxrnn.LSTM(64, compute_dtype=jnp.bfloat16), jaxrnn.LSTM(768, compute_dtype=jnp.bfloat16)
    assert pallas.qualifies(small, "gpu") and pallas.qualifies(small, "tpu")
    assert not pallas.qualifies(large, "gpu")  # 4.5 MiB: more than one GPU program holds
    assert pallas.qualifies(large, "tpu") and not pallas.qualifies(jaxrnn.LSTM(2048), "tpu")
    assert not pallas.qualifies(small, "cpu")


def test_auto_does_not_pick_unverified_kernel():
    """``qualifies`` is False until a platform is verified on hardware, so
    ``impl="auto"`` keeps the XLA backend on GPU and TPU."""
    assert pallas.VERIFIED_PLATFORMS == ()
    for platform in ("cpu", "gpu", "cuda", "tpu"):
        assert not pallas.qualifies(jaxrnn.LSTM(128), platform)
    name, _ = jaxrnn.kernels.resolve("auto", jaxrnn.LSTM(128), "tpu")
    assert name == "xla"


# --------------------------------------------------------------------------
# Lowering for accelerators, checked on CPU with jax.export
# --------------------------------------------------------------------------
def _export_fwd_bwd(name, platform, dtype=jnp.float32, block=None, hidden=H):
    """Export forward + VJP of the compiled (non-interpret) kernels for ``platform``."""
    cell = CELLS[name](hidden).resolve(dtype)
    params = cell.init(jax.random.key(0), I)
    xp = jax.ShapeDtypeStruct((8, 16, cell.gate_size), jnp.float32)
    carry0 = cell.zero_carry(16)
    lengths = jnp.full((16,), 8, jnp.int32)

    def f(params, xp, carry0):
        run = functools.partial(rnn_pallas, cell, interpret=False, platform=platform, block=block)
        out, vjp = jax.vjp(lambda p, x, c: run(p, x, c, lengths, True), params, xp, carry0)
        return out, vjp(out)

    target = "cuda" if platform == "gpu" else platform
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = export.export(jax.jit(f), platforms=[target], disabled_checks=checks)(params, xp, carry0)
    return exported.mlir_module()


@pytest.mark.parametrize("name", list(CELLS))
def test_lowers_for_tpu(name):
    """The kernels lower to Mosaic TPU (compiling and running them needs a TPU)."""
    module = _export_fwd_bwd(name, "tpu", jnp.bfloat16)
    assert module.count("tpu_custom_call") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("name", SPLIT_CELLS)
def test_split_lowers_for_tpu(name):
    """The step kernels lower to Mosaic TPU: two 128-unit tiles, each step's
    kernel inside the forward and the backward time loop."""
    block = BlockSizes(batch=8, lanes=128, hidden=128)
    module = _export_fwd_bwd(name, "tpu", jnp.bfloat16, block=block, hidden=200)
    assert module.count("tpu_custom_call") == 2 and module.count("stablehlo.while") == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CELLS))
def test_lowers_for_gpu(name, dtype):
    """Every cell's kernels lower with Triton (compiling and running them needs a GPU).

    Triton has no rule for slicing or concatenating values and wants
    power-of-two tiles: the kernels run the per-gate step of ``gates`` with
    one ``(rows, Hp)`` tile per gate.
    """
    module = _export_for_gpu(name, dtype)
    assert module.count("__gpu$xla.gpu.triton") == 2


def _export_for_gpu(name, dtype, **kwargs):
    """:func:`_export_fwd_bwd` for GPU; skips where lowering needs a GPU."""
    try:
        return _export_fwd_bwd(name, "gpu", dtype, **kwargs)
    except RuntimeError as e:  # jax >= 0.11 reads the GPU's properties while lowering
        if "No supported GPU devices found" not in str(e):
            raise
        pytest.skip(f"jax {jax.__version__} needs a GPU to lower with Triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", SPLIT_CELLS)
def test_split_lowers_for_gpu(name, dtype):
    """The step kernels lower with Triton: H=40 in four 16-unit tiles (64 padded)."""
    module = _export_for_gpu(name, dtype, block=BlockSizes(batch=16, lanes=16, hidden=16), hidden=40)
    assert module.count("__gpu$xla.gpu.triton") == 2 and module.count("stablehlo.while") == 2
    assert "grid_y = 4" in module


def test_gpu_splits_a_large_weight_by_default():
    """Compiled for GPU with default blocks, the FlashRNN-size bf16 LSTM
    (H=768, 4.5 MiB of weight) runs the step kernels: 64 programs of 16 units."""
    module = _export_for_gpu("lstm", jnp.bfloat16, hidden=768)
    assert module.count("rnn_forward_step") and module.count("rnn_backward_step")
    assert "grid_y = 64" in module
