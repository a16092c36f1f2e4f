"""The training task end to end through Hydra, on a small cohort written by the test."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.tasks.train import run

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
EXPERIMENTS = sorted(str(p.relative_to(Path(CONFIGS) / "experiment").with_suffix(""))
                     for p in (Path(CONFIGS) / "experiment").rglob("*.yaml"))


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=["report=false", *overrides])


@pytest.fixture
def small_cohort(tmp_path):
    df = simulate_patients(60, seed=3)
    root = tmp_path / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    df[["patient_id", "true_risk"]].to_csv(root / "truth.csv", index=False)
    return root, df


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = _cfg([f"experiment={experiment}"])
    assert cfg.name == experiment and cfg.modalities


@pytest.mark.parametrize("evaluation", ["holdout", "kfold"])
def test_clinical_run_writes_outputs(small_cohort, tmp_path, evaluation):
    root, df = small_cohort
    out = tmp_path / "run"
    cfg = _cfg(["experiment=seed/clinical", "data=cohort", f"data.root={root}", "target=pfs",
                f"evaluation={evaluation}", "+output_dir=" + str(out),
                "data.clinical.categorical=[sex,smoking,histology,stage]"])
    metrics = run(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["endpoint"] == "pfs" and saved["experiment"] == "seed/clinical"
    assert saved["n_patients"] == 60 and saved["n_events"] == int(df.pfs_event.sum())
    assert saved["protocol"] == evaluation
    c = saved["cindex"]
    assert len(c["per_split"]) == 5
    assert c["mean"] == pytest.approx(np.mean(list(c["per_split"].values())))
    assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
    assert 0.5 < saved["oracle_cindex"]["mean"] <= 1
    pred = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert list(pred.columns) == ["patient_id", "split", "role", "risk"]
    assert pred.groupby("split").size().eq(60).all()
    # the per-split test C-index is reproducible from predictions.csv
    from lifelines.utils import concordance_index
    first = next(iter(c["per_split"]))
    p = pred[(pred.split == first) & (pred.role == "test")].merge(df, on="patient_id")
    assert concordance_index(p.pfs_time, -p.risk, p.pfs_event) == pytest.approx(c["per_split"][first])
    assert len(list((out / "models").glob("*.joblib"))) == 5
    assert metrics["cindex"]["mean"] == c["mean"]


def test_clinical_model_learns_the_signal(small_cohort, tmp_path):
    root, df = small_cohort
    cfg = _cfg(["experiment=seed/clinical", "data=cohort", f"data.root={root}",
                "+output_dir=" + str(tmp_path / "r"),
                "data.clinical.categorical=[sex,smoking,histology,stage]"])
    assert run(cfg)["cindex"]["mean"] > 0.6


def test_leak_free_encoder_is_fitted_on_train_rows(small_cohort, tmp_path):
    """Changing a test patient's covariate must not change the fitted model of that split."""
    import joblib

    root, df = small_cohort
    base = ["experiment=seed/clinical", "data=cohort", f"data.root={root}", "evaluation.seeds=[0]",
            "data.clinical.categorical=[sex,smoking,histology,stage]"]
    run(_cfg(base + ["+output_dir=" + str(tmp_path / "a")]))
    pred = pd.read_csv(tmp_path / "a" / "predictions.csv", dtype={"patient_id": str})
    test_ids = pred[pred.role == "test"].patient_id.tolist()
    clin = pd.read_csv(root / "clinical.csv", dtype={"patient_id": str})
    clin.loc[clin.patient_id.isin(test_ids), "age"] = 99
    clin.to_csv(root / "clinical.csv", index=False)
    run(_cfg(base + ["+output_dir=" + str(tmp_path / "b")]))
    a = joblib.load(tmp_path / "a" / "models" / "seed0.joblib")
    b = joblib.load(tmp_path / "b" / "models" / "seed0.joblib")
    np.testing.assert_allclose(a.model_.coef_, b.model_.coef_)


def test_leak_free_feature_steps_with_combat(small_cohort, tmp_path):
    """Imputation, scaling, ComBat, correlation filter, selection and the inner search see training
    rows only: rewriting every test patient's features leaves the fitted model unchanged."""
    import joblib

    root, df = small_cohort
    rng = np.random.default_rng(1)
    n = len(df)
    scanner = rng.choice(["A", "B", "C"], n)
    shift = pd.Series({"A": 0.0, "B": 2.0, "C": -1.0})[scanner].to_numpy()
    feats = pd.DataFrame({"patient_id": df.patient_id,
                          **{f"f{i}": df.true_risk * (i % 3 == 0) + rng.normal(0, 1, n) + shift
                             for i in range(12)}})
    (root / "features").mkdir()
    feats.to_csv(root / "features" / "radiomics.csv", index=False)
    (root / "img").mkdir()
    for p in df.patient_id:
        (root / "img" / p).write_bytes(b"x")
    pd.DataFrame({"patient_id": df.patient_id, "image": "img/" + df.patient_id,
                  "mask": "img/" + df.patient_id, "scanner": scanner}).to_csv(root / "ct.csv", index=False)
    base = ["data=cohort", f"data.root={root}", "evaluation.seeds=[0]", "name=r",
            "modalities=[radiomics]", "harmonize=combat", "selection.k=[2,4]"]
    m = run(_cfg(base + ["+output_dir=" + str(tmp_path / "a")]))
    assert m["harmonize"] == "combat" and m["cindex"]["mean"] > 0.6
    pred = pd.read_csv(tmp_path / "a" / "predictions.csv", dtype={"patient_id": str})
    test_ids = pred[pred.role == "test"].patient_id
    feats.loc[feats.patient_id.isin(test_ids), [f"f{i}" for i in range(12)]] = 100.0
    feats.to_csv(root / "features" / "radiomics.csv", index=False)
    run(_cfg(base + ["+output_dir=" + str(tmp_path / "b")]))
    a = joblib.load(tmp_path / "a" / "models" / "seed0.joblib")
    b = joblib.load(tmp_path / "b" / "models" / "seed0.joblib")
    assert a.selected_ == b.selected_
    np.testing.assert_allclose(a.model_.coef_, b.model_.coef_)
    sa = pd.read_csv(tmp_path / "a" / "inner_search.csv")
    sb = pd.read_csv(tmp_path / "b" / "inner_search.csv")
    pd.testing.assert_frame_equal(sa, sb)


def test_feature_table_modality(small_cohort, tmp_path):
    root, df = small_cohort
    (root / "features").mkdir()
    rng = np.random.default_rng(0)
    feats = pd.DataFrame({"patient_id": df.patient_id,
                          "signal": df.true_risk + rng.normal(0, 0.3, len(df)),
                          "noise": rng.normal(size=len(df))})
    feats.to_csv(root / "features" / "radiomics.csv", index=False)
    cfg = _cfg(["data=cohort", f"data.root={root}", "name=radiomics_table", "model=coxph",
                "modalities=[radiomics]", "evaluation.seeds=[0,1]",
                "+output_dir=" + str(tmp_path / "r")])
    m = run(cfg)
    assert m["cindex"]["mean"] > 0.65
    # model=coxph has survival curves: its integrated Brier score is reported, below the null's
    assert m["ibs"]["mean"] < m["ibs_null"]["mean"]
    hr = pd.read_csv(tmp_path / "r" / "hazard_ratios.csv")
    assert {"feature", "exp(coef)", "exp(coef) lower 95%", "exp(coef) upper 95%", "split"} <= set(hr.columns)


def test_multirun_writes_results_table(small_cohort, tmp_path):
    """A two-job Hydra sweep through the real entry point ends with the results table."""
    import subprocess
    import sys

    root, _ = small_cohort
    sweep = tmp_path / "mr"
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    res = subprocess.run(
        [sys.executable, str(script), "-m", "data=cohort", f"data.root={root}", "target=os,pfs",
         "evaluation.seeds=[0,1]", "data.clinical.categorical=[sex,histology]",
         f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, encoding="utf-8",
        timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    md = (sweep / "results.md").read_text()
    assert "| clinical |" in md and "OS C-index" in md and "PFS C-index" in md
    assert len(pd.read_csv(sweep / "results.csv")) == 2
