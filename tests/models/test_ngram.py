"""The interpolated Kneser–Ney baseline (jaxrnn.models.ngram) against the formula written out by hand on the
corpus "a b a b c", distributions that sum to 1 for seen and unseen contexts, a deterministic corpus scoring a
perplexity near 1, the Evaluation the language model reports, and its errors."""

import math

import numpy as np
import pytest

from jaxrnn.models.lm import Evaluation
from jaxrnn.models.ngram import KneserNey

A, B, C, D_ = 0, 1, 2, 3  # tokens; d never occurs in the corpus
CORPUS = [A, B, A, B, C]
D = 0.75


def hand_probabilities():
    """Interpolated KN, order 3, V = 4, on "a b a b c", by hand.

    Order 1 (continuation counts N1+(. w) over the bigram types ab, ba, bc): a 1, b 1, c 1, d 0; total 3, 3 types:
        P1(w) = max(N1+(. w) - D, 0) / 3 + D * 3 / 3 * 1/V
    Order 2 (continuation counts N1+(. h w) over the trigram types aba, bab, abc):
        after a: ab 1 (from bab)          -> total 1, 1 type
        after b: ba 1 (aba), bc 1 (abc)   -> total 2, 2 types
        P2(w | h) = max(N1+(. h w) - D, 0) / total + D * types / total * P1(w)
    Order 3 (raw counts): after "a b": a 1, c 1 -> total 2, 2 types; after "b a": b 1 -> total 1, 1 type
        P3(w | h) = max(c(h w) - D, 0) / total + D * types / total * P2(w | h[1:])
    """
    V = 4
    cont1 = {A: 1, B: 1, C: 1, D_: 0}
    P1 = {w: max(cont1[w] - D, 0) / 3 + D * 3 / 3 / V for w in range(V)}
    cont2 = {A: {B: 1}, B: {A: 1, C: 1}}
    P2 = {}
    for h, row in cont2.items():
        total, types = sum(row.values()), len(row)
        P2[h] = {w: max(row.get(w, 0) - D, 0) / total + D * types / total * P1[w] for w in range(V)}
    raw3 = {(A, B): {A: 1, C: 1}, (B, A): {B: 1}}
    P3 = {}
    for h, row in raw3.items():
        total, types = sum(row.values()), len(row)
        P3[h] = {w: max(row.get(w, 0) - D, 0) / total + D * types / total * P2[h[1]][w] for w in range(V)}
    return P1, P2, P3


def test_probabilities_match_the_formula_by_hand():
    model = KneserNey(order=3, discount=D).fit(CORPUS, vocab_size=4)
    P1, P2, P3 = hand_probabilities()
    # Spot values, also worked on paper: P3(a | a b) = 0.25/2 + 0.75 * P2(a | b), P2(a | b) = 0.25/2 + 0.75/4 ...
    assert P1[A] == pytest.approx(0.25 / 3 + 0.1875) and P2[B][A] == pytest.approx(0.328125)
    assert P3[(A, B)][A] == pytest.approx(0.37109375) and P3[(A, B)][D_] == pytest.approx(0.10546875)
    for w in range(4):
        assert math.exp(model.logprob([A, B], w)) == pytest.approx(P3[(A, B)][w], rel=1e-12)
        assert math.exp(model.logprob([B, A], w)) == pytest.approx(P3[(B, A)][w], rel=1e-12)
        assert math.exp(model.logprob([C, A, B], w)) == pytest.approx(P3[(A, B)][w], rel=1e-12)  # last 2 only
        # Unseen histories back off entirely: "c a" and "b b" to order 2, "d d" and "c c" to order 1.
        assert math.exp(model.logprob([C, A], w)) == pytest.approx(P2[A][w], rel=1e-12)
        assert math.exp(model.logprob([B, B], w)) == pytest.approx(P2[B][w], rel=1e-12)
        assert math.exp(model.logprob([D_, D_], w)) == pytest.approx(P1[w], rel=1e-12)
        assert math.exp(model.logprob([C, C], w)) == pytest.approx(P1[w], rel=1e-12)  # "c" ends the corpus
        # Short contexts start the recursion lower.
        assert math.exp(model.logprob([B], w)) == pytest.approx(P2[B][w], rel=1e-12)
        assert math.exp(model.logprob([], w)) == pytest.approx(P1[w], rel=1e-12)
    np.testing.assert_allclose(model.probs([A, B]), [P3[(A, B)][w] for w in range(4)], rtol=1e-12)


def test_sequence_scores_are_the_sum_of_conditionals():
    model = KneserNey(order=3, discount=D).fit(CORPUS, vocab_size=4)
    P1, P2, P3 = hand_probabilities()
    seq = [A, B, A, D_, B]
    # t=1: P2(b | a); t=2: P3(a | a b); t=3: P3(d | b a); t=4: history "a d" unseen -> P2(b | d) -> "d" unseen -> P1(b)
    expected = [P2[A][B], P3[(A, B)][A], P3[(B, A)][D_], P1[B]]
    np.testing.assert_allclose(np.exp(model.token_logprobs(seq)), expected, rtol=1e-12)
    nats = -np.mean(np.log(expected))
    result = model.evaluate(seq)
    assert isinstance(result, Evaluation) and result.count == 4
    assert result.nll == pytest.approx(nats, rel=1e-12) == model.nll(seq)
    assert model.perplexity(seq) == pytest.approx(math.exp(nats), rel=1e-12)
    assert model.bits_per_token(seq) == pytest.approx(nats / math.log(2), rel=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distributions_sum_to_one(order):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 6, size=n) for n in (40, 3, 25)]  # token 6 never occurs
    model = KneserNey(order=order, discount=0.6).fit(sequences, vocab_size=7)
    contexts = [[], [0], [1, 2], [6, 6, 6, 6], [5, 6, 0], list(sequences[0][:10]), list(sequences[1])]
    for context in contexts:
        p = model.probs(context)
        assert p.shape == (7,) and np.all(p > 0)
        assert p.sum() == pytest.approx(1.0, abs=1e-12), (order, context)


def test_deterministic_corpus_has_perplexity_near_one():
    ids = np.tile([0, 1, 2, 3], 500)
    model = KneserNey(order=3).fit(ids)
    ppl = model.perplexity(ids)
    # After 2 tokens P(next) = (c - D)/c + D/c * P2 >= 1 - 0.75/c with c >= 498: all but the first prediction.
    assert 1.0 < ppl < 1.01, ppl
    assert model.perplexity(np.tile([0, 1, 2, 3], 20)) < 1.1


def test_sequences_do_not_span_boundaries_and_rows():
    # "a b" | "c a": the bigram "b c" never occurs inside a sequence.
    split = KneserNey(order=2).fit([np.array([A, B]), np.array([C, A])], vocab_size=3)
    joined = KneserNey(order=2).fit(np.array([A, B, C, A]), vocab_size=3)
    rows = KneserNey(order=2).fit(np.array([[A, B], [C, A]]), vocab_size=3)
    np.testing.assert_array_equal(split.probs([B]), rows.probs([B]))
    assert split.probs([B])[C] < joined.probs([B])[C]


def test_errors():
    with pytest.raises(ValueError, match="order: expected a positive int, got 0"):
        KneserNey(order=0)
    with pytest.raises(ValueError, match=r"discount: expected a discount in \(0, 1\), got 1.0"):
        KneserNey(discount=1.0)
    with pytest.raises(ValueError, match="model: expected a fitted KneserNey"):
        KneserNey().nll([0, 1])
    model = KneserNey().fit(CORPUS)
    with pytest.raises(ValueError, match=r"token_ids: expected token ids in \[0, 3\), got min 0 and max 3"):
        model.nll([0, 3])
    with pytest.raises(ValueError, match=r"token_ids: expected a 1-D sequence of at least 2 ids, got shape \(1,\)"):
        model.nll([0])
    with pytest.raises(ValueError, match=r"vocab_size: expected at least 3 \(the largest id \+ 1\), got 2"):
        KneserNey().fit(CORPUS, vocab_size=2)
    with pytest.raises(TypeError, match="data: expected integer token ids, got dtype float64"):
        KneserNey().fit(np.array([0.0, 1.0]))
