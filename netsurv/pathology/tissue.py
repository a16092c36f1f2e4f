"""Tissue segmentation on a thumbnail at a fixed µm/px, marks (ink, dye, padding) told apart
from stained tissue by colour, and per-slide QC images.

Rules (on an RGB thumbnail at ``thumb_mpp`` µm/px, default 8; HSV with hue in degrees,
saturation S = 1 - min/max and value V = max in [0, 1]; in optical density (OD = -ln I/I0),
V is the *least* absorbed channel and S grows with the spread between channels):

1. **black** (black ink, black scanner padding, dirt): ``V < black_value`` (0.2) and
   ``S < black_max_saturation`` (0.45): every channel absorbs > 1.6 OD and about equally.
   Dark *stained* tissue is strongly coloured: CMU-1's darkest epidermis and hair follicle
   at 8 µm/px have V 0.18-0.3 with S >= 0.45 (haematoxylin and eosin both pass blue light,
   OD_B ~0.3-0.4 of OD_G).  Below V = 0.06 hue and saturation are quantisation / JPEG noise
   (a (1, 0, 1) pixel has S = 1), so such pixels are black whatever their saturation.
2. **dark and colourless** (grey/black ink, padding, shadows): ``V < dark_value`` (0.45)
   and ``S < dark_max_saturation`` (0.25).  CMU-1's epidermis is (82, 45, 86): V 0.34,
   S 0.48.  The previous rule on V alone (V < 0.4) hatched out 23 % of that slide's tissue.
3. **coloured ink / marking dye** (blue, green, teal, cyan): hue inside one of
   ``pen_hue_ranges`` (default [[60, 245]] degrees) and ``S >= pen_min_saturation`` (0.25).
   Hue in (60, 240) means green light passes better than red; both H&E stains absorb green
   at least as much as red (Ruifrok's haematoxylin OD_G/OD_R ~ 1.1, eosin ~ 14), so stained
   tissue sits at 240-360 / 0-30 degrees.  The saturation floor keeps pale blue haematoxylin
   (the IHC counterstain of scikit-image's ``ihc`` sample: hue 210-240, S ~ 0.18) out of the
   ink class; marker ink and tissue dye are saturated (CMU-1's teal dye S ~ 0.45, marker
   blue/green > 0.7).  The upper bound 245 (not 240) catches blue ink over pink tissue, whose
   mixture drifts to ~236-242 degrees.  Red ink looks like eosin and is not detected (use a
   user mask).
4. **marks finer than a thumbnail pixel** (dye granules on tissue, the soft rims of pen
   strokes): rules 1-3 are also applied at ``marks_mpp`` (2 µm/px) from the same pixels the
   thumbnail is averaged from (so at the pyramid level's own resolution when that is
   coarser: no second read), strokes (>= 256 µm²) growing a rim of ``mark_rim_um``
   (black/dark strokes twice that: black ink over stained tissue looks like dark
   haematoxylin at its edge); a thumbnail pixel at least ``mark_min_fraction`` covered is a
   mark, and the tiler limits each tile's mark *area* (``TissueMask.artefacts``).  At 8 µm
   the teal dye of CMU-1 mixed with pink fibres averages to a purple that rule 3 cannot see.
   Marks are dilated by ``exclude_dilate_um`` before they cut the tissue mask.
5. **tissue**: saturation above an Otsu threshold computed on the pixels that are not marks
   (clamped to [``min_saturation``, ``max_saturation_threshold``] so an empty slide does
   not turn glass noise into tissue, and pale loose dermis (S 0.12-0.15 at 8 µm/px on CMU-1)
   stays tissue); optionally AND optical density > ``min_od``.
6. morphology: closing (edge-replicated: tissue cut by the scan border keeps its border
   rows) then opening with discs of ``close_um`` / ``open_um``; connected regions smaller
   than ``min_region_um2`` are dropped; holes are kept unless ``fill_holes`` (holes smaller
   than ``min_hole_um2`` are always filled).  Marks stay out.
7. optional user mask (GeoJSON polygons in level-0 pixels, or a PNG at a given downsample):
   tissue is restricted to it.

Marks that hide tissue are reported: ``TissueMask.marked_tissue`` holds the mark pixels that
are as saturated as tissue (stained-looking), ``marked_tissue_fraction`` their share of
tissue + them, so a QC image and the tiling index show at once when a mark rule bites into
tissue.  The same colour rules are applied per pixel by the nuclear morphology
(:func:`mark_mask`), so dye specks are never segmented as nuclei.

These rules follow what published tissue QC does with colour (HistoQC's pen / dark-tissue
classes, the hue/saturation pen filters of histolab and PathML, Otsu on saturation as in
CLAM/TRIDENT's classic segmentation), written here as a handful of explicit thresholds
because none of those packages is a dependency and their filters are tuned on RGB
templates rather than stated as physical rules.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .slides import SlideReader

__all__ = ["TissueParams", "TissueMask", "thumbnail", "segment_tissue", "tissue_mask_from_rgb",
           "mark_classes", "mark_mask", "load_user_mask", "save_qc", "save_failure_qc"]


@dataclass
class TissueParams:
    """Thresholds and scales of the tissue / mark rules (see the module docstring).

    Lengths are in µm, areas in µm², hues in degrees, saturation and value in [0, 1].
    """

    thumb_mpp: float = 8.0
    black_value: float = 0.2
    black_max_saturation: float = 0.45
    dark_value: float = 0.45
    dark_max_saturation: float = 0.25
    pen_hue_ranges: list = field(default_factory=lambda: [[60.0, 245.0]])
    pen_min_saturation: float = 0.25
    marks_mpp: float = 2.0
    mark_min_fraction: float = 0.5
    mark_rim_um: float = 2.0
    exclude_dilate_um: float = 8.0
    min_saturation: float = 0.05
    max_saturation_threshold: float = 0.12
    min_od: float = 0.0
    close_um: float = 16.0
    open_um: float = 16.0
    min_region_um2: float = 5000.0
    fill_holes: bool = False
    min_hole_um2: float = 2000.0

    @classmethod
    def from_any(cls, p) -> TissueParams:
        """Build parameters from ``None`` (defaults), an instance (returned as is) or a mapping.

        Raises
        ------
        ValueError
            If the mapping has keys that are not fields of this class.
        """
        if p is None:
            return cls()
        if isinstance(p, cls):
            return p
        d = dict(p)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tissue parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain dict of all fields (``pen_hue_ranges`` as lists of floats), e.g. for JSON."""
        d = asdict(self)
        d["pen_hue_ranges"] = [[float(a), float(b)] for a, b in d["pen_hue_ranges"]]
        return d


BLACK_NOISE_FLOOR = 0.06
MARK_STROKE_UM2 = 256.0  # marks at least this large (a 16 µm disc) are strokes, with rims
# values of TissueMask.marks
MARK_NONE, MARK_DARK, MARK_INK = 0, 1, 2


@dataclass
class TissueMask:
    """Result of a tissue segmentation on the thumbnail grid, with the marks and QC figures."""

    mask: np.ndarray          # bool (h, w) on the thumbnail grid
    thumb: np.ndarray         # uint8 (h, w, 3)
    scale: tuple              # level-0 pixels per thumbnail pixel (sx, sy)
    excluded: np.ndarray      # bool: marks (dark / ink, dilated) removed before thresholding
    threshold: float          # saturation threshold used
    params: TissueParams
    marks: np.ndarray | None = None          # uint8 MARK_* before dilation
    marked_tissue: np.ndarray | None = None  # bool: excluded pixels as saturated as tissue
    px_um: float = float("nan")              # µm per thumbnail pixel
    mark_fraction: np.ndarray | None = None  # float32: share of each pixel that is marks at
    #                                           marks_mpp (dye specks finer than a pixel)

    @property
    def artefacts(self) -> np.ndarray:
        """Float map of the marks' area per thumbnail pixel (what max_artefact_fraction
        limits): 1 on pixels whose own colour is a mark, else the fine marks' share."""
        if self.marks is None:
            return self.excluded.astype(np.float32)
        a = (self.marks > 0).astype(np.float32)
        if self.mark_fraction is not None:
            a = np.maximum(a, self.mark_fraction)
        return a

    @property
    def tissue_fraction(self) -> float:
        """Share of thumbnail pixels that are tissue."""
        return float(self.mask.mean())

    @property
    def tissue_mm2(self) -> float:
        """Tissue area in mm² (``px_um`` per thumbnail pixel; NaN when ``px_um`` is unknown)."""
        return float(self.mask.sum()) * self.px_um ** 2 * 1e-6

    @property
    def marked_tissue_mm2(self) -> float:
        """Area in mm² of the mark pixels that are as saturated as tissue (0 when not computed)."""
        if self.marked_tissue is None:
            return 0.0
        return float(self.marked_tissue.sum()) * self.px_um ** 2 * 1e-6

    @property
    def marked_tissue_fraction(self) -> float:
        """Share of (tissue + stained-looking mark pixels) excluded as marks: 0 when no mark
        rule removed anything that looked like tissue."""
        if self.marked_tissue is None:
            return 0.0
        m = float(self.marked_tissue.sum())
        tot = m + float(self.mask.sum())
        return m / tot if tot else 0.0

    def summary(self) -> dict:
        """Per-slide figures for indexes and QC titles."""
        return {"tissue_mm2": round(self.tissue_mm2, 4),
                "marked_tissue_mm2": round(self.marked_tissue_mm2, 4),
                "marked_tissue_fraction": round(self.marked_tissue_fraction, 4),
                "marks_dark_fraction": round(float((self.marks == MARK_DARK).mean())
                                             if self.marks is not None else 0.0, 4),
                "marks_ink_fraction": round(float((self.marks == MARK_INK).mean())
                                            if self.marks is not None else 0.0, 4)}


def thumbnail(slide: SlideReader, thumb_mpp: float, max_pixels: int = 64 << 20,
              fine_factor: int = 1, fine_fn=None):
    """RGB thumbnail at ~``thumb_mpp`` µm/px from the coarsest level at least that fine,
    area-averaged (PIL BOX).  Returns (rgb, (sx, sy)) with sx, sy level-0 pixels per
    thumbnail pixel (exact: thumbnail pixel j spans level-0 x in [j*sx, (j+1)*sx)).

    Never larger than level 0: a slide coarser than ``thumb_mpp`` is used at its own
    resolution (upsampling a low-resolution file to the thumbnail grid would only cost memory).
    A level larger than ``max_pixels`` (e.g. a single-level 40960² TIFF) is read in
    horizontal bands, each reduced on its own (fractional band edges via PIL's resize box),
    so memory stays bounded.

    ``fine_fn`` (optional): a function of (RGB image, its µm/px) returning a bool map
    (h, w) or maps (h, w, k); it is applied to
    the same pixels reduced to ``fine_factor`` x the thumbnail grid (capped at the level's
    own resolution), and the fraction of each thumbnail pixel where it holds is returned as a
    third value (float32, thumbnail shape).  This is how marks finer than a thumbnail pixel
    (dye specks on tissue) are measured without a second read."""
    from PIL import Image

    W, H = slide.dimensions
    f = max(thumb_mpp / slide.mpp, 1.0)
    tw, th = max(1, int(round(W / f))), max(1, int(round(H / f)))
    levels = [i for i in range(slide.level_count) if slide.level_mpp(i) <= thumb_mpp * 1.001]
    lv = max(levels, key=slide.level_mpp) if levels else 0
    lw, lh = (int(v) for v in slide.level_dimensions[lv])
    kf = max(1, min(int(fine_factor), int(lw // tw), int(lh // th)))

    def reduce(img, rows, box=None):
        """(thumbnail rows, fine-fraction rows or None) of one level image / band."""
        pil = Image.fromarray(img)
        out = np.asarray(pil.resize((tw, rows), Image.BOX, box=box)) if (
            img.shape[1], img.shape[0]) != (tw, rows) or box is not None else img
        if fine_fn is None:
            return out, None
        fine = np.asarray(pil.resize((tw * kf, rows * kf), Image.BOX, box=box)) if kf > 1 \
            else out
        m = np.asarray(fine_fn(fine, slide.mpp * W / (tw * kf)), np.float32)
        if kf > 1:
            m = m.reshape(rows, kf, tw, kf, *m.shape[2:]).mean((1, 3))
        return out, m

    scale = (W / tw, H / th)
    if lw * lh <= max_pixels:
        rgb, fr = reduce(slide.read_level(lv), th)
        return (rgb, scale) if fine_fn is None else (rgb, scale, fr)
    ds = float(slide.level_downsamples[lv])
    fy = lh / th  # level rows per thumbnail row
    rows = max(1, int(max_pixels // max(lw, 1) / max(fy, 1.0)))  # thumbnail rows per band
    out = np.empty((th, tw, 3), np.uint8)
    frac = None
    for r0 in range(0, th, rows):
        r1 = min(r0 + rows, th)
        a, b = int(np.floor(r0 * fy)), min(int(np.ceil(r1 * fy)), lh)
        band = slide.read_region((0, int(round(a * ds))), lv, (lw, b - a))
        o, m = reduce(band, r1 - r0, box=(0.0, r0 * fy - a, float(lw), r1 * fy - a))
        out[r0:r1] = o
        if m is not None:
            if frac is None:
                frac = np.empty((th, tw, *m.shape[2:]), np.float32)
            frac[r0:r1] = m
    return (out, scale) if fine_fn is None else (out, scale, frac)


def _disc(r: float) -> np.ndarray:
    r = max(int(round(r)), 0)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r + 1e-9


def _hsv(rgb: np.ndarray):
    """Hue (degrees), saturation and value in [0, 1] (PIL's C conversion: 8-bit steps)."""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("HSV"))
    h = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    return h, hsv[..., 1].astype(np.float32) / 255.0, hsv[..., 2].astype(np.float32) / 255.0


def mark_classes(hue, sat, val, p: TissueParams, black: bool = True):
    """(dark, ink) bool maps of rules 1-3 from HSV arrays (numpy or torch).  ``black=False``
    leaves out rule 1 (used per pixel at full resolution, where single nuclei pixels can be
    nearly black yet saturated)."""
    dark = (val < p.dark_value) & (sat < p.dark_max_saturation)
    if black:
        # below ~6 % of full scale hue and saturation are quantisation / JPEG noise
        # (a (1, 0, 1) pixel has S = 1): such pixels are black whatever their saturation
        dark = dark | ((val < p.black_value) & ((sat < p.black_max_saturation)
                                                | (val < BLACK_NOISE_FLOOR)))
    ink = None
    for lo, hi in p.pen_hue_ranges:
        r = (hue >= lo) & (hue < hi)
        ink = r if ink is None else (ink | r)
    if ink is None:
        ink = hue < -1  # no ranges: all False, same type as the inputs
    ink = ink & (sat >= p.pen_min_saturation)
    return dark, ink & ~dark


def mark_mask(rgb: np.ndarray, mpp: float, params=None, smooth_um: float = 1.0,
              dilate_um: float = 1.0) -> np.ndarray:
    """Per-pixel marks (ink, dye, colourless dark) of a full-resolution RGB tile at ``mpp``
    µm/px, by the colour rules 2-3 of the module doc.  The image is first smoothed by
    ``smooth_um`` (gaussian sigma): JPEG chroma subsampling gives the rims of purple nuclei
    single pixels of any hue, which must not read as dye; marks are then dilated by
    ``dilate_um`` (their soft rims).  Specks smaller than ~1 µm² are dropped."""
    p = TissueParams.from_any(params)
    x = np.asarray(rgb)[..., :3]
    if smooth_um > 0:
        x = ndi.gaussian_filter(x.astype(np.float32), (smooth_um / mpp, smooth_um / mpp, 0),
                                mode="nearest", truncate=2.0)
        x = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    hue, sat, val = _hsv(x)
    dark, ink = mark_classes(hue, sat, val, p, black=False)
    m = dark | ink
    if m.any():
        m = ndi.binary_opening(m, _disc(max(1.0, 0.5 / mpp)))
        if dilate_um > 0 and m.any():
            m = ndi.binary_dilation(m, _disc(dilate_um / mpp))
    return m


def _closing(mask: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Binary closing with the image edge replicated: tissue cut by the slide border (a
    region scanned up to its edge) keeps its border rows; scipy's ``border_value=0`` would
    erode them away."""
    r = se.shape[0] // 2
    if r == 0:
        return mask
    big = np.pad(mask, r, mode="edge")
    return ndi.binary_closing(big, se, border_value=0)[r:-r, r:-r]


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size < 2 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values, nbins=256))


def _pixel_rules_torch(rgb: np.ndarray, px_um: float, p: TissueParams, device, fine=None):
    """The per-pixel rules and the closing/opening of :func:`tissue_mask_from_rgb` in torch
    (float HSV instead of PIL's 8-bit steps; disc morphology as a convolution with zero
    padding, which equals scipy's ``border_value=0``).  Returns numpy
    (mask, excluded, thr, marks, sat)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(rgb[..., :3], np.uint8)).to(device).float().div_(255.0)
    mx, mn = x.max(-1).values, x.min(-1).values
    delta = mx - mn
    sat = torch.where(mx > 0, delta / mx.clamp_min(1e-12), torch.zeros_like(mx))
    r, g, b = x.unbind(-1)
    d = delta.clamp_min(1e-12)
    hue = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2,
                                                           (r - g) / d + 4)) * 60.0
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    dark, ink = _with_fine(*mark_classes(hue, sat, mx, p),
                           None if fine is None else torch.from_numpy(fine).to(device), p)

    def conv(m, radius):
        k = torch.as_tensor(_disc(radius), dtype=torch.float32, device=m.device)
        out = F.conv2d(m.float()[None, None], k[None, None], padding=k.shape[-1] // 2)[0, 0]
        return out, float(k.sum())

    def dilate(m, radius):
        return conv(m, radius)[0] > 0.5

    def erode(m, radius):
        out, full = conv(m, radius)
        return out > full - 0.5

    excluded = dark | ink
    if p.exclude_dilate_um > 0 and bool(excluded.any()):
        excluded = dilate(excluded, p.exclude_dilate_um / px_um)
    cand = sat[~excluded]
    if cand.numel() < 2 or float(cand.min()) == float(cand.max()):
        thr = float("inf")
    else:
        from skimage.filters import threshold_otsu

        lo_, hi_ = float(cand.min()), float(cand.max())
        counts = torch.histc(cand, bins=256, min=lo_, max=hi_).cpu().numpy()
        centres = lo_ + (np.arange(256) + 0.5) * (hi_ - lo_) / 256
        thr = float(threshold_otsu(hist=(counts, centres)))
    thr = float(np.clip(thr, p.min_saturation, p.max_saturation_threshold))
    mask = (sat > thr) & ~excluded
    if p.min_od > 0:
        od = -torch.log((x * 255.0 + 1.0) / 256.0).mean(-1)
        mask &= od > p.min_od
    if p.close_um > 0:  # edge-replicated border, as in _closing
        rc = int(round(p.close_um / px_um))
        big = F.pad(mask.float()[None, None], (rc, rc, rc, rc), mode="replicate")[0, 0] > 0.5
        mask = erode(dilate(big, p.close_um / px_um), p.close_um / px_um)
        mask = mask[rc:mask.shape[0] - rc, rc:mask.shape[1] - rc]
    if p.open_um > 0:
        mask = dilate(erode(mask, p.open_um / px_um), p.open_um / px_um)
    marks = (dark.to(torch.uint8) * MARK_DARK + ink.to(torch.uint8) * MARK_INK)
    return (mask.cpu().numpy(), excluded.cpu().numpy(), thr, marks.cpu().numpy(),
            sat.cpu().numpy())


def _with_fine(dark, ink, fine, p: TissueParams):
    """Add the thumbnail pixels mostly covered by marks seen at ``marks_mpp`` (``fine``:
    (h, w, 2) shares of dark / ink marks) to the pixel-colour classes."""
    if fine is None:
        return dark, ink
    dark = dark | (fine[..., 0] >= p.mark_min_fraction)
    ink = (ink | (fine[..., 1] >= p.mark_min_fraction)) & ~dark
    return dark, ink


def _rules(rgb: np.ndarray, px_um: float, p: TissueParams, device=None, fine=None):
    """(mask, excluded, thr, marks, marked_tissue) of the rules of the module doc."""
    if device is not None:
        mask, excluded, thr, marks, sat = _pixel_rules_torch(rgb, px_um, p, device, fine)
    else:
        hue, sat, val = _hsv(rgb)
        dark, ink = _with_fine(*mark_classes(hue, sat, val, p), fine, p)
        marks = dark.astype(np.uint8) * MARK_DARK + ink.astype(np.uint8) * MARK_INK
        excluded = dark | ink
        if p.exclude_dilate_um > 0 and excluded.any():
            excluded = ndi.binary_dilation(excluded, _disc(p.exclude_dilate_um / px_um))
        thr = _otsu(sat[~excluded])
        thr = float(np.clip(thr, p.min_saturation, p.max_saturation_threshold))
        mask = (sat > thr) & ~excluded
        if p.min_od > 0:
            od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(-1)
            mask &= od > p.min_od
        if p.close_um > 0:
            mask = _closing(mask, _disc(p.close_um / px_um))
        if p.open_um > 0:
            mask = ndi.binary_opening(mask, _disc(p.open_um / px_um))
    mask, excluded = _regions_and_holes(mask, excluded, px_um, p)
    # mark pixels that would have passed the saturation rule: tissue hidden under / taken
    # for a mark (black padding and glass are colourless and do not count)
    marked_tissue = excluded & (sat > thr)
    return mask, excluded, thr, marks, marked_tissue


def tissue_mask_from_rgb(rgb: np.ndarray, px_um: float, params=None, device=None):
    """Apply the rules of the module doc to an RGB thumbnail of ``px_um`` µm/px.
    Returns (mask, excluded, threshold).

    ``device`` (a torch device, e.g. "cuda"): run the per-pixel rules and the morphology in
    torch there; connected components and holes stay on the CPU (scipy).  ``None``: numpy /
    scipy throughout.  Both agree on >= 99 % of pixels (tests)."""
    mask, excluded, thr, _, _ = _rules(rgb, px_um, TissueParams.from_any(params), device)
    return mask, excluded, thr


def _regions_and_holes(mask, excluded, px_um: float, p: TissueParams):
    mask = mask & ~excluded  # closing must not bridge back over ink
    px_area = px_um * px_um
    if p.min_region_um2 > 0 and mask.any():
        lab, n = ndi.label(mask)
        sizes = np.bincount(lab.ravel())
        keep = sizes * px_area >= p.min_region_um2
        keep[0] = False
        mask = keep[lab]
    if mask.any():
        holes = ndi.binary_fill_holes(mask) & ~mask
        if p.fill_holes:
            mask |= holes
        elif p.min_hole_um2 > 0 and holes.any():
            lab, n = ndi.label(holes)
            sizes = np.bincount(lab.ravel())
            small = sizes * px_area < p.min_hole_um2
            small[0] = False
            mask |= small[lab]
        mask &= ~excluded
    return mask, excluded


def load_user_mask(path, shape, scale, downsample: float | None = None) -> np.ndarray:
    """Rasterise a user mask onto the thumbnail grid (``shape`` (h, w), ``scale`` level-0
    pixels per thumbnail pixel).

    - ``.geojson`` / ``.json``: Polygon / MultiPolygon features (or a bare geometry /
      FeatureCollection) in level-0 pixel coordinates; the first ring is the outline and
      further rings are holes.
    - image (``.png`` ...): non-zero = keep; ``downsample`` = level-0 pixels per mask pixel
      (required)."""
    from PIL import Image, ImageDraw

    path = Path(path)
    h, w = shape
    sx, sy = scale
    if path.suffix.lower() in (".geojson", ".json"):
        doc = json.loads(path.read_text(encoding="utf-8"))  # GeoJSON is UTF-8 (RFC 7946)
        geoms = []

        def collect(o):
            t = o.get("type")
            if t == "FeatureCollection":
                for f in o["features"]:
                    collect(f)
            elif t == "Feature":
                collect(o["geometry"])
            elif t == "Polygon":
                geoms.append(o["coordinates"])
            elif t == "MultiPolygon":
                geoms.extend(o["coordinates"])
            elif t == "GeometryCollection":
                for g in o["geometries"]:
                    collect(g)

        collect(doc)
        if not geoms:
            raise ValueError(f"{path}: no Polygon/MultiPolygon geometry found")
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        for rings in geoms:
            for k, ring in enumerate(rings):
                pts = [(float(x) / sx, float(y) / sy) for x, y, *_ in ring]
                if len(pts) >= 3:
                    draw.polygon(pts, fill=0 if k else 1)
        return np.asarray(img) > 0
    if downsample is None:
        raise ValueError(f"{path}: an image mask needs its downsample (level-0 px per mask px)")
    m = np.asarray(Image.open(path).convert("L")) > 0
    # sample the mask at thumbnail pixel centres
    ys = np.minimum(((np.arange(h) + 0.5) * sy / downsample).astype(int), m.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * sx / downsample).astype(int), m.shape[1] - 1)
    return m[np.ix_(ys, xs)]


def resolve_device(device):
    """``"auto"`` -> "cuda" when torch sees a GPU, else None (numpy); ``None``/"numpy" ->
    None; anything else is a torch device name."""
    if device in (None, "numpy", "none"):
        return None
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else None
        except ImportError:
            return None
    return str(device)


def segment_tissue(slide: SlideReader, params=None, user_mask=None,
                   user_mask_downsample: float | None = None, device="auto") -> TissueMask:
    """Tissue mask of ``slide`` on a thumbnail at ``params.thumb_mpp`` µm/px.  ``user_mask``:
    a bool array on the thumbnail grid, or a path (see :func:`load_user_mask`).
    ``device``: see :func:`resolve_device` (GPU segmentation when available)."""
    p = TissueParams.from_any(params)
    kf = int(round(p.thumb_mpp / p.marks_mpp)) if p.marks_mpp > 0 else 1
    if kf > 1:
        rgb, scale, fine = thumbnail(slide, p.thumb_mpp, fine_factor=kf,
                                     fine_fn=lambda im, um: _fine_marks(im, p, um))
    else:
        (rgb, scale), fine = thumbnail(slide, p.thumb_mpp), None
    px_um = slide.mpp * math.sqrt(scale[0] * scale[1])
    mask, excluded, thr, marks, marked = _rules(rgb, px_um, p, resolve_device(device), fine)
    if user_mask is not None:
        if not isinstance(user_mask, np.ndarray):
            user_mask = load_user_mask(user_mask, mask.shape, scale, user_mask_downsample)
        if user_mask.shape != mask.shape:
            raise ValueError(f"user mask shape {user_mask.shape} != thumbnail {mask.shape}")
        mask &= user_mask.astype(bool)
        marked &= user_mask.astype(bool)
    return TissueMask(mask, rgb, scale, excluded, thr, p, marks, marked, px_um,
                      None if fine is None else fine.sum(-1))


def _fine_marks(rgb: np.ndarray, p: TissueParams, px_um: float) -> np.ndarray:
    """(h, w, 2) bool: dark-colourless and ink marks of ``rgb`` (``px_um`` µm/px, about
    ``marks_mpp``) by rules 1-3, with the rims of strokes.

    Strokes (connected marks of >= ``MARK_STROKE_UM2``: pen lines, dye smears, padding) get a
    rim of ``mark_rim_um`` (ink) or twice that (black/dark marks): at partial density ink
    over tissue is a colour mixture; blue/green ink stays recognisable nearly to its edge, but
    black ink over stained tissue looks like dark haematoxylin, so its soft edge is wider than
    what the colour rules see.  Isolated specks (dye granules) are counted as they are."""
    dark, ink = mark_classes(*_hsv(rgb), p)
    r = p.mark_rim_um / px_um
    if r <= 0:
        return np.stack([dark, ink], -1)
    min_px = MARK_STROKE_UM2 / px_um ** 2

    def rim(m, radius):
        if not m.any() or radius < 0.5:
            return m
        lab, _ = ndi.label(m)
        big = np.bincount(lab.ravel()) >= min_px
        big[0] = False
        return m | ndi.binary_dilation(big[lab], _disc(radius))

    dark = rim(dark, 2 * r)
    return np.stack([dark, rim(ink, r) & ~dark], -1)


QC_MAX_SIDE = 2048  # QC images larger than this (big slides at 8 µm/px) are reduced


def save_qc(path, tm: TissueMask, coords=None, patch_size_level0: int | None = None,
            title: str | list | None = None, n_grid: int | None = None) -> None:
    """PNG: a title band (``title``: a string or lines), then the thumbnail with marks hatched
    (black/dark marks red, coloured ink/dye magenta), the tissue contour in green, the tile
    grid as blue rectangles and gap-fill tiles (``coords[n_grid:]``) orange."""
    from PIL import Image, ImageDraw

    img = tm.thumb.copy()
    edge = tm.mask & ~ndi.binary_erosion(tm.mask, border_value=0)
    excl = tm.excluded & ~tm.mask
    chk = (np.add.outer(np.arange(img.shape[0]), np.arange(img.shape[1])) % 4) == 0
    ink = (tm.marks == MARK_INK) if tm.marks is not None else np.zeros_like(excl)
    img[excl & chk & ~ink] = (220, 30, 30)
    img[excl & chk & ink] = (230, 0, 230)
    img[ndi.binary_dilation(edge)] = (0, 200, 0)
    h, w = img.shape[:2]
    scale = max(1, int(math.ceil(512 / max(h, w))))
    if max(h, w) > QC_MAX_SIDE:
        scale = QC_MAX_SIDE / max(h, w)
    pil = Image.fromarray(img)
    if scale != 1:
        pil = pil.resize((max(1, int(round(w * scale))), max(1, int(round(h * scale)))),
                         Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    if coords is not None and patch_size_level0:
        sx, sy = tm.scale[0] / scale, tm.scale[1] / scale
        coords = np.asarray(coords)
        ng = len(coords) if n_grid is None else int(n_grid)
        for k, (x, y) in enumerate(coords):
            draw.rectangle([x / sx, y / sy, (x + patch_size_level0) / sx - 1,
                            (y + patch_size_level0) / sy - 1],
                           outline=(30, 60, 255) if k < ng else (255, 140, 0))
    _save_png(path, _with_title(pil, title))


def save_failure_qc(path, slide_path, reason: str, tm: TissueMask | None = None,
                    title: str | list | None = None) -> None:
    """QC image of a slide whose tiling failed: the tissue QC when segmentation ran (``tm``),
    else the file's own thumbnail when any reader can produce one, else a placeholder; the
    failure reason is printed in the title band in every case."""
    from PIL import Image

    lines = ([title] if isinstance(title, str) else list(title or [])) + [f"FAILED: {reason}"]
    if tm is not None:
        save_qc(path, tm, title=lines)
        return
    thumb = _any_thumbnail(slide_path)
    if thumb is None:
        thumb = Image.new("RGB", (512, 96), (200, 200, 200))
        lines.append("(no image: the file cannot be read by openslide or tifffile)")
    _save_png(path, _with_title(thumb, lines))


def _any_thumbnail(slide_path, max_side: int = 512, max_pixels: int = 32 << 20):
    """A small RGB PIL thumbnail of a file netsurv could not open as a slide (missing or
    implausible mpp, odd TIFF), without trusting its metadata; None if nothing reads it.
    Never decodes a level larger than ``max_pixels``."""
    from PIL import Image

    try:
        import openslide

        with openslide.OpenSlide(str(slide_path)) as s:
            return s.get_thumbnail((max_side, max_side)).convert("RGB")
    except Exception:  # noqa: BLE001 - try the next reader
        pass
    import logging

    tlog = logging.getLogger("tifffile")
    level = tlog.level
    try:
        import tifffile

        tlog.setLevel(logging.ERROR)  # a broken file is expected here: no warning noise
        with tifffile.TiffFile(str(slide_path)) as tf:
            levels = list(tf.series[0].levels)
            lv = min(levels, key=lambda lv_: int(np.prod(lv_.shape[:2])))
            if int(np.prod(lv.shape[:2])) > max_pixels:
                return None
            a = np.asarray(lv.asarray())
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            a = a[..., :3]
        elif a.ndim != 2:
            return None
        img = Image.fromarray(np.ascontiguousarray(a).astype(np.uint8))
        img.thumbnail((max_side, max_side))
        return img.convert("RGB")
    except Exception:  # noqa: BLE001
        return None
    finally:
        tlog.setLevel(level)


def _with_title(img, title):
    """``img`` (PIL) under a white band holding ``title`` (string or lines), wrapped."""
    import textwrap

    from PIL import Image, ImageDraw

    if not title:
        return img
    lines = [title] if isinstance(title, str) else [str(t) for t in title if t]
    lines = [ln.replace("µ", "u").replace("²", "2") for ln in lines]  # PIL's bitmap font
    width = max(img.width, 512)
    per_line = max(20, width // 6 - 2)  # PIL's default bitmap font is ~6 px wide
    wrapped = [w for ln in lines for w in (textwrap.wrap(ln, per_line) or [""])]
    band = 6 + 12 * len(wrapped)
    out = Image.new("RGB", (width, img.height + band), (255, 255, 255))
    out.paste(img, (0, band))
    draw = ImageDraw.Draw(out)
    red = False
    for k, ln in enumerate(wrapped):
        red = red or ln.startswith("FAILED")
        draw.text((4, 3 + 12 * k), ln, fill=(170, 0, 0) if red else (0, 0, 0))
    return out


def _save_png(path, pil) -> None:
    from netsurv.stages.cache import atomic_path

    # unique temp name per process and call: two jobs writing one slide's QC never collide
    with atomic_path(path, suffix=".png") as tmp:
        pil.save(tmp)
