"""Experiments that reproduce the lectures' claims: ``jaxrnn experiment NAME [--config small|full]``.

Each experiment is a module of this package with ``CONFIGS`` (``"small"``:
seconds, what the tests run; ``"full"``: the real run) and
``run(config, seed, out) -> Outcome``. :func:`run_experiment` runs one,
writes ``out/NAME.json`` (the record: ``experiment``, ``config`` — every
setting —, ``seed``, ``device``, ``versions``, ``seconds``, ``results``,
``figures``) beside its PNG figures and returns the record.

``import jaxrnn`` does not import this package (its figures need matplotlib).

Example:
  >>> from jaxrnn import experiments
  >>> record = experiments.run_experiment("exercises", "small", seed=0, out="out/exp")
  >>> record["results"]["parameter_counts"]["count_params"]["lstm"]
  1574912
"""

from __future__ import annotations

import importlib
import json
import os
import time

from jaxrnn.checks import check_index, check_one_of
from jaxrnn.experiments.common import environment

__all__ = ["CONFIG_NAMES", "EXPERIMENTS", "load", "run_experiment"]

#: Experiment name -> (module, what it reproduces).
EXPERIMENTS = {
    "exercises": ("jaxrnn.experiments.exercises", "the lecture exercises, computed and checked"),
    "dependency-length": ("jaxrnn.experiments.dependency_length", "accuracy against dependency length ℓ per cell"),
    "counting": ("jaxrnn.experiments.counting", "LSTM vs GRU on a^n b^n (c^n): which one counts"),
    "clipping": ("jaxrnn.experiments.clipping", "an exploding Elman RNN trained with and without clipping"),
    "initialisation": ("jaxrnn.experiments.initialisation", "orthogonal/Gaussian/IRNN/forget-bias initialisations"),
    "attention-path": ("jaxrnn.experiments.attention_path", "gradient from ℓ tokens back: RNNs vs one attention layer"),
    "depth": ("jaxrnn.experiments.depth", "2/4/8-layer stacks with no, residual, dense and highway connections"),
    "interpret": ("jaxrnn.experiments.interpret", "character-LSTM cells that track quotes, line position, indentation"),
}
CONFIG_NAMES = ("small", "full")


def load(name: str):
    """The module of experiment ``name``."""
    check_one_of("name", name, tuple(EXPERIMENTS))
    return importlib.import_module(EXPERIMENTS[name][0])


def run_experiment(name: str, config: str = "small", *, seed: int = 0, out: str = os.path.join("out", "experiments")):
    """Run experiment ``name`` with configuration ``config``; write ``out/NAME.json`` and its figures.

    Returns:
      The record written (a dict), with the printed table under ``"table"``
      (not written to the JSON).
    """
    module = load(name)
    check_one_of("config", config, CONFIG_NAMES)
    seed = check_index(seed, "seed", minimum=0)
    settings = dict(module.CONFIGS[config])
    start = time.perf_counter()
    outcome = module.run(settings, seed, out)
    seconds = time.perf_counter() - start
    record = {"experiment": name, "config": {"name": config, **settings}, "seed": seed, **environment(),
              "seconds": seconds, "results": outcome.results, "figures": list(outcome.figures)}  # fmt: skip
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, allow_nan=True)
        f.write("\n")
    return {**record, "table": outcome.table}
