"""Feature selection: vectorised univariate Cox vs lifelines/scikit-survival, correlation
filter keeps the outcome-associated twin, invalid columns named, train-only fitting."""
import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi

from netsurv.features.select import (
    CorrelationFilter,
    DropInvalid,
    UnivariateCoxSelector,
    univariate_cox,
)

FEATS = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


@pytest.fixture(scope="module")
def rossi():
    return load_rossi()


@pytest.fixture(scope="module")
def lifelines_stats(rossi):
    rows = {}
    for f in FEATS:
        s = CoxPHFitter().fit(rossi[[f, "week", "arrest"]], "week", "arrest").summary.loc[f]
        rows[f] = {"coef": s["coef"], "se": s["se(coef)"], "z": s["z"], "p": s["p"]}
    return pd.DataFrame(rows).T


def test_univariate_cox_matches_lifelines_efron(rossi, lifelines_stats):
    st = univariate_cox(rossi[FEATS], (rossi.week, rossi.arrest))
    assert st["converged"].all()
    for col in ("coef", "se", "z", "p"):
        np.testing.assert_allclose(st[col], lifelines_stats[col], atol=1e-4, err_msg=col)


def test_univariate_cox_breslow_matches_sksurv_and_structured_y(rossi):
    sk = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv
    y = Surv.from_arrays(rossi.arrest.astype(bool), rossi.week)
    st = univariate_cox(rossi[FEATS], y, ties="breslow")
    for f in FEATS:
        ref = sk.CoxPHSurvivalAnalysis(ties="breslow").fit(rossi[[f]], y).coef_[0]
        assert st.loc[f, "coef"] == pytest.approx(ref, abs=1e-6)
    pd.testing.assert_frame_equal(univariate_cox(rossi[FEATS], y),
                                  univariate_cox(rossi[FEATS], (rossi.week, rossi.arrest)))


def test_univariate_cox_constant_and_separating_columns():
    rng = np.random.default_rng(0)
    t = rng.exponential(size=60)
    e = np.ones(60, int)
    X = pd.DataFrame({"const": 1.0, "sep": -t, "x": rng.normal(size=60)})  # sep: perfect order
    st = univariate_cox(X, (t, e))
    assert st.loc["const", "coef"] == 0 and st.loc["const", "p"] == 1
    assert not st.loc["sep", "converged"] and st.loc["x", "converged"]
    assert np.isfinite(st[["coef", "z", "p"]].to_numpy()).all()
    assert st.loc["sep", "z"] > 5                         # score test: strongly prognostic
    with pytest.warns(UserWarning, match=r"did not converge for \['sep'\]"):
        sel = UnivariateCoxSelector(k=1, min_events_per_feature=None).fit(X, (t, e))
    assert sel.selected_ == ["sep"]


def test_univariate_selector_ranks_like_lifelines(rossi, lifelines_stats):
    sel = UnivariateCoxSelector(k=3).fit(rossi[FEATS], (rossi.week, rossi.arrest))
    top3 = lifelines_stats["z"].abs().sort_values(ascending=False).index[:3]
    assert set(sel.selected_) == set(top3) == {"prio", "age", "wexp"}
    assert sel.selected_ == [f for f in FEATS if f in top3]          # input order
    np.testing.assert_allclose(sel.scores_, lifelines_stats["z"].abs(), atol=1e-4)
    np.testing.assert_allclose(sel.pvalues_, lifelines_stats["p"], atol=1e-4)
    assert list(sel.transform(rossi).columns) == sel.selected_
    assert sel.get_support().sum() == 3
    for k in ("all", 50):
        assert UnivariateCoxSelector(k=k).fit(rossi[FEATS], (rossi.week, rossi.arrest)) \
            .selected_ == FEATS
    with pytest.raises(ValueError, match="k must be"):
        UnivariateCoxSelector(k=0).fit(rossi[FEATS], (rossi.week, rossi.arrest))


def test_events_per_feature_warning(rossi):
    sub = rossi.iloc[:60]
    n_ev = int(sub.arrest.sum())
    with pytest.warns(UserWarning, match=f"too few events per feature: {n_ev} events for 3 "
                                         "features"):
        UnivariateCoxSelector(k=3).fit(sub[FEATS], (sub.week, sub.arrest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnivariateCoxSelector(k=3).fit(rossi[FEATS], (rossi.week, rossi.arrest))  # 114 events


def _survival(signal, rng, n):
    t = rng.exponential(np.exp(-signal))
    c = rng.exponential(2.0, n)
    return np.minimum(t, c), (t <= c).astype(int)


def test_correlation_filter_keeps_outcome_associated_twin():
    rng = np.random.default_rng(1)
    n = 200
    true = rng.normal(size=n)
    y = _survival(1.2 * true, rng, n)
    X = pd.DataFrame({
        "twin_noisy": true + 0.3 * rng.normal(size=n),   # r ~ 0.96 with its twin, less prognostic
        "twin_true": true,
        "other": rng.normal(size=n),
        "exp_true": np.exp(3 * true),                    # monotone in true: Spearman 1, Pearson < 0.9
    })
    cf = CorrelationFilter(threshold=0.9).fit(X, y)
    # the twin listed first is the weaker one: it must be the one dropped
    assert cf.scores_["twin_true"] > cf.scores_["twin_noisy"] > cf.scores_["exp_true"]
    assert cf.columns_ == ["twin_true", "other"]
    assert cf.dropped_ == {"twin_noisy": "twin_true", "exp_true": "twin_true"}
    pe = CorrelationFilter(threshold=0.9, method="pearson").fit(X, y)
    assert pe.columns_ == ["twin_true", "other", "exp_true"]
    # column order does not matter; other rows get the training selection
    rev = CorrelationFilter(threshold=0.9).fit(X[X.columns[::-1]], y)
    assert rev.columns_ == ["other", "twin_true"] and rev.dropped_ == cf.dropped_
    assert list(cf.transform(X.iloc[:10]).columns) == cf.columns_


def test_correlation_filter_greedy_chain():
    # a ~ b (r ~ .7), b ~ c (r ~ .7), a !~ c; a most prognostic -> keep a, drop b, keep c
    rng = np.random.default_rng(2)
    n = 300
    a, c = rng.normal(size=n), rng.normal(size=n)
    X = pd.DataFrame({"b": (a + c) / np.sqrt(2), "c": c, "a": a})
    y = _survival(1.5 * a, rng, n)
    cf = CorrelationFilter(threshold=0.6, method="pearson").fit(X, y)
    assert cf.scores_.idxmax() == "a"
    assert cf.columns_ == ["c", "a"] and cf.dropped_ == {"b": "a"}


def test_drop_invalid_names_columns_and_fits_on_train_only():
    X = pd.DataFrame({
        "ok": [1.0, 2.0, 3.0, 4.0],
        "part_nan": [1.0, np.nan, 3.0, 4.0],
        "const": [5.0, 5.0, 5.0, 5.0],
        "const_nan": [5.0, np.nan, 5.0, np.nan],
        "all_nan": [np.nan] * 4,
        "inf": [1.0, np.inf, 2.0, 3.0],
        "text": list("abcd"),
    })
    with pytest.warns(UserWarning) as rec:
        d = DropInvalid().fit(X.iloc[:4])
    msg = str(rec[0].message)
    for c in ("const", "const_nan", "all_nan", "inf", "text"):
        assert repr(c) in msg
    assert "'ok'" not in msg and "'part_nan'" not in msg
    assert d.columns_ == ["ok", "part_nan"]
    assert d.dropped_ == {"const": "constant", "const_nan": "constant", "all_nan": "all-NaN",
                          "inf": "non-finite (inf)", "text": "non-numeric"}
    test = X.assign(const=[1.0, 2.0, 3.0, 4.0])          # valid in test rows: still dropped
    assert list(d.transform(test).columns) == ["ok", "part_nan"]
    with pytest.raises(KeyError, match="part_nan"):
        d.transform(X[["ok"]])


def test_selectors_fit_on_train_only_and_reject_nan(rossi):
    train, test = rossi.iloc[:300], rossi.iloc[300:]
    sel = UnivariateCoxSelector(k=2).fit(train[FEATS], (train.week, train.arrest))
    ref = univariate_cox(train[FEATS], (train.week, train.arrest))
    np.testing.assert_allclose(sel.scores_, ref["z"].abs())
    assert list(sel.transform(test).columns) == sel.selected_
    assert list(sel.transform(test).index) == list(test.index)
    bad = train[FEATS].copy()
    bad.iloc[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in feature column\(s\) \['age'\]"):
        UnivariateCoxSelector().fit(bad, (train.week, train.arrest))
    with pytest.raises(ValueError, match="tuple"):
        UnivariateCoxSelector().fit(train[FEATS], train.week)
