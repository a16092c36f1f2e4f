"""Attention heatmaps and tile galleries for MIL models.

The tile attention comes from a run's ``attention.h5`` (its format, reader and writer are in
:mod:`netsurv.evaluation.attention`, beside the training code that writes it).

Slides are opened with :func:`netsurv.pathology.slides.open_slide`, paths (and ``mpp``
overrides) from the cohort's ``slides.csv``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netsurv.evaluation.attention import PatientAttention, read_attention


# --------------------------------------------------------------------------- heatmap
def normalize_scores(scores, how: str | None = "rank") -> np.ndarray:
    """``rank``: percentile rank in [0, 1] (ties share their mean rank; robust to the heavy tail of
    softmax weights); ``minmax``: linear to [0, 1]; None: unchanged."""
    s = np.asarray(scores, float)
    if how is None or len(s) == 0:
        return s
    if how == "minmax":
        lo, hi = np.nanmin(s), np.nanmax(s)
        return np.zeros_like(s) if hi <= lo else (s - lo) / (hi - lo)
    if how == "rank":
        from scipy.stats import rankdata

        return np.zeros_like(s) if len(s) == 1 else (rankdata(s) - 1) / (len(s) - 1)
    raise ValueError(f"normalize must be 'rank', 'minmax' or None, got {how!r}")


def read_thumbnail(slide, downsample: float) -> np.ndarray:
    """Whole slide at ``downsample`` (level-0 px per thumbnail px): thumbnail pixel (i, j)
    covers level-0 pixels [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds)."""
    from PIL import Image

    W, H = slide.dimensions
    tw, th = max(1, int(round(W / downsample))), max(1, int(round(H / downsample)))
    ok = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.001]
    lv = max(ok, key=lambda i: slide.level_downsamples[i]) if ok else 0
    img = slide.read_level(lv)
    if img.shape[1] != tw or img.shape[0] != th:
        img = np.asarray(Image.fromarray(img).resize((tw, th), Image.BOX))
    return img


def score_raster(coords, scores, patch_size_level0: int, shape, downsample: float) -> np.ndarray:
    """(h, w) map of tile scores on the thumbnail grid, NaN where no tile; overlapping tiles are
    averaged. Tile (x, y) covers thumbnail columns round(x/ds) .. round((x+p)/ds) - 1."""
    h, w = shape
    acc = np.zeros((h, w), float)
    cnt = np.zeros((h, w), float)
    p = float(patch_size_level0)
    for (x, y), s in zip(np.asarray(coords, float), np.asarray(scores, float)):
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1 = max(x0 + 1, int(round((x + p) / downsample)))
        y1 = max(y0 + 1, int(round((y + p) / downsample)))
        x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1c <= x0c or y1c <= y0c:
            continue
        acc[y0c:y1c, x0c:x1c] += s
        cnt[y0c:y1c, x0c:x1c] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, acc / cnt, np.nan)


@dataclass
class Heatmap:
    """A tile-score overlay on a slide thumbnail, as :func:`draw_heatmap` returns it.

    Attributes
    ----------
    thumbnail : numpy.ndarray
        (h, w, 3) uint8 slide thumbnail.
    overlay : numpy.ndarray
        (h, w, 3) uint8 thumbnail with the scores blended in (what the PNG holds).
    scores : numpy.ndarray
        (h, w) mean normalised score of the tiles covering each thumbnail pixel, NaN where
    no tile lies.
    downsample : float
        Level-0 pixels per thumbnail pixel.
    png : pathlib.Path or None
        Where the overlay was written, None when it was not.
    """

    thumbnail: np.ndarray        # (h, w, 3) uint8
    overlay: np.ndarray          # (h, w, 3) uint8, written to out_png pixel for pixel
    scores: np.ndarray           # (h, w) float in [0, 1], NaN off-tile
    downsample: float            # level-0 px per thumbnail px
    png: Path | None = None


def _slide_obj(slide, mpp=None):
    from netsurv.pathology.slides import SlideReader, open_slide

    return slide if isinstance(slide, SlideReader) else open_slide(slide, mpp_override=mpp)


def auto_thumb_mpp(slide, max_px: int = 1000, coarsest: float = 8.0) -> float:
    """µm/px for a thumbnail: ``coarsest`` (8 µm/px) for large slides, finer for small ones so
    the longer side gets up to ``max_px`` pixels (never finer than level 0)."""
    return float(max(slide.mpp, min(coarsest, max(slide.dimensions) * slide.mpp / max_px)))


def draw_heatmap(slide, coords, scores, patch_size_level0: int, out_png=None, *,
                 thumb_mpp: float | None = 8.0, normalize: str | None = "minmax",
                 vmin: float = 0.0, vmax: float = 1.0, cmap: str = "jet",
                 alpha: float = 0.5) -> Heatmap:
    """Paint each tile's score over the slide thumbnail (read at ``thumb_mpp`` µm/px; None:
    :func:`auto_thumb_mpp`).

    ``slide``: a :class:`~netsurv.pathology.slides.SlideReader` or a path; ``coords``: (N, 2)
    level-0 top-left (x, y); ``scores``: (N,) normalised by ``normalize`` ('minmax', 'rank' or
    None) then mapped with ``cmap`` over [vmin, vmax]. The PNG is the overlay itself, one pixel per
    thumbnail pixel, so a tile at level-0 (x, y) appears at pixel (x, y) / downsample of it.
    """
    import matplotlib

    sl = _slide_obj(slide)
    ds = float(thumb_mpp if thumb_mpp is not None else auto_thumb_mpp(sl)) / sl.mpp
    thumb = read_thumbnail(sl, ds)
    s = normalize_scores(scores, normalize)
    raster = score_raster(coords, s, patch_size_level0, thumb.shape[:2], ds)
    norm = np.clip((raster - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(norm))[..., :3] * 255
    on = np.isfinite(raster)[..., None]
    over = np.where(on, (1 - alpha) * thumb + alpha * rgba, thumb).round().astype(np.uint8)
    png = None
    if out_png is not None:
        from PIL import Image

        png = Path(out_png)
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(over).save(png)
    return Heatmap(thumb, over, raster, ds, png)


# --------------------------------------------------------------------------- tiles
def read_tiles(slides: dict, pa: PatientAttention, idx, max_px: int = 224) -> list[np.ndarray]:
    """Tiles ``idx`` of ``pa`` read at ``pa.read_mpp`` (what the model saw), shown at most
    ``max_px`` wide. ``slides``: slide index -> SlideReader.  Features computed elsewhere
    (TRIDENT/CLAM) record no µm/px: their tiles are shown at the slide's own resolution."""
    from netsurv.pathology.slides import resize_rgb

    out = []
    for i in idx:
        si = int(pa.slide[i])
        sl = slides[si]
        mpp = pa.read_mpp if np.isfinite(pa.read_mpp) and pa.read_mpp > 0 else sl.mpp
        size = max(1, int(round(pa.patch_size_level0[si] * sl.mpp / mpp)))
        x, y = pa.coords[i]
        img = sl.read_at_mpp(int(x), int(y), size, mpp, allow_upsample=True)
        out.append(resize_rgb(img, max_px) if size > max_px else img)
    return out


def fig_tile_gallery(slides: dict, pa: PatientAttention, k: int = 8, max_px: int = 224):
    """Top-k (first row) and bottom-k (second row) attended tiles of one patient."""
    import matplotlib.pyplot as plt

    order = np.argsort(-pa.attention, kind="stable")
    k = max(1, min(k, len(order) // 2 if len(order) > 1 else 1))
    rows = [("highest attention", order[:k]), ("lowest attention", order[::-1][:k])]
    fig, axes = plt.subplots(2, k, figsize=(1.8 * k, 4.8), squeeze=False, layout="constrained")
    for r, (name, idx) in enumerate(rows):
        for c, (i, img) in enumerate(zip(idx, read_tiles(slides, pa, idx, max_px))):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{pa.attention[i]:.2e}\n{pa.slide_ids[pa.slide[i]]}", fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    at = f"{pa.read_mpp:g} µm/px" if np.isfinite(pa.read_mpp) else "the slide's resolution"
    fig.suptitle(f"{pa.patient_id} ({pa.split}, risk {pa.risk:.3g}): tiles at {at}, "
                 "attention weight above each", fontsize=9)
    return fig


def fig_patient_heatmaps(slides: dict, pa: PatientAttention, *, thumb_mpp: float | None = None,
                         normalize: str = "rank", out_dir=None):
    """Thumbnail and attention overlay of every slide of one patient (scores normalised over the
    patient's tiles jointly: the attention is a softmax over all of them)."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    s = normalize_scores(pa.attention, normalize)
    present = [i for i in range(len(pa.slide_ids)) if i in slides and (pa.slide == i).any()]
    if not present:
        raise ValueError(f"{pa.patient_id}: none of its slides could be opened")
    maps = []
    for i in present:
        m = pa.slide == i
        png = None if out_dir is None else Path(out_dir) / f"{pa.split}_{pa.patient_id}_{pa.slide_ids[i]}.png"
        maps.append((i, draw_heatmap(slides[i], pa.coords[m], s[m], pa.patch_size_level0[i], png,
                                     thumb_mpp=thumb_mpp, normalize=None)))
    fig, axes = plt.subplots(len(maps), 2, figsize=(10, 4.6 * len(maps)), squeeze=False,
                             layout="constrained")
    for row, (i, hm) in zip(axes, maps):
        H, W = hm.thumbnail.shape[:2]
        ext = (0, W * hm.downsample, H * hm.downsample, 0)  # axes in level-0 px
        row[0].imshow(hm.thumbnail, extent=ext)
        row[1].imshow(hm.overlay, extent=ext)
        row[0].set_title(f"{pa.slide_ids[i]} ({int((pa.slide == i).sum())} tiles)", fontsize=9)
        row[1].set_title(f"attention ({normalize or 'raw'})", fontsize=9)
        for ax in row:
            ax.tick_params(labelsize=6)
    fig.colorbar(ScalarMappable(Normalize(0, 1), "jet"), ax=axes.ravel().tolist(), shrink=0.6,
                 label="attention percentile" if normalize == "rank" else "attention")
    fig.suptitle(f"{pa.patient_id} · {pa.split} · {pa.role} · risk {pa.risk:.3g}", fontsize=10)
    return fig


# --------------------------------------------------------------------------- driver
def choose_records(records: list[PatientAttention], patients=None, split: str | None = None,
                   n_top: int = 2, n_bottom: int = 2) -> list[PatientAttention]:
    """The chosen ``patients`` (in ``split``, else the first split holding each), or the
    ``n_top`` highest- and ``n_bottom`` lowest-risk test patients of ``split`` (default: the
    first split in the file; risks of different splits are not on one scale)."""
    if patients is not None:
        out = []
        for p in patients:
            hit = [r for r in records if r.patient_id == str(p) and (split is None or r.split == split)]
            if hit:
                out.append(hit[0])
        return out
    splits = list(dict.fromkeys(r.split for r in records))
    if not splits:
        return []
    s = split or splits[0]
    test = [r for r in records if r.split == s and r.role == "test" and np.isfinite(r.risk)]
    test.sort(key=lambda r: -r.risk)
    top = test[:n_top]
    bottom = [r for r in test[::-1][:n_bottom] if r not in top]
    return top + bottom


@dataclass
class PatientFigures:
    """Figures made for one patient by :func:`attention_figures`.

    Attributes
    ----------
    record : PatientAttention
        The patient's attention record.
    heatmap_png, gallery_png : pathlib.Path or None
        The heatmap and tile-gallery PNGs, None when they could not be drawn.
    errors : list of str
        What failed (unreadable slides, failed figures).
    """

    record: PatientAttention
    heatmap_png: Path | None = None
    gallery_png: Path | None = None
    errors: list[str] = field(default_factory=list)


def attention_figures(run_dir, *, patients=None, split: str | None = None, n_top: int = 2,
                      n_bottom: int = 2, k: int = 8, thumb_mpp: float | None = None,
                      normalize: str = "rank", slides_table=None, out_dir=None
                      ) -> list[PatientFigures]:
    """Heatmaps and tile galleries for chosen patients (or the top/bottom-risk test patients)
    of a run with an ``attention.h5``; PNGs go to ``<run_dir>/figures/attention/``.

    ``slides_table``: a slides.csv-like frame (slide_id, path, optional mpp); default: the
    cohort at ``data.root`` of the run's config.yaml (an external run's test cohort).
    """
    import matplotlib.pyplot as plt

    from netsurv.pathology.slides import open_slide

    run_dir = Path(run_dir)
    records = choose_records(read_attention(run_dir / "attention.h5"), patients, split,
                             n_top, n_bottom)
    if slides_table is None:
        from omegaconf import OmegaConf

        from netsurv.cohort.schema import load_cohort

        root = OmegaConf.load(run_dir / "config.yaml").data.root
        mpath = run_dir / "metrics.json"
        if mpath.is_file():  # evaluation=external: attention.h5 holds the test cohort's patients
            import json

            root = (json.loads(mpath.read_text()).get("external") or {}).get("test_root", root)
        slides_table = load_cohort(root, check_files=False).slides
        if slides_table is None:
            raise FileNotFoundError(f"cohort {root} has no slides.csv")
    table = slides_table.set_index("slide_id")
    out_dir = Path(out_dir or run_dir / "figures" / "attention")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for pa in records:
        res = PatientFigures(pa)
        opened = {}
        for i, sid in enumerate(pa.slide_ids):
            if sid not in table.index:
                res.errors.append(f"slide {sid} not in slides.csv")
                continue
            row = table.loc[sid]
            mpp = row.get("mpp") if "mpp" in table.columns else None
            try:
                opened[i] = open_slide(row["path"], mpp_override=None if mpp is None or
                                       not np.isfinite(mpp) else float(mpp))
            except Exception as exc:  # noqa: BLE001
                res.errors.append(f"slide {sid}: {exc}")
        stem = f"{pa.split}_{pa.patient_id}"
        try:
            fig = fig_patient_heatmaps(opened, pa, thumb_mpp=thumb_mpp, normalize=normalize,
                                       out_dir=out_dir / "overlays")
            res.heatmap_png = out_dir / f"heatmap_{stem}.png"
            fig.savefig(res.heatmap_png, dpi=90)
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"heatmap: {type(exc).__name__}: {exc}")
        try:
            keep = np.isin(pa.slide, list(opened))
            sub = PatientAttention(pa.split, pa.patient_id, pa.coords[keep], pa.slide[keep],
                                   pa.attention[keep], pa.slide_ids, pa.patch_size_level0,
                                   pa.read_mpp, pa.risk, pa.role)
            if not keep.any():
                raise ValueError("no readable tiles")
            fig = fig_tile_gallery(opened, sub, k=k)
            res.gallery_png = out_dir / f"tiles_{stem}.png"
            fig.savefig(res.gallery_png, dpi=100)
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"tile gallery: {type(exc).__name__}: {exc}")
        for sl in opened.values():
            sl.close()
        results.append(res)
    return results
