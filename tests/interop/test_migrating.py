"""docs/migrating.md runs: its python blocks, executed in order, assert equal outputs against flax and PyTorch."""

import pathlib
import re

import numpy as np
import pytest

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "migrating.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    return BLOCK.findall(PAGE.read_text())


def test_page_has_both_guides():
    text = PAGE.read_text()
    assert "## Migrating from flax" in text and "## Migrating from PyTorch" in text
    assert len(_blocks()) >= 6


def test_code_blocks_run_and_match_the_original_frameworks():
    pytest.importorskip("torch")
    namespace = {"__name__": "migrating"}
    for k, code in enumerate(_blocks()):
        exec(compile(code, f"{PAGE.name}[block {k}]", "exec"), namespace)  # noqa: S102  (the page's own code)
    # The blocks' own assertions compared against flax and PyTorch; these check they really computed something.
    flax_logits, torch_logits = namespace["flax_logits"], namespace["torch_logits"]
    assert flax_logits.shape == torch_logits.shape == (4, 2)
    np.testing.assert_allclose(namespace["ported_logits"], flax_logits, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(flax_logits)).max() > 0 and np.abs(torch_logits).max() > 0
    assert namespace["losses"][-1] < namespace["losses"][0]
