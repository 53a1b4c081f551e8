"""``jaxrnn experiment counting``: the record follows its rule; a hand-set LSTM counter accepts aⁿbⁿ to n = 1000."""

import jax.numpy as jnp
import numpy as np

from jaxrnn.experiments import counting

CFG = counting.CONFIGS["small"]


def test_record_structure_and_the_max_n_rule(experiment_record):
    record, out = experiment_record("counting")
    results = record["results"]
    assert (out / "counting.png").is_file() and results["eval_max_n"] == CFG["eval_max_n"]
    for name, state in (("lstm", "c"), ("gru", "h")):
        entry = results[name]
        accepted = entry["accepted"]
        assert len(accepted) == CFG["eval_max_n"]
        first_reject = accepted.index(False) if False in accepted else len(accepted)
        assert entry["max_n"] == first_reject  # every n' <= max_n accepted, max_n + 1 rejected (or the end)
        assert entry["accepted_fraction"] == np.mean(accepted)
        unit = entry["counting_unit"]
        assert unit["state"] == state and 0 <= unit["index"] < CFG["hidden_size"] and -1 <= unit["correlation"] <= 1


def test_hand_set_lstm_counter_accepts_every_n_up_to_1000():
    cell, params = counting.counter_lstm()
    ev = counting.evaluate_counting(cell, params, 1000)
    assert ev.accepted.all() and ev.max_n == 1000
    # its unit 0 is the counter: c_0 = #a - #b exactly (float32 counts exactly), the count ends at 0
    np.testing.assert_array_equal(ev.states[:, 0], ev.counts)
    assert ev.counts.max() == 1000 and ev.counts[-1] == 0
    assert ev.counting_unit() == (0, 1.0)


def test_the_evaluation_rejects_a_broken_counter():
    cell, params = counting.counter_lstm()
    # never predict the final $: no string is accepted
    no_end = params._replace(b=params.b.at[0].set(-100.0))
    assert counting.evaluate_counting(cell, no_end, 20).max_n == 0
    # a counter that counts down by 1/2 on b: c_0 = n/2 after a^n b^n, so the $ is never predicted
    w_ih = params.cell.w_ih.at[2, 4].set(-jnp.arctanh(0.5))  # column 2H + 0: g_0 on b is -0.5 instead of -1
    half = params._replace(cell=params.cell._replace(w_ih=w_ih))
    ev = counting.evaluate_counting(cell, half, 20)
    assert ev.max_n == 0 and not ev.accepted.any()
