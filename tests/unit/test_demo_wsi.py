"""Synthetic H&E slide generator: openslide compatibility, mpp metadata, determinism,
trait -> image response and artefact ground truth."""
from __future__ import annotations

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
from PIL import Image  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.color import rgb2hed  # noqa: E402

from netsurv.demo.wsi import write_demo_slide  # noqa: E402

SIZE_UM = 768.0  # 1536 px at 0.5 µm/px: two pyramid levels, ~0.1 s per slide


def _write(path, seed=0, **kw):
    args = dict(density_z=0.0, size_z=0.0, pleomorphism_z=0.0, width_um=SIZE_UM, height_um=SIZE_UM)
    args.update(kw)
    return write_demo_slide(path, rng=np.random.default_rng(seed), **args)


def _level0(path):
    return tifffile.imread(path, key=0)


@pytest.mark.parametrize("vendor", ["aperio", "generic", "nompp"])
@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_openslide_opens_and_reports_mpp(tmp_path, vendor, mpp):
    path = tmp_path / f"s_{vendor}.tiff"
    size = 512.0  # 1024 / 2048 px: still two pyramid levels
    info = _write(path, mpp=mpp, vendor=vendor, width_um=size, height_um=size)
    assert (info["width"], info["height"]) == (round(size / mpp),) * 2
    with openslide.OpenSlide(str(path)) as s:
        props = s.properties
        if vendor == "nompp":
            assert "openslide.mpp-x" not in props
        else:
            assert float(props["openslide.mpp-x"]) == pytest.approx(mpp)
            assert float(props["openslide.mpp-y"]) == pytest.approx(mpp)
        assert props["openslide.vendor"] == ("aperio" if vendor == "aperio" else "generic-tiff")
        assert s.level_count >= 2
        assert [tuple(d) for d in s.level_dimensions] == [tuple(d) for d in info["levels"]]
        assert s.level_downsamples[1] == pytest.approx(4.0)
        # openslide decodes the same pixels as tifffile
        region = np.asarray(s.read_region((256, 256), 0, (256, 256)).convert("RGB"))
    np.testing.assert_array_equal(region, _level0(path)[256:512, 256:512])


def test_pixel_size_scales_with_mpp(tmp_path):
    a = _write(tmp_path / "a.tiff", mpp=0.5, width_um=512.0, height_um=384.0)
    b = _write(tmp_path / "b.tiff", mpp=0.25, width_um=512.0, height_um=384.0)
    assert (a["width"], a["height"]) == (1024, 768)
    assert (b["width"], b["height"]) == (2 * a["width"], 2 * a["height"])
    assert _level0(tmp_path / "b.tiff").shape == (b["height"], b["width"], 3)
    # physical nuclei: same trait -> same µm diameter whatever the pixel size
    assert b["mean_nuclear_diameter_um"] == pytest.approx(a["mean_nuclear_diameter_um"], rel=0.1)


def test_deterministic(tmp_path):
    kw = dict(artefacts=("pen", "padding", "blur"))
    _write(tmp_path / "a.tiff", seed=3, **kw)
    _write(tmp_path / "b.tiff", seed=3, **kw)
    _write(tmp_path / "c.tiff", seed=4, **kw)
    a, b, c = (_level0(tmp_path / f"{k}.tiff") for k in "abc")
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()
    assert not np.array_equal(a, c)


def test_strips_agree(tmp_path, monkeypatch):
    """Rendering in 256-row strips (blur halos crossing strip borders) gives the same pixels
    as rendering in one strip: the large-slide path is exact."""
    import netsurv.demo.wsi as demo_wsi

    kw = dict(seed=3, artefacts=("pen", "padding", "blur"))
    _write(tmp_path / "one.tiff", **kw)
    monkeypatch.setattr(demo_wsi, "STRIP_PIXELS", 1536 * 256)
    _write(tmp_path / "many.tiff", **kw)
    assert (tmp_path / "one.tiff").read_bytes() == (tmp_path / "many.tiff").read_bytes()


def _count_nuclei(rgb, mpp):
    """Dark haematoxylin blobs of at least ~3 µm² on the level-0 image."""
    h = rgb2hed(rgb)[..., 0]
    blobs = h > 0.09
    lab, n = ndi.label(blobs)
    sizes = np.bincount(lab.ravel())[1:]
    return int((sizes * mpp**2 >= 3.0).sum())


def test_nuclear_density_follows_trait(tmp_path):
    counts, reported = [], []
    for z in (-1.5, 0.0, 1.5):
        path = tmp_path / f"d{z}.tiff"
        info = _write(path, seed=11, density_z=z)
        counts.append(_count_nuclei(_level0(path), 0.5))
        reported.append(info["nuclear_density_per_mm2"])
    assert counts[0] < counts[1] < counts[2], counts
    assert reported[0] < reported[1] < reported[2], reported
    assert 1000 < reported[1] < 4000  # ~2500 / mm² at z = 0


def test_nuclear_size_follows_trait(tmp_path):
    d = [_write(tmp_path / f"n{z}.tiff", seed=2, size_z=z)["mean_nuclear_diameter_um"]
         for z in (-1.0, 1.0)]
    assert d[0] < d[1]
    assert d[0] == pytest.approx(7.0 - 1.2, rel=0.15)
    assert d[1] == pytest.approx(7.0 + 1.2, rel=0.15)


def _truth(truth_path, shape, ds=16):
    lab = np.asarray(Image.open(truth_path))
    assert lab.dtype == np.uint8
    assert lab.shape == (-(-shape[0] // ds), -(-shape[1] // ds))
    return lab


def _inner(lab, value, shape, r=1, ds=16):
    """Full-res mask of truth label `value`, eroded by r truth pixels (away from label
    boundaries: centre sampling, soft edges and JPEG)."""
    m = ndi.binary_erosion(lab == value, iterations=r, border_value=1)
    return np.repeat(np.repeat(m, ds, 0), ds, 1)[: shape[0], : shape[1]]


def test_clean_slide_truth(tmp_path):
    info = _write(tmp_path / "s.tiff", truth_path=tmp_path / "t.png")
    rgb = _level0(tmp_path / "s.tiff")
    lab = _truth(tmp_path / "t.png", rgb.shape)
    assert set(np.unique(lab)) == {0, 1}
    assert 0.3 <= info["tissue_fraction"] <= 0.7
    assert info["tissue_fraction"] == pytest.approx((lab == 1).mean())
    glass = rgb[_inner(lab, 0, rgb.shape)]
    assert np.all(np.abs(np.median(glass, axis=0) - 240) <= 6)  # off-white glass
    assert glass.std(axis=0).max() < 4
    tissue = rgb[_inner(lab, 1, rgb.shape)].astype(float)
    r, g, b = np.median(tissue, axis=0)
    assert r > g + 30 and b > g + 10  # eosin pink: green absorbed most


@pytest.mark.parametrize("seed", [0, 1, 2, 7])  # black, black (2 pads), green, blue ink
def test_artefact_truth(tmp_path, seed):
    path, tpath = tmp_path / "s.tiff", tmp_path / "t.png"
    info = _write(path, seed=seed, artefacts=("pen", "padding", "blur"), truth_path=tpath)
    assert info["artefacts"] == ["pen", "padding", "blur"]
    rgb = _level0(path)
    lab = _truth(tpath, rgb.shape)
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    assert 0.3 <= info["tissue_fraction"] <= 0.7

    # padding: pure black band(s), 5-12 % of the slide side
    pad = rgb[_inner(lab, 3, rgb.shape)]
    assert pad.max() <= 12
    assert 0.04 <= (lab == 3).mean() <= 0.25

    # pen ink: saturated blue/green or near-black, unlike any H&E pixel
    ink = np.median(rgb[_inner(lab, 2, rgb.shape)].astype(float), axis=0)
    r, g, b = ink
    blue = b > r + 60 and b > g + 40
    green = g > r + 50 and g > b + 20
    black = ink.max() < 80
    assert blue or green or black, ink
    assert 0.01 <= (lab == 2).mean() <= 0.3

    # blur: ~15-25 % of the tissue, and visibly smoother than sharp tissue
    blur_frac = (lab == 4).sum() / ((lab == 1) | (lab == 4)).sum()
    assert 0.08 <= blur_frac <= 0.35

    def sharpness(mask):
        g = rgb[..., 1].astype(float)
        lap = np.abs(ndi.laplace(g))
        return np.median(lap[mask])

    assert sharpness(_inner(lab, 4, rgb.shape)) < 0.5 * sharpness(_inner(lab, 1, rgb.shape))


def test_truth_downsample(tmp_path):
    info = _write(tmp_path / "s.tiff", truth_path=tmp_path / "t.png", truth_downsample=32)
    lab = np.asarray(Image.open(tmp_path / "t.png"))
    assert lab.shape == (-(-info["height"] // 32), -(-info["width"] // 32))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        _write(tmp_path / "x.tiff", artefacts=("coffee",))
    with pytest.raises(ValueError):
        _write(tmp_path / "x.tiff", vendor="hamamatsu")


@pytest.mark.slow
def test_large_slide(tmp_path):
    """40960² px benchmark slide: written in strips, 4 pyramid levels."""
    path = tmp_path / "big.tiff"
    info = write_demo_slide(path, rng=np.random.default_rng(0), density_z=0.0, size_z=0.0,
                            pleomorphism_z=0.0, mpp=0.5, width_um=20480.0, height_um=20480.0,
                            artefacts=("pen", "padding", "blur"))
    assert (info["width"], info["height"]) == (40960, 40960)
    with openslide.OpenSlide(str(path)) as s:
        assert s.dimensions == (40960, 40960)
        assert [tuple(d) for d in s.level_dimensions] == [tuple(d) for d in info["levels"]]
        assert s.level_count == 4
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        thumb = np.asarray(s.read_region((0, 0), 3, s.level_dimensions[3]).convert("RGB"))
    assert thumb.std() > 10
