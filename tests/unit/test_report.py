"""Run reports: KM risk groups, figures and the self-contained HTML (netsurv.report)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.evaluation.attention import PatientAttention, write_attention
from netsurv.report import figures as F
from netsurv.report.html import write_report
from netsurv.report.km import assign_groups, km_analysis, km_groups, logrank_p, risk_thresholds

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _write_slide(path, mark_xy=None, size=(1024, 768), mpp=0.5):
    """White tiled TIFF; a black 64 px square at level-0 ``mark_xy`` when given."""
    import tifffile

    img = np.full((size[1], size[0], 3), 255, np.uint8)
    if mark_xy is not None:
        x, y = mark_xy
        img[y:y + 64, x:x + 64] = 0
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def make_run(tmp_path, n=60, splits=("s0", "s1", "s2"), truth=True, hr=True, slides=False):
    """A synthetic run directory (+ cohort) with every file a training run writes."""
    df = simulate_patients(n, seed=3)
    root = tmp_path / "cohort"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    if truth:
        df[["patient_id", "true_risk"]].to_csv(root / "truth.csv", index=False)
    if slides:
        (root / "slides").mkdir()
        rows = []
        for p in df.patient_id[:4]:
            _write_slide(root / "slides" / f"{p}.tiff", mark_xy=(320, 192))
            rows.append({"patient_id": p, "slide_id": f"{p}-A", "path": f"slides/{p}.tiff",
                         "mpp": 0.5})
        pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    risk = df.true_risk.to_numpy() + rng.normal(0, 0.5, n)
    preds, sel, hrs, per = [], [], [], {}
    for i, s in enumerate(splits):
        role = np.where(rng.random(n) < 0.3, "test", "train")
        preds.append(pd.DataFrame({"patient_id": df.patient_id, "split": s, "role": role,
                                   "risk": risk + 0.05 * i}))
        sel += [{"split": s, "feature": f} for f in ("clinical:age", "clinical:stage_IV",
                                                      f"radiomics:f{i}")]
        for f in ("clinical:age", "clinical:stage_IV"):
            c = rng.normal(0.3, 0.1)
            hrs.append({"feature": f, "coef": c, "exp(coef)": np.exp(c), "se(coef)": 0.1,
                        "exp(coef) lower 95%": np.exp(c - 0.2),
                        "exp(coef) upper 95%": np.exp(c + 0.2), "p": 0.01, "split": s})
        per[s] = 0.7 + 0.01 * i
    pd.concat(preds).to_csv(run / "predictions.csv", index=False)
    pd.DataFrame(sel).to_csv(run / "selected_features.csv", index=False)
    if hr:
        pd.DataFrame(hrs).to_csv(run / "hazard_ratios.csv", index=False)
    vals = list(per.values())
    summ = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)),
            "ci95": [0.65, 0.75], "per_split": per}
    (run / "metrics.json").write_text(json.dumps({
        "experiment": "synthetic", "endpoint": "os", "model": "CoxPH", "n_patients": n,
        "n_events": int(df.os_event.sum()), "protocol": "holdout", "cindex": summ,
        "td_auc": summ, "n_warnings": 1}))
    (run / "config.yaml").write_text(f"name: synthetic\ntarget: os\ndata:\n  root: {root}\n")
    (run / "warnings.log").write_text("UserWarning: a <warning> to show\n")
    return run, df


# ----------------------------------------------------------------------------- KM
def _pred(train_risk, test_risk, time, event, split="s0"):
    n_tr = len(train_risk)
    return pd.DataFrame({
        "patient_id": [f"p{i}" for i in range(n_tr + len(test_risk))], "split": split,
        "role": ["train"] * n_tr + ["test"] * len(test_risk),
        "risk": list(train_risk) + list(test_risk),
        "time": list(np.linspace(1, 50, n_tr)) + list(time),
        "event": [1] * n_tr + list(event)})


def test_km_groups_use_the_training_threshold_not_the_test_median():
    train = np.linspace(0, 1, 11)                       # median 0.5
    test = np.array([0.2, 0.3, 0.6, 0.7, 0.8, 0.9])     # test median 0.65
    g = km_groups(_pred(train, test, np.arange(1, 7), [1] * 6))
    assert g.thresholds.iloc[0] == pytest.approx((0.5,))
    assert g.group.tolist() == [0, 0, 1, 1, 1, 1]       # the test median would give 3 / 3
    assert g.group.tolist() != (test >= np.median(test)).astype(int).tolist()
    assert g.label.tolist()[:2] == ["low risk"] * 2
    # tertiles from training: cut-offs 1/3 and 2/3
    g3 = km_groups(_pred(train, test, np.arange(1, 7), [1] * 6), n_groups=3)
    assert g3.group.tolist() == [0, 0, 1, 2, 2, 2]


def test_threshold_helpers():
    assert risk_thresholds([1, 2, 3, 4], 2) == pytest.approx([2.5])
    assert assign_groups([2.5, 2.4, 9], [2.5]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError):
        risk_thresholds([1, 2], 4)


def test_logrank_p_equals_lifelines(tmp_path):
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    run, _ = make_run(tmp_path)
    rd = F.load_run(run)
    res = km_analysis(rd.pred)
    for s, df in res.groups.groupby("split"):
        a, b = df[df.group == 0], df[df.group == 1]
        p = logrank_test(a.time, b.time, a.event, b.event).p_value
        assert res.p_split[s] == pytest.approx(p, rel=1e-12)
        # each split's groups come from its own training median
        tr = rd.pred[(rd.pred.split == s) & (rd.pred.role == "train")]
        assert (df.group == (df.risk >= np.median(tr.risk)).astype(int)).all()
    g = res.pooled  # pooled: each patient once (tests/unit/test_compare.py checks how)
    assert g.patient_id.is_unique
    pooled = logrank_test(g.time[g.group == 0], g.time[g.group == 1],
                          g.event[g.group == 0], g.event[g.group == 1]).p_value
    assert res.p_pooled == pytest.approx(pooled, rel=1e-12)
    res3 = km_analysis(rd.pred, n_groups=3)
    g3 = res3.pooled
    assert res3.p_pooled == pytest.approx(
        multivariate_logrank_test(g3.time, g3.group, g3.event).p_value, rel=1e-12)
    assert np.isnan(logrank_p([1, 2], [1, 1], [0, 0]))  # one group: undefined
    t = res.table()
    assert t.split.tolist()[-1] == "pooled" and t.logrank_p.iloc[-1] == pytest.approx(pooled)


# ----------------------------------------------------------------------------- figures
def test_figures_non_empty(tmp_path):
    import matplotlib.pyplot as plt

    run, _ = make_run(tmp_path)
    rd = F.load_run(run)
    assert rd.has_outcome and not rd.problems
    for fn in (F.fig_td_auc, F.fig_brier, F.fig_calibration, F.fig_forest, F.fig_selection,
               F.fig_truth):
        fig = fn(rd)
        ax = fig.axes[0]
        assert ax.lines or ax.collections or ax.patches, fn.__name__
        fig.savefig(tmp_path / f"{fn.__name__}.png", dpi=40)
        assert (tmp_path / f"{fn.__name__}.png").stat().st_size > 2000
        plt.close(fig)
    # evaluation times never reach the training follow-up of their split
    for s, (t, _) in F.td_auc_curves(rd).items():
        tr = rd.pred[(rd.pred.split == s) & (rd.pred.role == "train")]
        assert t.max() < tr.time.max()
    cal = F.calibration_table(rd, n_bins=5)
    assert len(cal) == 5 and cal.n.sum() == (rd.pred.role == "test").sum()
    assert F.selection_frequency(pd.read_csv(run / "selected_features.csv"))["clinical:age"] == 1


# ----------------------------------------------------------------------------- HTML
def _imgs(html):
    return re.findall(r'<img alt="([^"]*)" src="([^"]{0,40})', html)


def test_write_report_embeds_every_figure(tmp_path):
    run, df = make_run(tmp_path, splits=("s0", "s1"), slides=True)
    xs, ys = np.meshgrid(np.arange(0, 1024, 64), np.arange(0, 768, 64))
    coords = np.c_[xs.ravel(), ys.ravel()]
    recs = []
    for j, p in enumerate(df.patient_id[:4]):
        att = np.zeros(len(coords))
        att[(coords[:, 0] == 320) & (coords[:, 1] == 192)] = 1.0
        recs.append(PatientAttention("s0", p, coords, np.zeros(len(coords), int), att,
                                     [f"{p}-A"], [64], 1.0, risk=float(j), role="test"))
    write_attention(run / "attention.h5", recs)
    out = write_report(run, attention={"n_top": 1, "n_bottom": 1, "k": 3}, dpi=60)
    assert out == run / "report.html"
    html = out.read_text(encoding="utf-8")
    imgs = _imgs(html)
    names = {a for a, _ in imgs}
    assert {"km_pooled", "km_splits", "td_auc", "brier", "calibration", "forest", "selection",
            "truth"} <= names
    assert all(src.startswith("data:image/png;base64,") for _, src in imgs)
    assert html.count("<img") == len(imgs)
    assert 'class="err"' not in html
    assert "a &lt;warning&gt; to show" in html and "synthetic" in html
    assert "Harrell C-index" in html and "0.700" in html
    assert "WSI (patients / slides)" in html  # data summary with modality coverage
    assert not re.search(r'src="(?!data:)', html)  # self-contained: nothing fetched
    assert (run / "figures" / "km_pooled.png").is_file()
    # attention: heatmap + tile gallery of the top- and the bottom-risk test patient
    heat = sorted((run / "figures" / "attention").glob("heatmap_*.png"))
    tiles = sorted((run / "figures" / "attention").glob("tiles_*.png"))
    assert len(heat) == 2 and len(tiles) == 2
    assert f"heatmap_s0_{df.patient_id[3]}.png" in {h.name for h in heat}
    assert sum(1 for a in names if "heatmap" in a or "tiles" in a) == 4


def test_write_report_omits_missing_inputs_and_survives_bad_ones(tmp_path):
    run, _ = make_run(tmp_path, splits=("s0", "s1"), hr=False, truth=False)
    (run / "selected_features.csv").write_text("split,nonsense\ns0,1\n")   # broken figure input
    (run / "attention.h5").write_bytes(b"not hdf5")                       # broken optional input
    html = write_report(run, dpi=50).read_text(encoding="utf-8")
    names = {a for a, _ in _imgs(html)}
    assert "forest" not in names and "truth" not in names
    assert "km_pooled" in names and "brier" in names
    assert html.count('class="err"') == 2   # selection figure + attention section, one line each
    assert "feature selection frequency: not drawn" in html
    # no predictions, no cohort: still a report
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.json").write_text((run / "metrics.json").read_text(encoding="utf-8"))
    html = write_report(bare).read_text(encoding="utf-8")
    assert "Harrell C-index" in html and "no predictions.csv" in html


@pytest.mark.slow
def test_real_training_run_report(tmp_path):
    """A CoxPH run of the training task itself (small cohort, two splits) reports cleanly."""
    from hydra import compose, initialize_config_dir

    from netsurv.tasks.train import run

    df = simulate_patients(60, seed=3)
    root = tmp_path / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=clinical", "~net", "data=cohort", f"data.root={root}", "model=coxph",
            "model.grid.penalizer=[0.1]", "evaluation.seeds=[0,1]", "+output_dir=" + str(out),
            "data.clinical.categorical=[sex,smoking,histology,stage]"])
    run(cfg)
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    # model=coxph gets survival curves, hence an integrated Brier score, like coxnet
    assert 0.0 < m["ibs"]["mean"] < 0.25 and 0.0 < m["ibs_null"]["mean"] < 0.25
    html = write_report(out, dpi=50).read_text(encoding="utf-8")
    names = {a for a, _ in _imgs(html)}
    assert {"km_pooled", "td_auc", "brier", "calibration", "forest", "selection"} <= names
    assert 'class="err"' not in html


def test_brier_figure_shows_the_ibs_of_metrics_json(tmp_path):
    """One IBS per report: with the run's own curves (brier_curves.csv) the figure's legend
    carries metrics.json's IBS, not a recomputation on another grid."""
    run, _ = make_run(tmp_path)
    t = np.array([2.0, 5.0, 9.0, 14.0])
    rows = [pd.DataFrame({"time": t, "null": 0.05 * np.arange(1, 5), "model": 0.04 * np.arange(1, 5),
                          "split": s}) for s in ("s0", "s1", "s2")]
    pd.concat(rows).to_csv(run / "brier_curves.csv", index=False)
    m = json.loads((run / "metrics.json").read_text())
    m["ibs"] = {"mean": 0.1234, "std": 0.001, "ci95": [0.1, 0.2],
                "per_split": {"s0": 0.12, "s1": 0.123, "s2": 0.1272}}
    m["ibs_null"] = {"mean": 0.2345, "std": 0.002, "ci95": [0.2, 0.3],
                     "per_split": {"s0": 0.23, "s1": 0.234, "s2": 0.2405}}
    (run / "metrics.json").write_text(json.dumps(m))
    rd = F.load_run(run)
    cur = F.stored_brier_curves(rd)
    assert cur["s1"][3] == 0.123 and cur["s1"][4] == 0.234
    np.testing.assert_allclose(cur["s0"][2], 0.05 * np.arange(1, 5))
    fig = F.fig_brier(rd)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("IBS 0.123 ± 0.001" in s for s in labels), labels
    assert any("null" in s and "IBS 0.234 ± 0.002" in s for s in labels), labels
