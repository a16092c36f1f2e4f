import json

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_rossi
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from netsurv.report.results import results_table
from netsurv.survival.coxnet import CoxNet, breslow_loglik


@pytest.fixture(scope="module")
def rossi():
    r = load_rossi()
    X = r.drop(columns=["week", "arrest"]).astype(float)
    return (X - X.mean()) / X.std(), r.week.to_numpy(float), r.arrest.to_numpy()


def test_breslow_loglik_matches_quadratic_reference(rossi):
    X, t, e = rossi
    eta = X.to_numpy() @ np.linspace(-0.3, 0.3, X.shape[1])
    ref = sum(e[i] * (eta[i] - np.log(np.exp(eta[t >= t[i]]).sum())) for i in range(len(t)))
    assert breslow_loglik(eta, t, e) == pytest.approx(ref, rel=1e-12)


def test_coxnet_fixed_alpha_matches_sksurv(rossi):
    X, t, e = rossi
    ours = CoxNet(l1_ratio=0.7, alpha=0.02).fit(X, Surv.from_arrays(e.astype(bool), t))
    ref = CoxnetSurvivalAnalysis(l1_ratio=0.7, alphas=[0.02]).fit(X.to_numpy(), Surv.from_arrays(e.astype(bool), t))
    np.testing.assert_allclose(ours.coef_, ref.coef_[:, 0], atol=1e-8)
    np.testing.assert_allclose(ours.predict(X), X.to_numpy() @ ref.coef_[:, 0], atol=1e-8)
    S = ours.predict_survival(X.iloc[:5], [5, 20, 40])
    assert S.shape == (5, 3) and (np.diff(S, axis=1) <= 0).all() and ((S > 0) & (S <= 1)).all()


@pytest.mark.parametrize("metric", ["cindex", "deviance"])
def test_coxnet_alpha_chosen_on_path_by_inner_cv(rossi, metric):
    X, t, e = rossi
    m = CoxNet(l1_ratio=0.5, cv_metric=metric).fit(X, Surv.from_arrays(e.astype(bool), t))
    path = CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=100, alpha_min_ratio=0.01).fit(
        X.to_numpy(), Surv.from_arrays(e.astype(bool), t))
    assert m.alpha_ in path.alphas_ and len(m.cv_scores_) == len(path.alphas_)
    eligible = np.abs(path.coef_).sum(axis=0) > 0
    assert m.alpha_ == path.alphas_[int(np.argmax(np.where(eligible, m.cv_scores_, -np.inf)))]
    assert np.abs(m.coef_).sum() > 0


def test_coxnet_path_for_the_inner_search(rossi):
    """alpha_path = sksurv's path of all rows (eligible = non-empty fit); path_coefs = sksurv's fit
    along given penalties, one column per penalty even where glmnet ends the path early."""
    X, t, e = rossi
    y = Surv.from_arrays(e.astype(bool), t)
    m = CoxNet(l1_ratio=0.5)
    alphas, eligible = m.alpha_path(X.to_numpy(), t, e)
    ref = CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=100, alpha_min_ratio=0.01).fit(X.to_numpy(), y)
    np.testing.assert_allclose(alphas, ref.alphas_)
    np.testing.assert_array_equal(eligible, np.abs(ref.coef_).sum(axis=0) > 0)
    assert not eligible[0] and eligible[-1]
    rows = np.arange(0, len(t), 2)
    weak = np.concatenate([alphas, alphas[-1] * np.logspace(-1, -6, 20)])  # far past the path's end
    coefs = m.path_coefs(X.to_numpy()[rows], t[rows], e[rows], weak)
    fold = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=weak, max_iter=100_000).fit(
        X.to_numpy()[rows], y[rows])
    n = fold.coef_.shape[1]
    assert coefs.shape == (X.shape[1], len(weak))
    np.testing.assert_allclose(coefs[:, :n], fold.coef_, atol=1e-10)
    np.testing.assert_allclose(coefs[:, n:], np.repeat(fold.coef_[:, -1:], len(weak) - n, axis=1))


def test_results_table(tmp_path):
    for i, (exp, harm, ep, c) in enumerate([("seed/radiomics", "none", "os", 0.61),
                                             ("seed/radiomics", "none", "pfs", 0.63),
                                             ("seed/radiomics", "combat", "os", 0.62),
                                             ("clinical", "none", "os", 0.70)]):
        d = tmp_path / str(i)
        d.mkdir()
        d.joinpath("metrics.json").write_text(json.dumps({
            "experiment": exp, "harmonize": harm, "endpoint": ep, "protocol": "holdout",
            "n_patients": 80, "n_events": 40,
            "cindex": {"mean": c, "ci95": [c - 0.05, c + 0.05]},
            "oracle_cindex": {"mean": 0.78}}))
    wide = results_table(tmp_path)
    assert list(wide.columns) == ["OS C-index (95% CI)", "PFS C-index (95% CI)"]
    assert wide.loc["seed/radiomics", "PFS C-index (95% CI)"] == "0.630 (0.580–0.680)"
    assert wide.loc["seed/radiomics + combat", "OS C-index (95% CI)"] == "0.620 (0.570–0.670)"
    md = (tmp_path / "results.md").read_text()
    assert "| clinical | 0.700 (0.650–0.750) | – |" in md and "OS 0.780" in md
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4
