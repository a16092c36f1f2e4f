"""Nuclear morphology (pathomics) on synthetic tiles and demo slides, and the cached stage."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from netsurv.demo.cohort import CLINICAL_COLUMNS, simulate_patients
from netsurv.demo.wsi import write_demo_slide
from netsurv.pathology import morphology as M
from netsurv.pathology.slides import open_slide
from netsurv.pathology.tiling import tile_slide, write_coords
from netsurv.stages import FAILURE_COLUMNS


# --------------------------------------------------------------------------- synthetic tiles
def _he_tile(mpp, discs, size_um=128.0, glass_right=0.0, h_conc=1.2):
    """RGB tile by Beer-Lambert: eosin stroma (glass on the right ``glass_right`` fraction) and
    haematoxylin discs ``(cy_um, cx_um, r_um)``."""
    from skimage.color import rgb_from_hed

    n = int(round(size_um / mpp))
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    h = np.zeros((n, n))
    for cy, cx, r in discs:
        h[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = h_conc
    e = np.full((n, n), 0.5)
    if glass_right:
        e[:, int(n * (1 - glass_right)):] = 0.0
    od = h[..., None] * rgb_from_hed[0] + e[..., None] * rgb_from_hed[1]
    return np.clip(np.rint(242.0 * np.exp(-od)), 0, 255).astype(np.uint8)


DISCS = [(20.0, 20.0, 4.0), (20.0, 60.0, 4.0), (20.0, 100.0, 4.0), (60.0, 20.0, 4.0),
         (60.0, 60.0, 4.0), (100.0, 30.0, 4.0), (100.0, 80.0, 4.0),
         (60.0, 97.0, 4.0), (60.0, 104.5, 4.0)]  # the last two touch: the watershed splits them


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_known_discs_count_and_area(mpp):
    tile, nuclei = M.tile_features(_he_tile(mpp, DISCS), mpp, {"max_nuclei_per_tile": None})
    assert tile["n_nuclei"] == len(DISCS)
    assert tile["tissue_mm2"] == pytest.approx((128e-3) ** 2, rel=1e-6)
    assert tile["density_mm2"] == pytest.approx(len(DISCS) / (128e-3) ** 2, rel=1e-6)
    area = math.pi * 4.0**2
    # the two touching discs lose a little to the cut; the isolated ones are within 10 %
    assert np.median(nuclei["area_um2"]) == pytest.approx(area, rel=0.1)
    assert np.all(np.abs(nuclei["area_um2"] - area) < 0.2 * area)
    assert np.median(nuclei["perimeter_um"]) == pytest.approx(2 * math.pi * 4.0, rel=0.15)
    assert np.median(nuclei["eccentricity"]) < 0.35
    assert np.median(nuclei["solidity"]) > 0.9
    assert np.median(nuclei["h_od"]) > 0.8


def test_border_nuclei_count_half_and_tissue_area_excludes_glass():
    discs = [(60.0, 60.0, 4.0), (0.0, 30.0, 4.0)]  # the second is cut by the top border
    tile, nuclei = M.tile_features(_he_tile(0.5, discs, glass_right=0.5), 0.5)
    assert tile["n_nuclei"] == 1.5
    assert len(nuclei["area_um2"]) == 1  # shape only from the interior nucleus
    assert tile["tissue_mm2"] == pytest.approx(0.5 * (128e-3) ** 2, rel=0.03)


def test_empty_tile_has_no_nuclei():
    tile, nuclei = M.tile_features(_he_tile(0.5, []), 0.5)
    assert tile["n_nuclei"] == 0 and tile["density_mm2"] == 0
    assert all(len(v) == 0 for v in nuclei.values())
    assert np.isfinite(tile["glcm_contrast_d1um"])


def test_haematoxylin_matches_rgb2hed():
    from skimage.color import rgb2hed

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = rgb2hed(rgb)[..., 0] * math.log(1e6)
    np.testing.assert_allclose(M.haematoxylin_od(rgb), ref, atol=1e-4)


def test_params_hash_changes_with_every_parameter():
    base = M.params_hash({}, "t1")
    assert M.params_hash({"n_jobs": 7, "name": "x"}, "t1") == base  # runtime keys
    assert M.params_hash({}, "t2") != base
    assert M.params_hash({"h_floor_od": 0.4}, "t1") != base
    assert M.params_hash({"max_tiles": 10}, "t1") != base
    with pytest.raises(ValueError, match="unknown morphology"):
        M.normalise_params({"h_flor_od": 0.4})


def test_combine_slides_weights_by_tiles():
    s = pd.DataFrame({"patient_id": ["a", "a", "b"], "n_tiles": [3, 1, 5],
                      "f": [1.0, 5.0, 2.0], "g": [np.nan, 4.0, np.nan]})
    t = M.combine_slides(s, ["f", "g"]).set_index("patient_id")
    assert t.loc["a", "f"] == pytest.approx(2.0)
    assert t.loc["a", "g"] == 4.0 and np.isnan(t.loc["b", "g"])


# --------------------------------------------------------------------------- demo slides
DENSITY_Z = [-2.0, -1.2, -0.4, 0.4, 1.2, 2.0]


@pytest.fixture(scope="module")
def demo_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("morph_slides")
    out = []
    for k, z in enumerate(DENSITY_Z):
        mpp = 0.5 if k % 2 == 0 else 0.25  # both resolutions, measured at the same 0.5 µm/px
        p = d / f"s{k}.tiff"
        info = write_demo_slide(p, rng=np.random.default_rng(10 + k), density_z=z,
                                size_z=float(np.sin(k)), pleomorphism_z=0.0, mpp=mpp,
                                width_um=640, height_um=640)
        with open_slide(p) as s:
            write_coords(d / f"s{k}.h5", tile_slide(s, {}), s, slide_id=f"s{k}")
        out.append((p, d / f"s{k}.h5", info))
    return out


def test_measured_density_follows_true_density(demo_slides):
    truth, measured = [], []
    for p, h5, info in demo_slides:
        f, inf = M.slide_features(h5, p, {"max_tiles": None, "max_nuclei_per_tile": 8})
        assert inf["n_tiles"] == inf["n_tiles_total"] > 0 and inf["mpp"] == pytest.approx(0.5)
        truth.append(info["nuclear_density_per_mm2"])
        measured.append(f["nuclei_density_mm2"])
    rho = spearmanr(truth, measured)[0]
    assert rho > 0.8, (truth, measured)
    # and in the right units: within 30 % of the drawn density
    np.testing.assert_allclose(measured, truth, rtol=0.3)


def test_max_tiles_subsample_is_seeded(demo_slides):
    p, h5, _ = demo_slides[0]
    a, ia = M.slide_features(h5, p, {"max_tiles": 3}, slide_id="x")
    b, _ = M.slide_features(h5, p, {"max_tiles": 3}, slide_id="x")
    assert ia["n_tiles"] == 3 < ia["n_tiles_total"]
    assert a == b
    assert set(M.select_tiles(100, 10, 0, "x")) != set(M.select_tiles(100, 10, 1, "x"))


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def slide_cohort(tmp_path, demo_slides):
    """P0: two slides, P1: one slide, P2: a corrupt slide file."""
    import shutil

    from netsurv.cohort import load_cohort

    root = tmp_path / "cohort"
    (root / "slides").mkdir(parents=True)
    simulate_patients(3, seed=1)[CLINICAL_COLUMNS].to_csv(root / "clinical.csv", index=False)
    ids = pd.read_csv(root / "clinical.csv").patient_id.tolist()
    rows = []
    for k, (pid, n) in enumerate([(ids[0], 2), (ids[1], 1)]):
        for s in range(n):
            sid = f"{pid}-S{s + 1}"
            shutil.copy(demo_slides[2 * k + s][0], root / "slides" / f"{sid}.tiff")
            rows.append({"patient_id": pid, "slide_id": sid, "path": f"slides/{sid}.tiff"})
    (root / "slides" / "bad.tiff").write_bytes(b"II*\x00 not a slide")
    rows.append({"patient_id": ids[2], "slide_id": f"{ids[2]}-S1", "path": "slides/bad.tiff"})
    pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    cfg = OmegaConf.create({"data": {"derived": str(root / "derived")}, "tiling": {},
                            "morphology": {"max_tiles": 3, "max_nuclei_per_tile": 8,
                                           "n_jobs": 1},
                            "tile": {"qc": False}})
    return load_cohort(root), cfg, ids


def test_extract_records_failures_caches_and_resumes(slide_cohort, monkeypatch):
    from netsurv.tasks import pathomics as T

    cohort, cfg, ids = slide_cohort
    table, failures = T.extract(cohort, cfg)
    assert table["patient_id"].tolist() == ids[:2]
    assert {"nuclei_density_mm2", "nucleus_area_um2_q50", "tile_glcm_energy_d1um_mean"} <= set(
        table.columns)
    assert table.drop(columns="patient_id").dtypes.map(lambda t: t.kind == "f").all()
    assert failures["slide_id"].tolist() == [f"{ids[2]}-S1"]
    assert failures["stage"].tolist() == ["tiling"]
    out = T.output_dir(cfg)
    # the failures table of every stage, here and in the tiling folder
    tiles = Path(cfg.data.derived) / "tiles"
    for p in [out / "failures.csv", *tiles.glob("*/failures.csv")]:
        assert list(pd.read_csv(p).columns) == FAILURE_COLUMNS, p
    assert list(failures.columns) == FAILURE_COLUMNS
    assert out.parent.name == "pathomics"
    slides = pd.read_csv(out / "slides.csv")
    assert len(slides) == 3 and (slides["n_tiles"] == 3).all()
    # P0 = tile-weighted mean of its two slides
    p0 = slides[slides.patient_id == ids[0]]
    assert table.iloc[0]["nuclei_density_mm2"] == pytest.approx(p0["nuclei_density_mm2"].mean())
    pd.testing.assert_frame_equal(pd.read_csv(out / "pathomics.csv"), table,
                                  check_dtype=False, atol=1e-9)

    # resume: nothing is measured again
    def boom(*a, **k):
        raise AssertionError("a cached slide was measured again")

    monkeypatch.setattr(M, "slide_features", boom)
    table2, failures2 = T.extract(cohort, cfg)
    pd.testing.assert_frame_equal(table2, table)
    assert failures2["stage"].tolist() == ["tiling"]

    # a parameter change never reuses the cache: new folder, slides measured again (and fail)
    cfg2 = OmegaConf.merge(cfg, {"morphology": {"h_floor_od": 0.4}})
    assert T.output_dir(cfg2) != out
    _, failures3 = T.extract(cohort, cfg2)
    assert (failures3["stage"] == "morphology").sum() == 3
    assert "a cached slide was measured again" in failures3["error"].iloc[-1]
    cfg3 = OmegaConf.merge(cfg, {"tiling": {"patch_size": 224}})
    assert T.output_dir(cfg3) != out


def test_extract_slide_unreadable_after_tiling_fails_alone(slide_cohort):
    from netsurv.tasks import pathomics as T

    cohort, cfg, ids = slide_cohort
    T.extract(cohort, cfg)
    # slide P0-S2 is damaged after tiling: coords exist, reading its tiles fails
    bad = cohort.slides.set_index("slide_id").loc[f"{ids[0]}-S2", "path"]
    with open(bad, "r+b") as f:
        f.truncate(4096)
    table, failures = T.extract(cohort, cfg)
    fm = failures[failures.stage == "morphology"]
    assert fm["slide_id"].tolist() == [f"{ids[0]}-S2"]
    assert table["patient_id"].tolist() == ids[:2]  # P0 still has its first slide
    slides = pd.read_csv(T.output_dir(cfg) / "slides.csv")
    s1 = slides.set_index("slide_id").loc[f"{ids[0]}-S1", "nuclei_density_mm2"]
    assert table.iloc[0]["nuclei_density_mm2"] == pytest.approx(s1)


@pytest.mark.slow
def test_extract_parallel_matches_serial(slide_cohort, tmp_path):
    from netsurv.tasks import pathomics as T

    cohort, cfg, _ = slide_cohort
    a, _ = T.extract(cohort, cfg)
    cfg2 = OmegaConf.merge(cfg, {"data": {"derived": str(tmp_path / "d2")},
                                 "morphology": {"n_jobs": 2}})
    b, _ = T.extract(cohort, cfg2)
    pd.testing.assert_frame_equal(a, b)


# --------------------------------------------------------------------------- overlap, dye
def test_overlapping_tiles_count_each_nucleus_and_tissue_pixel_once():
    """Two tiles overlapping by half (a gap-fill tile over a grid tile): with the ownership
    masks the slide totals equal those of the union; without, the shared half counts twice."""
    discs = [(30.0, 20.0, 4.0), (90.0, 30.0, 4.0),                      # tile A only
             (20.0, 80.0, 4.0), (60.0, 100.0, 4.0), (100.0, 85.0, 4.0),  # the shared half
             (40.0, 150.0, 4.0), (100.0, 170.0, 4.0)]                    # tile B only
    img = _he_tile(0.5, discs, size_um=192.0)[:256]  # 128 x 192 µm: tiles A | B overlap 64 µm
    coords = np.array([[0, 0], [128, 0]])
    owned = M.owned_masks(coords, 256, 256)
    assert owned[0] is None and owned[1][:, :128].sum() == 0 and owned[1][:, 128:].all()
    p = {"max_nuclei_per_tile": None}
    a, na = M.tile_features(img[:, :256], 0.5, p, owned=owned[0])
    b, nb = M.tile_features(img[:, 128:384], 0.5, p, owned=owned[1])
    assert a["n_nuclei"] + b["n_nuclei"] == len(discs)
    assert len(na["area_um2"]) + len(nb["area_um2"]) == len(discs)
    assert a["tissue_mm2"] + b["tissue_mm2"] == pytest.approx(128e-3 * 192e-3, rel=1e-6)
    # the same tiles measured without ownership count the shared half twice
    a2, _ = M.tile_features(img[:, :256], 0.5, p)
    b2, _ = M.tile_features(img[:, 128:384], 0.5, p)
    assert a2["n_nuclei"] + b2["n_nuclei"] == len(discs) + 3


def _teal(tile, mpp, spots, value=(72, 126, 145)):
    """Paint teal marking dye (CMU-1's median dye colour) discs (cy_um, cx_um, r_um)."""
    n = tile.shape[0]
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    out = tile.copy()
    for cy, cx, r in spots:
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
    return out


def test_dye_is_neither_nucleus_nor_lifts_the_threshold():
    rng = np.random.default_rng(3)
    specks = [(float(y), float(x), 2.5) for y, x in rng.uniform(10, 118, (12, 2))]
    clean = _he_tile(0.5, DISCS)
    dyed = _teal(clean, 0.5, [s for s in specks
                              if min(np.hypot(s[0] - d[0], s[1] - d[1]) for d in DISCS) > 9])
    n_specks = sum(min(np.hypot(s[0] - d[0], s[1] - d[1]) for d in DISCS) > 9 for s in specks)
    assert n_specks >= 6
    p = {"max_nuclei_per_tile": None}
    t, _ = M.tile_features(dyed, 0.5, p)
    assert t["n_nuclei"] == len(DISCS) and t["marks_fraction"] > 0.01
    t_raw, _ = M.tile_features(dyed, 0.5, {**p, "exclude_marks": False})
    assert t_raw["n_nuclei"] >= len(DISCS) + n_specks - 1  # teal reads as haematoxylin
    assert t["tissue_mm2"] < t_raw["tissue_mm2"]
    # pale nuclei and a dye smear over part of the tile: with the dye in its sample, Otsu
    # splits dye from the rest, above the pale nuclei (CMU-1: up to +0.65 OD on 19 of 48
    # tiles); left out, the nuclei are found
    pale = _he_tile(0.5, DISCS, h_conc=0.75)
    smear = _teal(pale, 0.5, [(64.0, 140.0, 45.0)])
    under = sum(np.hypot(d[0] - 64.0, d[1] - 140.0) < 45.0 + d[2] for d in DISCS)
    assert under == 2
    assert M.tile_features(pale, 0.5, p)[0]["n_nuclei"] == len(DISCS)
    assert M.tile_features(smear, 0.5, p)[0]["n_nuclei"] == len(DISCS) - under
    assert M.tile_features(smear, 0.5, {**p, "exclude_marks": False})[0]["n_nuclei"] <= 3


def test_threshold_ceiling_keeps_nuclei_next_to_dark_keratin():
    """Dark epidermis next to a band of dense keratin (CMU-1's follicle: per-tile Otsu up
    to 2.9 OD, 19 nuclei found where ~100 are obvious): Otsu splits band from the rest, above
    the nuclei; the ceiling keeps the threshold below them and the band is no nucleus."""
    from skimage.filters import threshold_otsu

    mpp, n = 0.5, 256
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) * mpp
    h = np.full((n, n), 0.9, np.float32)  # haematoxylin-rich cytoplasm
    h[:, int(0.6 * n):] = 4.0  # keratin band: 51 µm wide, 6500 µm²
    discs = [d for d in DISCS if d[1] + d[2] < 0.6 * 128 - 4]
    for cy, cx, r in discs:
        h[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.8
    tissue = np.ones((n, n), bool)
    assert threshold_otsu(h) > 1.8  # the nuclei fall below a plain Otsu threshold
    p = M.normalise_params({})
    labels, thr = M.segment_nuclei(h, tissue, mpp, p)
    assert thr == p["h_ceiling_od"] and labels.max() == len(discs) >= 4
    assert M.segment_nuclei(h, tissue, mpp, {**p, "h_ceiling_od": 10.0})[0].max() == 0
    # without the clump limit the band (far larger than any clump of nuclei) is "nuclear"
    labels, _ = M.segment_nuclei(h, tissue, mpp, {**p, "max_clump_um2": 0.0})
    assert (labels > 0).mean() > 0.35


# --------------------------------------------------------------------------- CMU-1 (real)
CMU1 = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"


def _independent_density(crops, mpp):
    """Nuclei per mm² of tissue by a separate plain scikit-image pipeline over ``crops``
    (pairs of an RGB image and the bool region of it to measure): rgb2hed, one Otsu
    threshold on the haematoxylin of all their tissue, holes filled, objects below 10 µm²
    removed, touching nuclei split by a distance-transform watershed (peaks >= 2.5 µm
    apart), a nucleus counted where its centroid lies in the region.  Tissue: grey level
    < 0.85 after a 2 µm blur; teal/blue dye (HSV hue 140-235°, S > 0.2) is neither.  Shares
    no code with netsurv.pathology.morphology."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2gray, rgb2hed, rgb2hsv
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.measure import label, regionprops
    from skimage.segmentation import watershed

    prepared = []
    for rgb, region in crops:
        h = gaussian(rgb2hed(rgb)[..., 0], 1.0)
        hsv = rgb2hsv(gaussian(rgb, 2.0, channel_axis=-1))
        dye = (hsv[..., 0] >= 140 / 360) & (hsv[..., 0] < 235 / 360) & (hsv[..., 1] > 0.2)
        dye = ndi.binary_dilation(dye, iterations=2)
        tissue = (gaussian(rgb2gray(rgb), 2.0 / mpp) < 0.85) & ~dye
        prepared.append((h, tissue, region))
    thr = threshold_otsu(np.concatenate([h[t & r] for h, t, r in prepared]))
    count, area = 0, 0
    for h, tissue, region in prepared:
        nuc = ndi.binary_fill_holes((h > thr) & tissue)
        lab = label(nuc)
        small = np.bincount(lab.ravel()) < 10 / mpp**2
        small[0] = True
        nuc = ~small[lab]
        dist = ndi.distance_transform_edt(nuc)
        peaks = peak_local_max(gaussian(dist, 1.0), min_distance=int(round(2.5 / mpp)),
                               labels=label(nuc), exclude_border=False)
        markers = np.zeros(nuc.shape, int)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        for r in regionprops(watershed(-dist, markers, mask=nuc)):
            y, x = (int(round(v)) for v in r.centroid)
            count += bool(region[y, x])
        area += int((tissue & region).sum())
    return count / (area * mpp**2 * 1e-6)


def _cmu1_density_pair(tmp_path, subset):
    import h5py
    import openslide

    from netsurv.pathology.tiling import tile_slide, write_coords

    s = open_slide(CMU1)
    res = tile_slide(s, device="numpy")
    h5 = write_coords(tmp_path / "cmu1.h5", res, s, slide_id="cmu1")
    size0 = res.plan.size_level0
    if subset:  # first-pass tiles spread over the section (each owns its whole area)
        keep = np.linspace(0, res.n_grid - 1, subset).round().astype(int)
        with h5py.File(h5, "r+") as f:
            for k in ("coords", "tissue_fraction", "gap_fill"):
                v, attrs = f[k][:][keep], dict(f[k].attrs)
                del f[k]
                d = f.create_dataset(k, data=v)
                for a, val in attrs.items():
                    d.attrs[a] = val
    feats, info = M.slide_features(h5, CMU1, {"max_tiles": None, "max_nuclei_per_tile": 4})
    with h5py.File(h5, "r") as f:
        coords = f["coords"][:]
    with openslide.OpenSlide(str(CMU1)) as o:
        if subset:  # each tile on its own (no overlaps among first-pass tiles)
            crops = [(np.asarray(o.read_region((int(x), int(y)), 0, (size0, size0))
                                 .convert("RGB")), np.ones((size0, size0), bool))
                     for x, y in coords]
        else:  # the whole slide once, measured over the union of the tiles
            W, H = s.dimensions
            region = np.zeros((H, W), bool)
            for x, y in coords:
                region[y:y + size0, x:x + size0] = True
            crops = [(np.asarray(o.read_region((0, 0), 0, (W, H)).convert("RGB")), region)]
    return feats["nuclei_density_mm2"], _independent_density(crops, s.mpp), info


def test_cmu1_nuclei_density_matches_an_independent_count_on_tiles(tmp_path):
    ours, indep, info = _cmu1_density_pair(tmp_path, subset=8)
    print(f"CMU-1, 8 tiles: netsurv {ours:.0f} / mm², independent {indep:.0f} / mm²")
    assert info["n_tiles"] == 8
    assert 1000 < ours < 8000  # plausible H&E nuclear density (skin: dermis to epidermis)
    assert ours == pytest.approx(indep, rel=0.15)


@pytest.mark.slow
def test_cmu1_nuclei_density_matches_an_independent_count_whole_slide(tmp_path):
    """All tiles, gap-fill ones included (ownership: each nucleus once); the independent
    pipeline runs once over the union of the tiles, so it cannot double count."""
    ours, indep, info = _cmu1_density_pair(tmp_path, subset=0)
    print(f"CMU-1, all tiles: netsurv {ours:.0f} / mm², independent {indep:.0f} / mm²")
    assert info["n_tiles"] == info["n_tiles_total"] > 40
    assert 1000 < ours < 8000
    assert ours == pytest.approx(indep, rel=0.15)
