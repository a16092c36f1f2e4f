"""Training on features computed elsewhere: ``embeddings.dir`` with TRIDENT-layout files, a bad
file among them, slides.csv with ids only (no slide images at hand)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.cohort.schema import SLIDES_REQUIRED
from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.evaluation.attention import read_attention
from netsurv.tasks.train import run

REPO = Path(__file__).resolve().parents[2]
FAST = ["evaluation.seeds=[0]", "optim.max_epochs=2", "optim.min_epochs=1", "optim.patience=0",
        "optim.max_instances=16", "optim.batch_size=8", "report=false", "target=os",
        "data.clinical.categorical=[sex,smoking,histology,stage]", "selection.k=[3]"]


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A cohort of 24 patients (one with two slides, one without any) whose slide features
    were computed elsewhere: TRIDENT files (fp16, chunked rows, coords attrs), plus one
    unreadable file."""
    d = tmp_path_factory.mktemp("ext")
    root, feats = d / "cohort", d / "trident" / "20x_256px_0px_overlap" / "features_uni_v1"
    root.mkdir()
    feats.mkdir(parents=True)
    clin = simulate_patients(24, seed=3)[CLINICAL_COLUMNS]
    clin.to_csv(root / "clinical.csv", index=False)
    rng = np.random.default_rng(0)
    rows, coords = [], {}
    for i, pid in enumerate(clin.patient_id[:-1]):
        for k in range(2 if i == 0 else 1):
            sid = f"{pid}-{k}"
            n = int(rng.integers(20, 60))
            side = int(np.ceil(np.sqrt(n)))
            c = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 512
            coords[sid] = c
            with h5py.File(feats / f"{sid}.h5", "w") as f:
                f.create_dataset("features", data=rng.standard_normal((n, 32)).astype(np.float16),
                                 chunks=(1, 32), maxshape=(None, 32))
                cd = f.create_dataset("coords", data=c, chunks=(1, 2), maxshape=(None, 2))
                cd.attrs["patch_size_level0"] = 512
                cd.attrs["patch_size"] = 256
            rows.append({"patient_id": pid, "slide_id": sid})
    (feats / f"{rows[5]['slide_id']}.h5").write_bytes(b"interrupted copy")
    slides = pd.DataFrame(rows)
    if "path" in SLIDES_REQUIRED:  # until the path column is optional: placeholders
        (root / "img").mkdir()
        for r in rows:
            (root / "img" / f"{r['slide_id']}.svs").write_bytes(b"x")
        slides["path"] = [f"img/{s}.svs" for s in slides.slide_id]
    slides.to_csv(root / "slides.csv", index=False)
    return {"root": root, "feats": feats, "coords": coords, "bad": rows[5]}


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("experiment,model", [("pathomics", "abmil"),
                                              ("clinical_pathomics", "transmil")])
def test_training_on_trident_features_from_embeddings_dir(external, tmp_path, experiment, model):
    out = tmp_path / "run"
    cfg = _cfg([f"experiment={experiment}", f"net={model}", "data=cohort",
                f"data.root={external['root']}", f"embeddings.dir={external['feats']}",
                f"+output_dir={out}", *FAST])
    metrics = run(cfg)
    emb = metrics["embeddings"]
    assert emb["out"] == str(external["feats"].resolve())
    assert emb["tiling_params_hash"] is None and emb["n_tiles"] > 0
    pred = pd.read_csv(out / "predictions.csv")
    assert np.isfinite(pred.risk).all()
    bad = external["bad"]
    warn = (out / "warnings.log").read_text()
    assert f"{bad['slide_id']}.h5: cannot be read" in warn
    fails = pd.read_csv(Path(external["root"]) / "derived" / "bags" /
                        next(p.name for p in (Path(external["root"]) / "derived" / "bags")
                             .iterdir()) / "failures.csv")
    assert fails.slide_id.tolist() == [bad["slide_id"]]
    if experiment == "pathomics":   # the patient of the bad slide has no modality left
        assert bad["patient_id"] not in set(pred.patient_id)
    # heatmap records of the test patients: TRIDENT's coords, one weight per tile
    recs = read_attention(out / "attention.h5")
    assert recs
    for r in recs:
        c = np.concatenate([external["coords"][s] for s in r.slide_ids])
        np.testing.assert_array_equal(r.coords, c)
        assert r.patch_size_level0 == [512] * len(r.slide_ids)
        assert r.attention.sum() == pytest.approx(1.0, abs=1e-4)
    assert json.loads((out / "metrics.json").read_text())["model"] == (
        "ABMIL" if model == "abmil" else "TransMIL")
