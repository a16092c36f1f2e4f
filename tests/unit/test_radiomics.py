"""CT radiomics stage: identical to pyradiomics, robust per case, cached and resumable."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from netsurv.demo.ct import write_demo_ct
from netsurv.radiology import radiomics as R
from netsurv.radiology.volumes import VolumeError, load_case, read_volume
from netsurv.stages import FAILURE_COLUMNS

PARAMS = {"name": "original", "label": 1, "resample_mask": False,
          "settings": {"binWidth": 25, "interpolator": "sitkBSpline"},
          "image_types": {"Original": {}}, "features": None}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct")
    out = []
    for i, scanner in enumerate(["philips_b", "ge_lung", "philips_b"]):
        img, msk = d / f"p{i}_ct.nii.gz", d / f"p{i}_mask.nii.gz"
        write_demo_ct(img, msk, rng=np.random.default_rng(i), size_z=0.0, irregularity_z=0.5 * i,
                      heterogeneity_z=0.0, scanner=scanner, fov_mm=(64.0, 64.0, 48.0))
        out.append((f"P{i}", img, msk))
    return d, out


def _direct(img, msk, params=PARAMS):
    ext = R.make_extractor(params)
    res = ext.execute(str(img), str(msk), label=1)
    return {k: float(v) for k, v in res.items() if not k.startswith("diagnostics_")}


def test_features_equal_direct_pyradiomics(cases):
    _, items = cases
    _, img, msk = items[1]
    ours, notes = R.extract_case(img, msk, PARAMS)
    ref = _direct(img, msk)
    assert len(ours) == 107 and list(ours) == list(ref) and notes == []
    np.testing.assert_allclose(list(ours.values()), list(ref.values()), rtol=1e-9, atol=1e-9)


def _write_dicom_series(img: sitk.Image, folder):
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sp = img.GetSpacing()
    uid = "1.2.826.0.1.3680043.2.1125.1." + "4242"
    for z in range(img.GetDepth()):
        sl = img[:, :, z]
        pos = img.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, val in [("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".1"),
                         ("0020|0013", str(z + 1)), ("0020|0032", "\\".join(map(str, pos))),
                         ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", str(sp[2])),
                         ("0028|0030", f"{sp[1]}\\{sp[0]}")]:
            sl.SetMetaData(tag, val)
        writer.SetFileName(str(folder / f"{z:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_matches_nifti_twin(cases, tmp_path):
    _, items = cases
    _, img, msk = items[0]
    image = sitk.ReadImage(str(img))
    _write_dicom_series(image, tmp_path / "series")
    back = read_volume(tmp_path / "series")
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    f_dcm, _ = R.extract_case(tmp_path / "series", msk, PARAMS)
    f_nii, _ = R.extract_case(img, msk, PARAMS)
    np.testing.assert_allclose(list(f_dcm.values()), list(f_nii.values()), rtol=1e-9, atol=1e-9)


def test_geometry_mismatch_fails_or_resamples(cases, tmp_path):
    _, items = cases
    _, img, msk = items[0]
    m = sitk.ReadImage(str(msk))
    m.SetOrigin(tuple(o + 3.0 for o in m.GetOrigin()))
    shifted = tmp_path / "shifted.nii.gz"
    sitk.WriteImage(m, str(shifted))
    with pytest.raises(VolumeError, match=r"mask geometry differs from image .* in \['origin'\]: "
                                          r"image \{.*\} vs mask \{.*\}"):
        load_case(img, shifted)
    case = load_case(img, shifted, resample_mask=True)
    assert case.notes and "resampled" in case.notes[0]
    assert case.mask.GetOrigin() == sitk.ReadImage(str(img)).GetOrigin()
    assert sitk.GetArrayViewFromImage(case.mask).sum() > 0


def test_mask_labelled_255_is_accepted(cases, tmp_path):
    _, items = cases
    _, img, msk = items[0]
    m = sitk.ReadImage(str(msk)) * 255
    p = tmp_path / "m255.nii.gz"
    sitk.WriteImage(sitk.Cast(m, sitk.sitkUInt8), str(p))
    f255, notes = R.extract_case(img, p, PARAMS)
    f1, _ = R.extract_case(img, msk, PARAMS)
    assert any("255" in n for n in notes)
    assert f255 == f1


def test_empty_mask_wrong_label_and_unreadable_file(cases, tmp_path):
    _, items = cases
    _, img, msk = items[0]
    m = sitk.ReadImage(str(msk)) * 0
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(m, str(empty))
    with pytest.raises(VolumeError, match=r"empty\.nii\.gz: mask is empty"):
        load_case(img, empty)
    with pytest.raises(VolumeError, match=r"label 3 not present; the mask holds labels \[1\]"):
        load_case(img, msk, label=3)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(VolumeError, match=r"broken\.nii\.gz: cannot be read as an image"):
        load_case(bad, msk)


def _ct_table(items, extra=()):
    rows = [{"patient_id": p, "image": str(i), "mask": str(m), "scanner": "A"} for p, i, m in items]
    return pd.DataFrame(rows + list(extra))


def test_failures_recorded_others_complete_and_resume(cases, tmp_path, monkeypatch):
    d, items = cases
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"garbage")
    ct = _ct_table(items, [{"patient_id": "BAD", "image": str(bad), "mask": str(items[0][2]),
                            "scanner": "B"}])
    out = tmp_path / "out"
    calls = []
    real = R._job
    monkeypatch.setattr(R, "_job", lambda args: calls.append(args[0]) or real(args))
    table, fail = R.extract_cohort(ct, PARAMS, out, n_jobs=1, progress=False)
    assert sorted(table.patient_id) == ["P0", "P1", "P2"]
    assert list(fail.patient_id) == ["BAD"] and "cannot be read" in fail.reason[0]
    assert table["scanner"].eq("A").all()                       # acquisition columns kept
    assert (out / "radiomics.csv").is_file() and (out / "failures.csv").is_file()
    assert list(pd.read_csv(out / "failures.csv").columns) == FAILURE_COLUMNS  # every stage's
    assert list(fail.columns) == FAILURE_COLUMNS and fail.path[0] == str(bad)
    assert sorted(calls) == ["BAD", "P0", "P1", "P2"]
    # an interrupted run: one finished case lost its cache entry -> only it is recomputed
    next(iter((out / "cases").glob("P1-*.json"))).unlink()
    calls.clear()
    table2, _ = R.extract_cohort(ct, PARAMS, out, n_jobs=1, progress=False)
    assert sorted(calls) == ["BAD", "P1"]
    pd.testing.assert_frame_equal(table.sort_values("patient_id").reset_index(drop=True),
                                  table2.sort_values("patient_id").reset_index(drop=True))
    # a changed parameter gives new cache keys: everything is recomputed
    calls.clear()
    R.extract_cohort(ct, {**PARAMS, "settings": {"binWidth": 50}}, out, n_jobs=1, progress=False)
    assert sorted(calls) == ["BAD", "P0", "P1", "P2"]


def test_process_pool_gives_identical_features(cases, tmp_path):
    _, items = cases
    ct = _ct_table(items)
    t1, _ = R.extract_cohort(ct, PARAMS, tmp_path / "a", n_jobs=1, progress=False)
    t2, _ = R.extract_cohort(ct, PARAMS, tmp_path / "b", n_jobs=2, progress=False)
    pd.testing.assert_frame_equal(t1.sort_values("patient_id").reset_index(drop=True),
                                  t2.sort_values("patient_id").reset_index(drop=True))
