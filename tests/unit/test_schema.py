"""Cohort contract: every validation error names file, row/patient and column."""
import re

import pandas as pd
import pytest

from netsurv.cohort import CohortError, CohortWarning, load_cohort


def _edit(root, name, fn):
    df = pd.read_csv(root / name, dtype={"patient_id": str})
    df = fn(df)
    df.to_csv(root / name, index=False)


def test_valid_cohort_loads(cohort_dir):
    c = load_cohort(cohort_dir)
    assert len(c.clinical) == 40
    assert c.slides.groupby("patient_id").size().max() == 2          # several slides: valid
    assert set(c.clinical.index) - set(c.slides.patient_id)          # patient without WSI: valid
    assert set(c.clinical.index) - set(c.ct.patient_id)              # patient without CT: valid
    assert list(c.features) == ["radiomics"]
    assert c.slides.path.map(lambda p: p.startswith(str(cohort_dir))).all()  # resolved paths
    t, e = c.endpoint("pfs")
    assert t.dtype == float and set(e) <= {0, 1}


def test_missing_required_column(cohort_dir):
    _edit(cohort_dir, "clinical.csv", lambda d: d.drop(columns="os_event"))
    with pytest.raises(CohortError, match=r"clinical\.csv: missing required column\(s\) \['os_event'\]"):
        load_cohort(cohort_dir)


def test_duplicate_patient_id(cohort_dir):
    def dup(d):
        d.loc[5, "patient_id"] = d.loc[3, "patient_id"]
        return d
    _edit(cohort_dir, "clinical.csv", dup)
    with pytest.raises(CohortError, match=r"clinical\.csv: duplicate patient_id \['NET004'\] \(lines \[5, 7\]\)"):
        load_cohort(cohort_dir)


def test_non_numeric_time(cohort_dir):
    def bad(d):
        d["os_time"] = d["os_time"].astype(object)
        d.loc[2, "os_time"] = "12 months"
        return d
    _edit(cohort_dir, "clinical.csv", bad)
    with pytest.raises(CohortError) as ei:
        load_cohort(cohort_dir)
    msg = str(ei.value)
    assert "'os_time' is not numeric" in msg and "NET003" in msg and "line 4" in msg
    assert "'12 months'" in msg


def test_negative_time(cohort_dir):
    def bad(d):
        d.loc[0, "pfs_time"] = -1.0
        return d
    _edit(cohort_dir, "clinical.csv", bad)
    with pytest.raises(CohortError, match=r"'pfs_time' is negative \(-1\.0\) for patient 'NET001' \(line 2\)"):
        load_cohort(cohort_dir)


def test_event_not_binary(cohort_dir):
    def bad(d):
        d.loc[1, "os_event"] = 2
        d.loc[4, "os_event"] = -1
        return d
    _edit(cohort_dir, "clinical.csv", bad)
    with pytest.raises(CohortError) as ei:
        load_cohort(cohort_dir)
    msg = str(ei.value)
    assert "'os_event' must be 0 or 1" in msg
    assert "1 = death observed" in msg
    assert "found ['-1', '2']" in msg and "NET002" in msg and "NET005" in msg


def test_pfs_event_message_mentions_progression(cohort_dir):
    _edit(cohort_dir, "clinical.csv", lambda d: d.assign(pfs_event=d.pfs_event.replace(1, "yes")))
    with pytest.raises(CohortError, match=r"1 = progression or death observed.*found \['yes'\]"):
        load_cohort(cohort_dir)


def test_unknown_patients_in_slides_and_ct(cohort_dir):
    _edit(cohort_dir, "slides.csv", lambda d: pd.concat(
        [d, pd.DataFrame([{"patient_id": "GHOST1", "slide_id": "g", "path": d.path[0]}])]))
    with pytest.raises(CohortError, match=r"slides\.csv: 1 patient_id\(s\) not in clinical\.csv: \['GHOST1'\]"):
        load_cohort(cohort_dir)


def test_unknown_patients_in_ct(cohort_dir):
    _edit(cohort_dir, "ct.csv", lambda d: d.assign(patient_id=d.patient_id.replace("NET010", "X9")))
    with pytest.raises(CohortError, match=r"ct\.csv: 1 patient_id\(s\) not in clinical\.csv: \['X9'\]"):
        load_cohort(cohort_dir)


def test_missing_image_file(cohort_dir):
    (cohort_dir / "img" / "NET007_mask.nii.gz").unlink()
    with pytest.raises(CohortError) as ei:
        load_cohort(cohort_dir)
    msg = str(ei.value)
    assert "ct.csv" in msg and "'mask'" in msg and "NET007" in msg and "does not exist" in msg


def test_missing_slide_file(cohort_dir):
    (cohort_dir / "img" / "NET003_0.tiff").unlink()
    with pytest.raises(CohortError, match=r"slides\.csv: column 'path', patient 'NET003' \(line \d+\): file .*NET003_0\.tiff does not exist"):
        load_cohort(cohort_dir)


def test_pfs_longer_than_os_warns(cohort_dir):
    def bad(d):
        d.loc[0, "pfs_time"] = d.loc[0, "os_time"] + 5
        return d
    _edit(cohort_dir, "clinical.csv", bad)
    with pytest.warns(CohortWarning, match=r"pfs_time > os_time for 1 patient\(s\) \['NET001'\]"):
        c = load_cohort(cohort_dir)
    assert len(c.clinical) == 40  # a warning, not an error


def test_feature_table_with_unknown_patient(cohort_dir):
    _edit(cohort_dir, "features/radiomics.csv",
          lambda d: d.assign(patient_id=d.patient_id.replace("NET001", "ZZ")))
    with pytest.raises(CohortError, match=r"radiomics\.csv: 1 patient_id\(s\) not in clinical\.csv: \['ZZ'\]"):
        load_cohort(cohort_dir)


def test_bad_mpp_value(cohort_dir):
    _edit(cohort_dir, "slides.csv", lambda d: d.assign(mpp=["0.25"] + ["abc"] * (len(d) - 1)))
    with pytest.raises(CohortError, match=r"column 'mpp' for slide .* is 'abc'"):
        load_cohort(cohort_dir)


def test_missing_clinical_file(tmp_path):
    tmp_path.joinpath("x").mkdir()
    with pytest.raises(CohortError, match=re.escape(str(tmp_path / "x" / "clinical.csv")) + ": file not found"):
        load_cohort(tmp_path / "x")
