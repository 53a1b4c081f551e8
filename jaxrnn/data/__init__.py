"""Text data for the language model: the shipped corpus, character and word vocabularies, training windows.

:mod:`jaxrnn.data.corpus` holds the text (the package data file ``corpus.txt``,
or a file of yours); :mod:`jaxrnn.data.words` splits text into words and
punctuation; :mod:`jaxrnn.data.text` turns text into token ids (characters or
words, with ``<unk>``, ``min_count`` and ``max_size``) and batches of windows.

Example:
  >>> from jaxrnn import data
  >>> vocab = data.Vocab.from_text(data.DEFAULT_TEXT)
  >>> ids = vocab.encode("The lamp")
  >>> vocab.decode(ids)
  'The lamp'
  >>> words = data.Vocab.from_text(data.DEFAULT_TEXT, level="word", min_count=2)
  >>> state = words.to_dict()  # JSON-serialisable, for checkpoints; data.Vocab.from_dict(state) == words
"""

from jaxrnn.data.corpus import CORPUS_FILE, DEFAULT_TEXT, default_text, load_text
from jaxrnn.data.text import LEVELS, UNK, Vocab, sample_windows, split_windows, train_val_split
from jaxrnn.data.words import WORD_PATTERN, join_words, tokenize_words

__all__ = [
    "CORPUS_FILE",
    "DEFAULT_TEXT",
    "LEVELS",
    "UNK",
    "Vocab",
    "WORD_PATTERN",
    "default_text",
    "join_words",
    "load_text",
    "sample_windows",
    "split_windows",
    "tokenize_words",
    "train_val_split",
]
