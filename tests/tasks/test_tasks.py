"""jaxrnn.tasks: every generator against hand-computed examples and its stated properties."""

import numpy as np
import pytest

from jaxrnn import tasks


def same(a, b):
    """Two batches (NamedTuples of arrays and ints) are equal field by field."""
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------
# Determinism: same seed, same batch; another seed, another batch
# --------------------------------------------------------------------------
GENERATORS = {
    "adding": lambda seed: tasks.adding(8, 20, seed=seed),
    "copy": lambda seed: tasks.copy_task(8, 5, 3, seed=seed),
    "agreement": lambda seed: tasks.agreement(16, max_attractors=3, seed=seed),
    "distance": lambda seed: tasks.distance_task(8, 4, seed=seed),
    "ns": lambda seed: (tasks.sample_ns(16, 30, seed=seed),),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_batch(name):
    make = GENERATORS[name]
    assert same(make(3), make(3))
    assert not same(make(3), make(4))


# --------------------------------------------------------------------------
# The adding problem
# --------------------------------------------------------------------------
def test_adding_target_is_the_sum_of_the_two_marked_numbers():
    batch = tasks.adding(64, 30, seed=1)
    values, markers = batch.inputs[..., 0], batch.inputs[..., 1]
    assert batch.inputs.dtype == np.float32 and batch.inputs.shape == (64, 30, 2)
    np.testing.assert_array_equal(markers.sum(1), 2.0)  # exactly two markers
    np.testing.assert_allclose(batch.targets, (values * markers).sum(1), rtol=1e-6)
    first, second = batch.positions.T
    assert np.all(first < 15) and np.all(second >= 15)  # one marker per half
    np.testing.assert_array_equal(np.nonzero(markers)[1].reshape(64, 2), batch.positions)
    assert np.all((values >= 0) & (values < 1))


def test_adding_hand_example():
    batch = tasks.adding(1, 4, seed=0)
    (i, j), v = batch.positions[0], batch.inputs[0, :, 0]
    assert batch.targets[0] == np.float32(v[i] + v[j])


# --------------------------------------------------------------------------
# The copy task
# --------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0, 1, 7])
def test_copy_target_is_the_input_shifted_by_the_delay(delay):
    batch = tasks.copy_task(6, 4, delay, num_symbols=5, seed=2)
    T = 4 + delay
    assert batch.inputs.shape == batch.targets.shape == (6, T)
    np.testing.assert_array_equal(batch.targets[:, delay:], batch.inputs[:, : T - delay])
    np.testing.assert_array_equal(batch.targets[:, :delay], 0)
    assert np.all((batch.inputs[:, :4] >= 1) & (batch.inputs[:, :4] <= 5)) and np.all(batch.inputs[:, 4:] == 0)
    # the mask marks exactly the targets that are symbols
    np.testing.assert_array_equal(batch.target_mask, batch.targets > 0)


def test_copy_hand_example():
    batch = tasks.copy_task(1, 3, 2, seed=0)
    a, b, c = batch.inputs[0, :3]
    np.testing.assert_array_equal(batch.inputs[0], [a, b, c, 0, 0])
    np.testing.assert_array_equal(batch.targets[0], [0, 0, a, b, c])


# --------------------------------------------------------------------------
# aⁿbⁿ and aⁿbⁿcⁿ
# --------------------------------------------------------------------------
def test_anbn_hand_example():
    batch = tasks.anbn([2, 1])
    np.testing.assert_array_equal(batch.inputs, [[0, 1, 1, 2, 2], [0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(batch.seq_lengths, [5, 3])
    #            after: $         a          a          b          b
    expected = [[[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]],
                [[0, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]]  # fmt: skip
    np.testing.assert_array_equal(batch.targets, np.array(expected, bool))
    np.testing.assert_array_equal(batch.next_tokens, [[1, 1, 2, 2, 0], [1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(batch.deterministic, [[1, 0, 0, 1, 1], [1, 0, 1, 0, 0]])
    padded = tasks.anbn([2, 1], length=7)  # the same strings, two more padding positions
    np.testing.assert_array_equal(padded.inputs, np.pad(batch.inputs, ((0, 0), (0, 2))))
    np.testing.assert_array_equal(padded.targets[:, :5], batch.targets)
    assert not padded.targets[:, 5:].any() and np.array_equal(padded.seq_lengths, batch.seq_lengths)


def test_anbncn_hand_example():
    batch = tasks.anbncn([2])
    assert tasks.decode_counting(batch.inputs[0]) == "$aabbcc"
    allowed = ["".join(s for s, ok in zip(tasks.COUNTING_SYMBOLS, row) if ok) for row in batch.targets[0]]
    assert allowed == ["a", "ab", "ab", "b", "c", "c", "$"]


@pytest.mark.parametrize("letters", [2, 3])
def test_counting_strings_are_in_the_language_and_targets_are_consistent(letters):
    ns = tasks.sample_ns(40, 25, seed=5)
    batch = tasks.counting_strings(ns, letters)
    for row in range(len(ns)):
        L = batch.seq_lengths[row]
        text = tasks.decode_counting(batch.inputs[row], L)
        assert text[0] == "$" and tasks.in_counting_language(text[1:], letters)
        assert len(text) == letters * ns[row] + 1
        # the symbol that comes next is always allowed; padding allows nothing
        assert np.all(batch.targets[row, np.arange(L), batch.next_tokens[row, :L]])
        assert not batch.targets[row, L:].any()
        # the deterministic part: the first a, then every symbol after the a's (b_2..b_n, c_1..c_n, the final $)
        assert batch.deterministic[row].sum() == 1 + (letters - 1) * ns[row]
        # the next symbols continue the string: inputs shifted left by one, then $
        np.testing.assert_array_equal(batch.next_tokens[row, : L - 1], batch.inputs[row, 1:L])


def test_in_counting_language():
    assert tasks.in_counting_language("aabb") and tasks.in_counting_language("abc", 3)
    for s in ("", "ab" * 2, "aab", "abb", "ba", "aabbc"):
        assert not tasks.in_counting_language(s)
    assert not tasks.in_counting_language("aabbc", 3) and not tasks.in_counting_language("ab", 3)


# --------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------
def test_agreement_label_is_the_subjects_number_whatever_the_attractors():
    batch = tasks.agreement(300, max_attractors=3, mismatch=0.5, seed=7)
    number_of = {w: k for pair in tasks.AGREEMENT_NOUNS for k, w in enumerate(pair)}
    mismatched = 0
    for b in range(300):
        words = tasks.decode_agreement(batch.tokens[b], batch.seq_lengths[b]).split()
        nouns = [w for w in words if w in number_of]
        assert words[:2] == ["the", nouns[0]] and batch.subject_positions[b] == 1
        assert batch.labels[b] == number_of[nouns[0]]  # the subject decides, never the nearest noun
        assert len(nouns) - 1 == batch.num_attractors[b]
        np.testing.assert_array_equal([number_of[w] for w in nouns[1:]], batch.attractor_numbers[b, : len(nouns) - 1])
        assert np.all(batch.attractor_numbers[b, len(nouns) - 1 :] == -1)
        mismatched += any(number_of[w] != batch.labels[b] for w in nouns[1:])
        assert np.all(batch.tokens[b, batch.seq_lengths[b] :] == 0)
    assert mismatched > 50  # attractors of the other number occur
    assert set(np.unique(batch.num_attractors)) == {0, 1, 2, 3}


def test_agreement_hand_sentence_and_mismatch_extremes():
    all_mismatched = tasks.agreement(50, min_attractors=2, max_attractors=2, mismatch=1.0, seed=0)
    np.testing.assert_array_equal(all_mismatched.attractor_numbers, 1 - all_mismatched.labels[:, None].repeat(2, 1))
    none = tasks.agreement(50, max_attractors=2, mismatch=0.0, seed=0)
    real = none.attractor_numbers >= 0
    assert np.all(none.attractor_numbers[real] == np.broadcast_to(none.labels[:, None], real.shape)[real])
    ids = [tasks.AGREEMENT_VOCAB.index(w) for w in "the keys next to the book".split()]
    assert tasks.decode_agreement(ids) == "the keys next to the book"


# --------------------------------------------------------------------------
# The distance task
# --------------------------------------------------------------------------
def test_distance_target_is_the_token_ell_steps_back():
    batch = tasks.distance_task(32, 3, seq_len=10, num_symbols=5, seed=1)
    np.testing.assert_array_equal(batch.targets, batch.inputs[:, 10 - 1 - 3])
    default = tasks.distance_task(32, 3, seed=1)
    assert default.inputs.shape == (32, 4)
    np.testing.assert_array_equal(default.targets, default.inputs[:, 0])
    zero = tasks.distance_task(4, 0, seq_len=3, seed=0)
    np.testing.assert_array_equal(zero.targets, zero.inputs[:, -1])
    # a hand example: the symbol ℓ = 2 steps before the last of a length-4 sequence is the second
    ex = tasks.distance_task(1, 2, seq_len=4, seed=3)
    assert ex.targets[0] == ex.inputs[0, 1] and ex.distance == 2


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: tasks.adding(0, 10), ValueError, "batch_size"),
        (lambda: tasks.adding(2, 1), ValueError, "seq_len"),
        (lambda: tasks.copy_task(2, 3, -1), ValueError, "delay"),
        (lambda: tasks.anbn([0, 2]), ValueError, "ns"),
        (lambda: tasks.anbn([1.5]), TypeError, "ns"),
        (lambda: tasks.counting_strings([1], letters=4), ValueError, "letters"),
        (lambda: tasks.anbn([3], length=6), ValueError, "length"),
        (lambda: tasks.agreement(2, min_attractors=3, max_attractors=1), ValueError, "min_attractors"),
        (lambda: tasks.agreement(2, mismatch=1.5), ValueError, "mismatch"),
        (lambda: tasks.distance_task(2, 5, seq_len=5), ValueError, "distance"),
        (lambda: tasks.distance_task(2, 1, seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_name_themselves(call, error, match):
    with pytest.raises(error, match=match):
        call()
