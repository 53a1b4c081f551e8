"""jaxrnn's benchmark suite.

Times jaxrnn's implementations (``impl="reference"``, ``"xla"``, ``"pallas"``)
against peers (flax linen and nnx, equinox, ``jax.experimental.rnn``'s cuDNN
LSTM, PyTorch) on named configuration grids, and writes JSON, a markdown table
and a plot under ``<out>/<device>/``.

Example:
  $ python -m benchmarks --suite smoke --out /tmp/bench
  $ jaxrnn bench --suite cpu --out benchmarks/results

See ``benchmarks/README.md`` for the suites, the method and running the GPU
suites on the device machine.
"""

from benchmarks.suites import SUITES, Case, Suite, Sweep, get_suite

__all__ = ["SUITES", "Case", "Suite", "Sweep", "get_suite"]
