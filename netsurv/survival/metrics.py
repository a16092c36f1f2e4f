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
    try:
        return float(concordance_index(time, -risk, event))
    except ZeroDivisionError:  # lifelines' message names no cause
        raise MetricError(f"no comparable pair among {len(time)} patients (every event time is "
                          "at or after every other follow-up): the C-index is undefined; use a "
                          "larger test set") from None


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


# --- IPCW metrics -------------------------------------------------------------------------------
# scikit-survival estimates the censoring distribution G on the *training* split and fails
# ("censoring survival function is zero") whenever a test time lies at or beyond the last training
# time. For evaluation times t below that limit, a test patient followed beyond the limit only ever
# enters as "still at risk at t", never with its own weight 1/G(T_i), so moving its time to just
# below the limit changes no term of Uno's C, the cumulative/dynamic AUC or the Brier score. That is
# what `_clip_to_followup` does; evaluation times themselves are restricted to the range where G > 0.

def _surv(time, event):
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, float))


def followup_limit(train_time) -> float:
    """Largest time at which IPCW weights from the training split are defined (exclusive)."""
    return float(np.max(np.asarray(train_time, float)))


def _clip_to_followup(test_time, limit):
    below = np.nextafter(limit, -np.inf)
    return np.minimum(np.asarray(test_time, float), below)


def default_eval_times(train_time, test_time, test_event, n: int = 10) -> np.ndarray:
    """Evaluation grid: quantiles 10–80 % of test event times, inside the test follow-up and the
    training follow-up (where the IPCW weights exist)."""
    test_time = np.asarray(test_time, float)
    ev = test_time[np.asarray(test_event).astype(bool)]
    if len(ev) == 0:
        raise MetricError("no events in the test split: time-dependent metrics are undefined")
    lo = max(test_time.min(), ev.min())
    hi = min(followup_limit(train_time), test_time.max())
    times = np.unique(np.quantile(ev, np.linspace(0.1, 0.8, n)))
    times = times[(times >= lo) & (times < hi)]
    if len(times) == 0:
        raise MetricError("no evaluation time lies inside both the training and test follow-up")
    return times


def uno_cindex(train_time, train_event, test_time, test_event, risk, tau: float | None = None) -> float:
    """Uno's IPCW C-index truncated at ``tau`` (default: the training follow-up limit)."""
    from sksurv.metrics import concordance_index_ipcw

    test_time, test_event, risk = _check(test_time, test_event, risk)
    limit = followup_limit(train_time)
    tau = limit if tau is None else min(float(tau), limit)
    tt = _clip_to_followup(test_time, limit)
    return float(concordance_index_ipcw(_surv(train_time, train_event), _surv(tt, test_event),
                                        risk, tau=np.nextafter(tau, -np.inf))[0])


def td_auc(train_time, train_event, test_time, test_event, risk, times=None):
    """Cumulative/dynamic AUC(t) (Uno / Hung–Chiang); returns (times, auc(t), mean AUC)."""
    from sksurv.metrics import cumulative_dynamic_auc

    test_time, test_event, risk = _check(test_time, test_event, risk)
    if times is None:
        times = default_eval_times(train_time, test_time, test_event)
    limit = followup_limit(train_time)
    times = np.asarray(times, float)
    if (times >= limit).any():
        raise MetricError(f"evaluation times {times[times >= limit].tolist()} are at or beyond the "
                          f"training follow-up ({limit:g}); IPCW weights are undefined there")
    tt = _clip_to_followup(test_time, limit)
    auc, mean_auc = cumulative_dynamic_auc(_surv(train_time, train_event), _surv(tt, test_event),
                                           risk, times)
    return times, np.asarray(auc, float), float(mean_auc)


def integrated_brier(train_time, train_event, test_time, test_event, surv_fn, times=None):
    """Integrated Brier score of predicted survival curves.

    ``surv_fn(times) -> array [n_test, len(times)]`` gives S(t | x) for the test patients.
    """
    from sksurv.metrics import integrated_brier_score

    test_time = np.asarray(test_time, float)
    if times is None:
        times = default_eval_times(train_time, test_time, test_event)
    times = np.asarray(times, float)
    if len(times) < 2:
        raise MetricError("the integrated Brier score needs at least two evaluation times")
    limit = followup_limit(train_time)
    tt = _clip_to_followup(test_time, limit)
    est = np.asarray(surv_fn(times), float)
    if np.isnan(est).any():
        raise MetricError("predicted survival contains NaN")
    return float(integrated_brier_score(_surv(train_time, train_event), _surv(tt, test_event),
                                        est, times))


def bootstrap_ci(metric, time, event, risk, *, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(time, event, risk)`` over patients of one test set.

    Resamples where the metric is undefined (no event, no comparable pair) are skipped.
    """
    time, event, risk = _check(time, event, risk)
    rng = np.random.default_rng(seed)
    n = len(time)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if event[idx].sum() == 0:
            continue
        try:
            vals.append(metric(time[idx], event[idx], risk[idx]))
        except MetricError:
            continue
    if not vals:
        raise MetricError("bootstrap: the metric is undefined on every resample")
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
