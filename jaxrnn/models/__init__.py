"""Models built on :class:`jaxrnn.Stack`.

* :mod:`jaxrnn.models.lm`: the recurrent language model (``LanguageModel``,
  ``LMParams``, ``generate``, ``loss``, ``make_train_step``, ...; every public
  name of it is here too);
* :mod:`jaxrnn.models.tagger`: :class:`Tagger`, one class per token (POS, NER);
* :mod:`jaxrnn.models.classifier`: :class:`Classifier`, one class per
  sentence from its last, mean, max or attention-pooled hidden states;
* :mod:`jaxrnn.models.bilm`: :class:`BiLM`, an ELMo-style deep biLM, and
  :func:`scalar_mix`;
* :mod:`jaxrnn.models.ngram`: :class:`KneserNey`, the interpolated
  Kneser-Ney n-gram baseline; :mod:`jaxrnn.models.window`: :class:`WindowLM`,
  the fixed-window neural LM of the lectures' review;
* :mod:`jaxrnn.models.common`: what they share (:class:`Batch`,
  :class:`DenseParams`, masked losses, :func:`reverse_valid`);
* :mod:`jaxrnn.models.nnx`: flax NNX modules around the tagger, classifier
  and biLM (imported on first access: it loads flax).

``pool`` is :func:`jaxrnn.sequence.pool`, ``pool(ys, seq_lengths, mode, *, bidirectional=False)``.

Example:
  >>> from jaxrnn.models import Batch, LanguageModel, Tagger, generate
  >>> model = LanguageModel(vocab_size=50, cell=jaxrnn.LSTM(128))
  >>> tagger = Tagger(17, jaxrnn.Stack(jaxrnn.LSTM(64), bidirectional=True), input_size=32, vocab_size=50)
"""

import importlib as _importlib

from jaxrnn.models import bilm, classifier, common, lm, ngram, tagger, window
from jaxrnn.models.bilm import BiLM, BiLMParams, MixParams, scalar_mix
from jaxrnn.models.classifier import Classifier, ClassifierParams
from jaxrnn.models.common import Batch, DenseParams, masked_accuracy, masked_cross_entropy, reverse_valid
from jaxrnn.models.lm import *  # noqa: F403  (re-export: the public names, listed in lm.__all__)
from jaxrnn.models.ngram import KneserNey
from jaxrnn.models.tagger import Tagger, TaggerParams
from jaxrnn.models.window import WindowLM, WindowParams
from jaxrnn.sequence import pool

#: Submodules that import flax when loaded: imported on first access.
_LAZY = ("nnx",)

def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"jaxrnn.models.{name}")
    raise AttributeError(f"module 'jaxrnn.models' has no attribute {name!r}")


__all__ = [
    "lm",
    *lm.__all__,
    "Batch",
    "BiLM",
    "BiLMParams",
    "Classifier",
    "ClassifierParams",
    "DenseParams",
    "KneserNey",
    "MixParams",
    "Tagger",
    "TaggerParams",
    "WindowLM",
    "WindowParams",
    "bilm",
    "classifier",
    "common",
    "masked_accuracy",
    "masked_cross_entropy",
    "ngram",
    "pool",
    "reverse_valid",
    "scalar_mix",
    "tagger",
    "window",
]
