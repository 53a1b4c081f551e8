"""``jaxrnn experiment interpret``: the text features against Python's tokenizer and hand-worked strings, the
correlations against ``np.corrcoef``, the recorded cell states against the language model's own carry."""

import io
import tokenize
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from jaxrnn.data import Vocab
from jaxrnn.experiments import interpret
from jaxrnn.models import lm

CFG = interpret.CONFIGS["small"]


def test_inside_quotes_by_hand():
    assert interpret.inside_quotes('a = "b\\"c" # "').tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # triple quotes hold single quotes; a comment's quote opens nothing; the opening quote is inside, the closing not
    text = 'x = """a "b" c"""  # it\'s\ny = \'q\''
    got = interpret.inside_quotes(text).tolist()
    assert len(got) == len(text)
    inside = "".join(ch if v else "_" for ch, v in zip(text, got))
    assert inside == '____"""a "b" c' + "_" * 16 + "'q_"
    # prose: apostrophes are not quotes, double quotes pair up
    prose = 'He said "don\'t" and left.'
    inside = "".join(ch if v else "_" for ch, v in zip(prose, interpret.inside_quotes(prose, python=False)))
    assert inside == '________"don\'t_' + "_" * 10


def _string_spans(source):
    """0/1 per character from Python's tokenizer: inside a string token, from its opening quote to before its closing delimiter."""
    offsets = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
    out = np.zeros(len(source), np.int8)
    start = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[tok.type]
        begin, end = offsets[tok.start[0] - 1] + tok.start[1], offsets[tok.end[0] - 1] + tok.end[1]
        if name in ("STRING", "FSTRING_START"):
            start = begin
        if name in ("STRING", "FSTRING_END"):
            text = source[start:end]
            q = min(i for i in (text.find("'"), text.find('"')) if i >= 0)
            delim = 3 if text[q : q + 3] in ("'''", '"""') else 1
            out[start + q : end - delim] = 1
    return out


@pytest.mark.parametrize("module", ["checks.py", "experiments/interpret.py", "cli/args.py"])
def test_inside_quotes_matches_pythons_tokenizer(module):
    source = (Path(jaxrnn.__file__).parent / module).read_text(encoding="utf-8")
    np.testing.assert_array_equal(interpret.inside_quotes(source), _string_spans(source))


def test_line_position_and_indentation():
    assert interpret.column("ab\ncd").tolist() == [1, 2, 0, 1, 2]
    assert interpret.indentation("a\n  b c\n ").tolist() == [0, 0, 1, 2, 2, 2, 2, 0, 1]
    source = interpret.load_text("source", 5000)
    col, ind = interpret.column(source), interpret.indentation(source)
    ends = [i for i, ch in enumerate(source) if ch == "\n"]
    for a, b in zip([-1] + ends, ends):  # at the last character of each line: its length and its indentation
        line = source[a + 1 : b]
        if line:
            assert col[b - 1] == len(line)
            assert ind[b - 1] == len(line) - len(line.lstrip(" "))


def test_correlations_and_best_unit_against_numpy():
    rng = np.random.default_rng(0)
    feature = rng.integers(0, 5, 200).astype(float)
    units = rng.normal(size=(200, 6))
    units[:, 4] = -2 * feature + 0.1 * rng.normal(size=200)  # a planted unit, anti-correlated
    units[:, 1] = 3.0  # a constant unit
    r = interpret.unit_correlations(units, feature)
    for h in (0, 2, 3, 4, 5):
        assert r[h] == pytest.approx(np.corrcoef(units[:, h], feature)[0, 1], abs=1e-12)
    assert r[1] == 0.0
    unit, best = interpret.best_unit(units, feature)
    assert unit == 4 and best == pytest.approx(r[4]) and best < -0.99
    assert interpret.best_unit(units, np.ones(200)) == (None, None)
    with pytest.raises(ValueError, match="units, feature"):
        interpret.unit_correlations(units, feature[:10])


def test_cell_states_are_the_models_own_cell_states():
    text = "def f(x):\n    return 'a'\n"
    vocab = Vocab.from_text(text)
    model = lm.LanguageModel(vocab.size, jaxrnn.LSTM(8), embed_size=5)
    params = model.init(jax.random.key(3))
    ids = vocab.encode(text)
    states = interpret.cell_states(model, params, ids)
    assert states.shape == (len(ids), 8)
    for k in (1, 7, len(ids)):  # after k tokens: the model's final carry on the prefix
        _, carries = model.apply(params, jnp.asarray(ids[:k])[None])
        np.testing.assert_allclose(states[k - 1], np.asarray(carries[0].c[0]), rtol=1e-5, atol=1e-6)


def test_heatmap_html_colours_and_escapes():
    page = interpret.heatmap_html("<a\n", [1.0, -1.0, 0.0])
    assert page.count("<span") == 3
    assert 'background:rgb(255,0,0)" title="+1.000">&lt;</span>' in page
    assert 'background:rgb(0,0,255)" title="-1.000">a</span>' in page
    assert 'background:rgb(255,255,255)' in page


def test_small_run_reports_consistent_units(experiment_record):
    record, out = experiment_record("interpret")
    res = record["results"]
    H = CFG["hidden_size"]
    assert (out / "interpret.html").is_file() and (out / "interpret.png").is_file()
    assert res["units"] == H and len(res["max_abs_r"]) == H and len(res["losses"]) == CFG["steps"]
    max_abs = np.asarray(res["max_abs_r"])
    assert res["interpretable_units"] == int(np.sum(max_abs >= CFG["threshold"]))
    assert res["interpretable_units"] + res["not_interpretable_units"] == H
    for name in interpret.FEATURES:
        e = res["features"][name]
        assert not e["constant"]  # the source text has quotes, lines and indentation
        assert 0 <= e["unit"] < H and abs(e["r"]) <= 1 and max_abs[e["unit"]] >= abs(e["r"]) - 1e-12
        assert abs(e["untrained_r"]) <= 1
    page = (out / "interpret.html").read_text(encoding="utf-8")
    assert page.count("<pre") == 3 and f"of {H} units" in page
    assert np.isfinite(res["val_loss"]) and res["final_loss"] < res["losses"][0]


def test_standardise_against_its_formula():
    ref = np.array([1.0, 2.0, 3.0, 10.0])
    values = np.array([2.0, 50.0, -50.0])
    expected = np.clip((values - ref.mean()) / (2 * ref.std()), -1, 1)
    np.testing.assert_allclose(interpret.standardise(values, ref), expected)
    assert interpret.standardise(values, ref)[1:].tolist() == [1.0, -1.0]
    np.testing.assert_array_equal(interpret.standardise(np.full(3, 7.0)), np.zeros(3))


def test_validation_features_come_from_the_whole_text():
    """A split inside a string literal: the part's quotes keep their true sides."""
    text = 'x = "abc def"\n    y = "z"\n'
    start = text.index("def")  # inside the first string
    part = interpret.feature_arrays(text, start=start)
    whole = interpret.feature_arrays(text)
    for name in interpret.FEATURES:
        np.testing.assert_array_equal(part[name], whole[name][start:])
    assert part["in_quotes"][:3].tolist() == [1, 1, 1]  # "def" is inside the string
    assert interpret.inside_quotes(text[start:])[:3].tolist() == [0, 0, 0]  # what cutting first would get wrong
    assert part["indentation"][part["indentation"] > 0].max() == 4 and part["line_position"][0] == start + 1


def test_load_text_reads_a_file(tmp_path):
    from jaxrnn.experiments.common import load_text

    path = tmp_path / "t.txt"
    path.write_text('say "hi"\n', encoding="utf-8")
    assert load_text(str(path)) == 'say "hi"\n' and load_text(str(path), 3) == "say"
    assert load_text("corpus", 10) == jaxrnn.data.DEFAULT_TEXT[:10]
    with pytest.raises(ValueError, match="text"):
        load_text(str(tmp_path / "missing.txt"))


def test_text_record_names_the_text_exactly():
    import hashlib

    from jaxrnn.experiments.common import text_record

    rec = text_record("corpus", "héllo")
    assert rec == {"name": "corpus", "chars": 5, "sha256": hashlib.sha256("héllo".encode()).hexdigest()}
