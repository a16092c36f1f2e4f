"""A deep run fits its classical counterpart on the same splits and reports the comparison."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.tasks.train import run

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
FAST = ["data=cohort", "evaluation.seeds=[0]", "optim.max_epochs=2", "optim.min_epochs=1",
        "optim.patience=0", "inner_cv=2", "inner_repeats=1", "selection.k=[3]",
        "data.clinical.categorical=[sex,smoking,histology,stage]", "report=false"]


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=[*FAST, *overrides])


def test_deep_run_reports_its_classical_counterpart(tmp_path, capsys, monkeypatch):
    import netsurv.evaluation.deep as deep

    # the network (not the offset alone) predicts, so the two models differ
    monkeypatch.setattr(deep, "_paired_gain",
                        lambda *a, **k: {"mean": 1.0, "se": 0.0, "prob_better": 1.0})
    df = simulate_patients(60, seed=3)
    root = tmp_path / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    deep = run(_cfg(["experiment=clinical", f"data.root={root}",
                     f"+output_dir={tmp_path / 'deep'}"]))
    line = capsys.readouterr().out
    # the baseline is exactly the classical experiment on the same split (training rows only)
    seed = run(_cfg(["experiment=seed/clinical", f"data.root={root}",
                     f"+output_dir={tmp_path / 'seed'}"]))
    b = deep["baseline"]
    assert b["name"] == "CoxNet (clinical)"
    assert b["cindex"]["per_split"]["seed0"] == pytest.approx(seed["cindex"]["per_split"]["seed0"],
                                                              abs=1e-12)
    pd_ = pd.read_csv(tmp_path / "deep" / "predictions.csv")
    ps = pd.read_csv(tmp_path / "seed" / "predictions.csv")
    np.testing.assert_allclose(pd_.baseline_risk, ps.risk, atol=1e-10)
    d = b["cindex_diff"]
    assert d["mean"] == pytest.approx(deep["cindex"]["mean"] - b["cindex"]["mean"])
    assert d["ci95"][0] < d["mean"] < d["ci95"][1]
    # null IBS on the model's grid, both in metrics.json and the console line
    assert 0 < deep["ibs_null"]["mean"] < 0.5 and 0 < deep["ibs"]["mean"] < 0.5
    assert "baseline CoxNet (clinical)" in line and "vs null" in line
    curves = pd.read_csv(tmp_path / "deep" / "brier_curves.csv")
    t = curves.time.to_numpy()
    assert np.trapezoid(curves["null"], t) / (t[-1] - t[0]) == pytest.approx(
        deep["ibs_null"]["mean"], rel=1e-9)
    # classical runs report the null IBS too, and have no baseline
    assert "ibs_null" in seed and "baseline" not in seed
    rec = json.loads((tmp_path / "deep" / "splits" / "seed0.json").read_text())
    assert len(rec["baseline"]["diff_replicates"]) == 500


@pytest.mark.parametrize("net_wins", [False, True])
def test_offset_alone_unless_the_network_beats_it_out_of_fold(tmp_path, monkeypatch, net_wins):
    """offset.modalities=tabular + inner folds: when the network's out-of-fold C does not beat
    the offset's in 95 % of paired bootstrap resamples, the model is the classical offset itself (test risks
    = the baseline's, shifted by the training centre; 0 epochs); otherwise the refitted
    network predicts."""
    import netsurv.evaluation.deep as deep

    gain = ({"mean": 1.0, "se": 0.0, "prob_better": 1.0} if net_wins
            else {"mean": 0.0, "se": 1.0, "prob_better": 0.5})
    monkeypatch.setattr(deep, "_paired_gain", lambda *a, **k: gain)
    df = simulate_patients(60, seed=3)
    root = tmp_path / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    m = run(_cfg(["experiment=clinical", f"data.root={root}", "optim.inner_folds=2",
                  "optim.select_after=0", "optim.smooth=1", f"+output_dir={tmp_path / 'd'}"]))
    info = m["training"]["seed0"]
    assert info["inner_folds"] == 2 and info["offset"]["modalities"] == ["clinical"]
    p = pd.read_csv(tmp_path / "d" / "predictions.csv").query("role == 'test'")
    shift = (p.risk - p.baseline_risk).to_numpy()
    if net_wins:
        assert info["epochs"] >= 1 and info["snapshots"] >= 1
        assert np.ptp(shift) > 1e-6
    else:
        assert info["epochs"] == 0
        np.testing.assert_allclose(shift, shift[0], atol=1e-5)
        assert m["cindex"]["mean"] == pytest.approx(m["baseline"]["cindex"]["mean"], abs=1e-12)
