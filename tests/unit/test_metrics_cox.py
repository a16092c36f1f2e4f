import numpy as np
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from netsurv.survival.cox import CoxPH
from netsurv.survival.metrics import MetricError, harrell_cindex, mean_ci


def test_harrell_golden_with_ties():
    # hand count: comparable pairs (i has event, t_i < t_j): (0,1),(0,2),(0,3),(2,3); t tie (1,2)
    # with event only at 2 -> comparable as well: (2,1)
    time = np.array([1.0, 3.0, 3.0, 5.0])
    event = np.array([1, 0, 1, 0])
    risk = np.array([4.0, 1.0, 2.0, 2.0])
    # (0,1) conc, (0,2) conc, (0,3) conc, (2,3) tie in risk -> 0.5, (2,1) conc -> 4.5 / 5
    assert harrell_cindex(time, event, risk) == pytest.approx(4.5 / 5)
    sk = concordance_index_censored(event.astype(bool), time, risk)[0]
    assert harrell_cindex(time, event, risk) == pytest.approx(sk)


def test_metric_errors():
    with pytest.raises(MetricError, match="all patients are censored"):
        harrell_cindex([1, 2], [0, 0], [0.1, 0.2])
    with pytest.raises(MetricError, match="NaN"):
        harrell_cindex([1, 2], [1, 0], [np.nan, 0.2])


def test_mean_ci_t_interval():
    m, sd, (lo, hi) = mean_ci([0.6, 0.7, 0.8])
    assert m == pytest.approx(0.7) and sd == pytest.approx(0.1)
    assert hi - m == pytest.approx(4.302652729911275 * 0.1 / np.sqrt(3))
    assert mean_ci([0.6]) == (0.6, 0.0, (0.6, 0.6))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_mean_ci_rejects_non_finite_values(bad):
    # today NaN passed through silently: mean NaN and a NaN interval in metrics.json
    with pytest.raises(MetricError, match="1 of 3 value\\(s\\) are NaN or infinite"):
        mean_ci([0.6, bad, 0.8])
    with pytest.raises(MetricError, match="no values"):
        mean_ci([])


def test_harrell_rejects_inf_risk_bad_event_and_negative_time():
    t, e, r = [1.0, 2.0, 3.0], [1, 0, 1], [0.3, 0.2, 0.1]
    assert harrell_cindex(t, e, r) == 1.0
    with pytest.raises(MetricError, match="infinite"):        # gave 0.5 before
        harrell_cindex(t, e, [np.inf, 0.2, 0.1])
    with pytest.raises(MetricError, match="0 \\(censored\\) or 1"):  # event 2 counted
        harrell_cindex(t, [2, 0, 1], r)
    with pytest.raises(MetricError, match="negative"):
        harrell_cindex([-1.0, 2.0, 3.0], e, r)


def test_coxph_matches_lifelines_and_drops_constant_columns():
    rossi = load_rossi()
    X = rossi.drop(columns=["week", "arrest"]).astype(float)
    X["const"] = 1.0
    with pytest.warns(UserWarning, match=r"constant column\(s\).*\['const'\]"):
        m = CoxPH(penalizer=0.0).fit(X, Surv.from_arrays(rossi.arrest.astype(bool), rossi.week))
    ref = CoxPHFitter().fit(rossi, "week", "arrest")
    np.testing.assert_allclose(m.coef_, ref.params_[m.columns_].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(m.predict(X), X[m.columns_].to_numpy() @ m.coef_)


def test_coxph_survival_matches_breslow_on_its_linear_predictor():
    """CoxPH.predict_survival (so model=coxph runs get an integrated Brier score) equals
    scikit-survival's Breslow estimator on the same linear predictor (rossi, real data)."""
    from lifelines.datasets import load_rossi
    from sksurv.linear_model.coxph import BreslowEstimator

    rossi = load_rossi()
    X = rossi.drop(columns=["week", "arrest"])
    m = CoxPH(penalizer=0.0).fit(X, Surv.from_arrays(rossi.arrest.astype(bool), rossi.week))
    times = np.array([5.0, 20.0, 35.0, 50.0])
    got = m.predict_survival(X.iloc[:40], times)
    assert got.shape == (40, 4) and np.all(np.diff(got, axis=1) <= 0)
    lp = m.predict(X)
    br = BreslowEstimator().fit(lp, rossi.arrest.to_numpy().astype(bool), rossi.week.to_numpy())
    want = np.vstack([f(times) for f in br.get_survival_function(lp[:40])])
    np.testing.assert_allclose(got, want, atol=1e-6)
