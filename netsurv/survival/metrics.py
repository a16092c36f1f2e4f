"""Survival metrics with one risk convention: higher ``risk`` means an earlier event."""
from __future__ import annotations

import numpy as np
from lifelines.utils import concordance_index
from scipy import stats


class MetricError(ValueError):
    pass


def _check(time, event, risk):
    time = np.asarray(time, float)
    event = np.asarray(event).astype(int)
    risk = np.asarray(risk, float)
    if not (len(time) == len(event) == len(risk)):
        raise MetricError(f"time, event, risk lengths differ: {len(time)}, {len(event)}, {len(risk)}")
    if np.isnan(risk).any():
        raise MetricError(f"risk has {int(np.isnan(risk).sum())} NaN value(s); the model "
                          "produced invalid predictions (check for diverged training)")
    if event.sum() == 0:
        raise MetricError("all patients are censored: the C-index is undefined without events")
    return time, event, risk


def harrell_cindex(time, event, risk) -> float:
    """Harrell's C. lifelines scores *survival-like* predictions, so the risk is negated once here.

    Tied risks count 1/2; pairs tied in time are not comparable unless only one has the event.
    """
    time, event, risk = _check(time, event, risk)
    return float(concordance_index(time, -risk, event))


def mean_ci(values, level: float = 0.95) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std and a t-interval over per-split estimates.

    Splits of one cohort overlap, so this interval is optimistic; it is what the founding study
    reports (mean over seeds) with its spread made explicit.
    """
    v = np.asarray(values, float)
    m = float(v.mean())
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if len(v) < 2:
        return m, sd, (m, m)
    h = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * sd / np.sqrt(len(v)))
    return m, sd, (m - h, m + h)
