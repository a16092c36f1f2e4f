"""Tissue masks, tile grids, coords files, the tiling job and the raw-tile fast path,
checked against the demo slides' ground truth (labels 0 glass, 1 tissue, 2 pen,
3 padding, 4 blurred tissue; one label per 16x16 level-0 block)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from netsurv.demo.wsi import write_demo_slide
from netsurv.pathology.rawtiles import RawTileReader, decode_jpeg_torch
from netsurv.pathology.slides import open_slide
from netsurv.pathology.tiling import (
    NoTissueError,
    TileDataset,
    grid_coords,
    normalise_params,
    params_hash,
    read_coords,
    tile_fractions,
    tile_slide,
)
from netsurv.tasks.tile import tile_cohort

DS = 16  # truth downsample
TISSUE = (1, 4)


def _slide(d, name, seed, *, mpp=0.5, size_um=1536.0, artefacts=("pen", "padding"),
           vendor="aperio"):
    p = d / f"{name}.tiff"
    t = d / f"{name}.png"
    write_demo_slide(p, rng=np.random.default_rng(seed), density_z=0.0, size_z=0.0,
                     pleomorphism_z=0.0, mpp=mpp, width_um=size_um, height_um=size_um,
                     artefacts=artefacts, vendor=vendor, truth_path=t, truth_downsample=DS)
    return p, np.asarray(Image.open(t))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("wsi")
    out = {f"s{k}": _slide(d, f"s{k}", seed) for k, seed in enumerate((0, 2, 4))}
    out["fine"] = _slide(d, "fine", 5, mpp=0.25, size_um=1024.0, artefacts=())
    out["coarse"] = _slide(d, "coarse", 5, mpp=0.5, size_um=1024.0, artefacts=())
    out["nompp"] = _slide(d, "nompp", 6, size_um=1024.0, artefacts=(), vendor="nompp")
    out["dir"] = d
    return out


def _union_px(coords, size0):
    """Union area of the tiles by brute-force rasterisation (independent of union_area)."""
    w = int(coords[:, 0].max()) + size0
    h = int(coords[:, 1].max()) + size0
    m = np.zeros((h, w), bool)
    for x, y in coords:
        m[y:y + size0, x:x + size0] = True
    return int(m.sum())


def _truth_blocks(truth, coords, size0):
    s = size0 // DS
    return [truth[y // DS:y // DS + s, x // DS:x // DS + s] for x, y in coords]


@pytest.mark.parametrize("name", ["s0", "s1", "s2"])
def test_tiles_cover_tissue_and_avoid_background_pen_padding(slides, name):
    path, truth = slides[name]
    assert (truth == 2).any() and (truth == 3).any()  # the slide has pen and padding
    res = tile_slide(open_slide(path))  # defaults: 256 px at 0.5 µm/px (128 µm tiles)
    tis = np.isin(truth, TISSUE)
    # mask vs truth, pixel level (pen and padding count as non-tissue)
    m = res.tissue.mask
    assert m.shape == truth.shape
    assert (m & tis).sum() / tis.sum() >= 0.93
    assert (m & ~tis).sum() / m.sum() <= 0.03
    assert not (m & np.isin(truth, (2, 3))).any()
    size0 = res.plan.size_level0
    assert size0 == 256
    # the tiles cover >= 95 % of the true tissue area (grid + gap-fill tiles)
    s = size0 // DS
    covered = np.zeros_like(tis)
    for x, y in res.coords:
        covered[y // DS:y // DS + s, x // DS:x // DS + s] = True
    assert (covered & tis).sum() / tis.sum() >= 0.95
    grid_only = np.zeros_like(tis)
    for x, y in res.coords[:res.n_grid]:
        grid_only[y // DS:y // DS + s, x // DS:x // DS + s] = True
    assert (grid_only & tis).sum() < (covered & tis).sum()  # the gap fill is what gets there
    plain = tile_slide(open_slide(path), {"fill_gaps": False})
    np.testing.assert_array_equal(plain.coords, res.coords[:res.n_grid])
    # gap fill without duplicates: summed tile area <= 1.10 x the tiles' union (exact)
    assert res.overlap_factor <= 1.10 + 1e-9
    assert _union_px(res.coords, size0) * res.overlap_factor == pytest.approx(
        len(res.coords) * size0**2)
    # <= 2 % of the tiles fall on background (< 25 % true tissue); none is tissue-free
    blocks = _truth_blocks(truth, res.coords, size0)
    frac_tissue = np.array([np.isin(b, TISSUE).mean() for b in blocks])
    assert (frac_tissue < 0.25).mean() <= 0.02
    assert frac_tissue.min() > 0
    # pen ink and padding yield no tiles: none is centred on them, each holds <= 5 % of them
    centre = np.array([b[s // 2, s // 2] for b in blocks])
    assert not np.isin(centre, (2, 3)).any()
    assert max(np.isin(b, (2, 3)).mean() for b in blocks) <= 0.05  # max_artefact_fraction


def test_same_physical_tile_size_at_025_and_05(slides):
    fine, coarse = open_slide(slides["fine"][0]), open_slide(slides["coarse"][0])
    assert fine.mpp == pytest.approx(0.25) and coarse.mpp == pytest.approx(0.5)
    rf, rc = tile_slide(fine), tile_slide(coarse)
    assert rf.plan.size_level0 == 512 and rc.plan.size_level0 == 256
    assert rf.plan.size_px == rc.plan.size_px == 256
    # same physical layout: as many tiles, covering the same tissue (the adaptive placement
    # may shift a run of tiles by a cell between the two renderings)
    assert abs(len(rf.coords) - len(rc.coords)) <= 0.1 * len(rc.coords)
    cov_f = np.zeros((512, 512), bool)  # 2 µm cells over the 1024 µm slides
    cov_c = np.zeros((512, 512), bool)
    for x, y in rf.coords:  # 0.25 µm/px: 8 px per 2 µm cell
        cov_f[y // 8:(y + 512) // 8, x // 8:(x + 512) // 8] = True
    for x, y in rc.coords:  # 0.5 µm/px: 4 px per cell
        cov_c[y // 4:(y + 256) // 4, x // 4:(x + 256) // 4] = True
    assert (cov_f ^ cov_c).sum() <= 0.1 * (cov_f | cov_c).sum()
    x, y = rc.coords[rc.n_grid // 2]
    tf = fine.read_at_mpp(2 * x, 2 * y, 256, 0.5).astype(float)
    tc = coarse.read_at_mpp(x, y, 256, 0.5).astype(float)
    assert tf.shape == tc.shape == (256, 256, 3)
    assert abs(tf.mean() - tc.mean()) < 6  # same rendered content, different scanner mpp


def test_banded_thumbnail_matches_whole_level(slides):
    from netsurv.pathology.tissue import thumbnail

    s = open_slide(slides["s0"][0])
    a, sa = thumbnail(s, 7.0)  # level 1 (2 µm/px) reduced by a non-integer factor
    b, sb = thumbnail(s, 7.0, max_pixels=50_000)  # the same, band by band
    assert sa == sb and a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_params_validation_and_hash():
    with pytest.raises(ValueError, match="overlap"):
        normalise_params({"patch_size": 256, "overlap": 256})
    with pytest.raises(ValueError, match="overlap"):
        normalise_params({"overlap": 300})
    with pytest.raises(ValueError, match="unknown"):
        normalise_params({"patchsize": 256})
    with pytest.raises(ValueError, match="unknown tissue"):
        normalise_params({"tissue": {"thumbmpp": 4}})
    h = params_hash({})
    assert h == params_hash(normalise_params({})) == params_hash({"patch_size": 256})
    assert params_hash({"overlap": 32}) != h
    assert params_hash({"tissue": {"fill_holes": True}}) != h
    assert params_hash({"mpp_override": 0.5}) != h
    assert params_hash({"strict_mpp": True}) != h
    assert params_hash({"placement": "grid"}) != h
    for bad in ({"placement": "hex"}, {"fill_max_overlap": 1.0}, {"max_overlap_factor": 0.9}):
        with pytest.raises(ValueError, match="tiling"):
            normalise_params(bad)
    assert normalise_params({"overlap": 32})["overlap"] == 32  # overlap implies the grid


def test_config_file_matches_defaults():
    """configs/tiling/default.yaml and configs/morphology/default.yaml state the code's
    defaults (what a user reads there is what runs)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from netsurv.pathology import morphology as M

    root = Path(__file__).resolve().parents[2] / "configs"
    tiling = OmegaConf.to_container(OmegaConf.load(root / "tiling" / "default.yaml"))
    assert normalise_params(tiling) == normalise_params({})
    assert set(tiling) == set(normalise_params({}))
    assert set(tiling["tissue"]) == set(normalise_params({})["tissue"])
    morph = OmegaConf.to_container(OmegaConf.load(root / "morphology" / "default.yaml"))
    assert M.normalise_params(morph) == M.normalise_params({})


def test_grid_edge_policy_overlap_and_fractions():
    c = grid_coords(1000, 600, 256, 256)
    assert c[:, 0].max() + 256 <= 1000 and c[:, 1].max() + 256 <= 600 and len(c) == 3 * 2
    c = grid_coords(1000, 600, 256, 192)  # overlap 64
    assert np.all(np.diff(np.unique(c[:, 0])) == 192) and c[:, 0].max() + 256 <= 1000
    assert len(grid_coords(100, 600, 256, 256)) == 0
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half; 1 mask px = 8 level-0 px
    f = tile_fractions(mask, (8.0, 8.0), np.array([[0, 0], [20, 0], [40, 0]]), 40)
    np.testing.assert_allclose(f, [1.0, 0.5, 0.0], atol=1e-6)


def test_overlap_tiles_and_user_mask(slides, tmp_path):
    path, truth = slides["s0"]
    s = open_slide(path)
    r0 = tile_slide(s, {"patch_size": 128})
    r1 = tile_slide(s, {"patch_size": 128, "overlap": 64})
    assert r1.stride_level0 == 64 and r1.n_grid > 3 * r0.n_grid
    with pytest.raises(ValueError, match="overlap"):
        tile_slide(s, {"patch_size": 128, "overlap": 128})
    # GeoJSON user mask (level-0 px): only tiles inside the left half remain
    W, H = s.dimensions
    gj = tmp_path / "m.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [W // 2, 0], [W // 2, H], [0, H], [0, 0]]]}}]}))
    r2 = tile_slide(s, {"patch_size": 128}, user_mask=gj)
    assert 0 < len(r2.coords) < len(r0.coords)
    # tiles hold >= 50 % of the masked half (+ one thumbnail pixel: PIL fills polygon edges)
    assert (r2.coords[:, 0] + 128 <= W // 2 + 64 + 16).all()
    # PNG user mask at downsample 64: the top half
    png = tmp_path / "m.png"
    arr = np.zeros((H // 64, W // 64), np.uint8)
    arr[: arr.shape[0] // 2] = 255
    Image.fromarray(arr).save(png)
    r3 = tile_slide(s, {"patch_size": 128}, user_mask=png, user_mask_downsample=64)
    assert 0 < len(r3.coords) < len(r0.coords)
    assert (r3.coords[:, 1] + 128 <= H // 2 + 64 + 16).all()
    # an empty user mask leaves no tissue: a clear error
    Image.fromarray(np.zeros_like(arr)).save(png)
    with pytest.raises(NoTissueError, match="no tile"):
        tile_slide(s, {"patch_size": 128}, user_mask=png, user_mask_downsample=64)


def _cohort_df(slides, names, tmp_path, mpp=None):
    rows = [{"patient_id": f"P{i}", "slide_id": n, "path": str(slides[n][0])}
            for i, n in enumerate(names)]
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 200)
    rows.append({"patient_id": "P9", "slide_id": "corrupt", "path": str(bad)})
    blank = tmp_path / "blank.tif"  # glass only: no tissue
    tifffile.imwrite(blank, np.full((512, 512, 3), 240, np.uint8), tile=(256, 256),
                     photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    rows.append({"patient_id": "P8", "slide_id": "blank", "path": str(blank)})
    df = pd.DataFrame(rows)
    if mpp is not None:
        df["mpp"] = [mpp.get(r["slide_id"], np.nan) for r in rows]
    return df


def test_job_failures_resume_and_new_params(slides, tmp_path):
    df = _cohort_df(slides, ["s0", "s1", "nompp"], tmp_path)
    params = {"patch_size": 128}
    out = tmp_path / "tiles" / params_hash(params)
    res = tile_cohort(df, params, out, progress=False)
    assert res["n_done"] == 2 and res["n_failed"] == 3
    fails = pd.read_csv(out / "failures.csv").set_index("slide_id")
    assert set(fails.index) == {"corrupt", "nompp", "blank"}
    assert fails.at["blank", "error_type"] == "NoTissueError"
    assert "mpp" in fails.at["nompp", "error"] and fails.at["nompp", "error_type"] == "MppError"
    assert (out / "qc" / "s0.png").is_file() and (out / "index.csv").is_file()
    # every slide has a QC image and an index row, failed ones included
    index = pd.read_csv(out / "index.csv").set_index("slide_id")
    assert set(index.index) == {"s0", "s1", "nompp", "corrupt", "blank"}
    for sid in index.index:
        assert (out / "qc" / f"{sid}.png").is_file(), sid
        assert index.at[sid, "qc"] == str(out / "qc" / f"{sid}.png")
    assert (index.loc[["s0", "s1"], "status"] == "done").all()
    assert (index.loc[["nompp", "corrupt", "blank"], "status"] == "failed").all()
    assert index.at["s0", "mpp"] == pytest.approx(0.5)
    assert index.at["s0", "mpp_source"] == "openslide"
    assert index.at["s0", "n_tiles"] == index.at["s0", "n_grid_tiles"] + index.at[
        "s0", "n_gap_fill_tiles"] > 0
    assert 0 < index.at["s0", "marked_tissue_fraction"] < 0.5  # s0 has pen over its tissue
    assert 1.0 <= index.at["s0", "overlap_factor"] <= 1.10
    assert index.at["blank", "error_type"] == "NoTissueError" and index.at["blank", "mpp"] > 0
    assert index.at["nompp", "error_type"] == "MppError" and "slides.csv" in index.at[
        "nompp", "error"]
    # the failed slides' QC: the file's own image under the reason (placeholder if unreadable)
    qc_nompp = Image.open(out / "qc" / "nompp.png")
    assert qc_nompp.size[0] >= 512 and qc_nompp.size[1] > 100
    qc_corrupt = np.asarray(Image.open(out / "qc" / "corrupt.png").convert("RGB"))
    assert qc_corrupt.shape[1] == 512 and (qc_corrupt == 200).all(-1).mean() > 0.3  # grey box
    coords, attrs = read_coords(out / "s0.h5")
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    for k in ("patch_size", "patch_size_level0", "level0_width", "level0_height", "target_mpp",
              "read_level", "read_mpp", "mpp_source", "overlap", "tissue_params", "reader",
              "netsurv_version", "params_hash"):
        assert k in attrs, k
    assert attrs["patch_size"] == 128 and attrs["params_hash"] == params_hash(params)
    assert attrs["mpp_source"] == "openslide" and json.loads(attrs["tissue_params"])
    with h5py.File(out / "s0.h5") as f:  # CLAM reads attrs from the dataset
        assert f["coords"].attrs["patch_size_level0"] == 128
    mtime = (out / "s0.h5").stat().st_mtime_ns
    # rerun: done slides skipped; the slides.csv mpp fixes the nompp slide
    df2 = _cohort_df(slides, ["s0", "s1", "nompp"], tmp_path, mpp={"nompp": 0.5})
    res2 = tile_cohort(df2, params, out, progress=False)
    assert res2["n_skipped"] == 2 and res2["n_done"] == 1 and res2["n_failed"] == 2
    assert (out / "s0.h5").stat().st_mtime_ns == mtime
    _, a = read_coords(out / "nompp.h5")
    assert a["mpp_source"] == "override" and a["mpp_override"] == 0.5
    assert a["mpp_origin"] == "slides.csv"
    index = pd.read_csv(out / "index.csv").set_index("slide_id")
    assert index.at["nompp", "mpp_source"] == "slides.csv"
    assert index.at["s0", "status"] == "skipped" and index.at["s0", "mpp_source"] == "openslide"
    assert list(pd.read_csv(out / "failures.csv").slide_id) == ["corrupt", "blank"]
    assert not list(out.glob(".*tmp"))  # no temp files left behind
    # changed parameters -> a different folder, nothing reused
    p2 = {"patch_size": 128, "min_tissue_fraction": 0.6}
    out2 = tmp_path / "tiles" / params_hash(p2)
    assert out2 != out
    res3 = tile_cohort(df2.iloc[:1], p2, out2, progress=False, qc=False)
    assert res3["n_done"] == 1 and res3["n_skipped"] == 0


def test_tile_dataset_and_raw_fast_path(slides, tmp_path):
    import torch

    from netsurv.pathology.tiling import write_coords

    for name, tile_px in (("s0", 256), ("fine", 256), ("s1", 64)):
        path = slides[name][0]
        s = open_slide(path)
        # the regular grid: its 256 px tiles line up with the file's 256 px tiles
        res = tile_slide(s, {"patch_size": tile_px, "min_tissue_fraction": 0.25,
                             "placement": "grid"})
        h5 = write_coords(tmp_path / f"{name}-{tile_px}.h5", res, s, slide_id=name)
        with h5py.File(h5) as f:
            assert f["gap_fill"][:].sum() == len(res.coords) - res.n_grid
            assert f["coords"].attrs["n_grid_tiles"] == res.n_grid
        ds = TileDataset(h5)
        assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == len(res.coords)
        t = ds[0]
        assert t.dtype == np.uint8 and t.shape == (tile_px, tile_px, 3)
        x, y = res.coords[0]
        np.testing.assert_array_equal(t, s.read_at_mpp(x, y, tile_px, 0.5))
        raw = RawTileReader(path)
        lv = raw.level_for(*s.level_dimensions[res.plan.level])
        ds_ = s.level_downsamples[res.plan.level]
        grid = res.coords[:res.n_grid]
        # grid tiles of 256 px map onto whole 256 px file tiles; gap-fill and 64 px tiles don't
        assert raw.supports(grid, res.plan, lv, ds_, aligned=True) == (tile_px == 256)
        if name == "fine":  # no gap-fill tiles here: nothing to compare beyond the grid
            continue
        assert res.n_grid < len(res.coords)  # s0 and s1 get gap-fill tiles
        assert not raw.supports(res.coords[res.n_grid:], res.plan, lv, ds_, aligned=True)
        assert raw.supports(res.coords, res.plan, lv, ds_)  # whole level pixels: raw path ok
        rds = TileDataset(h5, backend="auto")
        assert rds.backend == "raw"
        # grid and gap-fill (straddling, cropped from cached neighbours) tiles vs openslide
        idx = np.unique(np.r_[np.linspace(0, res.n_grid - 1, 3).astype(int),
                              np.linspace(res.n_grid, len(ds) - 1, 3).astype(int)])
        for i in idx:
            d = np.abs(rds[i].astype(int) - ds[i].astype(int))
            assert d.max() <= 3, (name, i, d.max())
        batch = raw.read_batch(res.coords[idx], res.plan, lv, ds_, threads=2)
        assert np.abs(batch.astype(int) - np.stack([ds[i] for i in idx]).astype(int)).max() <= 3
    # torchvision decode of the same file tiles (CPU here; device="cuda" on a GPU)
    raw = RawTileReader(slides["s0"][0])
    tv = decode_jpeg_torch(raw, 0, [(0, 0), (1, 0)])
    assert np.abs(tv[1].permute(1, 2, 0).numpy().astype(int)
                  - raw.decode_tile(0, 1, 0).astype(int)).max() <= 3
    # DataLoader with a worker process: the dataset pickles without its open handles
    dl = torch.utils.data.DataLoader(TileDataset(tmp_path / "s0-256.h5",
                                                 transform=lambda a: torch.from_numpy(a)),
                                     batch_size=4, num_workers=1)
    b = next(iter(dl))
    assert b.shape == (4, 256, 256, 3) and b.dtype == torch.uint8


def test_hydra_config_composes_and_runs(slides, tmp_path, clinical_df):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from netsurv.tasks.tile import run

    root = tmp_path / "cohort"
    root.mkdir()
    clinical_df.to_csv(root / "clinical.csv", index=False)
    ids = clinical_df.patient_id.tolist()
    pd.DataFrame([{"patient_id": ids[0], "slide_id": "a", "path": str(slides["coarse"][0])},
                  {"patient_id": ids[1], "slide_id": "b", "path": str(slides["s2"][0])}]
                 ).to_csv(root / "slides.csv", index=False)
    cfg_dir = str(Path(__file__).resolve().parents[2] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose("tile", overrides=["data=cohort", f"data.root={root}",
                                         "tiling.patch_size=128", "tile.progress=false"])
    res = run(cfg)
    assert res["n_done"] == 2 and res["n_failed"] == 0
    out = Path(res["out"])
    assert out.parent == root / "derived" / "tiles" and (out / "a.h5").is_file()
    assert run(cfg)["n_skipped"] == 2


def test_torch_segmentation_matches_numpy(slides):
    """The GPU path (torch; run here on the CPU) agrees with numpy/scipy on the demo slides."""
    from netsurv.pathology.tissue import resolve_device, segment_tissue

    assert resolve_device("numpy") is None and resolve_device("cuda:1") == "cuda:1"
    for name in ("s0", "s1", "s2"):
        path, truth = slides[name]
        s = open_slide(path)
        a = segment_tissue(s, device="numpy")
        b = segment_tissue(s, device="cpu")
        assert (a.mask == b.mask).mean() >= 0.99, name
        assert (a.excluded == b.excluded).mean() >= 0.99, name
        assert b.threshold == pytest.approx(a.threshold, abs=0.01)
        tis = np.isin(truth, TISSUE)
        assert (b.mask & tis).sum() / tis.sum() >= 0.93  # as good against the truth
        # the placement optimises over the mask, so near-identical masks give near-identical
        # tissue coverage (not necessarily the same tile positions)
        ra, rb = tile_slide(s, device="numpy"), tile_slide(s, device="cpu")
        ca, cb = np.zeros_like(tis), np.zeros_like(tis)
        for cov, r in ((ca, ra), (cb, rb)):
            for x, y in r.coords:
                cov[y // DS:y // DS + 16, x // DS:x // DS + 16] = True
        assert abs(len(ra.coords) - len(rb.coords)) <= 0.05 * len(ra.coords), name
        assert abs((ca & tis).sum() - (cb & tis).sum()) <= 0.01 * tis.sum(), name


@pytest.mark.parametrize("resize", [False, True])
def test_raw_batch_read_decodes_each_file_tile_once(slides, monkeypatch, resize):
    """A batch of straddling regions equals the region-by-region reads, and each file tile
    it covers is decoded once (shared by up to four regions), in a thread pool or not."""
    from concurrent.futures import ThreadPoolExecutor

    from netsurv.pathology.slides import ReadPlan, resize_rgb

    raw = RawTileReader(slides["s0"][0])
    w, h = raw.pages[0].imagewidth, raw.pages[0].imagelength
    rng = np.random.default_rng(1)
    # a row-major block of unaligned 256-px regions (as gap-fill tiles are) plus strays
    xs, ys = np.meshgrid(np.arange(37, w - 300, 256), np.arange(101, h - 300, 256))
    coords = np.c_[np.c_[xs.ravel(), ys.ravel()].T, rng.integers(0, w - 256, (2, 5))].T
    plan = ReadPlan(0, 256, 128 if resize else 256, 256, 0.5, 0.5, resize)
    calls = []
    real = RawTileReader.decode_tile

    def counted(self, level, tx, ty):
        calls.append((level, tx, ty))
        return real(self, level, tx, ty)

    want = np.stack([resize_rgb(raw.read_level_region(x, y, 0, 256), plan.size_px)
                     for x, y in coords])
    monkeypatch.setattr(RawTileReader, "decode_tile", counted)
    for ex in (None, ThreadPoolExecutor(2)):
        raw._cache.clear()
        calls.clear()
        got = raw.read_batch(coords, plan, 0, 1.0, executor=ex)
        np.testing.assert_array_equal(got, want)
        covered = {(0, tx, ty) for x, y in coords for tx in range(x // 256, (x + 255) // 256 + 1)
                   for ty in range(y // 256, (y + 255) // 256 + 1)}
        assert sorted(calls) == sorted(covered)  # each once, none more
        calls.clear()  # the next batch starts where this one ended: its tiles are cached
        raw.read_batch(coords[-3:], plan, 0, 1.0, executor=ex)
        assert calls == []
    with pytest.raises(Exception, match="outside level 0"):
        raw.read_batch(np.array([[w - 100, 0]]), plan, 0, 1.0)
