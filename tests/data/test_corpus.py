"""jaxrnn.data.corpus: the shipped corpus is package data read with importlib.resources, the same
text under every name (data.DEFAULT_TEXT, data.default_text(), data.load_text()); a file of yours."""

import importlib.resources
import pathlib

import pytest

import jaxrnn
from jaxrnn import data


def test_default_text_is_package_data():
    resource = importlib.resources.files("jaxrnn.data").joinpath(data.CORPUS_FILE)
    assert resource.is_file()
    assert pathlib.Path(jaxrnn.__file__).parent.joinpath("data", "corpus.txt").is_file()
    text = resource.read_text(encoding="utf-8")
    assert data.default_text() == text == data.DEFAULT_TEXT == data.load_text()
    assert data.default_text() is data.default_text()  # read once
    assert text.startswith("THE KEEPER'S LOG\n\nFirst day.") and text.endswith("Save one apple for the last day.\n")
    assert len(text) == 11523 and text.isascii() and "\r" not in text


def test_load_text_too_short(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    with pytest.raises(ValueError, match="text: expected at least 2 characters"):
        data.load_text(short)
