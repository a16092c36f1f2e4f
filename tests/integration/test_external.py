"""External validation (evaluation=external) and scoring with a saved run (scripts/predict.py)
on two small cohorts written by the test: clinical + a radiomics-like feature table whose
scanner effects ComBat removes; the test cohort has a scanner the training cohort lacks."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from netsurv.cohort.schema import CohortError
from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.evaluation.predict import predict
from netsurv.tasks.train import run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = str(REPO / "configs")
FAST = ["report=false", "experiment=seed/clinical_radiomics", "data=cohort", "harmonize=combat",
        "model.grid.l1_ratio=[0.9]", "selection.k=[3]", "inner_cv=2", "inner_repeats=1",
        "data.clinical.categorical=[sex,smoking,histology,stage]", "evaluation=external"]
SHIFT = {"A": 0.0, "B": 2.0, "C": -1.0, "Z": 8.0}


def write_cohort(root: Path, n: int, seed: int, scanners) -> pd.DataFrame:
    df = simulate_patients(n, seed=seed)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    df[["patient_id", "true_risk"]].to_csv(root / "truth.csv", index=False)
    seen = [s for s in scanners if s != "Z"]
    scanner = np.asarray(seen, dtype=object)[rng.integers(0, len(seen), n)]
    if "Z" in scanners:
        scanner[:12] = "Z"  # the scanner the training cohort never saw
    feats = {"patient_id": df.patient_id}
    for k in range(6):  # features carrying the true risk, plus a scanner shift
        feats[f"f{k}"] = ((0.8 if k < 3 else 0.0) * df.true_risk + rng.normal(size=n)
                          + np.array([SHIFT[s] for s in scanner]))
    (root / "features").mkdir()
    pd.DataFrame(feats).to_csv(root / "features" / "radiomics.csv", index=False)
    pd.DataFrame({"patient_id": df.patient_id, "image": "none.nii.gz", "mask": "none.nii.gz",
                  "scanner": scanner}).to_csv(root / "ct.csv", index=False)
    return df


def _run(train, test, out):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*FAST, f"data.root={train}",
                                                      f"evaluation.test_root={test}",
                                                      f"+output_dir={out}"])
    return run(cfg)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ext")
    write_cohort(tmp / "train", 60, 1, ["A", "B", "C"])
    write_cohort(tmp / "test", 40, 2, ["A", "B", "Z"])
    metrics = _run(tmp / "train", tmp / "test", tmp / "run")
    return tmp, metrics


def test_external_run_scores_the_test_cohort(cohorts):
    tmp, m = cohorts
    saved = json.loads((tmp / "run" / "metrics.json").read_text())
    assert saved["protocol"] == "external" and list(saved["cindex"]["per_split"]) == ["external"]
    ext = saved["external"]
    assert (ext["n_train"], ext["n_test"], ext["renamed_test_ids"]) == (60, 40, 40)
    assert saved["cindex"]["ci95"] == saved["cindex"]["bootstrap_ci95_per_split"]["external"]
    assert saved["cindex"]["ci95"][0] < saved["cindex"]["mean"] < saved["cindex"]["ci95"][1]
    assert 0.6 < saved["oracle_cindex"]["mean"] <= 1 and saved["cindex"]["mean"] > 0.6
    # the unseen scanner is harmonised from its own rows, and says so
    z = ext["harmonize"]["modalities"]["radiomics"]["test_batches"]["Z"]
    assert z == {"n": 12, "action": "unseen: location/scale estimated from its own rows",
                 "few_cases": False}
    pred = pd.read_csv(tmp / "run" / "predictions.csv")
    assert np.isfinite(pred.risk).all()
    te = pred[pred.role == "test"]
    assert len(te) == 40 and te.patient_id.str.startswith("test:").all()
    assert (pred.role == "train").sum() == 60
    # the reported C-index is the test cohort's, from predictions.csv
    from lifelines.utils import concordance_index
    df = pd.read_csv(tmp / "test" / "clinical.csv")
    te = te.assign(patient_id=te.patient_id.str[5:]).merge(df, on="patient_id")
    assert concordance_index(te.os_time, -te.risk, te.os_event) == pytest.approx(
        saved["cindex"]["mean"])
    assert "batch 'Z' not seen in training" in (tmp / "run" / "warnings.log").read_text()


def test_test_outcomes_do_not_enter_fitting(cohorts, tmp_path):
    tmp, _ = cohorts
    shuffled = tmp_path / "test"
    shutil.copytree(tmp / "test", shuffled)
    c = pd.read_csv(shuffled / "clinical.csv")
    perm = np.random.default_rng(0).permutation(len(c))
    for col in ("os_time", "os_event", "pfs_time", "pfs_event"):
        c[col] = c[col].to_numpy()[perm]
    c.to_csv(shuffled / "clinical.csv", index=False)
    _run(tmp / "train", shuffled, tmp_path / "run")
    a = pd.read_csv(tmp / "run" / "predictions.csv")
    b = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert a.patient_id.tolist() == b.patient_id.tolist()
    np.testing.assert_array_equal(a.risk.to_numpy(), b.risk.to_numpy())


def test_predict_reproduces_the_external_test_risks(cohorts, tmp_path):
    tmp, _ = cohorts
    s = predict(tmp / "run", OmegaConf.create({"root": str(tmp / "test")}), tmp_path / "p")
    got = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert list(got.columns) == ["patient_id", "risk", "has_clinical", "has_radiomics"]
    run_pred = pd.read_csv(tmp / "run" / "predictions.csv")
    want = run_pred[run_pred.role == "test"]
    np.testing.assert_array_equal(got.risk.to_numpy(), want.risk.to_numpy())  # exactly
    assert s["models"] == ["external"]
    saved = json.loads((tmp / "run" / "metrics.json").read_text())
    assert s["cindex"] == saved["cindex"]["mean"]
    # bitwise, at full precision (the split record's JSON, not the CSV's 16 digits)
    from netsurv.cohort.schema import load_cohort
    from netsurv.evaluation.predict import cohort_inputs, load_fitted, predict_risk, run_config
    rec = json.loads((tmp / "run" / "splits" / "external.json").read_text())["predictions"]
    cfg, fitted = run_config(tmp / "run"), load_fitted(tmp / "run")
    inputs = cohort_inputs(cfg, load_cohort(tmp / "test", outcomes=False), fitted[0])
    risk = predict_risk(cfg, fitted[0], inputs)["risk"]
    np.testing.assert_array_equal(risk, np.asarray(rec["risk"])[np.asarray(rec["role"]) == "test"])
    z = s["harmonize"]["models"]["external"]["radiomics"]["unseen_batches"]["Z"]
    assert z["n"] == 12 and z["action"] == "estimated from its own rows"


def test_predict_script_without_outcomes_and_mismatched_features(cohorts, tmp_path):
    tmp, _ = cohorts
    bare = tmp_path / "bare"
    shutil.copytree(tmp / "test", bare)
    c = pd.read_csv(bare / "clinical.csv")
    c.drop(columns=["os_time", "os_event", "pfs_time", "pfs_event"]).to_csv(
        bare / "clinical.csv", index=False)
    (bare / "truth.csv").unlink()
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), f"run={tmp / 'run'}",
                        f"data.root={bare}", f"output_dir={out}"], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "40 of 40 patients scored (single model fitted on all training patients)" in r.stdout
    got = pd.read_csv(out / "predictions.csv")
    run_pred = pd.read_csv(tmp / "run" / "predictions.csv")
    np.testing.assert_array_equal(got.risk.to_numpy(),
                                  run_pred[run_pred.role == "test"].risk.to_numpy())
    assert "cindex" not in json.loads((out / "prediction.json").read_text())
    # a cohort lacking a feature the model was fitted on: one error naming it
    f = pd.read_csv(bare / "features" / "radiomics.csv").drop(columns=["f1"])
    f.to_csv(bare / "features" / "radiomics.csv", index=False)
    with pytest.raises(CohortError, match=r"'radiomics' table lacks 1 feature column.*'f1'"):
        predict(tmp / "run", OmegaConf.create({"root": str(bare)}), tmp_path / "p2")


def test_deep_tabular_external_and_predict(cohorts, tmp_path):
    """A deep model (clinical + the feature table through ComBat) saved by an external run is
    reloaded by predict (fitted tabular steps included) and gives the run's test risks."""
    tmp, _ = cohorts
    out = tmp_path / "deep"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *[o for o in FAST if not o.startswith(("model.grid", "experiment="))],
            "experiment=clinical_radiomics", f"data.root={tmp / 'train'}",
            f"evaluation.test_root={tmp / 'test'}", f"+output_dir={out}", "optim.max_epochs=3",
            "optim.min_epochs=1", "optim.select_after=0", "optim.smooth=2", "optim.patience=0",
            "trainer.enable_progress_bar=false"])
    m = run(cfg)
    assert m["protocol"] == "external" and m["external"]["n_test"] == 40
    assert m["external"]["harmonize"]["modalities"]["radiomics"]["test_batches"]["Z"]["n"] == 12
    s = predict(out, OmegaConf.create({"root": str(tmp / "test")}), tmp_path / "p")
    got = pd.read_csv(tmp_path / "p" / "predictions.csv")
    want = pd.read_csv(out / "predictions.csv").query("role == 'test'")
    assert np.isfinite(got.risk).all() and len(got) == len(want) == 40
    np.testing.assert_allclose(got.risk.to_numpy(), want.risk.to_numpy(), atol=1e-5, rtol=0)
    assert s["cindex"] == pytest.approx(m["cindex"]["mean"], abs=1e-6)


def test_predict_with_a_holdout_run_averages_the_split_models(cohorts, tmp_path):
    tmp, _ = cohorts
    out = tmp_path / "holdout"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *[o for o in FAST if o != "evaluation=external"], "evaluation=holdout",
            "evaluation.seeds=[0,1]", f"data.root={tmp / 'train'}", f"+output_dir={out}"])
    run(cfg)
    s = predict(out, OmegaConf.create({"root": str(tmp / "train")}), tmp_path / "p")
    assert s["models"] == ["seed0", "seed1"]
    got = pd.read_csv(tmp_path / "p" / "predictions.csv").set_index("patient_id").risk
    # each split's model scored every patient in the run: their mean is what predict gives
    want = pd.read_csv(out / "predictions.csv").groupby("patient_id").risk.mean()
    np.testing.assert_allclose(got.loc[want.index], want, rtol=1e-12, atol=1e-12)
