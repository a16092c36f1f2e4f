"""Survival metrics with one risk convention: higher ``risk`` means an earlier event."""
from __future__ import annotations

import numpy as np
from lifelines.utils import concordance_index
from scipy import stats


class MetricError(ValueError):
    """A metric cannot be computed from these inputs (invalid values or undefined metric)."""


def _times(time, what: str = "time") -> np.ndarray:
    try:
        t = np.asarray(time, float).reshape(-1)
    except (TypeError, ValueError):
        raise MetricError(f"{what} must be numbers") from None
    bad = ~np.isfinite(t)
    if bad.any():
        raise MetricError(f"{what} has {int(bad.sum())} non-finite value(s) (NaN or inf), first "
                          f"at position {int(np.flatnonzero(bad)[0])}; follow-up times must be "
                          "finite")
    if (t < 0).any():
        i = int(np.flatnonzero(t < 0)[0])
        raise MetricError(f"{what} has {int((t < 0).sum())} negative value(s), first {t[i]:g} at "
                          f"position {i}; follow-up times are >= 0")
    return t


def _events(event, what: str = "event") -> np.ndarray:
    e = np.asarray(event).reshape(-1)
    if e.dtype == bool:
        return e.astype(int)
    try:
        ef = e.astype(float)
    except (TypeError, ValueError):
        raise MetricError(f"{what} must be 0 (censored) or 1 (event); found "
                          f"{sorted({str(v) for v in e})[:5]}") from None
    bad = ~np.isin(ef, (0.0, 1.0))
    if bad.any():
        raise MetricError(f"{what} must be 0 (censored) or 1 (event); found "
                          f"{sorted({str(v) for v in e[bad]})[:5]} at {int(bad.sum())} "
                          f"position(s), first {int(np.flatnonzero(bad)[0])}")
    return ef.astype(int)


def _risks(risk, what: str = "risk") -> np.ndarray:
    try:
        r = np.asarray(risk, float).reshape(-1)
    except (TypeError, ValueError):
        raise MetricError(f"{what} must be numbers") from None
    nan, inf = np.isnan(r), np.isinf(r)
    if nan.any() or inf.any():
        raise MetricError(f"{what} has {int(nan.sum())} NaN and {int(inf.sum())} infinite "
                          "value(s); the model produced invalid predictions (check for diverged "
                          "training)")
    return r


def _check(time, event, risk):
    time, event, risk = _times(time), _events(event), _risks(risk)
    if not (len(time) == len(event) == len(risk)):
        raise MetricError(f"time, event, risk lengths differ: {len(time)}, {len(event)}, {len(risk)}")
    if event.sum() == 0:
        raise MetricError("all patients are censored: the C-index is undefined without events")
    return time, event, risk


def _check_train(train_time, train_event):
    t, e = _times(train_time, "train_time"), _events(train_event, "train_event")
    if len(t) != len(e):
        raise MetricError(f"train_time, train_event lengths differ: {len(t)}, {len(e)}")
    if len(t) == 0:
        raise MetricError("the training split is empty")
    return t, e


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


def cindex_or_none(time, event, risk) -> float | None:
    """Harrell's C, or None where it is undefined (no comparable pair): for summaries and
    model choices that must go on without it."""
    try:
        return harrell_cindex(time, event, risk)
    except MetricError:
        return None


def mean_ci(values, level: float = 0.95) -> tuple[float, float, tuple[float, float]]:
    """Mean, sample std and a t-interval over per-split estimates.

    Splits of one cohort overlap, so this interval is optimistic; it is what the founding study
    reports (mean over seeds) with its spread made explicit.
    """
    v = np.asarray(values, float).reshape(-1)
    if len(v) == 0:
        raise MetricError("mean_ci: no values")
    if not np.isfinite(v).all():
        raise MetricError(f"mean_ci: {int((~np.isfinite(v)).sum())} of {len(v)} value(s) are NaN "
                          "or infinite (a split whose metric could not be computed?)")
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
    train_time, train_event = _check_train(train_time, train_event)
    limit = followup_limit(train_time)
    tau = limit if tau is None else min(float(tau), limit)
    tt = _clip_to_followup(test_time, limit)
    return float(concordance_index_ipcw(_surv(train_time, train_event), _surv(tt, test_event),
                                        risk, tau=np.nextafter(tau, -np.inf))[0])


def td_auc(train_time, train_event, test_time, test_event, risk, times=None):
    """Cumulative/dynamic AUC(t) (Uno / Hung–Chiang); returns (times, auc(t), mean AUC)."""
    from sksurv.metrics import cumulative_dynamic_auc

    test_time, test_event, risk = _check(test_time, test_event, risk)
    train_time, train_event = _check_train(train_time, train_event)
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

    test_time, test_event = _times(test_time, "test_time"), _events(test_event, "test_event")
    if len(test_time) != len(test_event):
        raise MetricError(f"test_time, test_event lengths differ: {len(test_time)}, "
                          f"{len(test_event)}")
    train_time, train_event = _check_train(train_time, train_event)
    if times is None:
        times = default_eval_times(train_time, test_time, test_event)
    times = np.asarray(times, float)
    if len(times) < 2:
        raise MetricError("the integrated Brier score needs at least two evaluation times")
    limit = followup_limit(train_time)
    tt = _clip_to_followup(test_time, limit)
    est = np.asarray(surv_fn(times), float)
    if est.shape != (len(test_time), len(times)):
        raise MetricError(f"predicted survival has shape {est.shape}, expected "
                          f"{(len(test_time), len(times))} (test patients x times)")
    if not np.isfinite(est).all():
        raise MetricError(f"predicted survival has {int((~np.isfinite(est)).sum())} NaN or "
                          "infinite value(s)")
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


def paired_bootstrap(metric, time, event, risk_a, risk_b, *, n_boot: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of ``metric(a) - metric(b)`` with both models scored on the *same*
    resampled patients (a paired comparison: the patients' shared difficulty cancels).

    Draws exactly as :func:`bootstrap_ci` with the same ``seed`` (one ``rng.integers(0, n, n)``
    per replicate), so replicate ``b`` resamples the patients that replicate of the model's own
    CI did. A replicate where the metric is undefined (no event, no comparable pair) is NaN.
    """
    time, event, risk_a = _check(time, event, risk_a)
    risk_b = _risks(risk_b, "risk_b")
    if len(risk_b) != len(time):
        raise MetricError(f"risk_a, risk_b lengths differ: {len(risk_a)}, {len(risk_b)}")
    rng = np.random.default_rng(seed)
    n = len(time)
    out = np.full(n_boot, np.nan)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        if event[idx].sum() == 0:
            continue
        try:
            out[b] = (metric(time[idx], event[idx], risk_a[idx])
                      - metric(time[idx], event[idx], risk_b[idx]))
        except MetricError:
            continue
    return out


def combine_paired(replicates, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean over splits of a paired difference: replicate ``b`` of the
    combined statistic is the mean over splits of each split's replicate ``b``
    (:func:`paired_bootstrap`); replicates undefined in some split are dropped.

    Each split's test patients are resampled on their own, so the interval reflects the
    test-patient sampling of every split, not the variation between training splits.
    """
    M = np.vstack([np.asarray(r, float).reshape(-1) for r in replicates])
    ok = np.isfinite(M).all(axis=0)
    if not ok.any():
        raise MetricError("paired bootstrap: no replicate is defined in every split")
    mean = M[:, ok].mean(axis=0)
    a = (1 - level) / 2
    return float(np.quantile(mean, a)), float(np.quantile(mean, 1 - a))


def km_null_survival(train_time, train_event):
    """``surv_fn(times) -> [n, len(times)]`` factory of the null model: the training split's
    Kaplan–Meier curve given to every test patient (what a model's IBS must beat).

    Returns ``null(n)``, a function of the number of test patients giving that ``surv_fn``.
    """
    from lifelines import KaplanMeierFitter

    t, e = _check_train(train_time, train_event)
    km = KaplanMeierFitter().fit(t, e)

    def null(n: int):
        def surv_fn(times):
            s = km.survival_function_at_times(np.asarray(times, float)).to_numpy(float)
            return np.tile(s, (int(n), 1))
        return surv_fn
    return null


def brier_curve(train_time, train_event, test_time, test_event, surv_fn, times) -> np.ndarray:
    """IPCW Brier score BS(t) at ``times`` (scikit-survival ``brier_score``), with the inputs
    treated as in :func:`integrated_brier`, whose value is the trapezoidal mean of this curve."""
    from sksurv.metrics import brier_score

    train_time, train_event = _check_train(train_time, train_event)
    test_time, test_event = _times(test_time, "test_time"), _events(test_event, "test_event")
    tt = _clip_to_followup(test_time, followup_limit(train_time))
    times = np.asarray(times, float)
    est = np.asarray(surv_fn(times), float)
    _, bs = brier_score(_surv(train_time, train_event), _surv(tt, test_event), est, times)
    return np.asarray(bs, float)
