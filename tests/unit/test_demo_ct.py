"""Tests for the synthetic demo CT generator (netsurv.demo.ct)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from netsurv.demo.ct import SCANNERS, write_demo_ct

SMOOTH, SHARP, THICK = "siemens_b30f", "ge_lung", "philips_b"
BASE = dict(size_z=0.0, irregularity_z=0.0, heterogeneity_z=0.0)
# Smaller FOV for the trait tests (faster; the tumour still fits comfortably).
TRAIT_FOV = (96.0, 96.0, 72.0)


@pytest.fixture(scope="module")
def make_case(tmp_path_factory):
    """Generate (and cache) a case; returns (info, ct image, mask image, paths)."""
    root = tmp_path_factory.mktemp("demo_ct")
    cache: dict = {}

    def _make(scanner=SMOOTH, seed=0, fov=(128.0, 128.0, 96.0), **traits):
        t = {**BASE, **traits}
        key = (scanner, seed, fov, tuple(sorted(t.items())))
        if key not in cache:
            stem = f"case{len(cache)}"
            img_p, msk_p = root / f"{stem}_ct.nii.gz", root / f"{stem}_mask.nii.gz"
            info = write_demo_ct(img_p, msk_p, rng=np.random.default_rng(seed),
                                 scanner=scanner, fov_mm=fov, **t)
            cache[key] = (info, sitk.ReadImage(str(img_p)), sitk.ReadImage(str(msk_p)),
                          (str(img_p), str(msk_p)))
        return cache[key]

    return _make


@pytest.fixture(scope="module")
def radiomics_features():
    featureextractor = pytest.importorskip("radiomics.featureextractor")

    logger = logging.getLogger("radiomics")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    ext = featureextractor.RadiomicsFeatureExtractor()  # default settings
    # Only the features we test, to keep the run short (settings unchanged).
    ext.disableAllFeatures()
    ext.enableFeaturesByName(shape=["Sphericity"],
                             firstorder=["StandardDeviation", "Entropy"],
                             glcm=["Contrast", "JointEntropy", "Idm"])

    def _extract(paths) -> dict:
        res = ext.execute(*paths)
        return {k: float(v) for k, v in res.items() if k.startswith("original_")}

    yield _extract
    logger.setLevel(old_level)


def test_scanner_profiles():
    assert len(SCANNERS) >= 3
    for key in ("siemens_b30f", "ge_lung", "philips_b"):
        assert key in SCANNERS
    required = {"manufacturer", "model", "kernel", "pixel_spacing", "slice_thickness",
                "noise_hu", "sharpness", "hu_offset", "psf_sigma_mm"}
    for prof in SCANNERS.values():
        assert required <= set(prof)
    assert SCANNERS[SHARP]["sharpness"] > SCANNERS[SMOOTH]["sharpness"]
    assert SCANNERS[SHARP]["psf_sigma_mm"] < SCANNERS[SMOOTH]["psf_sigma_mm"]


@pytest.mark.parametrize("scanner", sorted(SCANNERS))
def test_geometry_mask_and_metadata(make_case, scanner):
    info, ct, mask, _ = make_case(scanner)
    prof = SCANNERS[scanner]
    assert ct.GetPixelID() == sitk.sitkInt16
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert ct.GetSize() == mask.GetSize() == tuple(info["size"])
    np.testing.assert_allclose(ct.GetSpacing(), mask.GetSpacing())
    np.testing.assert_allclose(ct.GetOrigin(), mask.GetOrigin())
    np.testing.assert_allclose(ct.GetDirection(), mask.GetDirection())
    np.testing.assert_allclose(
        ct.GetSpacing(),
        (prof["pixel_spacing"], prof["pixel_spacing"], prof["slice_thickness"]))
    # Default FOV 128 x 128 x 96 mm.
    np.testing.assert_allclose(np.array(ct.GetSize()) * ct.GetSpacing(),
                               (128.0, 128.0, 96.0), atol=prof["slice_thickness"])

    m = sitk.GetArrayFromImage(mask)
    assert set(np.unique(m)) == {0, 1}
    _, n_comp = ndimage.label(m)
    assert n_comp == 1
    voxel_ml = prof["pixel_spacing"] ** 2 * prof["slice_thickness"] / 1000.0
    assert info["tumour_volume_ml"] == pytest.approx(m.sum() * voxel_ml)
    for key, want in (("scanner", scanner), ("manufacturer", prof["manufacturer"]),
                      ("kernel", prof["kernel"])):
        assert info[key] == want
    assert info["slice_thickness"] == prof["slice_thickness"]
    assert info["pixel_spacing"] == prof["pixel_spacing"]
    ct_a = sitk.GetArrayFromImage(ct)
    assert info["tumour_mean_hu"] == pytest.approx(ct_a[m == 1].mean())


@pytest.mark.parametrize("scanner", sorted(SCANNERS))
def test_hu_sanity(make_case, scanner):
    info, ct, mask, _ = make_case(scanner)
    offset = SCANNERS[scanner]["hu_offset"]
    a = sitk.GetArrayFromImage(ct).astype(np.float32) - offset
    m = sitk.GetArrayFromImage(mask).astype(bool)
    assert a.min() >= -1024 - abs(offset) and a.max() < 3072
    # Lung: x > +20 mm (the chest wall is on the low-x side and never reaches
    # there), at least ~10 mm away from the tumour.
    x_mm = ct.GetOrigin()[0] + np.arange(a.shape[2]) * ct.GetSpacing()[0]
    far = ~ndimage.binary_dilation(m, iterations=max(2, int(10 / ct.GetSpacing()[0])))
    lung = far & (x_mm > 20.0)[None, None, :]
    assert lung.sum() > 10_000
    assert -850.0 <= float(np.median(a[lung])) <= -750.0
    # Tumour tissue (core, >= 2 mm from the surface: no partial volume).
    assert 0.0 <= info["tumour_core_mean_hu"] - offset <= 80.0
    # Whole-mask mean includes partial-volume boundary voxels but is still
    # far from lung.
    assert -250.0 <= info["tumour_mean_hu"] - offset <= 80.0
    # Outside air exists (chest wall crop) and is around -1000 HU.
    assert float(np.percentile(a, 0.5)) < -900.0


def test_determinism(make_case, tmp_path):
    info, ct, mask, _ = make_case(SHARP, seed=7)
    again = write_demo_ct(tmp_path / "a.nii.gz", tmp_path / "a_m.nii.gz",
                          rng=np.random.default_rng(7), scanner=SHARP, **BASE)
    assert again == info

    def arr(img_or_path):
        if not isinstance(img_or_path, sitk.Image):
            img_or_path = sitk.ReadImage(str(img_or_path))
        return sitk.GetArrayFromImage(img_or_path)

    np.testing.assert_array_equal(arr(ct), arr(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(arr(mask), arr(tmp_path / "a_m.nii.gz"))
    info2, ct2, _, _ = make_case(SHARP, seed=8)
    assert not np.array_equal(arr(ct), arr(ct2))
    assert info2["tumour_centre_mm"] != info["tumour_centre_mm"]


def test_volume_follows_size_trait(make_case):
    for scanner in (SMOOTH, THICK):
        vols = [make_case(scanner, fov=TRAIT_FOV, size_z=z)[0]["tumour_volume_ml"]
                for z in (-1.5, 0.0, 1.5)]
        assert vols[0] < vols[1] < vols[2]
    info = make_case(SMOOTH, fov=TRAIT_FOV)[0]  # size_z = 0 -> ~22 mm equivalent diameter
    assert info["tumour_diameter_mm"] == pytest.approx(22.0, rel=0.1)


@pytest.mark.parametrize("scanner", [SMOOTH, THICK])
def test_sphericity_follows_irregularity_trait(make_case, radiomics_features, scanner):
    f_lo = radiomics_features(make_case(scanner, fov=TRAIT_FOV, irregularity_z=-1.5)[3])
    f_hi = radiomics_features(make_case(scanner, fov=TRAIT_FOV, irregularity_z=1.5)[3])
    key = "original_shape_Sphericity"
    assert f_lo[key] > f_hi[key] + 0.05
    # Irregularity must not masquerade as size.
    v_lo = make_case(scanner, fov=TRAIT_FOV, irregularity_z=-1.5)[0]["tumour_volume_ml"]
    v_hi = make_case(scanner, fov=TRAIT_FOV, irregularity_z=1.5)[0]["tumour_volume_ml"]
    assert v_hi == pytest.approx(v_lo, rel=0.15)


@pytest.mark.parametrize("scanner", [SMOOTH, SHARP])
def test_texture_follows_heterogeneity_trait(make_case, radiomics_features, scanner):
    f_lo = radiomics_features(make_case(scanner, fov=TRAIT_FOV, heterogeneity_z=-1.5)[3])
    f_hi = radiomics_features(make_case(scanner, fov=TRAIT_FOV, heterogeneity_z=1.5)[3])
    # Whole-mask StandardDeviation is dominated (~100-120 HU) by partial-volume
    # boundary voxels, so test binned-intensity heterogeneity features instead.
    assert f_hi["original_firstorder_Entropy"] > f_lo["original_firstorder_Entropy"] + 0.15
    assert f_hi["original_glcm_JointEntropy"] > f_lo["original_glcm_JointEntropy"] + 0.3
    assert f_hi["original_glcm_Idm"] < f_lo["original_glcm_Idm"]
    # Also visible away from the boundary: HU spread in the tumour core.
    cores = []
    for z in (-1.5, 1.5):
        _, ct, mask, _ = make_case(scanner, fov=TRAIT_FOV, heterogeneity_z=z)
        m = sitk.GetArrayFromImage(mask).astype(bool)
        core = ndimage.binary_erosion(m, iterations=2)
        cores.append(sitk.GetArrayFromImage(ct)[core].std())
    assert cores[1] > 1.2 * cores[0]


def test_scanner_batch_effect(make_case, radiomics_features):
    """Same tumour, smooth vs. sharp kernel: sharp is noisier / more textured."""
    f_smooth = radiomics_features(make_case(SMOOTH)[3])
    f_sharp = radiomics_features(make_case(SHARP)[3])
    assert f_sharp["original_glcm_Contrast"] > 1.2 * f_smooth["original_glcm_Contrast"]
    assert f_sharp["original_glcm_Idm"] < 0.9 * f_smooth["original_glcm_Idm"]
    # Fine-grained noise: std of neighbour differences in lung (x > +20 mm,
    # where the smooth parenchyma texture contributes little to differences).
    hf = {}
    for sc in (SMOOTH, SHARP):
        ct = make_case(sc)[1]
        a = sitk.GetArrayFromImage(ct).astype(np.float32)
        x_mm = ct.GetOrigin()[0] + np.arange(a.shape[2]) * ct.GetSpacing()[0]
        d = np.diff(a[:, :, x_mm > 20.0], axis=2)
        hf[sc] = float(np.median(np.abs(d)))
    assert hf[SHARP] > 3.0 * hf[SMOOTH]


def test_generation_speed(tmp_path):
    # Finest grid (3.2 M voxels), typical traits; ~0.35 s on an idle core.
    # CPU time (not wall time) and a generous bound: a regression guard that
    # does not flake on a busy machine.
    write_demo_ct(tmp_path / "w.nii.gz", tmp_path / "w_m.nii.gz",
                  rng=np.random.default_rng(0), scanner=SMOOTH, **BASE)  # warm-up
    t0 = time.process_time()
    write_demo_ct(tmp_path / "s.nii.gz", tmp_path / "s_m.nii.gz",
                  rng=np.random.default_rng(1), scanner=SMOOTH, size_z=0.5,
                  irregularity_z=0.5, heterogeneity_z=0.5)
    assert time.process_time() - t0 < 2.5


def test_unknown_scanner_raises(tmp_path):
    with pytest.raises(KeyError):
        write_demo_ct(tmp_path / "x.nii.gz", tmp_path / "x_m.nii.gz",
                      rng=np.random.default_rng(0), scanner="nope", **BASE)
