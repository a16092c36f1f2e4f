"""Model vs baseline and null model: the paired bootstrap, the null IBS, the pooled KM counting
each patient once (netsurv.survival.metrics, netsurv.evaluation.compare, netsurv.report.km)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from omegaconf import OmegaConf

from netsurv.evaluation import compare
from netsurv.evaluation.records import SplitFit
from netsurv.survival.metrics import (
    brier_curve,
    combine_paired,
    harrell_cindex,
    integrated_brier,
    km_null_survival,
    paired_bootstrap,
)


def _cohort(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = rng.exponential(np.exp(-x)) * 10 + 0.1
    cens = rng.exponential(15, n)
    event = (time <= cens).astype(int)
    time = np.minimum(time, cens).round(2)
    a = x + rng.normal(0, 0.6, n)            # the model
    b = a + rng.normal(0, 0.3, n)            # a baseline close to it (correlated errors)
    return time, event, a, b


def _c(t, e, r):  # lifelines directly: it scores survival-like predictions, hence -risk
    return concordance_index(t, -r, e)


def test_paired_bootstrap_equals_a_hand_rolled_loop():
    t, e, a, b = _cohort()
    reps = paired_bootstrap(harrell_cindex, t, e, a, b, n_boot=200, seed=3)
    rng = np.random.default_rng(3)
    want = []
    for _ in range(200):
        i = rng.integers(0, len(t), len(t))
        want.append(_c(t[i], e[i], a[i]) - _c(t[i], e[i], b[i]) if e[i].sum() else np.nan)
    np.testing.assert_allclose(reps, want, rtol=0, atol=1e-12)
    assert np.isfinite(reps).all() and np.std(reps) > 0


def test_pairing_matters_independent_resampling_is_wider():
    """Scoring both models on the same resample cancels the patients' shared difficulty; a
    broken pairing (each model on its own resample) gives a different, much wider interval."""
    t, e, a, b = _cohort(60, seed=1)
    paired = paired_bootstrap(harrell_cindex, t, e, a, b, n_boot=400, seed=0)
    rng1, rng2 = np.random.default_rng(0), np.random.default_rng(1)
    indep = []
    for _ in range(400):
        i, j = rng1.integers(0, len(t), len(t)), rng2.integers(0, len(t), len(t))
        indep.append(_c(t[i], e[i], a[i]) - _c(t[j], e[j], b[j]))
    w_paired = np.subtract(*np.quantile(paired, [0.975, 0.025]))
    w_indep = np.subtract(*np.quantile(indep, [0.975, 0.025]))
    assert w_indep > 2 * w_paired, (w_paired, w_indep)


def test_combine_paired_is_the_quantile_of_the_replicate_means():
    r1 = np.array([0.1, 0.2, np.nan, 0.0, 0.3])
    r2 = np.array([0.0, -0.2, 0.5, 0.1, 0.1])
    lo, hi = combine_paired([r1, r2], level=0.5)
    means = np.array([0.05, 0.0, 0.05, 0.2])       # replicate 3 undefined in split 1: dropped
    assert (lo, hi) == pytest.approx((np.quantile(means, 0.25), np.quantile(means, 0.75)))


def test_null_ibs_equals_sksurv_directly():
    from sksurv.metrics import integrated_brier_score
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    t, e, _, _ = _cohort(80, seed=2)
    tr, te = np.arange(55), np.arange(55, 80)
    times = np.quantile(t[te][e[te] == 1], [0.2, 0.4, 0.6, 0.8])
    times = times[times < t[tr].max()]
    null = km_null_survival(t[tr], e[tr])(len(te))
    got = integrated_brier(t[tr], e[tr], t[te], e[te], null, times=times)
    # independent: sksurv's own KM, step function evaluated at the times
    kt, ks = kaplan_meier_estimator(e[tr].astype(bool), t[tr])
    s = np.array([ks[np.searchsorted(kt, u, side="right") - 1] if u >= kt[0] else 1.0
                  for u in times])
    want = integrated_brier_score(Surv.from_arrays(e[tr].astype(bool), t[tr]),
                                  Surv.from_arrays(e[te].astype(bool), t[te]),
                                  np.tile(s, (len(te), 1)), times)
    assert got == pytest.approx(want, rel=1e-12)
    # the stored Brier curve integrates to that IBS (the report draws it with this value)
    bs = brier_curve(t[tr], e[tr], t[te], e[te], null, times)
    assert np.trapezoid(bs, times) / (times[-1] - times[0]) == pytest.approx(got, rel=1e-12)


# ------------------------------------------------------------------------------ baseline glue
def _fit(risk, base=None):
    n = len(risk)
    return SplitFit(risk=np.asarray(risk, float), role=np.array(["train"] * n, object),
                    surv=None, selected=[], model=None, baseline=base)


def test_baseline_record_pairs_on_the_patients_the_baseline_scores():
    from types import SimpleNamespace

    t, e, a, b = _cohort(50, seed=4)
    b = b.copy()
    b[[3, 7]] = np.nan                                   # the baseline cannot score two
    data = SimpleNamespace(time=t, event=e)
    split = SimpleNamespace(name="s0", test=np.arange(50))
    rec = compare.baseline_record(data, split, _fit(a, {"name": "CoxNet (clinical)", "risk": b}))
    ok = np.isfinite(b)
    assert rec["n_test"] == 50 and rec["n_common"] == 48
    assert rec["cindex"] == pytest.approx(_c(t[ok], e[ok], b[ok]))
    assert rec["cindex_diff"] == pytest.approx(_c(t[ok], e[ok], a[ok]) - rec["cindex"])
    reps = paired_bootstrap(harrell_cindex, t[ok], e[ok], a[ok], b[ok], n_boot=compare.N_BOOT,
                            seed=compare.SEED)
    np.testing.assert_allclose(rec["diff_replicates"], reps)


def test_baseline_off_and_slides_only():
    cfg = OmegaConf.create({"modalities": ["wsi"], "baseline": {"name": "coxnet"}})
    fit = _fit([0.0, 1.0])
    compare.ensure_baseline(type("D", (), {"cfg": cfg})(), None, fit)
    assert fit.baseline["risk"] is None and "slides only" in fit.baseline["skipped"]
    off = OmegaConf.create({"modalities": ["clinical"], "baseline": {"name": "none"}})
    fit = _fit([0.0, 1.0])
    compare.ensure_baseline(type("D", (), {"cfg": off})(), None, fit)
    assert fit.baseline is None and not compare.wants_baseline(off)
    assert compare.tabular_modalities(OmegaConf.create(
        {"modalities": ["clinical", "radiomics", "wsi"]})) == ["clinical", "radiomics"]


def test_assemble_baseline_combines_the_split_replicates():
    from types import SimpleNamespace

    splits = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    recs = {"a": {"baseline": {"name": "X", "n_test": 3, "n_common": 3, "cindex": 0.6,
                               "bootstrap_ci95": [0.5, 0.7], "cindex_diff": 0.1,
                               "diff_ci95": [0.0, 0.2], "diff_replicates": [0.1, None, 0.3]}},
            "b": {"baseline": {"name": "X", "n_test": 3, "n_common": 3, "cindex": 0.7,
                               "bootstrap_ci95": [0.6, 0.8], "cindex_diff": -0.1,
                               "diff_ci95": [-0.2, 0.0], "diff_replicates": [0.0, 0.1, -0.1]}}}
    out = compare.assemble_baseline(splits, recs)
    assert out["cindex"]["mean"] == pytest.approx(0.65)
    assert out["cindex_diff"]["mean"] == pytest.approx(0.0)
    assert out["cindex_diff"]["ci95"] == pytest.approx(
        [np.quantile([0.05, 0.1], 0.025), np.quantile([0.05, 0.1], 0.975)])
    recs["b"]["baseline"] = {"name": "X", "skipped": "fit failed: boom"}
    assert compare.assemble_baseline(splits, recs)["skipped_splits"] == ["b"]


# ------------------------------------------------------------------------------ pooled KM
def test_pooled_logrank_counts_each_patient_once():
    from lifelines.statistics import logrank_test

    from netsurv.report.km import km_analysis

    rng = np.random.default_rng(5)
    n = 40
    pid = [f"p{i:02d}" for i in range(n)]
    x = rng.normal(size=n)
    time = np.round(rng.exponential(np.exp(-x)) * 10 + 0.1, 2)
    event = (rng.random(n) < 0.7).astype(int)
    rows = []
    for s in range(4):                       # holdout-like: test sets overlap between splits
        test = rng.random(n) < 0.4
        risk = x + rng.normal(0, 0.8, n)
        rows.append(pd.DataFrame({"patient_id": pid, "split": f"s{s}",
                                  "role": np.where(test, "test", "train"), "risk": risk,
                                  "time": time, "event": event}))
    pred = pd.concat(rows, ignore_index=True)
    res = km_analysis(pred, 2)
    tested = pred[pred.role == "test"]
    assert len(res.groups) == len(tested) > tested.patient_id.nunique()   # repeats exist
    pooled = res.pooled.set_index("patient_id")
    assert pooled.index.is_unique and set(pooled.index) == set(tested.patient_id)
    # majority over the splits where tested; ties by mean training-risk percentile
    for p, g in res.groups.groupby("patient_id"):
        c = np.bincount(g.group, minlength=2)
        want = int(c.argmax()) if c[0] != c[1] else int(g.train_pct.mean() >= 0.5)
        assert pooled.at[p, "group"] == want, p
    assert pooled.tie.any()                  # the tie-break was exercised
    lo, hi = pooled[pooled.group == 0], pooled[pooled.group == 1]
    want = logrank_test(lo.time, hi.time, lo.event, hi.event).p_value
    assert res.p_pooled == pytest.approx(want, rel=1e-12)
    row = res.table().set_index("split").loc["pooled"]
    assert row["low risk (n/events)"] == f"{len(lo)}/{int(lo.event.sum())}"
    assert "each of the" in res.pooled_how()


# ------------------------------------------------------------------------------ results table
def _metrics_run(d, cohort, experiment, c, base=None, ibs=(0.2, 0.21), **extra):
    import json

    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"data:\n  root: /cache/demo/{cohort}\n")
    s = lambda v: {"mean": v, "std": 0.01, "ci95": [v - 0.05, v + 0.05], "per_split": {}}  # noqa: E731
    m = {"experiment": experiment, "endpoint": "os", "harmonize": "none", "protocol": "holdout",
         "n_patients": 83, "n_events": 40, "cindex": s(c), "oracle_cindex": s(0.8),
         "ibs": s(ibs[0]), "ibs_null": s(ibs[1]), **extra}
    if base is not None:
        m["baseline"] = {"name": "CoxNet (clinical)", "cindex": s(base),
                         "cindex_diff": {**s(c - base), "ci95": [c - base - 0.04, c - base + 0.045]}}
    (d / "metrics.json").write_text(json.dumps(m))


def test_results_table_of_two_cohorts_has_the_comparison_columns(tmp_path):
    from netsurv.report.results import results_table

    a, b = tmp_path / "mr" / "demo83", tmp_path / "mr" / "demo250"
    _metrics_run(a / "0", "n83-seed0-small", "clinical_pathomics", 0.70, base=0.68)
    _metrics_run(a / "1", "n83-seed0-small", "seed/clinical", 0.68)
    _metrics_run(b / "0", "n250-seed7-small", "clinical_pathomics", 0.72, base=0.75)
    _metrics_run(a / "2", "n83-seed0-small", "multimodal", 0.77, base=0.78, complete_cases=True)
    results_table([a, b])
    md = (tmp_path / "mr" / "results.md").read_text()
    assert ("| n83-seed0-small | clinical_pathomics | os | 83 | 0.700 (0.650–0.750) | 0.680 | "
            "+0.020 (-0.020 to +0.065) | 0.200 | 0.210 | 0.800 |") in md
    assert "| n250-seed7-small | clinical_pathomics | os | 83 | 0.720 (0.670–0.770) | 0.750 | " \
           "-0.030 (-0.070 to +0.015) |" in md
    assert "| n83-seed0-small | seed/clinical | os | 83 | 0.680 (0.630–0.730) | – | – |" in md
    # a deep run on its counterpart's complete cases says so
    assert "| n83-seed0-small | multimodal (complete cases) | os | 83 | 0.770" in md
    # the endpoint-wide table keeps one row per cohort and model
    assert "| n250-seed7-small · clinical_pathomics | 0.720" in md
