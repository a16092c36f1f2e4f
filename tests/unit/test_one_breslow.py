"""One Breslow baseline and one evaluation grid (netsurv.survival.breslow / .metrics).

* :class:`Breslow` equals scikit-survival's ``BreslowEstimator`` (whas500) and lifelines'
  baseline (rossi), real data shipped with the packages, to 1e-6; the classical models' own
  library baselines (CoxNet: scikit-survival, CoxPH: lifelines) give the same curves, and so
  does the deep models' survival function;
* a report shows one IBS: for a tiny run scored by the runner's own function
  (:func:`netsurv.evaluation.compare.brier_metrics`), the Brier figure's legend is
  metrics.json's IBS, and the report's recomputation (runs without ``brier_curves.csv``) and its
  td-AUC use metrics.json's grid and reproduce its per-split IBS;
* no module but ``survival/breslow.py`` estimates a Breslow baseline, and none but
  ``survival/metrics.py`` builds an evaluation grid.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from sksurv.util import Surv

from netsurv.survival.breslow import Breslow
from tests.unit.test_report import make_run

PKG = Path(__file__).resolve().parents[2] / "netsurv"


# ----------------------------------------------------------------------------- the estimator
def _whas500():
    from sksurv.datasets import load_whas500

    X, y = load_whas500()
    X = X.select_dtypes("number").astype(float)
    X = (X - X.mean()) / X.std()
    return X, y["lenfol"].astype(float), y["fstat"].astype(bool)


def test_breslow_equals_sksurv_breslow_estimator_on_whas500():
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.linear_model.coxph import BreslowEstimator

    X, time, event = _whas500()
    cox = CoxPHSurvivalAnalysis(alpha=1e-4).fit(X.to_numpy(), Surv.from_arrays(event, time))
    lp = X.to_numpy() @ cox.coef_
    ours = Breslow().fit(lp, time, event)
    ref = BreslowEstimator().fit(lp, event, time)
    np.testing.assert_array_equal(ours.times_, ref.unique_times_)
    # the cumulative baseline hazard, ours of the risk centred on its mean
    np.testing.assert_allclose(ours.cum_hazard_ * np.exp(-ours.centre_),
                               ref.cum_baseline_hazard_.y, rtol=1e-6, atol=1e-12)
    # survival curves at event times, between them and at the last training time
    ev = np.unique(time[event])
    times = np.r_[ev[[0, 5, 40, 90]], ev[[3, 60]] + 0.37, time.max()]
    got = ours.survival(lp[:50], times)
    want = np.vstack([f(times) for f in ref.get_survival_function(lp[:50])])
    np.testing.assert_allclose(got, want, atol=1e-6)
    want_cox = np.vstack([f(times) for f in cox.predict_survival_function(X.to_numpy()[:50])])
    np.testing.assert_allclose(got, want_cox, atol=1e-6)


def test_breslow_is_a_step_function_on_the_whole_axis_and_shift_invariant():
    X, time, event = _whas500()
    lp = X.to_numpy() @ np.linspace(-0.5, 0.5, X.shape[1])
    br = Breslow().fit(lp, time, event)
    first, last = br.times_[0], br.times_[-1]
    s = br.survival(lp[:5], [0.0, np.nextafter(first, 0), last, last + 100.0])
    np.testing.assert_array_equal(s[:, :2], 1.0)                   # H0 = 0 before the first time
    np.testing.assert_array_equal(s[:, 2], s[:, 3])                # constant after the last
    # a network's log-hazards of several hundred: scikit-survival's exp overflows, ours is the
    # same estimate as for the unshifted risk (the baseline absorbs the shift)
    shifted = Breslow().fit(lp + 800.0, time, event).survival(lp[:5] + 800.0, br.times_[::50])
    np.testing.assert_allclose(shifted, br.survival(lp[:5], br.times_[::50]), atol=1e-12)


def test_lifelines_coxph_baseline_is_the_same_breslow_on_rossi():
    from lifelines import CoxPHFitter
    from lifelines.datasets import load_rossi

    from netsurv.survival.cox import CoxPH

    rossi = load_rossi()
    X = rossi.drop(columns=["week", "arrest"]).astype(float)
    cph = CoxPHFitter(penalizer=0.0).fit(rossi, "week", "arrest")
    lp = np.asarray(cph.predict_log_partial_hazard(X), float)       # centred by lifelines
    ours = Breslow().fit(lp, rossi.week, rossi.arrest)
    H0 = cph.baseline_cumulative_hazard_.iloc[:, 0]
    got = ours.cum_baseline_hazard(H0.index.to_numpy(float)) * np.exp(-ours.centre_)
    np.testing.assert_allclose(got, H0.to_numpy(), rtol=1e-6, atol=1e-12)
    # the package's CoxPH keeps lifelines' baseline, evaluated as a step function: the same
    # curves as Breslow on its linear predictor, between event times too
    m = CoxPH(penalizer=0.1).fit(X, Surv.from_arrays(rossi.arrest.astype(bool), rossi.week))
    risk = m.predict(X)
    times = np.array([0.5, 5.0, 9.5, 20.0, 33.3, 47.9, 52.0])
    want = Breslow().fit(risk, rossi.week, rossi.arrest).survival(risk[:40], times)
    np.testing.assert_allclose(m.predict_survival(X.iloc[:40], times), want, atol=1e-6)


def test_coxnet_library_baseline_agrees_with_breslow():
    from netsurv.survival.coxnet import CoxNet

    X, time, event = _whas500()
    m = CoxNet(alpha=0.05).fit(X, Surv.from_arrays(event.astype(bool), time))
    risk = m.predict(X)
    ev = np.unique(time[event])
    times = np.r_[ev[[0, 10, 80]], ev[[20, 100]] + 0.5, time.max()]
    want = Breslow().fit(risk, time, event).survival(risk[:50], times)
    np.testing.assert_allclose(m.predict_survival(X.iloc[:50], times), want, atol=1e-6)


def test_deep_cox_survival_function_is_the_breslow_of_the_shrunk_risks():
    """The deep runs' IBS curves: Breslow on slope * risk of the fit and validation patients;
    they exist beyond the last fit time (scikit-survival's StepFunction raised there)."""
    from netsurv.evaluation.deep import survival_fn

    X, time, event = _whas500()
    risk = X.to_numpy() @ np.linspace(-0.8, 0.8, X.shape[1]) + 3.0
    order = np.argsort(time)
    fit, val, test = order[:300], order[300:400:2], order[401::2]
    fn, slope = survival_fn("cox", risk[:, None], fit, time, event.astype(int), None,
                            val_idx=val)
    assert 0.0 <= slope <= 1.0
    idx = np.r_[fit, val]
    times = np.array([10.0, 200.0, time[fit].max() + 1.0, time.max()])
    want = Breslow().fit(slope * risk[idx], time[idx], event[idx]).survival(slope * risk[test],
                                                                             times)
    np.testing.assert_allclose(fn(test, times), want, atol=1e-12)


# ----------------------------------------------------------------------------- one IBS per report
def _tiny_run(tmp_path, estimator):
    """The report tests' synthetic run (:func:`tests.unit.test_report.make_run`) with its
    predictions, Brier curves and metrics.json replaced by those of ``estimator`` fitted on each
    split, scored by the runner's function (compare.brier_metrics, aggregated as the runner's
    ``_summary``)."""
    from netsurv.cohort.splits import holdout_splits
    from netsurv.evaluation import compare
    from netsurv.evaluation.records import SplitFit
    from netsurv.survival.metrics import mean_ci, td_auc

    run, df = make_run(tmp_path, n=90)
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"age": df.age.astype(float),
                      "score": df.true_risk + rng.normal(0, 0.5, len(df))})
    time, event = df.os_time.to_numpy(float), df.os_event.to_numpy(int)
    data = SimpleNamespace(time=time, event=event)
    preds, curves, per, splits = [], [], {"ibs": {}, "ibs_null": {}, "td_auc": {}}, []
    for sp in holdout_splits(event, seeds=(0, 1, 2), test_size=0.3):
        m = estimator().fit(X.iloc[sp.train], Surv.from_arrays(event[sp.train].astype(bool),
                                                            time[sp.train]))
        risk = m.predict(X)
        role = np.full(len(df), "train", dtype=object)
        role[sp.test] = "test"
        fit = SplitFit(risk=risk, role=role, selected=[], model=m,
                       surv=lambda t, m=m, te=sp.test: m.predict_survival(X.iloc[te], t))
        b, c = compare.brier_metrics(data, sp, fit)
        per["ibs"][sp.name], per["ibs_null"][sp.name] = b["ibs"], b["ibs_null"]
        per["td_auc"][sp.name] = td_auc(time[sp.train], event[sp.train], time[sp.test],
                                        event[sp.test], risk[sp.test])[2]
        curves.append(c.assign(split=sp.name))
        preds.append(pd.DataFrame({"patient_id": df.patient_id, "split": sp.name, "role": role,
                                   "risk": risk}))
        splits.append(sp)
    pd.concat(preds).to_csv(run / "predictions.csv", index=False)
    pd.concat(curves).to_csv(run / "brier_curves.csv", index=False)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for k, v in per.items():
        mean, sd, ci = mean_ci(list(v.values()))
        metrics[k] = {"mean": mean, "std": sd, "ci95": list(ci), "per_split": v}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, df, splits


def _legend(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


@pytest.mark.parametrize("model", ["CoxNet", "CoxPH"])
def test_report_shows_the_ibs_of_metrics_json(tmp_path, model):
    import matplotlib.pyplot as plt

    from netsurv.report import figures as F
    from netsurv.survival.cox import CoxPH
    from netsurv.survival.coxnet import CoxNet
    from netsurv.survival.metrics import default_eval_times

    est = {"CoxNet": lambda: CoxNet(alpha=0.05), "CoxPH": lambda: CoxPH(penalizer=0.1)}[model]
    run, df, splits = _tiny_run(tmp_path, est)
    rd = F.load_run(run)
    m = rd.metrics
    label = f"IBS {m['ibs']['mean']:.3f} ± {m['ibs']['std']:.3f}"
    null_label = f"IBS {m['ibs_null']['mean']:.3f} ± {m['ibs_null']['std']:.3f}"
    fig = F.fig_brier(rd)                                  # the run's own curves
    assert any(label in s for s in _legend(fig)), _legend(fig)
    assert any("null" in s and null_label in s for s in _legend(fig)), _legend(fig)
    plt.close(fig)
    # a run without brier_curves.csv: the report recomputes on metrics.json's grid with the one
    # Breslow and finds metrics.json's per-split IBS (before: another grid, another IBS)
    stored = F.stored_brier_curves(rd)
    (run / "brier_curves.csv").unlink()
    rec = F.brier_curves(rd)
    for sp in splits:
        t, _, _, ibs, ibn = rec[sp.name]
        grid = default_eval_times(df.os_time[sp.train], df.os_time[sp.test],
                                  df.os_event[sp.test])
        np.testing.assert_array_equal(t, grid)
        np.testing.assert_allclose(stored[sp.name][0], grid, rtol=1e-14)  # CSV round trip
        assert ibs == pytest.approx(m["ibs"]["per_split"][sp.name], abs=1e-6)
        assert ibn == pytest.approx(m["ibs_null"]["per_split"][sp.name], abs=1e-6)
        np.testing.assert_allclose(rec[sp.name][1], stored[sp.name][1], atol=1e-6)
    fig = F.fig_brier(rd)
    labels = _legend(fig)
    assert any(label in s for s in labels) and not any("recomputed" in s for s in labels), labels
    plt.close(fig)
    # the td-AUC figure: metrics.json's grid per split
    for s, (t, _) in F.td_auc_curves(rd).items():
        sp = next(x for x in splits if x.name == s)
        np.testing.assert_array_equal(t, default_eval_times(df.os_time[sp.train],
                                                            df.os_time[sp.test],
                                                            df.os_event[sp.test]))


def test_recomputed_curves_that_differ_say_so_beside_metrics_json_ibs(tmp_path):
    """A model whose curves the risks cannot give back (not a Cox model) and that kept no
    brier_curves.csv: the legend still shows metrics.json's IBS, and the recomputed value beside
    it, named as such."""
    from netsurv.report import figures as F
    from netsurv.survival.cox import CoxPH

    run, _, _ = _tiny_run(tmp_path, lambda: CoxPH(penalizer=0.1))
    (run / "brier_curves.csv").unlink()
    m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    m["ibs"] = {"mean": 0.1111, "std": 0.0222, "ci95": [0, 1],
                "per_split": dict.fromkeys(m["ibs"]["per_split"], 0.1111)}
    (run / "metrics.json").write_text(json.dumps(m))
    labels = _legend(F.fig_brier(F.load_run(run)))
    model = next(s for s in labels if s.startswith("model"))
    assert model.startswith("model, mean (IBS 0.111 ± 0.022; these recomputed curves "), model


def test_deep_run_report_applies_the_recorded_calibration_slope(tmp_path):
    from netsurv.report import figures as F
    from netsurv.survival.cox import CoxPH

    run, _, splits = _tiny_run(tmp_path, lambda: CoxPH(penalizer=0.1))
    m = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    m["training"] = {sp.name: {"calibration_slope": 0.5} for sp in splits}
    (run / "metrics.json").write_text(json.dumps(m))
    rd = F.load_run(run)
    s = splits[0].name
    trt, tre, trr, _, _, ter = F._split_arrays(rd.pred, s)
    want = Breslow().fit(0.5 * trr, trt, tre).survival(0.5 * ter, [10.0, 30.0])
    np.testing.assert_allclose(F.split_survival(rd, s)(ter, [10.0, 30.0]), want, atol=1e-12)


# ----------------------------------------------------------------------------- one of each
def _name(f):
    return getattr(f, "attr", getattr(f, "id", None))


def _modules():
    for f in sorted(PKG.rglob("*.py")):
        yield f.relative_to(PKG.parent).as_posix(), ast.parse(f.read_text(encoding="utf-8"))


def _is_div(x) -> bool:
    return isinstance(x, ast.BinOp) and isinstance(x.op, ast.Div)


def _divisions(node) -> set[str]:
    """Names assigned a ratio inside ``node`` (``h = d / at_risk``)."""
    return {t.id for n in ast.walk(node) if isinstance(n, ast.Assign) and _is_div(n.value)
            for t in n.targets if isinstance(t, ast.Name)}


def _cumsum_of_division(fn) -> bool:
    """A cumulative sum of a ratio (events / risk-set sum): a hand-written cumulative hazard.
    (Kaplan-Meier's ``cumsum(log(1 - d / n))`` sums logs, not ratios.)"""
    divs = _divisions(fn)
    for c in ast.walk(fn):
        if isinstance(c, ast.Call) and _name(c.func) == "cumsum":
            # np.cumsum(x) / x.cumsum(): the first argument or the object of the method
            args = c.args[:1] + ([c.func.value] if isinstance(c.func, ast.Attribute) else [])
            for a in args:
                while isinstance(a, ast.Subscript):
                    a = a.value
                if _is_div(a) or (isinstance(a, ast.Name) and a.id in divs):
                    return True
    return False


BRESLOW_API = {"BreslowEstimator", "cum_baseline_hazard_", "baseline_survival_",
               "get_cumulative_hazard_function"}


def test_no_breslow_estimator_outside_survival_breslow():
    home = "netsurv/survival/breslow.py"
    found = []
    for path, tree in _modules():
        if path == home:
            continue
        for n in ast.walk(tree):
            if isinstance(n, (ast.Name, ast.Attribute)) and _name(n) in BRESLOW_API:
                found.append(f"{path}:{n.lineno} uses {_name(n)}")
            if isinstance(n, ast.alias) and n.name.rsplit(".", 1)[-1] in BRESLOW_API:
                found.append(f"{path}:{n.lineno} imports {n.name}")
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _cumsum_of_division(n):
                found.append(f"{path}:{n.lineno} {n.name} sums a cumulative hazard")
    assert not found, found
    # the detector finds the hand-written baseline the report had
    for src in ("h = d / w\nreturn np.cumsum(h)", "return np.cumsum(d / w)",
                "return (d / w)[ok].cumsum(0)"):
        assert _cumsum_of_division(ast.parse("def f(d, w, ok):\n    " + src.replace(
            "\n", "\n    ")).body[0]), src


def test_one_evaluation_grid():
    """Quantiles on a linspace of levels build an evaluation grid only in
    survival/metrics.py (default_eval_times); losses.py's are the discrete-time loss's bins."""
    allowed = {("netsurv/survival/metrics.py", "default_eval_times"),
               ("netsurv/survival/losses.py", "fit")}
    found = []
    for path, tree in _modules():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for c in ast.walk(fn):
                if (isinstance(c, ast.Call) and _name(c.func) == "quantile" and any(
                        isinstance(x, ast.Call) and _name(x.func) == "linspace"
                        for a in c.args for x in ast.walk(a))):
                    found.append((path, fn.name))
    assert set(found) <= allowed, sorted(set(found) - allowed)
    assert ("netsurv/survival/metrics.py", "default_eval_times") in found
