r"""Words as tokens: the tokenizer of word-level vocabularies, and its (lossy) inverse.

The rule (:data:`WORD_PATTERN`): a token is either

* a **word**: a run of letters, digits or underscores (``\w+``), possibly
  joined by apostrophes *inside* it (``'`` or ``’`` between two word
  characters), so that ``don't``, ``keeper's`` and ``rock'n'roll`` are one
  token each; or
* a **punctuation mark**: any single other non-space character (``,``, ``!``,
  ``"``, a leading or trailing ``'``, ...), each its own token.

Whitespace only separates tokens and is dropped. :func:`join_words` puts
single spaces back, except before closing punctuation (``. , ; : ! ? ) ] }``)
and after opening brackets, so ``join_words(tokenize_words(text))`` is
``text`` up to spacing.

Example:
  >>> tokenize_words("Hello, world! Don't panic.")
  ['Hello', ',', 'world', '!', "Don't", 'panic', '.']
  >>> join_words(['Hello', ',', 'world', '!'])
  'Hello, world!'
"""

from __future__ import annotations

import re
from typing import Iterable, List

__all__ = ["WORD_PATTERN", "join_words", "tokenize_words"]

WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
"""A word (``\\w+``, apostrophes allowed between word characters) or one punctuation character."""

_NO_SPACE_BEFORE = frozenset(".,;:!?)]}")
_NO_SPACE_AFTER = frozenset("([{")


def tokenize_words(text: str) -> List[str]:
    """Split ``text`` into words and punctuation marks (the rule of :data:`WORD_PATTERN`).

    Args:
      text: any string.

    Returns:
      The tokens in order, whitespace dropped.

    Example:
      >>> tokenize_words("Hello, world!")
      ['Hello', ',', 'world', '!']
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    return WORD_PATTERN.findall(text)


def join_words(tokens: Iterable[str]) -> str:
    """Words and punctuation back into text: single spaces, none before ``.,;:!?)]}`` or after ``([{``.

    Example:
      >>> join_words(["(", "Hello", ",", "world", ")"])
      '(Hello, world)'
    """
    out: List[str] = []
    for token in tokens:
        if out and token not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(token)
    return "".join(out)
