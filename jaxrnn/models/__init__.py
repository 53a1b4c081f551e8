"""Models built on :class:`jaxrnn.Stack`: the recurrent language model (:mod:`jaxrnn.models.lm`).

Every public name of :mod:`jaxrnn.models.lm` is here too (``LanguageModel``,
``LMParams``, ``generate``, ``loss``, ``make_train_step``, ...).

Example:
  >>> from jaxrnn.models import LanguageModel, generate
  >>> model = LanguageModel(vocab_size=50, cell=jaxrnn.LSTM(128))
"""

from jaxrnn.models import lm
from jaxrnn.models.lm import *  # noqa: F403  (re-export: the public names, listed in lm.__all__)

__all__ = ["lm", *lm.__all__]
