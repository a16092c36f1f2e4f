"""Deep training helpers, now in :mod:`netsurv.evaluation.deep` (kept importable here)."""
from __future__ import annotations

from netsurv.evaluation.deep import ImagingSteps, build_net, survival_fn

__all__ = ["ImagingSteps", "build_net", "survival_fn"]
