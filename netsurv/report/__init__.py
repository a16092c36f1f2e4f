"""Reports of finished runs.

- :mod:`.html`: the self-contained ``report.html`` of a run.
- :mod:`.figures`: the report's figures (time-dependent AUC, Brier curves, calibration,
  hazard-ratio forest plot, feature selection frequency, predicted vs true risk).
- :mod:`.km`: Kaplan–Meier curves of test risk groups.
- :mod:`.heatmap`: attention heatmaps and tile galleries from a run's ``attention.h5``
  (format, reader and writer in :mod:`netsurv.evaluation.attention`).
- :mod:`.results`: the results table of a sweep (``results.md`` / ``results.csv``) and its Hydra
  callback.
"""
