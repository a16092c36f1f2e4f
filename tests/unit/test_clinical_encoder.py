import numpy as np
import pandas as pd
import pytest

from netsurv.cohort.schema import CohortError
from netsurv.features.clinical import ClinicalEncoder


def _df():
    return pd.DataFrame({
        "age": [50.0, 60.0, np.nan, 70.0],
        "sex": ["M", "F", "M", None],
        "histology": ["tc", "ac", "tc", "sclc"],
    }, index=["a", "b", "c", "d"])


def test_fit_on_train_only_and_impute_with_train_statistics():
    train = _df()
    enc = ClinicalEncoder(numeric=["age"], categorical=["sex", "histology"]).fit(train)
    Z = enc.transform(train)
    # age: train median (60) fills the NaN, then standardised with train mean/std
    ages = np.array([50, 60, 60, 70.0])
    np.testing.assert_allclose(Z["age"], (ages - ages.mean()) / ages.std())
    # first level dropped: sex has levels F, M, missing -> columns sex_M, sex_missing
    assert "sex_M" in Z.columns and "sex_missing" in Z.columns and "sex_F" not in Z.columns
    test = pd.DataFrame({"age": [200.0], "sex": ["F"], "histology": ["tc"]}, index=["t"])
    Zt = enc.transform(test)
    assert Zt.loc["t", "age"] == pytest.approx((200 - ages.mean()) / ages.std())


def test_unseen_category_is_reference_with_warning():
    enc = ClinicalEncoder(numeric=["age"], categorical=["sex", "histology"]).fit(_df())
    test = pd.DataFrame({"age": [55.0], "sex": ["M"], "histology": ["lcnec"]}, index=["t"])
    with pytest.warns(UserWarning, match=r"'histology': level\(s\) \['lcnec'\] not seen in training"):
        Z = enc.transform(test)
    hist_cols = [c for c in Z.columns if c.startswith("histology_")]
    assert (Z.loc["t", hist_cols] == 0).all()


def test_declared_column_missing_or_not_numeric():
    with pytest.raises(CohortError, match=r"\['stage'\] declared in the data config"):
        ClinicalEncoder(numeric=["age"], categorical=["stage"]).fit(_df())
    bad = _df().assign(age=["50", "x", "60", "70"])
    with pytest.raises(CohortError, match=r"'age' is declared numeric .* text: 'x' for patient 'b'"):
        ClinicalEncoder(numeric=["age"]).fit(bad)
    with pytest.raises(CohortError, match=r"'age' is not finite: inf for patient 'a'"):
        ClinicalEncoder(numeric=["age"]).fit(_df().assign(age=[np.inf, 1.0, 2.0, 3.0]))


def test_whitespace_around_levels_is_one_level():
    clean = ClinicalEncoder(numeric=["age"], categorical=["sex", "histology"]).fit(_df())
    dirty = _df().assign(sex=["M ", " F", "M", None])
    with pytest.warns(UserWarning, match=r"\['sex'\]: leading/trailing whitespace removed"):
        enc = ClinicalEncoder(numeric=["age"], categorical=["sex", "histology"]).fit(dirty)
    assert enc.categories_ == clean.categories_
    pd.testing.assert_frame_equal(enc.transform(_df()), clean.transform(_df()))
