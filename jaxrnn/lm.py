"""``jaxrnn.lm``: the language model under its first name; it lives in :mod:`jaxrnn.models.lm`.

Every public name of :mod:`jaxrnn.models.lm` is here too (``jaxrnn.lm.generate``,
``jaxrnn.lm.make_train_step``, ...), the same objects.

Example:
  >>> from jaxrnn import lm
  >>> model = lm.LanguageModel(vocab_size=50, cell=jaxrnn.LSTM(128))
"""

from jaxrnn.models.lm import *  # noqa: F403  (re-export: the public names, listed in models.lm.__all__)
from jaxrnn.models.lm import __all__  # noqa: F401
