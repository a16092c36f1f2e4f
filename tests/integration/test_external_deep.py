"""External validation of a MIL model between two demo cohorts generated with different seeds
(evaluation.test_demo_seed), and scripts/predict.py's reload of it (slow: two cohorts are
generated, tiled and embedded)."""
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from netsurv.evaluation.predict import predict
from netsurv.tasks.train import run

pytestmark = pytest.mark.slow
CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
TINY = ["data.demo.n_patients=24", "data.demo.seed=11", "data.demo.missing_ct=0.15",
        "data.demo.missing_wsi=0.15", "data.demo.two_slides=0.2", "data.demo.artefact_rate=0.0",
        "data.demo.fine_mpp_rate=0.2"]
FAST = ["encoder=test_tiny", "target=pfs", "optim.max_epochs=2", "optim.min_epochs=1",
        "optim.patience=0", "embed.progress=false", "tile.progress=false", "tile.qc=false",
        "selection.k=[3]", "optim.max_instances=16", "report=false", "tiling.target_mpp=1.0",
        "trainer.enable_progress_bar=false"]


def _run(out, extra):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=clinical_pathomics", "evaluation=external", *TINY, *FAST,
            f"+output_dir={out}", *extra])
    return run(cfg)


def _copy_cohort(src: Path, dst: Path, clinical: pd.DataFrame):
    """A cohort folder with another clinical.csv, the same slides (absolute paths) and the same
    stage cache (symlinked: same slides, same parameters)."""
    dst.mkdir()
    clinical.to_csv(dst / "clinical.csv", index=False)
    s = pd.read_csv(src / "slides.csv")
    s["path"] = [str(src / p) for p in s.path]
    s.to_csv(dst / "slides.csv", index=False)
    os.symlink(src / "derived", dst / "derived")


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extdeep")
    mp = pytest.MonkeyPatch()
    mp.setenv("NETSURV_CACHE", str(tmp / "cache"))
    # the slide probes join the offset whenever their weights are positive (no gate by
    # default), so predict() below must recompute the stacked offset, pathomics included
    m = _run(tmp / "run", ["evaluation.test_demo_seed=12"])
    yield tmp, m
    mp.undo()


def test_mil_external_run_and_predict(ext, tmp_path):
    tmp, m = ext
    e = m["external"]
    assert m["protocol"] == "external" and e["n_train"] + e["n_test"] == m["n_patients"]
    assert e["test_root"].endswith("n24-seed12-small") and e["renamed_test_ids"] > 0
    assert e["test_embeddings"]["tiling_params_hash"] == m["embeddings"]["tiling_params_hash"]
    assert "oracle_cindex" in m
    # the classical offset was fitted, so predict() below must recompute it for new patients
    assert all(t["offset"]["modalities"] == ["clinical"] for t in m["training"].values())
    # the morphology probe is among the used ones: predict() must extract pathomics from the
    # new cohort's slides for it (deterministic data: its weight is positive here)
    assert all("pathomics" in t["offset"]["probes"]["used"] for t in m["training"].values())
    test_root = Path(e["test_root"])
    s = predict(tmp / "run", OmegaConf.create({"root": str(test_root)}), tmp_path / "p")
    got = pd.read_csv(tmp_path / "p" / "predictions.csv").dropna(subset=["risk"])
    want = pd.read_csv(tmp / "run" / "predictions.csv").query("role == 'test'")
    assert len(got) == len(want) == e["n_test"]
    np.testing.assert_allclose(got.risk.to_numpy(), want.risk.to_numpy(), atol=1e-5, rtol=0)
    assert s["cindex"] == pytest.approx(m["cindex"]["mean"], abs=1e-6)
    with h5py.File(tmp_path / "p" / "attention.h5") as f:  # heatmaps of the scored patients
        assert len(f["external"]) == int(got.has_wsi.sum())
    # a copy without outcome columns is scored the same
    c = pd.read_csv(test_root / "clinical.csv")
    bare = tmp_path / "bare"
    _copy_cohort(test_root, bare, c.drop(columns=["os_time", "os_event", "pfs_time", "pfs_event"]))
    s2 = predict(tmp / "run", OmegaConf.create({"root": str(bare)}), tmp_path / "p2")
    got2 = pd.read_csv(tmp_path / "p2" / "predictions.csv").dropna(subset=["risk"])
    np.testing.assert_allclose(got2.risk.to_numpy(), got.risk.to_numpy(), atol=1e-6, rtol=0)
    assert "cindex" not in s2


def test_mil_test_outcomes_do_not_enter_fitting(ext, tmp_path):
    tmp, m = ext
    test_root = Path(m["external"]["test_root"])
    c = pd.read_csv(test_root / "clinical.csv")
    perm = np.random.default_rng(0).permutation(len(c))
    for col in ("os_time", "os_event", "pfs_time", "pfs_event"):
        c[col] = c[col].to_numpy()[perm]
    shuffled = tmp_path / "shuffled"
    _copy_cohort(test_root, shuffled, c)
    _run(tmp_path / "run", [f"evaluation.test_root={shuffled}"])
    a = pd.read_csv(tmp / "run" / "predictions.csv")
    b = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert a.patient_id.tolist() == b.patient_id.tolist()
    np.testing.assert_allclose(a.risk.to_numpy(), b.risk.to_numpy(), atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["cindex"]["mean"] != \
        m["cindex"]["mean"]
