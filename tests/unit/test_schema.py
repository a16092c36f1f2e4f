"""Cohort contract: every validation error names file, row/patient and column."""
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from netsurv.cohort import CohortError, CohortWarning, load_cohort
from netsurv.cohort.schema import line_of, require_items, source_of
from netsurv.features.clinical import ClinicalEncoder


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
    with pytest.raises(CohortError, match=r"clinical\.csv, line 1 \(header\): "
                                          r"missing required column\(s\) \['os_event'\]"):
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
    with pytest.raises(CohortError, match=r"clinical\.csv, line 2: column 'pfs_time' is negative "
                                          r"\(-1\.0\) for patient 'NET001'"):
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


def test_missing_image_file_is_left_to_the_stage(cohort_dir):
    # was a cohort-aborting error; now named in a warning, the other cases go on
    (cohort_dir / "img" / "NET007_mask.nii.gz").unlink()
    with pytest.warns(CohortWarning) as rec:
        c = load_cohort(cohort_dir)
    msg = " ".join(str(w.message) for w in rec)
    assert "ct.csv: 1 of 39 CT case(s) cannot be used" in msg
    assert "patient 'NET007', column 'mask'" in msg and "NET007_mask.nii.gz does not exist" in msg
    assert "NET007" in set(c.ct.patient_id)
    # a case missing both files counts once (it said "2 of 39" before)
    (cohort_dir / "img" / "NET007_ct.nii.gz").unlink()
    with pytest.warns(CohortWarning) as rec:
        load_cohort(cohort_dir)
    msg = " ".join(str(w.message) for w in rec)
    assert "ct.csv: 1 of 39 CT case(s) cannot be used" in msg
    assert "column 'image': file" in msg and "and column 'mask': file" in msg
    usable = require_items(c, "ct")
    assert len(usable) == 38 and "NET007" not in set(usable.patient_id)


def test_missing_slide_file_is_left_to_the_stage(cohort_dir):
    (cohort_dir / "img" / "NET003_0.tiff").unlink()
    with pytest.warns(CohortWarning, match=r"slides\.csv: 1 of 40 slide\(s\) cannot be used .*"
                      r"line 5: file .*NET003_0\.tiff of slide 'NET003-0' does not exist"):
        c = load_cohort(cohort_dir)
    prob = c.slides.set_index("slide_id").problem
    assert re.fullmatch(r"slides\.csv line 5, column 'path': file .*NET003_0\.tiff of slide "
                        r"NET003-0 does not exist \(paths are relative to .* or absolute\)",
                        prob["NET003-0"])
    assert prob.drop("NET003-0").isna().all()
    assert len(require_items(c, "slides")) == 39


def test_no_usable_item_left_is_an_error(cohort_dir):
    for f in (cohort_dir / "img").glob("*.tiff"):
        f.unlink()
    with pytest.warns(CohortWarning, match=r"slides\.csv: none of the 40 slide\(s\) can be used"):
        c = load_cohort(cohort_dir)
    with pytest.raises(CohortError, match=r"slides\.csv: none of the 40 row\(s\) can be used "
                                          r"\(line 2: file .*NET001_0.tiff of slide 'NET001-0' "
                                          r"does not exist; line 3: .* fix the paths"):
        require_items(c, "slides")
    assert len(require_items(c, "ct")) == 39
    (cohort_dir / "ct.csv").unlink()
    with pytest.raises(CohortError, match=r"ct\.csv: no such file; this run needs CT scans"):
        require_items(load_cohort(cohort_dir, check_files=False), "ct")


def test_slides_without_path_column(cohort_dir):
    # embeddings computed elsewhere: slides.csv needs patient_id and slide_id only
    _edit(cohort_dir, "slides.csv", lambda d: d.drop(columns="path"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        c = load_cohort(cohort_dir)
    assert c.slides.path.isna().all()
    assert c.slides.problem.iloc[0] == "no path for slide NET001-0 in slides.csv (line 2)"
    assert len(require_items(c, "slides", need_files=False)) == 40
    with pytest.raises(CohortError, match="none of the 40 row"):
        require_items(c, "slides")


def test_empty_path_cell_is_per_slide(cohort_dir):
    _edit(cohort_dir, "slides.csv", lambda d: d.assign(path=[None] + d.path[1:].tolist()))
    with pytest.warns(CohortWarning, match=r"line 2: slide 'NET001-0' has no path"):
        c = load_cohort(cohort_dir)
    assert c.slides.problem.notna().sum() == 1


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



# ------------------------------------------------------------- how spreadsheets write tables -----
def _clean(cohort_dir):
    return pd.read_csv(cohort_dir / "clinical.csv", dtype={"patient_id": str})


def _same_clinical(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=1e-12)


def test_whitespace_around_levels_is_stripped_with_a_warning(cohort_dir):
    ref = load_cohort(cohort_dir).clinical
    df = _clean(cohort_dir)
    df["sex"] = df["sex"].where(df.index % 3 != 0, df["sex"] + " ")   # "M " / "F "
    df["histology"] = " " + df["histology"]
    df.to_csv(cohort_dir / "clinical.csv", index=False)
    with pytest.warns(CohortWarning, match=r"clinical\.csv: removed leading/trailing whitespace "
                      r"from values of column\(s\) \['sex', 'histology'\] \(first 'sex': 'M ' on "
                      r"line 2"):
        c = load_cohort(cohort_dir)
    _same_clinical(c.clinical, ref)
    # the same design matrix, hence the same model: "M " was its own level (sex_M ) before
    enc = dict(numeric=["age"], categorical=["sex", "smoking", "histology", "stage"])
    a = ClinicalEncoder(**enc).fit(ref).transform(ref)
    b = ClinicalEncoder(**enc).fit(c.clinical).transform(c.clinical)
    pd.testing.assert_frame_equal(a, b)
    assert not [col for col in b.columns if col.endswith(" ")]


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity"])
def test_non_finite_time_is_rejected(cohort_dir, value):
    df = _clean(cohort_dir).astype({"os_time": object})
    df.loc[3, "os_time"] = value
    df.to_csv(cohort_dir / "clinical.csv", index=False)
    shown = "-inf" if value.startswith("-") else "inf"
    with pytest.raises(CohortError, match=rf"clinical\.csv, line 5: column 'os_time' is "
                                          rf"{shown} \(not finite\) for patient 'NET004'"):
        load_cohort(cohort_dir)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_files_with_decimal_commas_are_read(cohort_dir, sep, caplog):
    ref = load_cohort(cohort_dir).clinical
    _clean(cohort_dir).to_csv(cohort_dir / "clinical.csv", index=False, sep=sep, decimal=",")
    assert "," in (cohort_dir / "clinical.csv").read_text().splitlines()[1]  # decimal commas
    with caplog.at_level("INFO", logger="netsurv.cohort.schema"):
        c = load_cohort(cohort_dir)
    _same_clinical(c.clinical, ref)
    assert re.search(r"clinical\.csv: read as a (semicolon|tab)-separated file \(numbers may "
                     r"use a decimal comma\)", caplog.text)


def test_latin1_file_is_read_with_a_warning(cohort_dir):
    df = _clean(cohort_dir)
    df["histology"] = df["histology"].replace({"typical_carcinoid": "carcinoïde typique"})
    assert (df["histology"] == "carcinoïde typique").any()
    (cohort_dir / "clinical.csv").write_bytes(df.to_csv(index=False).encode("latin-1"))
    with pytest.warns(CohortWarning, match=r"clinical\.csv: not UTF-8 \(byte 0xef on line \d+\); "
                      r"read with the Windows-1252 \(Latin-1\) encoding, in which that byte is 'ï'"):
        c = load_cohort(cohort_dir)
    assert set(c.clinical.histology) == set(df.histology)


def test_utf16_tab_file_from_excel_is_read(cohort_dir):
    ref = load_cohort(cohort_dir).clinical
    text = _clean(cohort_dir).to_csv(index=False, sep="\t")
    (cohort_dir / "clinical.csv").write_bytes(text.encode("utf-16"))  # with byte-order mark
    _same_clinical(load_cohort(cohort_dir).clinical, ref)


def test_bom_and_windows_line_ends_are_read(cohort_dir):
    ref = load_cohort(cohort_dir).clinical
    text = _clean(cohort_dir).to_csv(index=False).replace("\n", "\r\n")
    (cohort_dir / "clinical.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    _same_clinical(load_cohort(cohort_dir).clinical, ref)


def test_excel_workbook_and_binary_files_are_named(cohort_dir):
    (cohort_dir / "clinical.csv").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CohortError, match=r"clinical\.csv: this is an Excel workbook .* 'CSV UTF-8"):
        load_cohort(cohort_dir)
    (cohort_dir / "clinical.csv").write_bytes(b"p\x00a\x00t\x00")
    with pytest.raises(CohortError, match=r"clinical\.csv: unknown text encoding"):
        load_cohort(cohort_dir)


def test_unquoted_decimal_comma_is_named_with_its_line(cohort_dir):
    lines = (cohort_dir / "clinical.csv").read_text().splitlines()
    cols = lines[0].split(",")
    row = lines[4].split(",")
    row[cols.index("os_time")] = row[cols.index("os_time")].replace(".", ",")
    lines[4] = ",".join(row)
    (cohort_dir / "clinical.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CohortError, match=r"clinical\.csv, line 5: 11 values but the header "
                                          r"\(line 1\) has 10 columns, so a value holds the "
                                          r"delimiter ',' \(comma\): probably a number with a "
                                          r"decimal comma .* save the file with ';' as the "
                                          r"delimiter"):
        load_cohort(cohort_dir)


def test_quoted_decimal_comma_in_a_number_column(cohort_dir):
    df = _clean(cohort_dir).astype({"os_time": object})
    df.loc[2, "os_time"] = "12,5"
    df.to_csv(cohort_dir / "clinical.csv", index=False)
    with pytest.raises(CohortError, match=r"line 4: column 'os_time' is not numeric .* '12,5'.*"
                                          r"decimal comma: write a decimal point \(e\.g\. 12\.5\)"):
        load_cohort(cohort_dir)


def test_value_holding_the_delimiter(cohort_dir):
    lines = (cohort_dir / "clinical.csv").read_text().splitlines()
    lines[7] = lines[7].replace("_carcinoid,", "_carcinoid, NOS,")
    lines[7] = lines[7].replace("_carcinoma,", "_carcinoma, NOS,")
    (cohort_dir / "clinical.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CohortError, match=r"clinical\.csv, line 8: 11 values but the header "
                                          r"\(line 1\) has 10 columns, so a value holds the "
                                          r"delimiter ',' \(comma\): quote text that holds it"):
        load_cohort(cohort_dir)


def test_line_numbers_count_blank_and_empty_lines(cohort_dir):
    lines = (cohort_dir / "clinical.csv").read_text().splitlines()
    cols = lines[0].split(",")
    row = lines[5].split(",")
    row[cols.index("os_event")] = "2"
    lines[5] = ",".join(row)
    # a blank line and an Excel row of empty cells above it: the error names the real line 8
    lines = lines[:3] + [""] + [","] * 1 + lines[3:]
    (cohort_dir / "clinical.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CohortError, match=r"'os_event' must be 0 or 1 .*found \['2'\] for "
                                          r"patient\(s\) \['NET005'\] \(first on line 8\)"):
        load_cohort(cohort_dir)


def test_numeric_covariate_holding_text_names_file_and_line(cohort_dir):
    df = _clean(cohort_dir).astype({"age": object})
    df.loc[6, "age"] = "unknown"
    df.to_csv(cohort_dir / "clinical.csv", index=False)
    c = load_cohort(cohort_dir)
    assert source_of(c.clinical).endswith("clinical.csv") and line_of(c.clinical, "NET007") == 8
    train = c.clinical.iloc[:30]  # lines travel with the rows the runner selects
    with pytest.raises(CohortError, match=re.escape(str(cohort_dir / "clinical.csv"))
                       + r": column 'age' is declared numeric \(data\.clinical\.numeric\) but holds "
                         r"text: 'unknown' for patient 'NET007' \(line 8\)"):
        ClinicalEncoder(numeric=["age"], categorical=["sex"]).fit(train)


@pytest.mark.parametrize("table,col,bad", [("slides.csv", "slide_id", "site1/S001"),
                                             ("slides.csv", "slide_id", ".."),
                                             ("clinical.csv", "patient_id", "a\\b")])
def test_ids_that_would_be_paths_are_refused(cohort_dir, table, col, bad):
    """Ids name the stages' per-patient / per-slide files: a separator would write elsewhere."""
    def edit(d):
        d[col] = d[col].astype(object)
        d.loc[1, col] = bad
        return d
    _edit(cohort_dir, table, edit)
    with pytest.raises(CohortError, match=re.escape(table) + rf": '{col}' .* on line\(s\) "
                       r"\[3\] cannot be used: ids name files"):
        load_cohort(cohort_dir)


def test_errors_of_other_tables_name_lines(cohort_dir):
    _edit(cohort_dir, "slides.csv", lambda d: d.assign(slide_id=["x"] * 2 + d.slide_id[2:].tolist()))
    with pytest.raises(CohortError, match=r"slides\.csv: duplicate slide_id \['x'\] \(lines \[2, 3\]\)"):
        load_cohort(cohort_dir)


def test_ct_label_must_be_an_integer(cohort_dir):
    _edit(cohort_dir, "ct.csv", lambda d: d.assign(label=["tumour"] + [1] * (len(d) - 1)))
    with pytest.raises(CohortError, match=r"ct\.csv, line 2: column 'label' is 'tumour' for "
                                          r"patient 'NET002'"):
        load_cohort(cohort_dir)


def test_feature_table_with_text_names_line(cohort_dir):
    _edit(cohort_dir, "features/radiomics.csv",
          lambda d: d.astype({"f2": object}).assign(f2=["NA"] + d.f2[1:].tolist()))
    c = load_cohort(cohort_dir)  # "NA" is a missing-value marker
    assert np.isnan(c.features["radiomics"].f2.iloc[0])
    _edit(cohort_dir, "features/radiomics.csv",
          lambda d: d.astype({"f2": object}).assign(f2=d.f2[:3].tolist() + ["high"] + d.f2[4:].tolist()))
    with pytest.raises(CohortError, match=r"radiomics\.csv, line 5: feature column 'f2' is not "
                                          r"numeric \(value 'high' for patient 'NET004'\)"):
        load_cohort(cohort_dir)


@pytest.mark.parametrize("edit,msg", [
    (lambda d: pd.concat([d, d.iloc[[2]]]), r"truth\.csv: duplicate patient_id \['NET003'\]"),
    (lambda d: d.assign(patient_id=["GHOST"] + d.patient_id[1:].tolist()),
     r"truth\.csv: 1 patient_id\(s\) not in clinical\.csv: \['GHOST'\]"),
    (lambda d: d.assign(true_risk=["inf"] + d.true_risk[1:].astype(str).tolist()),
     r"truth\.csv, line 2: column 'true_risk' is 'inf' for patient 'NET001'"),
])
def test_truth_table_is_checked(cohort_dir, edit, msg):
    """truth.csv feeds the oracle C-index: one finite risk per known patient."""
    ids = pd.read_csv(cohort_dir / "clinical.csv").patient_id
    truth = pd.DataFrame({"patient_id": ids, "true_risk": np.linspace(-1, 1, len(ids))})
    truth.to_csv(cohort_dir / "truth.csv", index=False)
    c = load_cohort(cohort_dir)
    assert c.truth["true_risk"].dtype == float and len(c.truth) == len(ids)
    edit(truth).to_csv(cohort_dir / "truth.csv", index=False)
    with pytest.raises(CohortError, match=msg):
        load_cohort(cohort_dir)
