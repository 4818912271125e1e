"""The experiments of cdg_jax: grids of runs, benchmarks, analyses.

Not part of the installed package (pyproject.toml packages `cdg_jax` only):
a checkout's experiments run as modules from the repository root, where the
checkout's `cdg_jax` and `experiments` come first on the import path:

  python -m experiments.grids.run_grid --grid=smoke

  accelerator/  the accelerator protocol and the data it reads
  analysis/     diagnostics of trained runs (kNN vs linear, feature norms,
                gates forced open)
  benchmarks/   speed: the train step, sparse execution, the PyTorch peer,
                XLA levers, profiles, processes, data and gs:// workdirs
  common/       what several of them share: the result record
                (`records.py`), train-step timing, the checkout's paths
  grids/        the grids of runs, their runner and report, and the
                rendering of the docs' tables from result records
  maintenance/  the behaviour fingerprint of refactors, the conversion of
                old results to records
  results/      dated result records (never rewritten)

experiments/README.md lists the old `python experiments/X.py` commands and
their new names.
"""
