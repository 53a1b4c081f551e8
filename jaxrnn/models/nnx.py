"""flax NNX modules around the functional tagger, classifier and biLM of :mod:`jaxrnn.models`.

Each module holds a functional configuration (:class:`jaxrnn.models.Tagger`,
:class:`~jaxrnn.models.Classifier`, :class:`~jaxrnn.models.BiLM`) and its
parameters, every array in an ``nnx.Param`` (as :class:`jaxrnn.nnx.StackRNN`
does for a Stack), and calls the functional ``apply``/``loss``: the outputs
are the functional core's, with the same parameters. Dropout is on unless
``deterministic`` (``model.eval()``, ``nnx.view(model, deterministic=True)``
or the call's flag); masks come from the ``dropout`` stream of ``rngs``
(else its ``default`` stream).

Example:
  >>> from flax import nnx
  >>> import jaxrnn.models.nnx as mnnx
  >>> config = jaxrnn.models.Tagger(9, jaxrnn.Stack(jaxrnn.LSTM(32), bidirectional=True, dropout=0.2,
  ...                                               num_layers=2), input_size=16, vocab_size=100)
  >>> tagger = mnnx.Tagger(config, rngs=nnx.Rngs(0))
  >>> logits = tagger(tokens, lengths)                     # (B, T, 9), dropout on
  >>> tagger.eval(); logits = tagger(tokens, lengths)      # dropout off
  >>> grads = nnx.grad(lambda m: m.loss(batch))(tagger)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrnn.models.bilm import BiLM as BiLMConfig
from jaxrnn.models.classifier import Classifier as ClassifierConfig
from jaxrnn.models.tagger import Tagger as TaggerConfig
from jaxrnn.nnx import box_params, unbox_params

__all__ = ["BiLM", "Classifier", "ModelModule", "Tagger"]


class ModelModule(nnx.Module):
    """The shared part: a functional model's configuration and boxed parameters, and the dropout stream.

    Args:
      model: the functional configuration (an instance of ``config_type``).
      rngs: ``nnx.Rngs``; ``params`` initialises (unless ``params`` is given),
        ``dropout`` (else ``default``) draws dropout masks.
      params: use these parameters instead of initialising (checked by ``model.check_params``).
      param_dtype: dtype of initialised parameters.
      deterministic: disable dropout.

    Attributes:
      model: the configuration.
      params: the model's parameter NamedTuple, arrays held in ``nnx.Param``.
    """

    config_type: type = object

    def __init__(
        self,
        model,
        *,
        rngs: Optional[nnx.Rngs] = None,
        params: Any = None,
        param_dtype=jnp.float32,
        deterministic: bool = False,
    ):
        if not isinstance(model, self.config_type):
            raise TypeError(f"model: expected a jaxrnn.models.{self.config_type.__name__}, got {type(model).__name__}")
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs: expected nnx.Rngs, got {type(rngs).__name__}")
        if params is None:
            if rngs is None:
                raise TypeError("rngs: expected nnx.Rngs to initialise parameters, got None")
            params = model.init(rngs.params(), param_dtype)
        else:
            model.check_params(params)
        self.model = model
        self.deterministic = bool(deterministic)
        self.params = nnx.data(box_params(params))
        stream = None
        if self.uses_dropout and rngs is not None:
            stream = (rngs.dropout if "dropout" in rngs else rngs.default).fork()
        self.rngs = nnx.data(stream)

    @property
    def uses_dropout(self) -> bool:
        """Whether the model has any dropout."""
        return self.model.stack.uses_dropout

    def get_params(self):
        """The current parameters as the functional model's plain NamedTuple."""
        return unbox_params(self.params)

    def set_view(self, deterministic: Optional[bool] = None):
        """Hook for ``nnx.view``: ``deterministic=True`` disables dropout."""
        if deterministic is not None:
            self.deterministic = deterministic

    def dropout_key(self, deterministic: Optional[bool] = None):
        """A fresh dropout key, or ``None`` when dropout is off (``deterministic`` overrides the attribute)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or not self.uses_dropout:
            return None
        if self.rngs is None:
            raise ValueError(
                "rngs: dropout is on (deterministic=False) but the module was built without nnx.Rngs; "
                "pass rngs= at construction or call with deterministic=True"
            )
        return self.rngs()

    def loss(self, batch, *, deterministic: Optional[bool] = None) -> jax.Array:
        """The functional ``model.loss(params, batch)``, with a dropout key unless deterministic."""
        return self.model.loss(self.get_params(), batch, dropout_key=self.dropout_key(deterministic))


class SequenceModule(ModelModule):
    """A tagger or classifier: ``module(inputs, seq_lengths)`` is ``model.apply(params, inputs, seq_lengths)``."""

    def __call__(self, inputs, seq_lengths=None, *, deterministic: Optional[bool] = None) -> jax.Array:
        """Logits: ``(B, T, C)`` for the tagger, ``(B, C)`` for the classifier.

        Args:
          inputs: ``(B, T)`` token ids or ``(B, T, F)`` features (per the configuration).
          seq_lengths: ``(B,)`` valid lengths, or ``None``.
          deterministic: overrides the attribute for this call.
        """
        return self.model.apply(self.get_params(), inputs, seq_lengths, dropout_key=self.dropout_key(deterministic))

    def accuracy(self, batch) -> jax.Array:
        """The functional ``model.accuracy(params, batch)`` (no dropout)."""
        return self.model.accuracy(self.get_params(), batch)


class Tagger(SequenceModule):
    """:class:`jaxrnn.models.Tagger` as an NNX module; arguments as :class:`ModelModule`.

    Example:
      >>> tagger = Tagger(config, rngs=nnx.Rngs(0))
      >>> logits = tagger(tokens, lengths)  # (B, T, C)
    """

    config_type = TaggerConfig


class Classifier(SequenceModule):
    """:class:`jaxrnn.models.Classifier` as an NNX module; arguments as :class:`ModelModule`.

    Example:
      >>> clf = Classifier(config, rngs=nnx.Rngs(0))
      >>> logits = clf(tokens, lengths)  # (B, C)
    """

    config_type = ClassifierConfig


class BiLM(ModelModule):
    """:class:`jaxrnn.models.BiLM` with its scalar mix as an NNX module.

    ``module(tokens, seq_lengths)`` is ``model.embed_contextual(params, mix, tokens, seq_lengths)``.

    Args:
      model, rngs, params, param_dtype, deterministic: as :class:`ModelModule`.
      mix: the :class:`~jaxrnn.models.MixParams` to start from (``model.init_mix()`` by default).

    Attributes:
      mix: the scalar mix's ``MixParams``, arrays held in ``nnx.Param``.

    Example:
      >>> elmo = BiLM(jaxrnn.models.BiLM(100, jaxrnn.LSTM(32)), rngs=nnx.Rngs(0))
      >>> feats = elmo(tokens, lengths)  # (B, T, 64)
    """

    config_type = BiLMConfig

    def __init__(self, model, *, mix: Any = None, **kwargs):
        super().__init__(model, **kwargs)
        mix = model.init_mix(kwargs.get("param_dtype", jnp.float32)) if mix is None else mix
        self.mix = nnx.data(box_params(mix))

    @property
    def uses_dropout(self) -> bool:
        """Whether the biLM has dropout (``model.dropout > 0``)."""
        return self.model.dropout > 0

    def get_mix(self):
        """The current scalar mix as a plain ``MixParams``."""
        return unbox_params(self.mix)

    def representations(self, tokens, seq_lengths=None, *, deterministic: Optional[bool] = None):
        """``model.representations(params, tokens, seq_lengths)``: ``L + 1`` arrays ``(B, T, 2H)``."""
        key = self.dropout_key(deterministic)
        return self.model.representations(self.get_params(), tokens, seq_lengths, dropout_key=key)

    def __call__(self, tokens, seq_lengths=None, *, deterministic: Optional[bool] = None) -> jax.Array:
        """The scalar mix ``(B, T, 2H)`` of the representations of ``tokens`` ``(B, T)``."""
        key = self.dropout_key(deterministic)
        return self.model.embed_contextual(self.get_params(), self.get_mix(), tokens, seq_lengths, dropout_key=key)
