"""A run stops before any stage when a modality it needs has no usable item at all; single
bad rows are left to the stages, which record them as failures."""
from __future__ import annotations

import pandas as pd
import pytest
from omegaconf import OmegaConf

from netsurv.cohort.schema import CohortError, load_cohort
from netsurv.evaluation.inputs import require_inputs


def _cfg(modalities, emb_dir=None):
    return OmegaConf.create({"modalities": modalities, "embeddings": {"dir": emb_dir}})


def test_every_slide_path_wrong_stops_a_wsi_run(cohort_dir):
    s = pd.read_csv(cohort_dir / "slides.csv")
    s["path"] = "nowhere/" + s["path"]
    s.to_csv(cohort_dir / "slides.csv", index=False)
    with pytest.warns(UserWarning, match="none of the 40 slide"):
        cohort = load_cohort(cohort_dir)
    with pytest.raises(CohortError, match=r"slides\.csv: none of the 40 row\(s\) can be used"):
        require_inputs(cohort, _cfg(["clinical", "wsi"]))
    with pytest.raises(CohortError, match="none of the 40"):
        require_inputs(cohort, _cfg(["pathomics"]))
    # features computed elsewhere need no slide files
    require_inputs(cohort, _cfg(["clinical", "wsi"], emb_dir="/features"))
    require_inputs(cohort, _cfg(["clinical"]))


def test_one_bad_slide_is_left_to_the_stages(cohort_dir):
    s = pd.read_csv(cohort_dir / "slides.csv")
    s.loc[0, "path"] = "nowhere.tiff"
    s.to_csv(cohort_dir / "slides.csv", index=False)
    with pytest.warns(UserWarning):
        cohort = load_cohort(cohort_dir)
    require_inputs(cohort, _cfg(["clinical", "wsi"]))


def test_radiomics_needs_ct_unless_a_table_is_given(cohort_dir):
    (cohort_dir / "ct.csv").unlink()
    cohort = load_cohort(cohort_dir)
    require_inputs(cohort, _cfg(["radiomics"]))   # features/radiomics.csv is the table
    (cohort_dir / "features" / "radiomics.csv").unlink()
    cohort = load_cohort(cohort_dir)
    with pytest.raises(CohortError, match=r"ct\.csv: no such file"):
        require_inputs(cohort, _cfg(["clinical", "radiomics"]))
