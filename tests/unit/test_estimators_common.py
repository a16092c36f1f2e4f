"""Checks every scikit-learn / scikit-survival estimator of netsurv passes (in the spirit of
scikit-survival's ``tests/test_common.py``): cloning, parameters, fitting without side effects,
NotFittedError, pickling, the survival prediction API, and agreement of the Cox models with
independent implementations on real data shipped with scikit-survival (WHAS500)."""
from __future__ import annotations

import ast
import copy
import inspect
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sksurv.datasets import load_whas500
from sksurv.functions import StepFunction
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

import netsurv
from netsurv.features.clinical import ClinicalEncoder
from netsurv.features.harmonize import ComBat
from netsurv.features.select import CorrelationFilter, DropInvalid, UnivariateCoxSelector
from netsurv.features.tabular import TableScaler
from netsurv.models.classical import ClassicalPipeline, ImagingBlock
from netsurv.survival.cox import CoxPH
from netsurv.survival.coxnet import CoxNet

NUM = ["age", "bmi", "hr", "sysbp", "diasbp", "los"]
LABS = ["bmi", "hr", "sysbp", "diasbp", "los"]


# ------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Data:
    num: pd.DataFrame          # numeric features
    clin: pd.DataFrame         # clinical table (numeric + categorical)
    frames: dict               # the classical pipeline's input tables
    meta: pd.DataFrame         # acquisition table (ComBat batches)
    y: np.ndarray              # structured survival outcome


def _load() -> Data:
    X, y_raw = load_whas500()
    X = X.copy()
    X.index = pd.Index([f"P{i:03d}" for i in range(len(X))], name="patient_id")
    meta = pd.DataFrame({"scanner": np.array(["A", "B", "C"])[np.arange(len(X)) % 3]},
                        index=X.index)
    num = X[NUM].astype(float)
    clin = X[["age", "bmi", "gender", "cvd"]].copy()
    labs = X[LABS].astype(float) + (meta.scanner == "B").to_numpy()[:, None] * 0.5
    y = Surv.from_arrays(y_raw["fstat"].astype(bool), y_raw["lenfol"].astype(float))
    return Data(num, clin, {"clinical": X[["age", "gender"]].copy(), "labs": labs}, meta, y)


DATA = _load()


@dataclass(frozen=True)
class Case:
    make: Callable[[], BaseEstimator]
    data: str                  # "num", "clin" or "frames"
    needs_y: bool = False
    meta: bool = False         # ComBat batches passed as meta=
    predictor: bool = False    # survival predictor (else transformer)


CASES = {
    "CoxPH": Case(lambda: CoxPH(penalizer=0.1), "num", needs_y=True, predictor=True),
    "CoxNet": Case(lambda: CoxNet(l1_ratio=0.5, alpha=0.05), "num", needs_y=True,
                   predictor=True),
    "ClassicalPipeline": Case(
        lambda: ClassicalPipeline(
            clinical_encoder=ClinicalEncoder(["age"], ["gender"]),
            imaging={"labs": ImagingBlock(harmonizer=ComBat(), corr_threshold=0.9)},
            model=CoxNet(l1_ratio=0.5, alpha=0.05), k=3),
        "frames", needs_y=True, meta=True, predictor=True),
    "ComBat": Case(lambda: ComBat(batch_col="scanner"), "num", meta=True),
    "ImagingBlock": Case(lambda: ImagingBlock(harmonizer=ComBat(), corr_threshold=0.5), "num",
                         needs_y=True, meta=True),
    "ClinicalEncoder": Case(lambda: ClinicalEncoder(["age", "bmi"], ["gender", "cvd"]), "clin"),
    "TableScaler": Case(TableScaler, "num"),
    "DropInvalid": Case(DropInvalid, "num"),
    "CorrelationFilter": Case(lambda: CorrelationFilter(threshold=0.5), "num", needs_y=True),
    "UnivariateCoxSelector": Case(lambda: UnivariateCoxSelector(k=3), "num", needs_y=True),
}
PREDICTORS = [name for name, c in CASES.items() if c.predictor]


def _X(case: Case):
    return getattr(DATA, case.data)


def _fit(est, case: Case):
    kw = {"meta": DATA.meta} if case.meta else {}
    return est.fit(_X(case), DATA.y, **kw)


def _output(est, case: Case) -> np.ndarray:
    kw = {"meta": DATA.meta} if case.meta else {}
    if case.predictor:
        return np.asarray(est.predict(_X(case), **kw))
    return np.asarray(est.transform(_X(case), **kw), float)


@pytest.fixture(scope="module")
def fitted():
    """One fitted estimator per case (tests that fit themselves use fresh ones)."""
    return {name: _fit(case.make(), case) for name, case in CASES.items()}


def _same_params(a, b) -> bool:
    """Equal parameters, comparing nested estimators by type and parameters."""
    if isinstance(a, BaseEstimator) or isinstance(b, BaseEstimator):
        if type(a) is not type(b):
            return False
        pa, pb = a.get_params(deep=False), b.get_params(deep=False)
        return pa.keys() == pb.keys() and all(_same_params(pa[k], pb[k]) for k in pa)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_params(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_params(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _nested_estimators(est):
    """The estimators among ``est``'s parameters (dict values included)."""
    for v in est.get_params(deep=False).values():
        for w in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(w, BaseEstimator):
                yield w
                yield from _nested_estimators(w)


# ------------------------------------------------------------------------------- coverage
def _estimator_classes() -> set[str]:
    """Public classes in netsurv's sources that derive (transitively) from BaseEstimator."""
    bases: dict[str, set[str]] = {}
    for path in Path(netsurv.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                                    for b in node.bases}
    found, grew = {"BaseEstimator"}, True
    while grew:
        new = {c for c, bs in bases.items() if bs & found} - found
        found |= new
        grew = bool(new)
    return {c for c in found if c != "BaseEstimator" and not c.startswith("_")}


def test_every_netsurv_estimator_is_covered():
    assert _estimator_classes() <= set(CASES), sorted(_estimator_classes() - set(CASES))


# ------------------------------------------------------------------------------- params
@pytest.mark.parametrize("name", CASES)
def test_clone_gives_equal_params(name):
    est = CASES[name].make()
    twin = clone(est)
    assert twin is not est and type(twin) is type(est)
    assert _same_params(twin, est)
    assert _same_params(clone(CASES[name].make()), type(est)(**est.get_params(deep=False)))


@pytest.mark.parametrize("name", CASES)
def test_get_set_params_round_trip(name):
    est = CASES[name].make()
    shallow = est.get_params(deep=False)
    ref = clone(est)
    assert est.set_params(**est.get_params(deep=True)) is est
    assert _same_params(est, ref)
    # __init__ stores its arguments unchanged (what clone relies on)
    rebuilt = type(est)(**shallow)
    for k, v in shallow.items():
        assert getattr(rebuilt, k) is v


@pytest.mark.parametrize("name", CASES)
def test_fit_returns_self_and_keeps_params(name):
    case = CASES[name]
    est = case.make()
    before = clone(est)
    assert _fit(est, case) is est
    assert _same_params(est, before)
    for sub in _nested_estimators(est):      # nested estimators are cloned, never fitted
        assert not [a for a in vars(sub) if a.endswith("_") and not a.startswith("_")], sub


@pytest.mark.parametrize("name", CASES)
def test_unfitted_use_raises_not_fitted_error(name):
    case = CASES[name]
    with pytest.raises(NotFittedError):
        _output(case.make(), case)


@pytest.mark.parametrize("name", CASES)
def test_pickled_estimator_reproduces_its_output(name, fitted):
    case = CASES[name]
    est = fitted[name]
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(_output(again, case), _output(est, case))


@pytest.mark.parametrize("name", CASES)
def test_fit_does_not_modify_its_inputs(name):
    case = CASES[name]
    X, y, meta = _X(case), DATA.y, DATA.meta
    X0, y0, meta0 = copy.deepcopy(X), y.copy(), meta.copy()
    _fit(case.make(), case)
    if isinstance(X, dict):
        assert X.keys() == X0.keys()
        for k in X:
            pd.testing.assert_frame_equal(X[k], X0[k])
    else:
        pd.testing.assert_frame_equal(X, X0)
    np.testing.assert_array_equal(y, y0)
    pd.testing.assert_frame_equal(meta, meta0)


@pytest.mark.parametrize("name", ["ComBat", "ImagingBlock"])
def test_meta_is_keyword_only(name):
    """Inside a scikit-learn pipeline ``y`` is passed positionally: it can never become meta."""
    est = CASES[name].make()
    for method in ("fit", "transform", "fit_transform"):
        params = inspect.signature(getattr(est, method)).parameters
        assert params["meta"].kind is inspect.Parameter.KEYWORD_ONLY, method
    with pytest.raises(TypeError):
        est.fit(DATA.num, DATA.y, DATA.meta)


# ---------------------------------------------------------------------------- predictors
@pytest.mark.parametrize("name", PREDICTORS)
def test_predict_and_score(name, fitted):
    case = CASES[name]
    est = fitted[name]
    kw = {"meta": DATA.meta} if case.meta else {}
    risk = est.predict(_X(case), **kw)
    assert risk.shape == (len(DATA.y),) and np.isfinite(risk).all()
    want = concordance_index_censored(DATA.y["event"], DATA.y["time"], risk)[0]
    assert est.score(_X(case), DATA.y, **kw) == want
    assert 0.6 < want < 0.9                            # age alone predicts WHAS500 deaths


@pytest.mark.parametrize("name", PREDICTORS)
def test_survival_functions(name, fitted):
    case = CASES[name]
    est = fitted[name]
    kw = {"meta": DATA.meta} if case.meta else {}
    X = _X(case)
    fns = est.predict_survival_function(X, **kw)
    assert len(fns) == len(DATA.y) and all(isinstance(f, StepFunction) for f in fns)
    model = est.model_ if hasattr(est, "model_") and not hasattr(est, "coef_") else est
    grid = model.unique_times_
    arr = est.predict_survival_function(X, return_array=True, **kw)
    assert arr.shape == (len(DATA.y), len(grid))
    np.testing.assert_allclose(arr[:20], np.vstack([f(grid) for f in fns[:20]]), atol=1e-12)
    assert np.all((arr >= 0) & (arr <= 1)) and np.all(np.diff(arr, axis=1) <= 1e-12)
    # the metrics' interface agrees with the step functions
    times = np.quantile(grid, [0.0, 0.1, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(est.predict_survival(X, times, **kw),
                               np.vstack([f(times) for f in fns]), atol=1e-12)
    # higher risk, lower survival
    risk = est.predict(X, **kw)
    hi, lo = int(np.argmax(risk)), int(np.argmin(risk))
    assert np.all(arr[hi] <= arr[lo] + 1e-12)
    chf = est.predict_cumulative_hazard_function(X, return_array=True, **kw)
    np.testing.assert_allclose(np.exp(-chf), arr, rtol=1e-10, atol=1e-12)


def test_fit_rejects_a_malformed_target():
    with pytest.raises(ValueError, match="Surv.from_arrays"):
        CoxNet(alpha=0.05).fit(DATA.num, DATA.y["time"])
    with pytest.raises(ValueError, match="one entry per row"):
        CoxPH().fit(DATA.num, DATA.y[:-1])
    with pytest.raises(ValueError, match="survival target"):
        CoxPH().fit(DATA.num, None)


# ------------------------------------------------------- agreement with other implementations
def test_coxph_agrees_with_lifelines_and_sksurv():
    from lifelines import CoxPHFitter
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    X = DATA.num
    ours = CoxPH(penalizer=0.0).fit(X, DATA.y)
    df = X.assign(T=DATA.y["time"], E=DATA.y["event"].astype(int))
    ll = CoxPHFitter().fit(df, "T", "E")
    np.testing.assert_allclose(ours.predict(X), X.to_numpy() @ ll.params_[NUM].to_numpy(),
                               rtol=1e-10, atol=1e-10)
    sk = CoxPHSurvivalAnalysis(alpha=0.0, ties="efron").fit(X.to_numpy(), DATA.y)
    np.testing.assert_allclose(ours.coef_, sk.coef_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.predict(X), sk.predict(X.to_numpy()), rtol=1e-4, atol=1e-4)
    assert ours.score(X, DATA.y) == pytest.approx(sk.score(X.to_numpy(), DATA.y), abs=1e-4)


def test_coxnet_agrees_with_sksurv_coxnet():
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    X = (DATA.num - DATA.num.mean()) / DATA.num.std()
    ours = CoxNet(l1_ratio=0.7, alpha=0.03).fit(X, DATA.y)
    ref = CoxnetSurvivalAnalysis(l1_ratio=0.7, alphas=[0.03], fit_baseline_model=True).fit(
        X.to_numpy(), DATA.y)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X.to_numpy()), rtol=1e-8,
                               atol=1e-8)
    np.testing.assert_allclose(ours.predict_survival_function(X.iloc[:10], return_array=True),
                               ref.predict_survival_function(X.to_numpy()[:10],
                                                             return_array=True), atol=1e-8)


def test_estimators_compose_in_a_sklearn_pipeline():
    pipe = make_pipeline(DropInvalid(), TableScaler(), UnivariateCoxSelector(k=4),
                         CoxNet(alpha=0.05)).fit(DATA.num, DATA.y)
    assert 0.6 < pipe.score(DATA.num, DATA.y) < 0.9
    assert clone(pipe).get_params()["coxnet__alpha"] == 0.05
