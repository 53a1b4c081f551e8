"""The CPU language-model study (``benchmarks.studies.lm_cpu``): equal work on both sides, and a ``--quick`` run's record.

About 15 s on 2 cores (three tiny runs of compiled steps and generators).
"""

import json
import math
import os
import sys

import numpy as np
import pytest
from _util import TOLERANCES

# ``benchmarks`` lives at the repository's top level and is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.studies import lm_cpu  # noqa: E402

RTOL, ATOL = TOLERANCES[np.dtype(np.float32)]


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_both_programs_compute_the_same_thing_from_the_same_weights():
    torch = pytest.importorskip("torch")
    module = lm_cpu.torch_lm(vocab=65, embed=8, hidden=16, layers=2, seed=3)
    tokens = lm_cpu.random_batches(1, batch=3, window=10, vocab=65, seed=4)[0]  # (3, 11)
    before = {k: v.clone() for k, v in module.state_dict().items()}

    check = lm_cpu.check_equivalence(module, tokens, gen_steps=6)

    # The first step of the two timed training programs: the same loss on the same batch.
    assert check["loss_jaxrnn"] == pytest.approx(check["loss_torch"], rel=RTOL, abs=ATOL)
    assert check["grad_rel_error"] <= RTOL
    # nn.LSTM's two biases each get the summed bias's gradient: its norm counts that gradient twice.
    assert check["grad_norm_torch"] == pytest.approx(check["grad_norm_torch_expected"], rel=RTOL)
    assert check["grad_norm_torch"] > check["grad_norm_jaxrnn"]
    # Greedy generation (top_k=1 / argmax): the same tokens, drawn from the same logits.
    assert check["greedy_tokens_equal"] and check["greedy_logits_rel_error"] <= RTOL
    assert check["ok"] is True
    # The check ran on copies: the module's weights are untouched.
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_the_loaded_model_is_the_torch_model():
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from jaxrnn.models import lm

    module = lm_cpu.torch_lm(vocab=11, embed=4, hidden=6, layers=2, seed=1)
    model, params = lm_cpu.jaxrnn_from_torch(module)
    assert (model.vocab_size, model.embed_size, model.hidden_size, model.num_layers) == (11, 4, 6, 2)
    tokens = lm_cpu.random_batches(1, batch=2, window=5, vocab=11)[0]
    with torch.no_grad():
        expected, _ = module(torch.from_numpy(tokens.astype(np.int64)))
    logits, _ = model.apply(params, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), expected.numpy(), rtol=RTOL, atol=ATOL)


def t_at(record, target):
    return record["targets"][target]["ratio_at_ceiling"]


def test_quick_run_writes_the_record(tmp_path, capsys):
    pytest.importorskip("torch")
    assert lm_cpu.main(["--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "lm_cpu.json").read_text())
    captured = capsys.readouterr()
    assert "training B=4 T=16" in captured.out and "wrote" in captured.out
    assert "[lm_cpu] training" in captured.err  # progress on stderr

    assert record["benchmark"] == "lm_cpu"
    assert record["environment"]["platform"] == "cpu" and record["environment"]["jax"]
    assert len(record["load_average_start"]) == len(record["load_average_end"]) == 3
    c = record["config"]
    assert (c["hidden"], c["batch"], c["window"], c["gen_length"], c["gen_batches"]) == (32, 4, 16, 20, [1, 4])
    assert record["torch"]["available"] is True and record["torch"]["threads"] >= 1

    results = [("training", record["training"], c["batch"] * c["window"])]
    results += [(k, g, g["batch"] * c["gen_length"]) for k, g in record["generation"].items()]
    assert [k for k, _, _ in results] == ["training", "batch_1", "batch_4"]
    for name, result, tokens in results:
        for impl in ("jaxrnn", "torch"):
            s = result[impl]
            assert s["rounds"] == len(s["times_s"]) == 3, (name, impl)
            assert s["min_s"] <= s["q25_s"] <= s["median_s"] <= s["q75_s"] <= s["max_s"], (name, impl)
            assert s["tokens_per_s"] == pytest.approx(tokens / s["median_s"])
            assert s["tokens_per_s_q25"] <= s["tokens_per_s"] <= s["tokens_per_s_q75"]
            if name != "training":
                assert s["ms_per_token"] == pytest.approx(1e3 * s["median_s"] / c["gen_length"])
        assert _number(result["jaxrnn"]["compile_s"]) and result["jaxrnn"]["compile_s"] >= 0
        assert "compile_s" not in result["torch"]
        assert result["ratio"] == pytest.approx(result["jaxrnn"]["tokens_per_s"] / result["torch"]["tokens_per_s"])

    # The work model, by hand for the quick sizes (V=65, E=64, H=32, 2 layers): per token forward,
    # 2*128*(64+32) + 2*128*(32+32) + 2*32*65 = 45,120 FLOPs; training counts it 3x over 4*16 tokens,
    # generation once over (20 + 1) steps per row.
    ceiling = record["matmul_ceiling"]["float32"]["ceiling_flop_s"]
    assert ceiling > 0 and record["flop_model"]
    assert record["training"]["model_flops"] == 3 * 45_120 * 4 * 16
    assert [g["model_flops"] for g in record["generation"].values()] == [45_120 * 21 * b for b in (1, 4)]
    for _, result, _ in results:
        for impl in ("jaxrnn", "torch"):
            s = result[impl]
            assert s["flop_per_s"] == pytest.approx(result["model_flops"] / s["median_s"])
            assert s["matmul_fraction"] == pytest.approx(s["flop_per_s"] / ceiling)
        assert result["ratio_at_ceiling"] == pytest.approx(result["torch"]["median_s"] * ceiling / result["model_flops"])
    assert "ratio at the ceiling" in (tmp_path / "lm_cpu.md").read_text()
    assert t_at(record, "training") == record["training"]["ratio_at_ceiling"]
    assert t_at(record, "generation") == min(g["ratio_at_ceiling"] for g in record["generation"].values())

    t = record["targets"]
    assert t["training"]["threshold"] == 1.3 and t["generation"]["threshold"] == 5.0
    assert t["training"]["met"] == (record["training"]["ratio"] >= 1.3)
    gen_ratio = min(g["ratio"] for g in record["generation"].values())
    assert t["generation"]["ratio"] == pytest.approx(gen_ratio) and t["generation"]["met"] == (gen_ratio >= 5.0)
    assert record["equivalence"]["ok"] is True

    md = (tmp_path / "lm_cpu.md").read_text()
    assert "| training B=4 T=16 |" in md and "equal work: verified" in md


def test_without_torch_jaxrnn_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_cpu, "import_torch", lambda: (None, "torch is not importable (simulated)"))
    argv = ["--quick", "--hidden", "8", "--window", "4", "--gen-batches", "2", "--rounds", "1", "--gen-rounds", "1"]
    assert lm_cpu.main(argv + ["--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "lm_cpu.json").read_text())
    assert record["torch"] == {"available": False, "reason": "torch is not importable (simulated)", "threads": None}
    assert set(record["training"]) == {"jaxrnn", "ratio", "model_flops", "ratio_at_ceiling"}
    assert record["training"]["ratio"] is None and record["training"]["ratio_at_ceiling"] is None
    assert set(record["generation"]) == {"batch_2"} and "torch" not in record["generation"]["batch_2"]
    assert record["targets"]["training"]["met"] is None and record["targets"]["generation"]["met"] is None
    assert record["equivalence"]["ok"] is None
    assert "jaxrnn only" in (tmp_path / "lm_cpu.md").read_text()


def test_bad_command_line_is_one_line(capsys):
    assert lm_cpu.main(["--batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m benchmarks.studies.lm_cpu:") and "\n" not in err
