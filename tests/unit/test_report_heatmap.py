"""Attention heatmaps: geometry (a tile appears where its level-0 coordinate says) and attention.h5."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from PIL import Image

from netsurv.evaluation.attention import PatientAttention, read_attention, write_attention
from netsurv.pathology.slides import open_slide
from netsurv.report.heatmap import (
    choose_records,
    draw_heatmap,
    fig_tile_gallery,
    normalize_scores,
    score_raster,
)

MARK = (320, 192)   # level-0 top-left of the black 64 px square and of the attended tile


@pytest.fixture
def slide_path(tmp_path):
    import tifffile

    img = np.full((768, 1024, 3), 255, np.uint8)
    img[MARK[1]:MARK[1] + 64, MARK[0]:MARK[0] + 64] = 0
    p = tmp_path / "s.tiff"
    tifffile.imwrite(p, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")   # 0.5 µm/px
    return p


def _grid():
    xs, ys = np.meshgrid(np.arange(0, 1024, 64), np.arange(0, 768, 64))
    return np.c_[xs.ravel(), ys.ravel()]


def test_tile_with_all_attention_appears_at_its_coordinate(slide_path, tmp_path):
    coords = _grid()
    att = np.zeros(len(coords))
    hot = np.flatnonzero((coords[:, 0] == MARK[0]) & (coords[:, 1] == MARK[1]))[0]
    att[hot] = 1.0
    with open_slide(slide_path) as sl:
        assert sl.mpp == pytest.approx(0.5)
        hm = draw_heatmap(sl, coords, att, 64, tmp_path / "h.png", thumb_mpp=8.0)
    ds = 16.0                                         # 8 µm/px / 0.5 µm/px
    assert hm.downsample == pytest.approx(ds) and hm.overlay.shape == (48, 64, 3)
    y0, x0 = int(MARK[1] / ds), int(MARK[0] / ds)     # 12, 20; the tile spans 4 x 4 px
    png = np.asarray(Image.open(tmp_path / "h.png").convert("RGB")).astype(int)
    assert (png == hm.overlay).all()                  # the PNG is the overlay, pixel for pixel
    red = png[..., 0] > png[..., 2] + 40              # jet(1) is red, jet(0) blue
    ys, xs = np.nonzero(red)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (y0, y0 + 4, x0, x0 + 4)
    # the slide content under it (the black square) is at the same place in the thumbnail
    dark = hm.thumbnail.mean(axis=2) < 128
    ys, xs = np.nonzero(dark)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (y0, y0 + 4, x0, x0 + 4)


def test_score_raster_offsets_and_overlap():
    r = score_raster([[32, 0], [48, 0]], [1.0, 0.0], 32, (4, 8), 8.0)
    # tile 1 covers columns 4..7, tile 2 columns 6..9 (clipped to 7): overlap averaged
    assert np.isnan(r[:, :4]).all()
    assert r[0, 4:8].tolist() == [1.0, 1.0, 0.5, 0.5] and np.isnan(r[4:, :]).all()
    assert normalize_scores([0, 0, 1], "minmax").tolist() == [0, 0, 1]
    assert normalize_scores([3, 1, 2], "rank").tolist() == [1, 0, 0.5]


def test_attention_h5_round_trip_choice_and_gallery(slide_path, tmp_path):
    coords = _grid()
    recs = []
    for i in range(5):
        att = np.random.default_rng(i).dirichlet(np.ones(len(coords)))
        recs.append(PatientAttention("s0", f"P{i}", coords, np.zeros(len(coords), int), att,
                                     ["A"], [64], 0.5, risk=float(i), role="test" if i else "train"))
    recs.append(PatientAttention("s1", "P9", coords[:3], np.zeros(3, int), np.ones(3) / 3,
                                 ["A"], [64], 0.5, risk=9.0, role="test"))
    write_attention(tmp_path / "attention.h5", recs)
    back = read_attention(tmp_path / "attention.h5")
    assert len(back) == 6
    b = next(r for r in back if r.patient_id == "P3")
    assert b.slide_ids == ["A"] and b.patch_size_level0 == [64] and b.read_mpp == 0.5
    assert (b.coords == coords).all() and b.coords.dtype == np.int64
    assert b.attention == pytest.approx(recs[3].attention) and b.role == "test" and b.risk == 3
    chosen = choose_records(back, n_top=1, n_bottom=1)       # split s0, test patients only
    assert [r.patient_id for r in chosen] == ["P4", "P1"]
    assert [r.patient_id for r in choose_records(back, patients=["P9"])] == ["P9"]
    with open_slide(slide_path) as sl:
        fig = fig_tile_gallery({0: sl}, b, k=3)
        assert len([a for a in fig.axes if a.images]) == 6  # 3 top + 3 bottom tiles
        img = fig.axes[0].images[0].get_array()
        assert img.shape == (64, 64, 3)    # 64 level-0 px (0.5 µm/px) read at 0.5 µm/px


def test_gallery_of_features_without_mpp_reads_at_the_slide_resolution(slide_path):
    """TRIDENT/CLAM feature files record no µm/px (read_mpp NaN): the gallery shows the tiles
    at the slide's own resolution instead of failing on NaN."""
    from netsurv.report.heatmap import read_tiles

    coords = _grid()
    pa = PatientAttention("s0", "P", coords, np.zeros(len(coords), int),
                          np.full(len(coords), 1 / len(coords)), ["A"], [64], float("nan"))
    hot = int(np.flatnonzero((coords[:, 0] == MARK[0]) & (coords[:, 1] == MARK[1]))[0])
    with open_slide(slide_path) as sl:
        (tile,) = read_tiles({0: sl}, pa, [hot])
        fig = fig_tile_gallery({0: sl}, pa, k=2)
    assert tile.shape == (64, 64, 3) and tile.max() == 0      # the black square, 64 px at 0.5
    assert "slide's resolution" in fig._suptitle.get_text()
