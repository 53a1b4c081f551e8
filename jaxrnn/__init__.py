"""jaxrnn: recurrent networks in JAX, as pure functions with fused kernels.

Example:
  >>> import jax, jax.numpy as jnp, jaxrnn
  >>> cell = jaxrnn.LSTM(64)
  >>> params = cell.init(jax.random.key(0), 16)
  >>> ys, carry = jaxrnn.rnn(cell, params, jnp.ones((8, 100, 16)))
"""

import importlib as _importlib

try:  # kernels/ is installed as jaxrnn.kernels (pyproject's package-dir); a bare checkout lacks it
    import jaxrnn.kernels  # noqa: F401
except ModuleNotFoundError as _error:  # pragma: no cover - exercised by the packaging test
    if _error.name != "jaxrnn.kernels":
        raise
    raise ImportError(
        "jaxrnn.kernels is missing: jaxrnn was imported from a source checkout that is not installed. "
        "Install it first: python3 -m venv .venv && .venv/bin/pip install -e ."
    ) from None

from jaxrnn.cells import (
    GRU,
    LSTM,
    Carry,
    Cell,
    Elman,
    ElmanParams,
    GRUParams,
    LSTMCarry,
    LSTMParams,
    count_params,
)
from jaxrnn.embedded import Embedded
from jaxrnn.interop import (
    carry_from_flax,
    carry_from_torch,
    carry_to_flax,
    carry_to_torch,
    from_flax,
    from_torch,
    to_flax,
)
from jaxrnn.models import LanguageModel, LMParams
from jaxrnn.runner import IMPLS, rnn
from jaxrnn.sequence import Encoder, EncoderParams, attention_pool, embed, last_valid, pool, sequence_mask
from jaxrnn.stack import HighwayParams, LayerParams, Stack
from jaxrnn import analysis, data, host, models, sequence, tasks, train

#: Submodules that import flax when loaded: imported on first access (``jaxrnn.nnx``), so
#: that ``import jaxrnn`` stays light.
_LAZY = ("linen", "nnx")


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"jaxrnn.{name}")
    raise AttributeError(f"module 'jaxrnn' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "GRU",
    "IMPLS",
    "LSTM",
    "Carry",
    "Cell",
    "Encoder",
    "EncoderParams",
    "Elman",
    "Embedded",
    "ElmanParams",
    "GRUParams",
    "HighwayParams",
    "LSTMCarry",
    "LMParams",
    "LSTMParams",
    "LanguageModel",
    "LayerParams",
    "Stack",
    "analysis",
    "host",
    "attention_pool",
    "carry_from_flax",
    "carry_from_torch",
    "carry_to_flax",
    "carry_to_torch",
    "count_params",
    "data",
    "embed",
    "from_flax",
    "from_torch",
    "last_valid",
    "linen",
    "models",
    "nnx",
    "pool",
    "rnn",
    "sequence",
    "sequence_mask",
    "tasks",
    "to_flax",
    "train",
]
