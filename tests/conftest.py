"""Shared fixtures: tiny cohorts written to tmp folders by the tests themselves."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients


@pytest.fixture
def clinical_df() -> pd.DataFrame:
    return simulate_patients(40, seed=7)[CLINICAL_COLUMNS].copy()


@pytest.fixture
def cohort_dir(tmp_path, clinical_df):
    """A valid cohort folder: clinical.csv, slides.csv (one patient with 2 slides, one with
    none), ct.csv (one patient without CT), a feature table and dummy image files."""
    root = tmp_path / "cohort"
    (root / "img").mkdir(parents=True)
    clinical_df.to_csv(root / "clinical.csv", index=False)
    ids = clinical_df.patient_id.tolist()
    slides = []
    for i, p in enumerate(ids[:-1]):
        for s in range(2 if i == 0 else 1):
            f = root / "img" / f"{p}_{s}.tiff"
            f.write_bytes(b"x")
            slides.append({"patient_id": p, "slide_id": f"{p}-{s}", "path": f"img/{f.name}"})
    pd.DataFrame(slides).to_csv(root / "slides.csv", index=False)
    ct = []
    for p in ids[1:]:
        for kind in ("ct", "mask"):
            (root / "img" / f"{p}_{kind}.nii.gz").write_bytes(b"x")
        ct.append({"patient_id": p, "image": f"img/{p}_ct.nii.gz", "mask": f"img/{p}_mask.nii.gz",
                   "scanner": "A"})
    pd.DataFrame(ct).to_csv(root / "ct.csv", index=False)
    (root / "features").mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame({"patient_id": ids, "f1": rng.normal(size=len(ids)),
                  "f2": rng.normal(size=len(ids))}).to_csv(root / "features" / "radiomics.csv",
                                                           index=False)
    return root


@pytest.fixture(autouse=True)
def _restore_lightning_rank_zero():
    """A Trainer built under faked launcher variables (torchrun/SLURM rank 3, say) sets
    Lightning's process-wide ``rank_zero_only.rank``; later tests in the same process would then
    log nothing (CSVLogger, rank-zero prints).  Put it back after every test."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    before = getattr(rank_zero_only, "rank", 0)  # Lightning sets it when imported: 0 here
    yield
    rank_zero_only.rank = before
