"""Text data for the language model: the shipped corpus, a character vocabulary and training windows.

:mod:`jaxrnn.data.corpus` holds the text (the package data file ``corpus.txt``,
or a file of yours); :mod:`jaxrnn.data.text` turns text into token ids and
batches of windows.

Example:
  >>> from jaxrnn import data
  >>> vocab = data.Vocab.from_text(data.DEFAULT_TEXT)
  >>> ids = vocab.encode("The lamp")
  >>> vocab.decode(ids)
  'The lamp'
"""

from jaxrnn.data.corpus import CORPUS_FILE, DEFAULT_TEXT, default_text, load_text
from jaxrnn.data.text import Vocab, sample_windows, split_windows, train_val_split

__all__ = [
    "CORPUS_FILE",
    "DEFAULT_TEXT",
    "Vocab",
    "default_text",
    "load_text",
    "sample_windows",
    "split_windows",
    "train_val_split",
]
