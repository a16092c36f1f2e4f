"""IPCW metrics against independent hand-written references (G from lifelines' KM of censoring),
including the case scikit-survival cannot handle: test times beyond the training follow-up."""
import numpy as np
import pytest
from lifelines import KaplanMeierFitter

from netsurv.survival.metrics import (
    MetricError,
    bootstrap_ci,
    harrell_cindex,
    integrated_brier,
    td_auc,
    uno_cindex,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    ttr = np.round(rng.exponential(30, 80), 1)
    etr = (rng.random(80) < 0.6).astype(int)
    tte = np.round(rng.exponential(30, 40), 1)
    ete = (rng.random(40) < 0.6).astype(int)
    tte[:3] = ttr.max() + 5          # beyond the training follow-up: sksurv alone fails here
    ete[:2] = 1
    risk = -tte / 30 + rng.normal(0, 1, 40)
    km = KaplanMeierFitter().fit(ttr, 1 - etr)
    G = lambda t: km.survival_function_at_times(np.atleast_1d(t)).to_numpy()  # noqa: E731
    return ttr, etr, tte, ete, risk, G


def test_uno_matches_reference(data):
    ttr, etr, tte, ete, risk, G = data

    def ref(tau):
        num = den = 0.0
        for i in range(len(tte)):
            if not ete[i] or tte[i] >= tau:
                continue
            w = 1 / G(tte[i])[0] ** 2
            for j in range(len(tte)):
                if tte[i] < tte[j]:
                    den += w
                    num += w * (1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0)
        return num / den

    assert uno_cindex(ttr, etr, tte, ete, risk, tau=50.0) == pytest.approx(ref(50.0), abs=1e-12)
    assert uno_cindex(ttr, etr, tte, ete, risk) == pytest.approx(ref(ttr.max()), abs=1e-12)


def test_uno_equals_harrell_without_censoring():
    rng = np.random.default_rng(0)
    t = rng.permutation(np.arange(1.0, 31.0))
    risk = -t + rng.normal(0, 8, 30)
    ttr = np.arange(1.0, 41.0)
    assert uno_cindex(ttr, np.ones(40), t, np.ones(30), risk, tau=np.inf) == pytest.approx(
        harrell_cindex(t, np.ones(30), risk))


def test_td_auc_matches_reference(data):
    ttr, etr, tte, ete, risk, G = data

    def ref(t):
        cases = np.where((tte <= t) & (ete == 1))[0]
        ctrl = tte > t
        w = 1 / G(tte[cases])
        num = sum(wi * ((risk[c] > risk[ctrl]).sum() + 0.5 * (risk[c] == risk[ctrl]).sum())
                  for wi, c in zip(w, cases))
        return num / (w.sum() * ctrl.sum())

    times, auc, _ = td_auc(ttr, etr, tte, ete, risk)
    assert times.max() < ttr.max()
    np.testing.assert_allclose(auc, [ref(t) for t in times], atol=1e-12)
    with pytest.raises(MetricError, match="beyond the training follow-up"):
        td_auc(ttr, etr, tte, ete, risk, times=[10.0, ttr.max() + 1])


def test_integrated_brier_matches_reference(data):
    ttr, etr, tte, ete, risk, G = data
    lam = 1 / 30 * np.exp(risk - risk.mean())

    def surv(times):
        return np.exp(-np.outer(lam, times))

    times = np.linspace(5, 40, 8)
    S = surv(times)
    bs = []
    for k, t in enumerate(times):
        died = (tte <= t) & (ete == 1)
        alive = tte > t
        gi = np.ones(len(tte))
        gi[died] = G(tte[died])
        bs.append(np.mean(np.where(died, S[:, k] ** 2 / gi, 0) + np.where(alive, (1 - S[:, k]) ** 2 / G(t)[0], 0)))
    ref = np.trapezoid(bs, times) / (times[-1] - times[0])
    assert integrated_brier(ttr, etr, tte, ete, surv, times) == pytest.approx(ref, abs=1e-12)


def test_bootstrap_ci_brackets_estimate(data):
    _, _, tte, ete, risk, _ = data
    lo, hi = bootstrap_ci(harrell_cindex, tte, ete, risk, n_boot=300, seed=0)
    c = harrell_cindex(tte, ete, risk)
    assert lo < c < hi and 0.1 < hi - lo < 0.5
    assert bootstrap_ci(harrell_cindex, tte, ete, risk, n_boot=300, seed=0) == (lo, hi)


# --------------------------------------------------------------- invalid inputs are refused -----
def _calls(data):
    ttr, etr, tte, ete, risk, _ = data
    return {
        "harrell_cindex": lambda t, e, r: harrell_cindex(t, e, r),
        "uno_cindex": lambda t, e, r: uno_cindex(ttr, etr, t, e, r),
        "td_auc": lambda t, e, r: td_auc(ttr, etr, t, e, r),
        "integrated_brier": lambda t, e, r: integrated_brier(
            ttr, etr, t, e, lambda times: np.tile(1 / (1 + np.exp(r))[:, None], len(times))),
        "bootstrap_ci": lambda t, e, r: bootstrap_ci(harrell_cindex, t, e, r, n_boot=20),
    }


CASES = [("risk_inf", "infinite"), ("risk_nan", "NaN"), ("event_2", "0 \\(censored\\) or 1"),
         ("event_text", "0 \\(censored\\) or 1"), ("time_negative", "negative"),
         ("time_inf", "non-finite"), ("time_nan", "non-finite")]


# integrated_brier takes survival curves, not risks: its risk cases do not apply
@pytest.mark.parametrize("name, case, match", [
    (name, case, match)
    for name in ("harrell_cindex", "uno_cindex", "td_auc", "integrated_brier", "bootstrap_ci")
    for case, match in CASES if not (name == "integrated_brier" and case.startswith("risk"))])
def test_metrics_reject_invalid_values(data, name, case, match):
    _, _, tte, ete, risk, _ = data
    t, e, r = tte.copy(), ete.astype(object), risk.copy()
    what, bad = case.split("_", 1)
    if what == "risk":
        r[5] = {"inf": np.inf, "nan": np.nan}[bad]
    elif what == "event":
        e[5] = {"2": 2, "text": "dead"}[bad]
    else:
        t[5] = {"negative": -1.0, "inf": np.inf, "nan": np.nan}[bad]
    # today (before the fix) inf risks gave 0.5 or a raw scikit-learn error, event 2 counted as an
    # event, negative times went through
    with pytest.raises(MetricError, match=match):
        _calls(data)[name](t, e, r)


def test_training_split_is_checked_too(data):
    ttr, etr, tte, ete, risk, _ = data
    bad_t, bad_e = ttr.copy(), etr.copy()
    bad_t[0], bad_e[1] = np.inf, 3
    with pytest.raises(MetricError, match="train_time has 1 non-finite"):
        uno_cindex(bad_t, etr, tte, ete, risk)
    with pytest.raises(MetricError, match="train_event must be 0 \\(censored\\) or 1"):
        td_auc(ttr, bad_e, tte, ete, risk)


def test_survival_curves_must_be_finite_and_shaped(data):
    ttr, etr, tte, ete, _, _ = data

    def nan_surv(times):
        s = np.full((40, len(times)), 0.5)
        s[3, 1] = np.nan
        return s

    with pytest.raises(MetricError, match="1 NaN or infinite"):
        integrated_brier(ttr, etr, tte, ete, nan_surv)
    with pytest.raises(MetricError, match="shape"):
        integrated_brier(ttr, etr, tte, ete, lambda times: np.full((len(times), 40), 0.5))


def test_bool_and_float_events_are_accepted(data):
    ttr, etr, tte, ete, risk, _ = data
    c = harrell_cindex(tte, ete, risk)
    assert harrell_cindex(tte, ete.astype(bool), risk) == c
    assert harrell_cindex(tte, ete.astype(float), risk) == c
    assert uno_cindex(ttr, etr.astype(bool), tte, ete.astype(float), risk) == pytest.approx(
        uno_cindex(ttr, etr, tte, ete, risk))
