"""Handcrafted nuclear morphology of H&E tiles ("pathomics" of the founding study).

Per tile (RGB uint8 at the tiling µm/px, from :class:`~netsurv.pathology.tiling.TileDataset`):

1. **Tissue** inside the tile: summed RGB optical density (``-ln(I / 255)``), gaussian-smoothed
   (``tissue_smooth_um``), above ``tissue_od``.  Glass under typical illumination is ~0.15.
2. **Haematoxylin** by colour deconvolution (the projection of :func:`skimage.color.rgb2hed` on
   ``skimage.color.hed_from_rgb``, via an optical-density lookup table), in natural-log optical
   density (skimage divides by ``ln(1e6)``), lightly smoothed (``h_smooth_um``).
3. **Nuclei**: H above ``max(Otsu(H in tissue), h_floor_od)`` (the floor keeps tiles without
   nuclei from segmenting stroma), holes filled, objects below ``min_nucleus_um2`` dropped;
   touching nuclei are split by a watershed on the (smoothed) distance transform, seeded by its
   local maxima at least ``split_min_distance_um`` apart.
4. **Region properties** (:func:`skimage.measure.regionprops_table`) of nuclei that do not touch
   the tile border (at most ``max_nuclei_per_tile`` of them, a seeded random subset: their cost
   is per nucleus): area (µm²), perimeter (µm), eccentricity, solidity, mean H (OD).
5. **Density**: nuclei per mm² of tissue in the tile; a nucleus cut by the tile border counts
   one half (on average it is counted again by the neighbouring tile).
6. **GLCM texture** of the H channel (:func:`skimage.feature.graycomatrix` /
   :func:`~skimage.feature.graycoprops`): H quantised on the fixed range ``[0, glcm_max_od]``
   into ``glcm_levels`` grey levels, glass pixels left out (pairs with a glass pixel are
   dropped), symmetric, averaged over 4 angles, one set per distance in ``glcm_distances_um``:
   contrast, homogeneity, energy, correlation.

Every length is given in µm and converted with the tile's µm/px, so tiles at 0.25 and 0.5 µm/px
measure the same quantities.

Per slide (:func:`slide_features`): a seeded subsample of at most ``max_tiles`` tiles; per-tile
values (density, nuclear area fraction, mean H of tissue, GLCM) are summarised over tiles by
mean, std and the ``quantiles``; per-nucleus values are pooled over the slide's tiles and
summarised the same way; ``nuclei_density_mm2`` is the ratio of total nuclei to total tissue
area.  Per patient (:func:`combine_slides`): the tile-count-weighted mean of its slides.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib

import numpy as np
from scipy import ndimage as ndi

__all__ = ["MORPHOLOGY_DEFAULTS", "RUNTIME_KEYS", "normalise_params", "params_hash",
           "segment_nuclei", "tile_features", "slide_features", "combine_slides"]

CODE_VERSION = "2"  # bump when the algorithm changes the features

MORPHOLOGY_DEFAULTS = {
    "max_tiles": 64,              # tiles per slide (seeded random subsample); null = all
    "seed": 0,
    "backend": "auto",            # TileDataset backend: auto | openslide | raw
    "tissue_od": 0.35,            # summed RGB optical density above which a pixel is tissue
    "tissue_smooth_um": 2.0,
    "h_smooth_um": 0.5,           # gaussian sigma on the H channel before thresholding
    "h_floor_od": 0.35,           # H threshold = clip(Otsu, this floor, h_ceiling_od)
    "h_ceiling_od": 1.2,          # ... and this ceiling (dark debris cannot lift it further)
    "exclude_marks": True,        # ink / dye pixels are neither tissue nor nuclei
    "mark_smooth_um": 1.0,        # colour of marks judged on this gaussian-smoothed image
    "mark_dilate_um": 1.0,        # ... and their rims excluded too
    "min_nucleus_um2": 10.0,
    "max_clump_um2": 1500.0,      # connected nuclear-stain regions larger than this are dropped
    "split_min_distance_um": 2.5, # watershed seeds (distance-transform maxima) this far apart
    "max_nuclei_per_tile": 24,    # shape properties of at most this many nuclei per tile (null = all)
    "glcm_levels": 32,
    "glcm_max_od": 2.0,
    "glcm_distances_um": [1.0, 2.0],
    "quantiles": [0.1, 0.5, 0.9],
}
# keys that never change the features (kept out of the hash)
RUNTIME_KEYS = {"n_jobs", "name", "progress"}

NUCLEUS_PROPS = ("area_um2", "perimeter_um", "eccentricity", "solidity", "h_od")
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")


def normalise_params(params=None) -> dict:
    """Defaults filled in, types normalised; runtime keys dropped.  Raises ValueError."""
    p = dict(MORPHOLOGY_DEFAULTS)
    params = {k: v for k, v in dict(params or {}).items() if k not in RUNTIME_KEYS}
    unknown = set(params) - set(MORPHOLOGY_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown morphology parameter(s) {sorted(unknown)}; "
                         f"known: {sorted(MORPHOLOGY_DEFAULTS)}")
    p.update(params)
    p["max_tiles"] = None if p["max_tiles"] in (None, 0) else int(p["max_tiles"])
    p["seed"] = int(p["seed"])
    for k in ("tissue_od", "tissue_smooth_um", "h_smooth_um", "h_floor_od", "h_ceiling_od",
              "min_nucleus_um2", "max_clump_um2", "split_min_distance_um", "glcm_max_od",
              "mark_smooth_um",
              "mark_dilate_um"):
        p[k] = float(p[k])
    p["exclude_marks"] = bool(p["exclude_marks"])
    if not p["h_ceiling_od"] >= p["h_floor_od"]:
        raise ValueError("morphology.h_ceiling_od must be >= morphology.h_floor_od")
    p["glcm_levels"] = int(p["glcm_levels"])
    p["max_nuclei_per_tile"] = (None if p["max_nuclei_per_tile"] in (None, 0)
                                else int(p["max_nuclei_per_tile"]))
    p["glcm_distances_um"] = [float(d) for d in p["glcm_distances_um"]]
    p["quantiles"] = [float(q) for q in p["quantiles"]]
    if p["backend"] not in ("auto", "openslide", "raw"):
        raise ValueError(f"morphology.backend {p['backend']!r}: choose auto, openslide or raw")
    if not 2 <= p["glcm_levels"] <= 255:
        raise ValueError("morphology.glcm_levels must be in [2, 255]")
    if not all(0.0 <= q <= 1.0 for q in p["quantiles"]):
        raise ValueError("morphology.quantiles must lie in [0, 1]")
    return p


def params_hash(params: dict, tiling_hash: str = "") -> str:
    """12 hex digits over the morphology parameters, the tiling hash and the code version."""
    p = normalise_params(params)
    import skimage

    blob = json.dumps({"code": CODE_VERSION, "skimage": skimage.__version__,
                       "tiling": tiling_hash, **p}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- one tile
# natural-log optical density of each 8-bit value, as skimage's separate_stains computes it
# (intensity / 255 floored at 1e-6); a lookup table instead of a float conversion and log
_OD_LUT = (-np.log(np.maximum(np.arange(256) / 255.0, 1e-6))).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) float32 natural-log optical density of an RGB uint8 image."""
    return _OD_LUT[np.asarray(rgb)[..., :3]]


def haematoxylin_od(rgb: np.ndarray, od: np.ndarray | None = None) -> np.ndarray:
    """H channel of :func:`skimage.color.rgb2hed` in natural-log optical density units: the
    same projection on ``skimage.color.hed_from_rgb`` (clamped at 0), computed from the OD
    lookup table (``rgb2hed(rgb)[..., 0] * ln(1e6)`` up to float32 rounding)."""
    from skimage.color import hed_from_rgb

    if od is None:
        od = optical_density(rgb)
    h = od @ hed_from_rgb[:, 0].astype(np.float32)
    return np.maximum(h, 0.0, out=h)


def tissue_mask(rgb: np.ndarray, mpp: float, p: dict, od: np.ndarray | None = None):
    """Tissue pixels of a tile: smoothed summed RGB optical density above ``tissue_od``."""
    if od is None:
        od = optical_density(rgb)
    s = od.sum(-1)
    sig = p["tissue_smooth_um"] / mpp
    if sig > 0:
        s = ndi.gaussian_filter(s, sig, mode="nearest", truncate=2.0)
    return s > p["tissue_od"]


def _drop_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    """Zero the labels with fewer than ``min_px`` pixels (in place), return ``labels``."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    if small.any():
        labels[small[labels]] = 0
    return labels


def segment_nuclei(h: np.ndarray, tissue: np.ndarray, mpp: float, p: dict,
                   marks: np.ndarray | None = None):
    """Labels of nuclei (int32, 1..n, consecutive) and the threshold used, from the smoothed
    H channel ``h`` (OD) and the tile's tissue mask.  ``marks`` (bool): ink / dye pixels,
    left out of the threshold's sample and never part of a nucleus (teal dye projects
    strongly on haematoxylin: counted as nuclei, and lifting the threshold above real ones)."""
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import relabel_sequential, watershed

    sample = tissue if marks is None else tissue & ~marks
    vals = h[sample]
    thr = p["h_floor_od"]
    if vals.size > 64 and vals.max() > vals.min():
        thr = min(max(thr, float(threshold_otsu(vals))), p["h_ceiling_od"])
    fg = h > thr
    if marks is not None:
        fg &= ~marks
    mask = ndi.binary_fill_holes(fg)
    if marks is not None:
        mask &= ~marks
    min_px = max(1, int(round(p["min_nucleus_um2"] / mpp**2)))
    comp, n = ndi.label(mask)
    if n == 0:
        return np.zeros(h.shape, np.int32), thr
    comp = _drop_small(comp, min_px)
    if p["max_clump_um2"]:  # bands of keratin, folds, dye smears: far larger than a clump
        sizes = np.bincount(comp.ravel())
        big = sizes > p["max_clump_um2"] / mpp**2
        big[0] = False
        if big.any():
            comp[big[comp]] = 0
    mask = comp > 0
    if not mask.any():
        return np.zeros(h.shape, np.int32), thr
    # seeds: maxima of the (slightly smoothed) distance transform at least split_min_distance
    # apart; touching nuclei joined by a neck get one seed each
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    dist_s = ndi.gaussian_filter(dist, max(0.5, 0.5 / mpp), truncate=2.0)
    md = max(1, int(round(p["split_min_distance_um"] / mpp)))
    peaks = peak_local_max(dist_s, min_distance=md, threshold_abs=0.5, exclude_border=False)
    seeds = np.zeros(h.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    seeds[~mask] = 0
    # components without a seed (tiny or flat) keep one from their own label
    labels = watershed(-dist_s, seeds, mask=mask)
    orphan = mask & (labels == 0)
    if orphan.any():
        extra, _ = ndi.label(orphan)
        labels[orphan] = extra[orphan] + labels.max()
    labels = _drop_small(labels.astype(np.int32), min_px)  # slivers of a split
    return relabel_sequential(labels)[0].astype(np.int32), thr


def _glcm(h: np.ndarray, tissue: np.ndarray, mpp: float, p: dict) -> dict:
    from skimage.feature import graycomatrix, graycoprops

    L = p["glcm_levels"]
    q = np.clip(h * (L / p["glcm_max_od"]), 0, L - 1).astype(np.uint8) + 1
    q[~tissue] = 0  # level 0 = glass, dropped from the matrix below
    dists = [max(1, int(round(d / mpp))) for d in p["glcm_distances_um"]]
    P = graycomatrix(q, dists, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=L + 1,
                     symmetric=True, normed=False)[1:, 1:].astype(np.float64)
    tot = P.sum(axis=(0, 1), keepdims=True)
    Pn = np.divide(P, tot, out=np.zeros_like(P), where=tot > 0)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for prop in GLCM_PROPS:
            v = np.where(tot[0, 0] > 0, graycoprops(Pn, prop), np.nan)  # (distances, angles)
            for i, d in enumerate(p["glcm_distances_um"]):
                fin = np.isfinite(v[i])
                out[f"glcm_{prop}_d{d:g}um"] = float(v[i][fin].mean()) if fin.any() else np.nan
    return out


def _measure_nuclei(labels: np.ndarray, h: np.ndarray, mpp: float, max_n, rng,
                    owned: np.ndarray | None = None) -> tuple:
    """(count with border nuclei as 1/2, nuclear pixels, per-nucleus arrays).

    ``owned`` (bool, optional): the part of the tile no earlier tile of the slide covers; a
    nucleus counts only when its centroid lies there, so overlapping tiles count it once.
    Shape properties come from :func:`skimage.measure.regionprops_table` on the counted
    interior nuclei, or on a random subset of ``max_n`` of them (their cost is per nucleus)."""
    from skimage.measure import regionprops_table

    n = int(labels.max())
    empty = {k: np.zeros(0, np.float32) for k in NUCLEUS_PROPS}
    if n == 0:
        return 0.0, 0, empty
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = np.zeros(n + 1, bool)
    border[edge] = True
    border[0] = False
    counted = np.ones(n + 1, bool)
    counted[0] = False
    if owned is not None:
        ys, xs = np.nonzero(labels)
        lab = labels[ys, xs]
        size = np.bincount(lab, minlength=n + 1)
        cy = np.bincount(lab, ys, minlength=n + 1)[1:] / np.maximum(size[1:], 1)
        cx = np.bincount(lab, xs, minlength=n + 1)[1:] / np.maximum(size[1:], 1)
        counted[1:] = owned[np.rint(cy).astype(int), np.rint(cx).astype(int)]
        nuc_px = int(((labels > 0) & owned).sum())
    else:
        nuc_px = int((labels > 0).sum())
    count = float((counted & ~border).sum() + 0.5 * (counted & border).sum())
    inner = np.flatnonzero(counted[1:] & ~border[1:]) + 1
    if max_n and len(inner) > max_n:
        inner = rng.choice(inner, int(max_n), replace=False)
    if len(inner) == 0:
        return count, nuc_px, empty
    keep = np.zeros(n + 1, bool)
    keep[inner] = True
    sub = np.where(keep[labels], labels, 0)
    t = regionprops_table(sub, intensity_image=h, properties=(
        "area", "perimeter", "eccentricity", "solidity", "intensity_mean"))
    return count, nuc_px, {
        "area_um2": (t["area"] * mpp**2).astype(np.float32),
        "perimeter_um": (t["perimeter"] * mpp).astype(np.float32),
        "eccentricity": t["eccentricity"].astype(np.float32),
        "solidity": t["solidity"].astype(np.float32),
        "h_od": t["intensity_mean"].astype(np.float32),
    }


def tile_features(rgb: np.ndarray, mpp: float, params: dict | None = None,
                  p_normalised: bool = False, rng=None, owned: np.ndarray | None = None,
                  marks_params=None) -> tuple[dict, dict]:
    """Features of one RGB uint8 tile at ``mpp`` µm/px.

    Returns ``(tile, nuclei)``: ``tile`` holds ``tissue_mm2``, ``n_nuclei`` (border nuclei
    count 1/2), ``density_mm2``, ``nuclear_fraction`` (nuclear / tissue area), ``h_od_tissue``
    (mean H of tissue), ``marks_fraction`` (share of the tile excluded as ink/dye) and the
    GLCM values; ``nuclei`` holds one array per :data:`NUCLEUS_PROPS` over the nuclei not
    touching the tile border (at most ``max_nuclei_per_tile`` of them, drawn with ``rng``).

    ``owned`` (bool (h, w)): the pixels this tile owns among overlapping tiles (see
    :func:`owned_masks`); counts, tissue area and the per-tile means use only them, so a
    slide's totals count each nucleus and each tissue pixel once.  ``marks_params``: the
    tissue colour rules (:class:`~netsurv.pathology.tissue.TissueParams`, default the
    tiling defaults) used for the ink / dye pixels when ``exclude_marks``."""
    p = params if p_normalised else normalise_params(params)
    rgb = np.asarray(rgb)[..., :3]
    od = optical_density(rgb)
    tissue = tissue_mask(rgb, mpp, p, od)
    marks = None
    if p["exclude_marks"]:
        from .tissue import mark_mask

        marks = mark_mask(rgb, mpp, marks_params, smooth_um=p["mark_smooth_um"],
                          dilate_um=p["mark_dilate_um"])
        tissue &= ~marks
    h = haematoxylin_od(rgb, od)
    del od
    if p["h_smooth_um"] > 0:
        h = ndi.gaussian_filter(h, p["h_smooth_um"] / mpp, mode="nearest", truncate=2.0)
    labels, _ = segment_nuclei(h, tissue, mpp, p, marks)
    if rng is None:
        rng = np.random.default_rng(p["seed"])
    count, nuc_px, nuclei = _measure_nuclei(labels, h, mpp, p["max_nuclei_per_tile"], rng,
                                            owned)
    own_tissue = tissue if owned is None else tissue & owned
    tissue_px = int(own_tissue.sum())
    tissue_mm2 = tissue_px * mpp**2 * 1e-6
    tile = {"tissue_mm2": tissue_mm2, "n_nuclei": count,
            "density_mm2": count / tissue_mm2 if tissue_px else np.nan,
            "nuclear_fraction": min(nuc_px / tissue_px, 1.0) if tissue_px else np.nan,
            "h_od_tissue": float(h[own_tissue].mean()) if tissue_px else np.nan,
            "marks_fraction": float(marks.mean()) if marks is not None else 0.0}
    tile.update(_glcm(h, tissue, mpp, p))
    return tile, nuclei


def owned_masks(coords: np.ndarray, size0: int, size_px: int, idx=None):
    """For the tiles ``idx`` (default all) of a slide whose tiles (``size0`` level-0 px, read
    as ``size_px`` px) sit at ``coords``: bool (size_px, size_px) masks of the pixels each
    owns, i.e. not covered by any tile before it in ``coords`` order (None when it owns all).
    Overlapping gap-fill tiles then add only their new area to a slide's totals."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    idx = range(len(coords)) if idx is None else idx
    f = size_px / float(size0)
    out = []
    for i in idx:
        x, y = coords[i]
        before = coords[:i]
        hit = np.flatnonzero((np.abs(before[:, 0] - x) < size0)
                             & (np.abs(before[:, 1] - y) < size0))
        if not len(hit):
            out.append(None)
            continue
        own = np.ones((size_px, size_px), bool)
        for j in hit:
            dx, dy = before[j, 0] - x, before[j, 1] - y
            c0, c1 = int(round(max(dx, 0) * f)), int(round(min(dx + size0, size0) * f))
            r0, r1 = int(round(max(dy, 0) * f)), int(round(min(dy + size0, size0) * f))
            own[r0:r1, c0:c1] = False
        out.append(own)
    return out


# --------------------------------------------------------------------------- one slide
TILE_SUMMARY = ("density_mm2", "nuclear_fraction", "h_od_tissue")


def _summary(prefix: str, x: np.ndarray, quantiles) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    out = {}
    if x.size == 0:
        out[f"{prefix}_mean"] = out[f"{prefix}_std"] = np.nan
        for q in quantiles:
            out[f"{prefix}_q{round(100 * q):02d}"] = np.nan
        return out
    out[f"{prefix}_mean"] = float(x.mean())
    out[f"{prefix}_std"] = float(x.std(ddof=1)) if x.size > 1 else 0.0
    qs = np.quantile(x, quantiles)
    for q, v in zip(quantiles, qs):
        out[f"{prefix}_q{round(100 * q):02d}"] = float(v)
    return out


def select_tiles(n: int, max_tiles, seed: int, slide_id: str) -> np.ndarray:
    """Indices of the tiles to measure: all, or a seeded sorted subsample of ``max_tiles``."""
    if not max_tiles or n <= max_tiles:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(str(slide_id).encode())])
    return np.sort(rng.choice(n, int(max_tiles), replace=False))


def aggregate_slide(tiles: list[dict], nuclei: list[dict], quantiles) -> dict:
    """Slide features from the per-tile dicts and per-tile nucleus arrays."""
    out = {}
    tissue = float(sum(t["tissue_mm2"] for t in tiles))
    count = float(sum(t["n_nuclei"] for t in tiles))
    out["nuclei_density_mm2"] = count / tissue if tissue > 0 else np.nan
    for k in TILE_SUMMARY + tuple(k for k in (tiles[0] if tiles else {}) if k.startswith("glcm_")):
        out.update(_summary(f"tile_{k}", [t[k] for t in tiles], quantiles))
    for k in NUCLEUS_PROPS:
        allv = np.concatenate([nu[k] for nu in nuclei]) if nuclei else np.zeros(0)
        out.update(_summary(f"nucleus_{k}", allv, quantiles))
    return out


def slide_features(coords_path, slide_path=None, params: dict | None = None, *,
                   slide_id: str = "") -> tuple[dict, dict]:
    """Features of one slide from its coords HDF5 (tiles read with :class:`TileDataset`).

    Returns ``(features, info)``; ``info``: ``n_tiles`` (measured), ``n_tiles_total``,
    ``n_nuclei`` (interior nuclei measured), ``tissue_mm2``, ``mpp`` (of the tiles),
    ``seconds``."""
    from .tiling import TileDataset

    t0 = time.perf_counter()
    p = normalise_params(params)
    ds = TileDataset(coords_path, slide_path, backend=p["backend"])
    mpp = float(ds.plan.effective_mpp)
    sid = str(slide_id or ds.attrs.get("slide_id", ""))
    idx = select_tiles(len(ds), p["max_tiles"], p["seed"], sid)
    if len(idx) == 0:
        raise ValueError(f"{coords_path}: no tiles")
    rng = np.random.default_rng([p["seed"], zlib.crc32(sid.encode()), 1])
    marks_params = _tissue_params(ds.attrs)
    owned = owned_masks(ds.coords, int(ds.plan.size_level0), int(ds.plan.size_px), idx)
    tiles, nuclei = [], []
    for k, i in enumerate(idx.tolist()):
        t, nu = tile_features(ds[i], mpp, p, p_normalised=True, rng=rng, owned=owned[k],
                              marks_params=marks_params)
        tiles.append(t)
        nuclei.append(nu)
    feats = aggregate_slide(tiles, nuclei, p["quantiles"])
    info = {"n_tiles": len(idx), "n_tiles_total": len(ds),
            "n_nuclei": int(sum(len(nu["area_um2"]) for nu in nuclei)),
            "tissue_mm2": float(sum(t["tissue_mm2"] for t in tiles)), "mpp": mpp,
            "seconds": round(time.perf_counter() - t0, 3)}
    return feats, info


def _tissue_params(attrs: dict):
    """The tissue colour rules the slide was tiled with (coords attribute ``tissue_params``),
    so that nuclei and tiles agree on what is a mark; the defaults for older files."""
    from .tissue import TissueParams

    try:
        return TissueParams.from_any(json.loads(attrs["tissue_params"]))
    except (KeyError, TypeError, ValueError):
        return TissueParams()


# --------------------------------------------------------------------------- patients
def combine_slides(slides, feature_cols, weight_col: str = "n_tiles"):
    """Per-patient features: the ``weight_col``-weighted mean of each patient's slides
    (NaN-aware: a slide without a value does not count for that column)."""
    import pandas as pd

    df = slides.copy()
    rows = []
    for pid, g in df.groupby("patient_id", sort=False):
        w = g[weight_col].to_numpy(np.float64)
        X = g[list(feature_cols)].to_numpy(np.float64)
        ok = np.isfinite(X)
        ws = (w[:, None] * ok).sum(0)
        val = np.where(ws > 0, np.nansum(np.where(ok, X, 0.0) * w[:, None], 0)
                       / np.where(ws > 0, ws, 1.0), np.nan)
        rows.append({"patient_id": pid, **dict(zip(feature_cols, val))})
    return pd.DataFrame(rows, columns=["patient_id", *feature_cols])
