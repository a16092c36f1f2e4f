"""A rerun in the same run directory (a requeued cluster job) reuses finished splits and
continues an interrupted deep split from its last checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.tasks.train import run

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=["report=false", *overrides])


@pytest.fixture
def cohort(tmp_path):
    df = simulate_patients(60, seed=3)
    root = tmp_path / "c"
    root.mkdir()
    df[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    return root


class Crash(RuntimeError):
    pass


def test_rerun_reuses_finished_splits_and_refits_the_interrupted_one(cohort, tmp_path,
                                                                     monkeypatch):
    import netsurv.evaluation.classical as classical

    base = ["experiment=seed/clinical", "data=cohort", f"data.root={cohort}",
            "evaluation.seeds=[0,1,2]", "data.clinical.categorical=[sex,smoking,histology,stage]",
            "model.grid.l1_ratio=[0.9]", "inner_repeats=1"]
    out = tmp_path / "run"
    fitted = []
    real = classical.fit_split

    def fit_or_crash(data, split):
        fitted.append(split.name)
        if split.name == "seed1" and crash:
            raise Crash("job killed during split seed1")
        return real(data, split)

    monkeypatch.setattr(classical, "fit_split", fit_or_crash)
    crash = True
    with pytest.raises(Crash):
        run(_cfg([*base, f"+output_dir={out}"]))
    assert fitted == ["seed0", "seed1"]
    assert (out / "splits" / "seed0.json").is_file()
    assert not (out / "splits" / "seed1.json").exists()
    assert not (out / "metrics.json").exists()
    seed0_model = (out / "models" / "seed0.joblib").stat().st_mtime_ns

    crash, fitted[:] = False, []
    resumed = run(_cfg([*base, f"+output_dir={out}"]))
    assert fitted == ["seed1", "seed2"]                 # seed0 reused, not refitted
    assert (out / "models" / "seed0.joblib").stat().st_mtime_ns == seed0_model

    fitted[:] = []
    fresh = run(_cfg([*base, f"+output_dir={tmp_path / 'fresh'}"]))
    assert fitted == ["seed0", "seed1", "seed2"]
    assert resumed["cindex"] == fresh["cindex"] and resumed["ibs"] == fresh["ibs"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"),
                                  pd.read_csv(tmp_path / "fresh" / "predictions.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "inner_search.csv"),
                                  pd.read_csv(tmp_path / "fresh" / "inner_search.csv"))

    # another config in the same folder: nothing reused
    fitted[:] = []
    run(_cfg([*base, f"+output_dir={out}", "model.grid.l1_ratio=[0.5]"]))
    assert fitted == ["seed0", "seed1", "seed2"]


def test_interrupted_deep_split_resumes_from_last_checkpoint(cohort, tmp_path, monkeypatch):
    import lightning as L

    import netsurv.evaluation.deep as deep

    # no random dropout, so a resumed fit can be compared with an uninterrupted one
    base = ["experiment=clinical", "data=cohort", f"data.root={cohort}", "evaluation.seeds=[0]",
            "data.clinical.categorical=[sex,smoking,histology,stage]", "optim.max_epochs=5",
            "optim.min_epochs=1", "optim.patience=0", "optim.select_after=1", "optim.smooth=2",
            "optim.batch_size=16", "selection.k=[3]", "tabular.dropout=0", "fusion.module.dropout=0",
            "optim.inner_folds=0"]

    class StopAfterEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                raise Crash("job killed during epoch 3")

    real = deep.make_trainer

    def make_trainer(*a, **k):
        trainer, ckpt = real(*a, **k)
        if crash:
            trainer.callbacks.append(StopAfterEpoch())
        return trainer, ckpt

    monkeypatch.setattr(deep, "make_trainer", make_trainer)
    out = tmp_path / "run"
    crash = True
    with pytest.raises(Crash):
        run(_cfg([*base, f"+output_dir={out}"]))
    last = out / "checkpoints" / "seed0" / "last.ckpt"
    import torch

    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert len(state["netsurv_selection"]["val_history"]) == 3   # selection state saved

    crash = False
    resumed = run(_cfg([*base, f"+output_dir={out}"]))
    info = resumed["training"]["seed0"]
    assert info["resumed_from"] == "last.ckpt" and info["epochs"] == 5
    assert not last.exists()                             # resume state dropped once committed
    fresh = run(_cfg([*base, f"+output_dir={tmp_path / 'fresh'}"]))
    assert fresh["training"]["seed0"]["resumed_from"] is None
    for k in ("best_epoch", "best_val_cindex", "snapshots", "epochs"):
        assert info[k] == fresh["training"]["seed0"][k], k
    a = pd.read_csv(out / "predictions.csv")
    b = pd.read_csv(tmp_path / "fresh" / "predictions.csv")
    np.testing.assert_allclose(a.risk, b.risk, rtol=1e-6, atol=1e-7)
    assert resumed["cindex"]["mean"] == pytest.approx(fresh["cindex"]["mean"], abs=1e-12)
    logged = pd.read_csv(out / "logs" / "seed0" / "metrics.csv")
    assert json.loads((out / "metrics.json").read_text())["training"]["seed0"] == info
    assert logged["val/cindex"].notna().sum() >= 2


def test_interrupted_inner_folds_resume_from_finished_folds(cohort, tmp_path, monkeypatch):
    """optim.inner_folds: a split killed during its second inner fold keeps the first fold's
    validation risks (checkpoints/<split>/inner0.npz) and a rerun trains only the rest; the
    result equals an uninterrupted run."""
    import netsurv.evaluation.deep as deep

    base = ["experiment=clinical", "data=cohort", f"data.root={cohort}", "evaluation.seeds=[0]",
            "data.clinical.categorical=[sex,smoking,histology,stage]", "optim.max_epochs=4",
            "optim.min_epochs=1", "optim.select_after=1", "optim.smooth=2",
            "optim.batch_size=16", "selection.k=[3]", "tabular.dropout=0", "fusion.module.dropout=0",
            "optim.inner_folds=3", "offset.modalities=none", "baseline=none"]
    real = deep._run_fit
    calls = []

    def run_fit(*a, **k):
        calls.append(1)
        if crash and len(calls) == 2:
            raise Crash("job killed during the second inner fold")
        return real(*a, **k)

    monkeypatch.setattr(deep, "_run_fit", run_fit)
    out = tmp_path / "run"
    crash = True
    with pytest.raises(Crash):
        run(_cfg([*base, f"+output_dir={out}"]))
    assert (out / "checkpoints" / "seed0" / "inner0.npz").is_file()
    assert not (out / "checkpoints" / "seed0" / "inner1.npz").exists()

    crash = False
    calls.clear()
    resumed = run(_cfg([*base, f"+output_dir={out}"]))
    info = resumed["training"]["seed0"]
    assert info["inner_folds_reused"] == 1
    assert len(calls) == 3            # folds 2 and 3, then the refit
    fresh = run(_cfg([*base, f"+output_dir={tmp_path / 'fresh'}"]))
    ref = fresh["training"]["seed0"]
    assert ref["inner_folds_reused"] == 0
    for k in ("inner_cindex", "best_epoch", "epochs", "snapshots"):
        assert info[k] == ref[k], k
    a = pd.read_csv(out / "predictions.csv")
    b = pd.read_csv(tmp_path / "fresh" / "predictions.csv")
    np.testing.assert_allclose(a.risk, b.risk, rtol=1e-6, atol=1e-7)
