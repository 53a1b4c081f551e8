"""Studies: one-off measurements that are not suites, run on the suites' harness.

Each study builds its implementations with :mod:`benchmarks.impls`, times
them with :mod:`benchmarks.measure`, records the environment with
:func:`benchmarks.measure.environment` and writes its JSON with
:func:`benchmarks.report.save_json` under ``benchmarks/results/<device>/``.

* :mod:`benchmarks.studies.kernels_cpu`: jaxrnn's CPU backends against flax
  and PyTorch at one size (``python -m benchmarks.studies.kernels_cpu``).
* :mod:`benchmarks.studies.analysis_cost`: the cost of
  ``jaxrnn.analysis.grad_norms_through_time`` against one forward+backward
  pass (``python -m benchmarks.studies.analysis_cost``).
"""
