"""The synthetic demo cohort: contract, images, determinism, and its statistics."""
import json

import numpy as np
import openslide
import pandas as pd
import pytest
import SimpleITK as sitk
from lifelines.utils import concordance_index

from netsurv.cohort import load_cohort
from netsurv.demo.cohort import CLINICAL_COLUMNS, make_demo_cohort, plan_cohort, simulate_patients

SMALL = dict(n_patients=8, seed=5, missing_ct=0.25, missing_wsi=0.25, two_slides=0.4,
             artefact_rate=0.25, fine_mpp_rate=0.3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_cohort(tmp_path_factory.mktemp("demo") / "c", verbose=False, **SMALL)


def test_demo_follows_the_contract(demo):
    c = load_cohort(demo)
    assert len(c.clinical) == 8
    pd.testing.assert_frame_equal(
        c.clinical.reset_index(),
        simulate_patients(8, 5)[CLINICAL_COLUMNS].astype({"age": int}), check_dtype=False)
    assert (c.clinical.pfs_time <= c.clinical.os_time).all()
    assert {"sex", "smoking", "histology", "stage", "age"} <= set(c.clinical.columns)
    assert set(c.ct.columns) >= {"scanner", "kernel", "slice_thickness", "pixel_spacing"}
    assert c.truth is not None and len(c.truth) == 8
    assert not c.features  # pathomics come from the morphology stage, not a shipped table


def test_every_slide_opens_with_mpp(demo):
    c = load_cohort(demo)
    truth = pd.read_csv(demo / "truth" / "slides.csv")
    assert len(c.slides) == len(truth) > 0
    for row, t in zip(c.slides.itertuples(), truth.itertuples()):
        s = openslide.OpenSlide(row.path)
        mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
        assert mpp in (0.25, 0.5) and mpp == pytest.approx(t.mpp)
        assert s.level_count >= 2 and s.dimensions == (t.width, t.height)
        label = (demo / t.truth_mask)
        assert label.is_file()
        s.close()


def test_every_ct_has_matching_nonempty_mask(demo):
    c = load_cohort(demo)
    assert len(c.ct) > 0
    for row in c.ct.itertuples():
        img, msk = sitk.ReadImage(row.image), sitk.ReadImage(row.mask)
        assert img.GetSize() == msk.GetSize()
        assert img.GetSpacing() == msk.GetSpacing()
        assert img.GetOrigin() == msk.GetOrigin()
        assert img.GetDirection() == msk.GetDirection()
        m = sitk.GetArrayViewFromImage(msk)
        assert m.sum() > 0 and set(np.unique(m)) <= {0, 1}
        assert img.GetSpacing()[2] == pytest.approx(row.slice_thickness)


def test_generation_is_deterministic(demo, tmp_path):
    params = dict(SMALL, n_patients=3)
    a = make_demo_cohort(tmp_path / "a", verbose=False, n_jobs=1, **params)
    b = make_demo_cohort(tmp_path / "b", verbose=False, n_jobs=2, **params)
    for f in ("clinical.csv", "truth.csv", "ct.csv", "slides.csv"):
        assert (a / f).read_text() == (b / f).read_text()
    for f in sorted((a / "slides").iterdir()):
        sa, sb = openslide.OpenSlide(f), openslide.OpenSlide(b / "slides" / f.name)
        ra = np.asarray(sa.read_region((0, 0), 0, sa.dimensions))
        rb = np.asarray(sb.read_region((0, 0), 0, sb.dimensions))
        np.testing.assert_array_equal(ra, rb)
    for f in sorted((a / "ct").iterdir()):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(b / "ct" / f.name))))
    other = simulate_patients(3, seed=6)
    assert not other.os_time.equals(simulate_patients(3, seed=5).os_time)


def test_rerun_reuses_and_params_regenerate(demo):
    stamp = (demo / ".complete").stat().st_mtime_ns
    make_demo_cohort(demo, verbose=False, **SMALL)
    assert (demo / ".complete").stat().st_mtime_ns == stamp
    assert json.loads((demo / ".complete").read_text())["params"]["n_patients"] == 8


def test_refuses_to_overwrite_a_user_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "clinical.csv").write_text("patient_id\n")
    with pytest.raises(FileExistsError, match="not a netsurv demo cohort"):
        make_demo_cohort(tmp_path / "mine", verbose=False)


def test_default_cohort_statistics():
    """The default cohort (83 patients, seed 0): oracle C-index, censoring, modality coverage."""
    df, slides, ct = plan_cohort()
    assert len(df) == 83
    oracle = concordance_index(df.os_time, -df.true_risk, df.os_event)
    assert 0.72 <= oracle <= 0.85
    assert 0.30 <= 1 - df.os_event.mean() <= 0.50
    assert 0.25 <= 1 - df.pfs_event.mean() <= 0.50
    assert (df.pfs_time <= df.os_time).all()
    with_wsi = {j["patient_id"] for j in slides}
    with_ct = {j["patient_id"] for j in ct}
    assert 0.03 <= 1 - len(with_wsi) / 83 <= 0.2 and 0.03 <= 1 - len(with_ct) / 83 <= 0.2
    assert with_wsi | with_ct == set(df.patient_id)
    per_patient = pd.Series([j["patient_id"] for j in slides]).value_counts()
    assert (per_patient == 2).sum() >= 5
    arts = pd.Series([a for j in slides for a in j["artefacts"]]).value_counts()
    assert set(arts.index) == {"pen", "padding", "blur"} and arts.min() >= 5
    assert {j["mpp"] for j in slides} == {0.25, 0.5}
    assert len({j["scanner"] for j in ct}) >= 3
    # histology has realistic prevalence and strongly different survival
    hist = df.histology.value_counts(normalize=True)
    assert hist["typical_carcinoid"] > hist["small_cell_carcinoma"] > 0.15
    by = df.groupby("histology").true_risk.mean()
    assert by["small_cell_carcinoma"] - by["typical_carcinoid"] > 0.8


def test_each_modality_carries_signal():
    """In a large simulated cohort each block of the true risk predicts survival on its own."""
    from sklearn.linear_model import LinearRegression

    big = simulate_patients(5000, seed=1)
    blocks = {
        "clinical": pd.get_dummies(big[["age", "sex", "smoking", "histology", "stage"]].fillna("na"),
                                   drop_first=True).astype(float),
        "ct": big[["ct_size", "ct_irregularity", "ct_heterogeneity"]],
        "wsi": big[["wsi_density", "wsi_nuclear_size", "wsi_pleomorphism"]],
    }
    full = concordance_index(big.os_time, -big.true_risk, big.os_event)
    for name, X in blocks.items():
        p = LinearRegression().fit(X, big.true_risk).predict(X)
        c = concordance_index(big.os_time, -p, big.os_event)
        assert 0.62 < c < full - 0.02, name
