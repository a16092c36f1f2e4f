"""Reports of finished runs.

- :mod:`.html`: the self-contained ``report.html`` of a run.
- :mod:`.figures`: the report's figures (time-dependent AUC, Brier curves, calibration,
  hazard-ratio forest plot, feature selection frequency, predicted vs true risk).
- :mod:`.km`: Kaplan–Meier curves of test risk groups.
- :mod:`.heatmap`: ``attention.h5`` (its format is in that module's docstring), attention
  heatmaps and tile galleries.
- :mod:`.results`: the results table of a sweep (``results.md`` / ``results.csv``) and its Hydra
  callback.
"""
