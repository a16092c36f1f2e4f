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
    check_embeddings(tmp_path, f, {**ok, "encoder": "unknown (features from /b)"})


def test_external_test_config(tmp_path):
    from netsurv.evaluation.external import test_config

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "clinical.csv").write_text("patient_id\n")

    def cfg(**ev):
        return OmegaConf.create({
            "data": {"root": str(tmp_path / "a"), "derived": "${data.root}/derived", "demo": None},
            "evaluation": {"name": "external", "test_root": None, "test_demo_seed": None, **ev}})

    with pytest.raises(CohortError, match="needs the test cohort: evaluation.test_root="):
        test_config(cfg())
    with pytest.raises(CohortError, match="test_demo_seed generates a second demo cohort"):
        test_config(cfg(test_demo_seed=1))
    with pytest.raises(CohortError, match="no clinical.csv there"):
        test_config(cfg(test_root=str(tmp_path / "c")))
    t = test_config(cfg(test_root=str(tmp_path / "b")))
    assert t.data.root == str(tmp_path / "b") and t.data.derived == str(tmp_path / "b" / "derived")
    same = cfg(test_root=str(tmp_path / "b"))
    same.data.root = str(tmp_path / "b")
    with pytest.raises(CohortError, match="is the training cohort"):
        test_config(same)
    # a second demo cohort: another seed, its own folder and cache
    demo = OmegaConf.create({
        "data": {"root": str(tmp_path) + "/n${data.demo.n_patients}-seed${data.demo.seed}",
                 "derived": "${data.root}/derived", "demo": {"n_patients": 24, "seed": 0}},
        "evaluation": {"name": "external", "test_root": None, "test_demo_seed": 3}})
    t = test_config(demo)
    assert t.data.root == str(tmp_path / "n24-seed3") and t.data.demo.seed == 3
    assert t.data.derived == str(tmp_path / "n24-seed3" / "derived")


def test_combat_batches_must_be_given():
    from netsurv.evaluation.external import check_batches

    cfg = OmegaConf.create({"harmonize": {"method": "combat", "modalities": ["radiomics"],
                                          "batch_col": "scanner"}})
    frames = {"radiomics": pd.DataFrame({"a": [1.0, 2.0]}, index=["p1", "p2"])}
    check_batches(cfg, frames, pd.DataFrame({"scanner": ["A", "B"]}, index=["p1", "p2"]), "/c")
    with pytest.raises(CohortError, match=r"/c/ct.csv: no 'scanner' .* for 1 patient\(s\), e.g. \['p2'\]"):
        check_batches(cfg, frames, pd.DataFrame({"scanner": ["A", None]}, index=["p1", "p2"]), "/c")
    with pytest.raises(CohortError, match="for 2 patient"):
        check_batches(cfg, frames, None, "/c")
