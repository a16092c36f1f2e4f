"""The checks scripts/predict.py and evaluation=external make before scoring a cohort: one error
naming the mismatch (columns, feature names, embedding dimension, encoder, tiling)."""
import json

import pandas as pd
import pytest
from omegaconf import OmegaConf

from netsurv.cohort.schema import CohortError
from netsurv.evaluation.external import check_tables
from netsurv.evaluation.predict import Fitted, check_embeddings

CFG = OmegaConf.create({"data": {"clinical": {"numeric": ["age"], "categorical": ["sex"]}}})


def test_tables_missing_and_extra_columns():
    clin = pd.DataFrame({"age": [1.0], "smoking": ["y"]}, index=["p1"])
    with pytest.raises(CohortError, match=r"/c/clinical.csv lacks the clinical column\(s\) \['sex'\]"):
        check_tables({"clinical": None}, {"clinical": clin}, CFG, "/c")
    rad = pd.DataFrame({"b": [1.0], "a": [2.0], "z": [3.0]}, index=["p1"])
    with pytest.warns(UserWarning, match=r"1 column\(s\) of the 'radiomics' table .* \['z'\]"):
        out = check_tables({"radiomics": ["a", "b"]}, {"radiomics": rad}, CFG, "/c")
    assert list(out["radiomics"].columns) == ["a", "b"]  # training order
    with pytest.raises(CohortError, match=r"'radiomics' table lacks 1 feature column.*\['c'\]"):
        check_tables({"radiomics": ["a", "c"]}, {"radiomics": rad}, CFG, "/c")
    with pytest.raises(CohortError, match="no 'pathomics' table"):
        check_tables({"pathomics": ["a"]}, {"radiomics": rad}, CFG, "/c")


def test_embeddings_must_match_the_run(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"embeddings": {"encoder": "uni", "tiling_params_hash": "abc"}}))
    f = Fitted("external", "deep", {"inputs": {"dims": {"clinical": 4, "wsi": 1024}}})
    ok = {"dim": 1024, "encoder": "uni", "tiling_params_hash": "abc", "out": "/f"}
    check_embeddings(tmp_path, f, ok)
    with pytest.raises(CohortError, match="768 dimensions.*expects 1024"):
        check_embeddings(tmp_path, f, {**ok, "dim": 768})
    with pytest.raises(CohortError, match="encoder mismatch: .*encoder=uni.*encoder=virchow2"):
        check_embeddings(tmp_path, f, {**ok, "encoder": "virchow2"})
    with pytest.raises(CohortError, match="tiling parameters mismatch"):
        check_embeddings(tmp_path, f, {**ok, "tiling_params_hash": "def"})
    check_embeddings(tmp_path, f, {**ok, "tiling_params_hash": None})  # features from elsewhere
