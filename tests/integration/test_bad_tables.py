"""Broken copies of a small cohort through the real tasks: the run either gives the clean run's
result (with a warning) or records the broken item and goes on with the others."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.demo.wsi import write_demo_slide

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _cfg(name, overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _clinical_run(root, out):
    from netsurv.tasks.train import run

    cfg = _cfg("train", ["report=false", "experiment=seed/clinical", "data=cohort",
                         f"data.root={root}", "evaluation.seeds=[0,1]", "inner_repeats=1",
                         "inner_cv=2", "model.grid.l1_ratio=[0.5]", "+output_dir=" + str(out),
                         "data.clinical.categorical=[sex,smoking,histology,stage]"])
    return run(cfg)


def test_whitespace_in_levels_gives_the_clean_result_and_a_warning(tmp_path):
    df = simulate_patients(60, seed=3)[CLINICAL_COLUMNS]
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for d in (clean, dirty):
        d.mkdir()
    df.to_csv(clean / "clinical.csv", index=False)
    bad = df.copy()
    bad["sex"] = np.where(np.arange(len(df)) % 2 == 0, bad["sex"] + " ", bad["sex"])  # "M "
    bad.to_csv(dirty / "clinical.csv", index=False)
    a = _clinical_run(clean, tmp_path / "run_clean")
    b = _clinical_run(dirty, tmp_path / "run_dirty")
    # before: "M " was its own level and the C-index moved (0.578 -> 0.530 in the issue)
    assert b["cindex"]["per_split"] == a["cindex"]["per_split"]
    log = (tmp_path / "run_dirty" / "warnings.log").read_text()
    assert "removed leading/trailing whitespace from values of column(s) ['sex']" in log
    sel = pd.read_csv(tmp_path / "run_dirty" / "selected_features.csv")
    assert not sel.feature.str.endswith(" ").any()


@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi_cohort")
    df = simulate_patients(4, seed=1)[CLINICAL_COLUMNS]
    df.to_csv(root / "clinical.csv", index=False)
    ids = df.patient_id.tolist()
    (root / "img").mkdir()
    write_demo_slide(root / "img" / "ok.tiff", rng=np.random.default_rng(0), density_z=0.0,
                     size_z=0.0, pleomorphism_z=0.0, mpp=0.5, width_um=768, height_um=768)
    pd.DataFrame([
        {"patient_id": ids[0], "slide_id": "ok", "path": "img/ok.tiff"},
        {"patient_id": ids[1], "slide_id": "gone", "path": "img/gone.tiff"},
        {"patient_id": ids[2], "slide_id": "nopath", "path": None},
    ]).to_csv(root / "slides.csv", index=False)
    return root


def test_missing_slide_files_are_failures_of_those_slides(slide_cohort):
    # before: "file ... does not exist" aborted the whole cohort at validation
    from netsurv.tasks.tile import run

    cfg = _cfg("tile", ["data=cohort", f"data.root={slide_cohort}", "tile.qc=false",
                        "tile.progress=false", "tiling.min_tissue_fraction=0.25"])
    with pytest.warns(UserWarning, match=r"slides\.csv: 2 of 3 slide\(s\) cannot be used"):
        res = run(cfg)
    assert (res["n_done"], res["n_failed"]) == (1, 2)
    out = Path(res["out"])
    fails = pd.read_csv(out / "failures.csv").set_index("slide_id").error
    assert fails["gone"].startswith("slides.csv line 3, column 'path': file ")
    assert "gone.tiff of slide gone does not exist" in fails["gone"]
    assert fails["nopath"] == "no path for slide nopath in slides.csv (line 4)"
    idx = pd.read_csv(out / "index.csv").set_index("slide_id").status
    assert idx.to_dict() == {"ok": "done", "gone": "failed", "nopath": "failed"}
    assert json.loads((out / "params.json").read_text())["params_hash"]
