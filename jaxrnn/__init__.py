"""jaxrnn: recurrent networks in JAX, as pure functions with fused kernels.

Example:
  >>> import jax, jax.numpy as jnp, jaxrnn
  >>> cell = jaxrnn.LSTM(64)
  >>> params = cell.init(jax.random.key(0), 16)
  >>> ys, carry = jaxrnn.rnn(cell, params, jnp.ones((8, 100, 16)))
"""

import importlib.util as _util
import os as _os
import sys as _sys


def _map_source_kernels():
    """Make ``jaxrnn.kernels`` importable from a source checkout.

    ``kernels/`` sits at the repository's top level; pyproject's package-dir
    installs it as ``jaxrnn.kernels`` (wheel and editable installs). When this
    package is imported straight from a checkout instead (the repository root on
    ``sys.path``), register that folder under the same name.
    """
    if "jaxrnn.kernels" in _sys.modules or _os.path.isdir(_os.path.join(__path__[0], "kernels")):
        return
    for finder in _sys.meta_path:  # an editable install maps it already
        find = getattr(finder, "find_spec", None)
        if find is not None and type(finder).__name__ != "PathFinder":
            try:
                if find("jaxrnn.kernels", __path__) is not None:
                    return
            except Exception:  # noqa: BLE001  (foreign finders may reject the call)
                continue
    folder = _os.path.join(_os.path.dirname(__path__[0]), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if _os.path.isfile(init):
        spec = _util.spec_from_file_location("jaxrnn.kernels", init, submodule_search_locations=[folder])
        module = _util.module_from_spec(spec)
        _sys.modules["jaxrnn.kernels"] = module
        spec.loader.exec_module(module)


from jaxrnn.cells import (  # noqa: E402
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
from jaxrnn.interop import (  # noqa: E402
    carry_from_flax,
    carry_from_torch,
    carry_to_flax,
    carry_to_torch,
    from_flax,
    from_torch,
)
from jaxrnn.lm import LanguageModel, LMParams  # noqa: E402
from jaxrnn.runner import IMPLS, rnn  # noqa: E402
from jaxrnn.stack import HighwayParams, LayerParams, Stack  # noqa: E402
from jaxrnn import analysis  # noqa: E402

_map_source_kernels()

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "IMPLS",
    "LSTM",
    "Carry",
    "Cell",
    "Elman",
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
    "carry_from_flax",
    "carry_from_torch",
    "carry_to_flax",
    "carry_to_torch",
    "count_params",
    "from_flax",
    "from_torch",
    "rnn",
]
