"""CT volumes: non-finite voxels are found in every format (NIfTI included, which SimpleITK reads
as 0) and fail that case naming the file that holds them, image or mask."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from netsurv.demo.ct import write_demo_ct
from netsurv.radiology import radiomics as R
from netsurv.radiology.volumes import VolumeError, load_case, non_finite_voxels, read_volume

PARAMS = {"name": "original", "label": 1, "resample_mask": False,
          "settings": {"binWidth": 25, "interpolator": "sitkBSpline"},
          "image_types": {"Original": {}}, "features": None}
FORMATS = [".nii.gz", ".nii", ".nrrd", ".mha"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctnan")
    img, msk = d / "ct.nii.gz", d / "mask.nii.gz"
    write_demo_ct(img, msk, rng=np.random.default_rng(0), size_z=0.0, irregularity_z=0.0,
                  heterogeneity_z=0.0, scanner="philips_b", fov_mm=(64.0, 64.0, 48.0))
    return d, img, msk


def _with_nan(src, dst, *, float_type=True, value=np.nan):
    """Copy ``src`` to ``dst`` (format from the suffix) with its first non-zero voxel set to
    ``value``; returns that voxel's (x, y, z) index."""
    im = sitk.ReadImage(str(src))
    a = sitk.GetArrayFromImage(im).astype(np.float32)
    z, y, x = np.argwhere(a != 0)[0]
    a[z, y, x] = value
    out = sitk.GetImageFromArray(a if float_type else a.astype(np.int16))
    out.CopyInformation(im)
    sitk.WriteImage(out, str(dst))
    return (int(x), int(y), int(z))


def test_simpleitk_reads_nifti_nan_as_zero_but_the_file_holds_it(case, tmp_path):
    # why the check reads NIfTI with nibabel: SimpleITK alone cannot see these voxels
    _, img, _ = case
    p = tmp_path / "nan.nii.gz"
    x, y, z = _with_nan(img, p)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(p)))[z, y, x] == 0.0
    assert non_finite_voxels(p, sitk.ReadImage(str(p))) == (1, (x, y, z))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_image_voxels_fail_naming_the_image(case, tmp_path, fmt, value):
    _, img, msk = case
    bad = tmp_path / f"ct_bad{fmt}"
    x, y, z = _with_nan(img, bad, value=value)
    with pytest.raises(VolumeError) as ei:
        load_case(bad, msk)
    msg = str(ei.value)
    assert msg.startswith(f"{bad}: image holds 1 non-finite voxel(s)"), msg
    assert f"(x, y, z) = ({x}, {y}, {z})" in msg and "-1024 HU" in msg


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_mask_voxels_fail_naming_the_mask(case, tmp_path, fmt):
    # before: NIfTI NaNs became background silently, .mha NaNs failed with numpy errors
    # ("cannot convert float NaN to integer") attributed to the image
    _, img, msk = case
    bad = tmp_path / f"mask_bad{fmt}"
    _with_nan(msk, bad)
    with pytest.raises(VolumeError) as ei:
        load_case(img, bad)
    msg = str(ei.value)
    assert msg.startswith(f"{bad}: mask holds 1 non-finite voxel(s)") and "set them to 0" in msg
    assert str(img) not in msg


def test_finite_float_and_integer_volumes_pass(case, tmp_path):
    _, img, msk = case
    for fmt in FORMATS:
        f = tmp_path / f"float{fmt}"
        im = sitk.Cast(sitk.ReadImage(str(img)), sitk.sitkFloat32)
        sitk.WriteImage(im, str(f))
        assert non_finite_voxels(f, read_volume(f)) == (0, None)
    i16 = tmp_path / "int.nii.gz"
    _with_nan(img, i16, float_type=False, value=5.0)  # integer storage cannot hold NaN
    assert non_finite_voxels(i16, read_volume(i16)) == (0, None)
    assert load_case(img, msk).mask.GetPixelID() == sitk.sitkUInt8


def test_stage_records_the_case_and_goes_on(case, tmp_path):
    d, img, msk = case
    nan_img, nan_mask = tmp_path / "nan_ct.nii.gz", tmp_path / "nan_mask.mha"
    _with_nan(img, nan_img)
    _with_nan(msk, nan_mask)
    ct = pd.DataFrame([
        {"patient_id": "OK", "image": str(img), "mask": str(msk)},
        {"patient_id": "BADIMG", "image": str(nan_img), "mask": str(msk)},
        {"patient_id": "BADMASK", "image": str(img), "mask": str(nan_mask)},
        {"patient_id": "GONE", "image": str(tmp_path / "gone.nii.gz"), "mask": str(msk)},
    ])
    table, fails = R.extract_cohort(ct, PARAMS, tmp_path / "out", progress=False)
    assert table.patient_id.tolist() == ["OK"]
    reason = fails.set_index("patient_id").reason
    assert set(reason.index) == {"BADIMG", "BADMASK", "GONE"}
    assert reason["BADIMG"].startswith(f"{nan_img}: image holds 1 non-finite")
    assert reason["BADMASK"].startswith(f"{nan_mask}: mask holds 1 non-finite")
    assert "gone.nii.gz" in reason["GONE"]
