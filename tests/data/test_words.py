"""jaxrnn.data.words: the word tokenizer's rule (words with inner apostrophes, one token per punctuation mark,
whitespace dropped) and its inverse, against hand-written token lists."""

import pytest

from jaxrnn import data


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        ("I don't know.", ["I", "don't", "know", "."]),
        ("The keeper's log", ["The", "keeper's", "log"]),
        ("rock'n'roll", ["rock'n'roll"]),
        ("'quoted' words", ["'", "quoted", "'", "words"]),  # apostrophes at the edges are punctuation
        ("dogs' bones", ["dogs", "'", "bones"]),
        ("Wait... what?!", ["Wait", ".", ".", ".", "what", "?", "!"]),
        ("(see page 12)", ["(", "see", "page", "12", ")"]),
        ("tab\tand\nnewline  spaces", ["tab", "and", "newline", "spaces"]),
        ("it’s curly", ["it’s", "curly"]),
        ("", []),
    ],
)
def test_tokenize_words_by_hand(text, tokens):
    assert data.tokenize_words(text) == tokens


def test_join_words_restores_ordinary_spacing():
    assert data.join_words(["Hello", ",", "world", "!"]) == "Hello, world!"
    assert data.join_words(["(", "see", "page", "12", ")", "."]) == "(see page 12)."
    assert data.join_words(["I", "don't", "know", "."]) == "I don't know."
    text = "The lamp was lit at dusk; the sea, calm."
    assert data.join_words(data.tokenize_words(text)) == text
    assert data.join_words([]) == ""


def test_tokenize_errors():
    with pytest.raises(TypeError, match="text: expected a str, got list"):
        data.tokenize_words(["a"])
