"""The text a language model trains on: the corpus shipped with the package, or a file.

The default corpus (``corpus.txt`` beside this module, read with
:mod:`importlib.resources`) is written for this package, so it ships under the
package's licence and needs no download: the log of a lighthouse keeper, about
11,500 characters of plain English with enough repetition for a small
character-level model to learn words within a minute of CPU training.

Example:
  >>> from jaxrnn import data
  >>> data.default_text().splitlines()[0]
  "THE KEEPER'S LOG"
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Optional, Union

__all__ = ["CORPUS_FILE", "DEFAULT_TEXT", "default_text", "load_text"]

CORPUS_FILE = "corpus.txt"
"""Name of the default corpus among the package data of :mod:`jaxrnn.data`."""


@functools.cache
def default_text() -> str:
    """The default corpus: the package data file ``jaxrnn/data/corpus.txt`` (read once)."""
    return importlib.resources.files(__package__).joinpath(CORPUS_FILE).read_text(encoding="utf-8")


DEFAULT_TEXT: str = default_text()
"""The default corpus, :func:`default_text`, as a constant."""


def load_text(path: Optional[Union[str, os.PathLike]] = None) -> str:
    """Return :data:`DEFAULT_TEXT`, or the UTF-8 text of the file ``path``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file has fewer than 2 characters (nothing to predict).
    """
    if path is None:
        return default_text()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text: no such file {os.fspath(path)!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if len(text) < 2:
        raise ValueError(f"text: expected at least 2 characters in {os.fspath(path)!r}, got {len(text)}")
    return text
