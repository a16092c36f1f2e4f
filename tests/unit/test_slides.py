"""Slide reader: mpp chain, exact-resolution reads, odd pyramids, single-level TIFFs."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from netsurv.demo.wsi import write_demo_slide
from netsurv.pathology.slides import SlideError, _tiff_resolution_mpp, open_slide


def _pattern(h, w):
    """Smooth RGB test image (no aliasing surprises when resampled)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 40 + 180 * x / w
    b = 40 + 180 * y / h
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _block_mean(a, k):
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k, 3).mean((1, 3)).round().astype(np.uint8)


def _write_pyramid(path, base, factors, mpp=0.5, tile=(128, 128), unit="CENTIMETER",
                   description=None, resolution=True):
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, f in enumerate(factors):
            img = base if f == 1 else _block_mean(base, f)
            kw = dict(photometric="rgb", metadata=None)
            if tile is not None:
                kw["tile"] = tile
            if resolution:
                per = 1e4 if unit == "CENTIMETER" else 25400.0
                r = per / (mpp * f)
                kw.update(resolution=(r, r), resolutionunit=unit)
            if i:
                kw["subfiletype"] = 1
            elif description:
                kw["description"] = description
            tw.write(img, **kw)


@pytest.fixture(scope="module")
def demo_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    out = {}
    for vendor in ("aperio", "generic", "nompp"):
        p = d / f"{vendor}.tiff"
        write_demo_slide(p, rng=np.random.default_rng(3), density_z=0, size_z=0,
                         pleomorphism_z=0, width_um=512, height_um=512, vendor=vendor)
        out[vendor] = p
    return out


def test_mpp_chain_openslide_and_override(demo_slides):
    s = open_slide(demo_slides["aperio"])
    assert s.mpp == pytest.approx(0.5) and s.mpp_source == "openslide"
    assert s.dimensions == (1024, 1024) and s.level_downsamples[0] == 1.0
    s = open_slide(demo_slides["generic"])
    assert s.mpp == pytest.approx(0.5)
    s = open_slide(demo_slides["aperio"], mpp_override=0.25)
    assert s.mpp == 0.25 and s.mpp_source == "override"


def test_missing_mpp_is_a_clear_error_and_override_works(demo_slides):
    p = demo_slides["nompp"]
    with pytest.raises(SlideError) as e:
        open_slide(p)
    msg = str(e.value)
    assert str(p) in msg and "mpp" in msg and "slides.csv" in msg and "mpp_override" in msg
    s = open_slide(p, mpp_override=0.5)
    assert s.mpp_source == "override" and s.mpp == 0.5
    assert s.read_at_mpp(0, 0, 64, 0.5).shape == (64, 64, 3)
    with pytest.raises(SlideError):
        open_slide(p, mpp_override=-1)


def test_tiff_resolution_inch_and_objective_power(tmp_path):
    base = _pattern(512, 512)
    p = tmp_path / "inch.tif"
    _write_pyramid(p, base, [1], mpp=0.25, unit="INCH")
    mx, my = _tiff_resolution_mpp(p)
    assert mx == pytest.approx(0.25, rel=1e-4) and my == pytest.approx(0.25, rel=1e-4)
    s = open_slide(p, backend="tifffile")  # no openslide properties: the TIFF tags decide
    assert s.mpp == pytest.approx(0.25, rel=1e-4) and s.mpp_source == "tiff-resolution"
    # Aperio description with AppMag but no MPP and no resolution tags -> objective power
    p2 = tmp_path / "mag.svs"
    _write_pyramid(p2, base, [1, 4], tile=(256, 256), resolution=False,
                   description="Aperio Image Library v12.0.15\r\n512x512 (256x256)|AppMag = 20")
    s = open_slide(p2)
    assert s.properties.get("openslide.mpp-x") is None
    assert s.mpp == pytest.approx(0.5) and s.mpp_source == "objective-power"


def test_read_region_is_level0_exact(tmp_path):
    base = _pattern(576, 576)
    p = tmp_path / "exact.tif"
    _write_pyramid(p, base, [1, 3])
    s = open_slide(p)
    np.testing.assert_array_equal(s.read_region((100, 37), 0, (64, 48)), base[37:85, 100:164])
    # outside the slide: white, not black
    out = s.read_region((560, 560), 0, (32, 32))
    assert (out[20:, 20:] == 255).all()


def test_non_power_of_two_levels(tmp_path):
    base = _pattern(1152, 1152)  # 1152 = 9 * 128
    p = tmp_path / "odd.tif"
    _write_pyramid(p, base, [1, 3, 9])
    s = open_slide(p)
    assert s.backend == "openslide"
    assert s.level_downsamples == pytest.approx((1.0, 3.0, 9.0))
    # 1.5 µm/px: level 1 read directly
    plan = s.plan(64, 1.5)
    assert plan.level == 1 and not plan.resize and plan.size_level0 == 192
    tile = s.read_at_mpp(192, 384, 64, 1.5)
    np.testing.assert_array_equal(tile, _block_mean(base, 3)[128:192, 64:128])
    # 1.0 µm/px: no level within 5 % -> level 0 (0.5) read at 128 px and box-downsampled x2
    plan = s.plan(64, 1.0)
    assert plan.level == 0 and plan.read_size == 128 and plan.resize
    tile = s.read_at_mpp(256, 256, 64, 1.0).astype(int)
    ref = _block_mean(base[256:384, 256:384], 2).astype(int)
    assert np.abs(tile - ref).max() <= 1
    # 2.0 µm/px: coarsest finer level is level 1 (1.5 µm/px), downsampled 0.75x with Lanczos
    plan = s.plan(48, 2.0)
    assert plan.level == 1 and plan.read_size == 64 and plan.size_level0 == 192
    tile = s.read_at_mpp(192, 192, 48, 2.0).astype(int)
    ref = _block_mean(base[192:384, 192:384], 4).astype(int)
    assert np.abs(tile - ref).mean() < 2.0
    # 4.5 µm/px within tolerance of level 2
    assert s.plan(32, 4.6).level == 2


def test_never_upsample_silently(tmp_path):
    p = tmp_path / "one.tif"
    _write_pyramid(p, _pattern(256, 256), [1], tile=(128, 128))
    s = open_slide(p)
    assert s.level_count == 1
    with pytest.raises(SlideError, match="upsampl"):
        s.read_at_mpp(0, 0, 64, 0.25)
    assert s.read_at_mpp(0, 0, 64, 0.25, allow_upsample=True).shape == (64, 64, 3)
    assert s.read_at_mpp(0, 0, 64, 0.51).shape == (64, 64, 3)  # within tolerance


def test_single_level_tiled_and_stripped_tiff(tmp_path):
    base = _pattern(300, 400)
    tiled = tmp_path / "tiled.tif"
    _write_pyramid(tiled, base, [1], tile=(128, 128))
    s = open_slide(tiled)
    assert s.level_count == 1 and s.dimensions == (400, 300)
    np.testing.assert_array_equal(s.read_at_mpp(10, 20, 100, 0.5), base[20:120, 10:110])
    stripped = tmp_path / "stripped.tif"
    _write_pyramid(stripped, base, [1], tile=None)
    s = open_slide(stripped)  # openslide refuses stripped TIFFs: tifffile fallback
    assert s.level_count == 1 and s.dimensions == (400, 300)
    np.testing.assert_array_equal(s.read_at_mpp(10, 20, 100, 0.5), base[20:120, 10:110])
    t = s.read_at_mpp(0, 0, 50, 1.0).astype(int)
    assert np.abs(t - _block_mean(base[:100, :100], 2).astype(int)).max() <= 1


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(SlideError, match="bad.svs"):
        open_slide(bad)
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.tiff")


def test_screen_dpi_is_recognised_in_inch_and_cm(tmp_path):
    """72 dpi is 352.8 µm/px, 300 dpi (118.11 px/cm) 84.7 µm/px: densities written by image
    software, refused with what was read; a real 0.25 µm/px in cm passes."""
    from netsurv.pathology.slides import MppError, _screen_dpi, _tiff_resolution

    base = _pattern(256, 256)
    p72 = tmp_path / "a.tif"
    _write_pyramid(p72, base, [1], mpp=25400.0 / 72, unit="INCH")
    r = _tiff_resolution(p72)
    assert r["unit"] == "inch" and _screen_dpi(r) == 72
    p300 = tmp_path / "b.tif"
    _write_pyramid(p300, base, [1], mpp=25400.0 / 300, unit="CENTIMETER")
    assert _screen_dpi(_tiff_resolution(p300)) == 300
    ok = tmp_path / "c.tif"
    _write_pyramid(ok, base, [1], mpp=0.25)
    assert _screen_dpi(_tiff_resolution(ok)) is None and open_slide(ok).mpp == pytest.approx(0.25)
    for p, dpi in ((p72, "72"), (p300, "300")):
        with pytest.raises(MppError, match=f"{dpi} dpi") as e:
            open_slide(p, backend="tifffile")
        assert "slides.csv" in str(e.value) and str(p) in str(e.value)
        s = open_slide(p, mpp_override=0.5, backend="tifffile")  # the fix
        assert s.mpp == 0.5 and s.mpp_file_problem and s.mpp_conflict is None


def test_file_mpp_outside_plausible_range(tmp_path):
    from netsurv.pathology.slides import MppError

    p = tmp_path / "huge.tif"
    _write_pyramid(p, _pattern(128, 128), [1], mpp=40.0)  # 40 µm/px in cm: no screen dpi
    with pytest.raises(MppError, match="outside the plausible range"):
        open_slide(p)
    p2 = tmp_path / "tiny.tif"
    _write_pyramid(p2, _pattern(128, 128), [1], mpp=0.02)
    with pytest.raises(MppError, match="0.02 µm/px"):
        open_slide(p2)
