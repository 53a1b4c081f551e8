"""The benchmark suite: the smoke suite end to end, its report files, the FLOP
model, the cuDNN-algorithm flag and the command line's errors.

The smoke suite runs once per module (about 15-30 s on 2 cores).
"""

import json
import math
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from _util import TOLERANCES

# ``benchmarks`` lives at the repository's top level and is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import __main__ as bench_cli
from benchmarks import suites
from benchmarks.impls import IMPLEMENTATIONS, cudnn_algorithm
from benchmarks.measure import model_flops, time_interleaved
from benchmarks.run import MEASURED_FIELDS, ROW_FIELDS


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = bench_cli.main(["--suite", "smoke", "--out", str(out), "--quiet"])
    assert code == 0
    folder = out / "cpu"
    with open(folder / "smoke.json") as f:
        results = json.load(f)
    return folder, results


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_every_case_has_every_implementation(smoke):
    _, results = smoke
    assert results["complete"] is True
    want = {(c.id, impl) for c in suites.get_suite("smoke").cases() for impl in IMPLEMENTATIONS}
    got = [(r["case_id"], r["impl"]) for r in results["rows"]]
    assert len(got) == len(set(got)), "duplicate rows"
    assert set(got) == want, "an implementation was dropped (or invented) for some case"


def test_every_row_has_every_field(smoke):
    _, results = smoke
    for r in results["rows"]:
        assert set(r) == set(ROW_FIELDS), f"{r['case_id']} {r['impl']}: fields differ"
        assert r["status"] in ("ok", "skipped"), f"{r['case_id']} {r['impl']} failed: {r['reason']}"
        if r["status"] == "ok":
            for field in MEASURED_FIELDS:
                assert _number(r[field]), f"{r['case_id']} {r['impl']}: {field}={r[field]!r}"
            assert r["ms_min"] <= r["ms_q25"] <= r["ms_median"] <= r["ms_q75"] <= r["ms_max"]
            assert r["n_reps"] >= 3 and r["compile_s"] >= 0 and r["matmul_fraction"] > 0
            assert r["library"] and r["compile_method"] and r["memory_method"]
            assert r["peak_memory_bytes"] is not None or r["memory_method"]
        else:
            assert isinstance(r["reason"], str) and r["reason"].strip()
            assert all(r[f] is None for f in MEASURED_FIELDS), f"skipped row with numbers: {r}"


def test_ffi_rows_count_their_thread_teams(smoke):
    """Each jaxrnn:ffi row records the C++ kernel's team counters over its timed rounds, and only those rows."""
    from jaxrnn.kernels import ffi  # noqa: PLC0415

    _, results = smoke
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    mine = [r for r in ok if r["impl"] == "jaxrnn:ffi"]
    assert mine if ffi.available() else not mine
    for r in mine:
        teams = r["notes"]["thread_teams"]
        assert set(teams) == {"team_calls", "short_handed_calls", "moved_threads"}
        assert 0 <= teams["short_handed_calls"] <= teams["team_calls"], r["case_id"]
    assert not [r for r in ok if r["impl"] != "jaxrnn:ffi" and "thread_teams" in r["notes"]]


def test_derived_numbers_follow_from_the_median(smoke):
    _, results = smoke
    for r in (r for r in results["rows"] if r["status"] == "ok"):
        t = r["ms_median"] / 1e3
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"] / t, rel=1e-9)
        assert r["us_per_step"] == pytest.approx(1e6 * t / r["seq_len"], rel=1e-9)
        assert r["flop_per_s"] == pytest.approx(r["model_flops"] / t, rel=1e-9)
        ceiling = results["matmul_ceiling"][r["dtype"]]["ceiling_flop_s"]
        assert r["matmul_fraction"] == pytest.approx(r["flop_per_s"] / ceiling, rel=1e-9)


def test_ratios_are_jaxrnn_time_over_peer_time(smoke):
    _, results = smoke
    ok = {(r["case_id"], r["impl"]): r for r in results["rows"] if r["status"] == "ok"}
    checked = 0
    for (case, impl), r in ok.items():
        if not impl.startswith("jaxrnn:"):
            assert r["time_ratio_vs_peers"] == {}
            continue
        peers = {p for (c, p) in ok if c == case and not p.startswith("jaxrnn:")}
        assert set(r["time_ratio_vs_peers"]) == peers
        for peer, ratio in r["time_ratio_vs_peers"].items():
            assert ratio == pytest.approx(r["ms_median"] / ok[(case, peer)]["ms_median"], rel=1e-9)
            checked += 1
    assert checked > 0
    assert len(results["ratios"]) == checked
    for s in results["summary"]:
        assert s["min"] * (1 - 1e-9) <= s["geomean_time_ratio"] <= s["max"] * (1 + 1e-9)


def test_reference_always_runs_and_fast_paths_match_it(smoke):
    _, results = smoke
    rtol = TOLERANCES[jnp.dtype(jnp.float32)][0]
    for r in results["rows"]:
        if r["impl"] == "jaxrnn:reference":
            assert r["status"] == "ok", r["reason"]
        elif r["impl"].startswith("jaxrnn:") and r["status"] == "ok":
            assert r["rel_err_vs_reference"] is not None and r["rel_err_vs_reference"] < 10 * rtol, r


def test_skips_say_why(smoke):
    _, results = smoke
    rows = {(r["case_id"], r["impl"]): r for r in results["rows"]}
    for (case, impl), r in rows.items():
        if impl == "jax.cudnn":  # CPU session: cuDNN is GPU only
            assert r["status"] == "skipped" and "GPU" in r["reason"]
        if impl == "equinox" and case.startswith("elman/"):
            assert r["status"] == "skipped" and "Elman" in r["reason"]
        if impl == "jaxrnn:xla" and "/step/" in case:
            assert r["status"] == "skipped" and "cell.step" in r["reason"]


def test_markdown_and_plot_exist(smoke):
    folder, results = smoke
    md = (folder / "smoke.md").read_text()
    assert "| case | impl | ms median" in md and "geomean" in md
    for impl in {r["impl"] for r in results["rows"] if r["status"] == "ok"}:
        assert f"| {impl} |" in md
    png = (folder / "smoke.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_flop_model_matches_the_formula():
    B, T, I, H = 3, 5, 7, 11
    for cell, gates in (("lstm", 4), ("gru", 3), ("elman", 1)):
        fwd = suites.Case(cell, "fwd", B, T, I, H)
        assert model_flops(fwd, gates) == 2 * B * T * gates * H * (I + H)
        bwd = suites.Case(cell, "fwdbwd", B, T, I, H)
        assert model_flops(bwd, gates) == 3 * model_flops(fwd, gates)
        step = suites.Case(cell, "step", B, 1, I, H)
        assert model_flops(step, gates) == 2 * B * gates * H * (I + H)
    # bidirectional 2-layer stack: 2 directions per layer; layer 1 reads 2H features.
    stack = suites.Case("lstm", "fwd", B, T, I, H, structure="bidir2")
    want = 2 * (2 * B * T * 4 * H * (I + H)) + 2 * (2 * B * T * 4 * H * (2 * H + H))
    assert model_flops(stack, 4) == want


def test_cudnn_persistent_flag_follows_the_rule():
    """fp16, one unidirectional layer, H ≤ 1024 and a multiple of 128, batch a
    multiple of 8 (≤ 128 for PyTorch on sm_90): cuDNN's persistent kernel."""
    h100 = (9, 0, 132)
    for dtype in ("float16", "bfloat16", "float32"):
        for B in (4, 8, 12, 16, 64, 128, 256):
            for H in (256, 384, 768, 1000, 1024, 1280):
                for layers, bidir in ((1, False), (2, False), (1, True)):
                    rule = dtype == "float16" and layers == 1 and not bidir and H <= 1024 and H % 128 == 0
                    rule = rule and B % 8 == 0 and B <= 128
                    algo = cudnn_algorithm("lstm", dtype, B, 1024, 768, H, layers, bidir, True, h100)
                    assert (algo == "PERSIST_STATIC") == rule, (dtype, B, H, layers, bidir, algo)
    # PyTorch never picks the persistent kernel for GRU; small hidden sizes get the small-H variant.
    assert cudnn_algorithm("gru", "float16", 16, 1024, 768, 768, 1, False, True, h100) == "STANDARD"
    assert cudnn_algorithm("lstm", "bfloat16", 16, 1024, 128, 128, 1, False, True, h100) == "PERSIST_STATIC_SMALL_H"


def test_interleaved_timing_rotates_and_drops_failures():
    calls = []

    def make(name, fail_at=None):
        def run():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")

        return run

    runs = {"a": make("a"), "b": make("b"), "c": make("c", fail_at=2)}
    times, errors = time_interleaved(runs, min_reps=4, max_reps=4, target_s=0.0)
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["b", "c", "a"]  # round 2 starts one later
    assert set(errors) == {"c"} and "broke" in str(errors["c"])
    assert len(times["a"]) == len(times["b"]) == 4 and len(times["c"]) == 1
    assert calls.count("c") == 2  # dropped after it raised

    calls.clear()
    runs = {"a": make("a"), "b": make("b")}
    times, errors = time_interleaved(runs, min_reps=3, max_reps=3, target_s=0.0, rewarm={"a"}, rewarm_s=0.0)
    assert not errors and calls[:3] == ["a", "a", "b"]  # "a" re-warms right before its timed call
    assert calls.count("a") == 6 and len(times["a"]) == 3 and len(times["b"]) == 3


def test_rewarm_lasts_its_duration():
    """A re-warm repeats untimed calls until rewarm_s has passed, right before the timed call, and stops then."""
    calls = []  # (name, start time)

    def make(name):
        def run():
            calls.append((name, time.perf_counter()))
            time.sleep(0.002)

        return run

    runs = {"a": make("a"), "b": make("b")}
    times, _ = time_interleaved(runs, min_reps=2, max_reps=2, target_s=0.0, rewarm={"a"}, rewarm_s=0.012)
    assert len(times["a"]) == len(times["b"]) == 2 and [n for n, _ in calls].count("b") == 2
    # Each round's calls of "a" are one unbroken run: untimed calls, then the timed one (the last).
    runs_of_a, current = [], []
    for name, start in calls:
        if name == "a":
            current.append(start)
        elif current:
            runs_of_a, current = runs_of_a + [current], []
    runs_of_a += [current] if current else []
    assert len(runs_of_a) == 2, calls
    for starts in runs_of_a:
        assert len(starts) >= 3  # at least two 2 ms untimed calls fit in 12 ms, then the timed one
        assert starts[-1] - starts[0] >= 0.011  # the timed call starts after rewarm_s of untimed calls (less µs)
        assert starts[-2] - starts[0] < 0.012  # and the last untimed call started within it


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--suite", "nope"], "nope"),
        ([], "--suite"),
        (["--suite", "smoke", "--impls", "bogus"], "bogus"),
        (["--suite", "smoke", "--modes", "sideways"], "sideways"),
        (["--suite", "smoke", "--budget-s", "-1"], "--budget-s"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_cli_errors_print_one_line(argv, needle, capsys, tmp_path):
    code = bench_cli.main(argv + ["--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert not list(tmp_path.iterdir()), "an erroneous command wrote files"


def test_jaxrnn_bench_dispatches_here(capsys):
    from jaxrnn.cli import main as jaxrnn_main

    assert jaxrnn_main(["bench", "--suite", "nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "smoke" in err[0]
    assert jaxrnn_main(["bench", "--list"]) == 0
    assert "smoke" in capsys.readouterr().out


def test_suites_are_well_formed():
    for suite in suites.SUITES.values():
        cases = suite.cases()
        assert cases and len({c.id for c in cases}) == len(cases)
        for sweep in suite.sweeps:
            if sweep.axis:
                values = [getattr(c, sweep.axis) for c in sweep.cases]
                assert len(set(values)) == len(values) >= 2, (suite.name, sweep.name)
    with pytest.raises(ValueError, match="cell"):
        suites.Case("lstmx", "fwd", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="mode"):
        suites.Case("lstm", "backward", 1, 1, 1, 1)


def test_gpu_session_script_usage():
    """The device-session script parses and refuses to run without its arguments."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    out = subprocess.run(["bash", script], capture_output=True, text=True)
    assert out.returncode != 0 and "usage: gpu_session.sh tests|SUITE OUT" in out.stderr


# --------------------------------------------------------------------------
# Studies (benchmarks/studies/): tiny runs through the shared harness
# --------------------------------------------------------------------------
BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
TINY = ["--batch", "2", "--seq-len", "4", "--input-size", "4", "--hidden", "8"]


def _keys(x):
    """The nested key structure of a JSON object."""
    return {k: _keys(v) for k, v in x.items()} if isinstance(x, dict) else None


def _spy_harness(monkeypatch):
    from benchmarks import measure

    calls = []
    real = measure.time_together

    def spy(runs, **kw):
        calls.append(sorted(runs))
        return real(runs, **kw)

    monkeypatch.setattr(measure, "time_together", spy)
    return calls


def _same_schema(committed_path, new, data_key, cell):
    with open(os.path.join(BENCHMARKS_DIR, "results", "cpu", committed_path)) as f:
        old = json.load(f)
    assert set(new) == set(old)
    for key, value in old.items():
        if isinstance(value, dict) and key != data_key:
            assert _keys(new[key]) == _keys(value), key
    assert _keys(new[data_key][cell]) == _keys(old[data_key][cell])


def test_study_analysis_cost_runs_on_the_harness(tmp_path, monkeypatch, capsys):
    from benchmarks.studies import analysis_cost

    calls = _spy_harness(monkeypatch)
    out = tmp_path / "cost.json"
    assert analysis_cost.main(TINY + ["--repeats", "2", "--cells", "gru", "--out", str(out)]) == 0
    assert calls == [["fwd_bwd", "grad_norms"]]
    record = json.loads(out.read_text())
    _same_schema("analysis_cost.json", record, "results", "gru")
    r = record["results"]["gru"]
    assert len(r["fwd_bwd_runs_s"]) == len(r["grad_norms_runs_s"]) == 2
    assert r["ratio"] == pytest.approx(r["grad_norms_s"] / r["fwd_bwd_s"])
    assert "wrote" in capsys.readouterr().out


def test_study_kernels_cpu_runs_on_the_harness(tmp_path, monkeypatch):
    from benchmarks.studies import kernels_cpu

    calls = _spy_harness(monkeypatch)
    out = tmp_path / "kernels.json"
    record = kernels_cpu.main(TINY + ["--cells", "elman", "--rounds", "1", "--out", str(out)])
    assert calls and all(name.endswith(("/forward", "/fwd+bwd")) for name in calls[0])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    _same_schema("kernels_xla.json", record, "cells", "elman")
    ms = record["cells"]["elman"]["ms"]
    assert set(ms) == {"forward", "fwd+bwd"}
    assert set(ms["forward"]) == {"flax", "reference", "xla", "xla_hoisted", "torch"}  # torch from the worker process
    assert record["config"]["torch_threads"] >= 1
    assert record["cells"]["elman"]["flops"]["fwd+bwd"] == 3 * record["cells"]["elman"]["flops"]["forward"]


def test_no_module_reaches_for_private_names():
    """Modules under benchmarks/ import only public names of each other and of jaxrnn."""
    import ast

    offences = []
    for folder, _, files in os.walk(BENCHMARKS_DIR):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            modules = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("benchmarks", "jaxrnn"):
                    for alias in node.names:
                        if alias.name.startswith("_"):
                            offences.append(f"{path}: from {node.module} import {alias.name}")
                        modules.add(alias.asname or alias.name)
                elif isinstance(node, ast.Import):
                    modules |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith(("benchmarks", "jaxrnn"))}
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in modules
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    offences.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_padded_cases_lengths_and_masking():
    """A padded case's lengths, by hand; jaxrnn's and PyTorch's padded outputs are zero past each length,
    and jaxrnn's fast path matches the reference on the padded batch."""
    import numpy as np  # noqa: PLC0415

    from benchmarks.impls import Context, JaxWork  # noqa: PLC0415

    case = suites.Case("lstm", "fwd", 4, 8, 3, 5, structure="bidir2", padded=True)
    assert case.seq_lengths() == (8, 7, 6, 5)  # 8 - (b * 4) // 4
    assert suites.Case("gru", "fwd", 3, 10, 2, 4, padded=True).seq_lengths() == (10, 9, 7)
    assert suites.Case("gru", "fwd", 3, 10, 2, 4).seq_lengths() is None
    assert case.id.endswith("/padded")
    outs = {}
    for impl in ("jaxrnn:reference", "jaxrnn:xla", "torch"):
        work = IMPLEMENTATIONS[impl](case, Context("cpu"))
        if isinstance(work, JaxWork):
            outs[impl] = np.asarray(work.compile()[1]())
        else:
            outs[impl] = work.run().numpy()
        assert outs[impl].shape == (4, 8, 10)
        for b, n in enumerate(case.seq_lengths()):
            assert not np.any(outs[impl][b, n:]), f"{impl}: output past length {n} of row {b}"
            assert np.all(np.any(outs[impl][b, :n] != 0, axis=-1)), f"{impl}: a valid step of row {b} is zero"
    rtol, atol = TOLERANCES[jnp.dtype(jnp.float32)]
    np.testing.assert_allclose(outs["jaxrnn:xla"], outs["jaxrnn:reference"], rtol=rtol, atol=atol)
    with pytest.raises(Exception, match="padded batches are timed for"):
        IMPLEMENTATIONS["equinox"](case, Context("cpu"))


def test_cpu_small_suite_covers_the_experiments_regime():
    suite = suites.get_suite("cpu_small")
    cases = suite.cases()
    assert {c.cell for c in cases} == set(suites.CELLS) and {c.mode for c in cases} == {"fwdbwd"}
    assert min(c.hidden_size for c in cases) == 32 and max(c.hidden_size for c in cases) == 128
    assert min(c.batch for c in cases) == 32 and max(c.batch for c in cases) == 128
    assert min(c.seq_len for c in cases) == 50 and max(c.seq_len for c in cases) == 500
    assert min(c.input_size for c in cases) == 1 and max(c.input_size for c in cases) == 64
    padded = [c for c in suites.get_suite("cpu").cases() if c.padded]
    assert {c.cell for c in padded} == {"lstm", "gru"} and all(c.structure == "bidir2" for c in padded)


def test_cpu_targets_reads_worst_cases_and_thresholds(tmp_path):
    """The targets study on hand-made results: speed-up = peer time / jaxrnn time, the worst case decides."""
    from benchmarks.studies import cpu_targets  # noqa: PLC0415

    def row(case, impl, ratios, **kw):
        base = dict(case_id=case, impl=impl, status="ok", mode="fwdbwd", structure="single", batch=32, seq_len=256,
                    hidden_size=256, cell="lstm", padded=False, compile_s=0.5, notes={}, time_ratio_vs_peers=ratios)
        return {**base, **kw}

    cpu = {"rows": [
        row("a", "jaxrnn:xla", {"torch": 0.5, "flax.linen": 0.5}),                  # 2x both, but:
        row("a", "jaxrnn:ffi", {"torch": 0.4, "flax.linen": 0.4},                   # what "auto" runs: 2.5x
            notes={"thread_teams": {"team_calls": 40, "short_handed_calls": 12}}),
        row("b", "jaxrnn:xla", {"torch": 1 / 1.2, "flax.linen": 0.25}, cell="gru"),  # 1.2x torch: below 1.3
        row("p", "jaxrnn:xla", {"torch": 0.25, "flax.linen": 0.4}, structure="bidir2", padded=True, batch=16),
        row("p", "torch", {}, structure="bidir2", padded=True, batch=16),
        row("p", "jaxrnn:reference", {}, structure="bidir2", padded=True, batch=16, compile_s=1.5),  # the oracle
    ]}  # fmt: skip
    with open(tmp_path / "cpu.json", "w") as f:
        json.dump(cpu, f)
    got = {t["target"]: t for t in cpu_targets.evaluate(str(tmp_path))}
    assert got["1"]["met"] is False
    assert got["1"]["worst"]["torch"] == {"speedup": pytest.approx(1.2), "case_id": "b", "short_handed": None}
    assert got["1"]["worst"]["flax.linen"]["speedup"] == pytest.approx(2.5)  # the ffi row of case a, not xla's
    assert [c["speedup"]["torch"] for c in got["1"]["cases"] if c["case_id"] == "a"] == [pytest.approx(2.5)]
    # The ffi row's thread teams: 12 of its 40 team calls short-handed; xla rows form no teams.
    assert {c["case_id"]: c["short_handed"] for c in got["1"]["cases"]} == {"a": pytest.approx(0.3), "b": None}
    assert got["1"]["worst"]["flax.linen"]["short_handed"] == pytest.approx(0.3)
    assert got["3"]["met"] is True and got["3"]["worst"]["flax.linen"]["speedup"] == pytest.approx(2.5)
    assert got["1b"]["met"] is True  # every case at least 1.0x PyTorch
    # Compilation: the backends "auto" picks; the reference's 1.5 s is reported, not counted.
    assert got["6"]["met"] is True and got["6"]["longest_compile_s"] == 0.5
    assert got["6"]["reference_longest_compile_s"] == 1.5
    cpu["rows"].append(row("q", "jaxrnn:ffi", {}, compile_s=1.25))
    with open(tmp_path / "cpu.json", "w") as f:
        json.dump(cpu, f)
    slow = {t["target"]: t for t in cpu_targets.evaluate(str(tmp_path))}["6"]
    assert slow["met"] is False and slow["over_1s"] == ["q jaxrnn:ffi"]
    assert cpu_targets.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "cpu_targets.md").read_text().count("| 1 |") == 1
    assert "`a`: torch 2.50x, flax.linen 2.50x; short-handed in 30% of its calls" in (tmp_path / "cpu_targets.md").read_text()
    assert "`b`: torch 1.20x, flax.linen 4.00x\n" in (tmp_path / "cpu_targets.md").read_text()
    # The language model's targets, with the bound lm_cpu measured (the ratio were every matmul at the ceiling).
    lm = {"targets": {
        "training": {"description": "training", "threshold": 1.3, "ratio": 1.12, "ratio_at_ceiling": 1.9, "met": False},
        "generation": {"description": "generation", "threshold": 5.0, "ratio": 1.6, "ratio_by_batch": {"1": 13.0, "32": 1.6},
                       "ratio_at_ceiling": 3.5, "met": False},
    }}  # fmt: skip
    with open(tmp_path / "lm_cpu.json", "w") as f:
        json.dump(lm, f)
    got = {t["target"]: t for t in cpu_targets.evaluate(str(tmp_path))}
    assert got["4"]["ratio"] == 1.12 and got["4"]["met"] is False and got["5"]["detail"]["ratio_at_ceiling"] == 3.5
    assert cpu_targets.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "cpu_targets.md").read_text()
    assert "1.12x; at most 1.90x at the float32 matmul ceiling" in text
    assert "1.60x (batch 1: 13.00x, batch 32: 1.60x); at most 3.50x" in text
    assert cpu_targets.main(["--results", str(tmp_path / "missing")]) == 2
