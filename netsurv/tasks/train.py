"""Training task: ``python scripts/train.py experiment=<name> [overrides]``.

The work is done by :mod:`netsurv.evaluation` (the runner and its classical / deep
split-fitters); this module keeps the task's entry points.
"""
from __future__ import annotations

from netsurv.evaluation.classical import build_pipeline
from netsurv.evaluation.inputs import acquisition_meta, make_harmonizer, modality_frames
from netsurv.evaluation.runner import is_deep, run, sweep_objective

__all__ = ["run", "sweep_objective", "is_deep", "modality_frames", "acquisition_meta",
           "make_harmonizer", "build_pipeline"]
