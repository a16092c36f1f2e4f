"""Tissue segmentation on a thumbnail at a fixed µm/px, and per-slide QC images.

Rules (all on an RGB thumbnail at ``thumb_mpp`` µm/px, default 8; HSV with hue in degrees,
saturation S and value V in [0, 1]):

1. **dark** (black scanner padding, black ink, folds): ``V < dark_value`` (default 0.4);
   glass and H&E stay well above (H&E V ~0.6-0.9 at 8 µm/px).
2. **pen ink** (blue, green, cyan marker): ``S >= pen_min_saturation`` and hue inside one
   of ``pen_hue_ranges`` (default [[60, 250]] degrees: yellow-green through blue).  H&E is
   pink/purple (hue ~ 270-360 and 0-20 degrees) and never green or pure blue.  Ink masks
   (pen + dark) are dilated by ``exclude_dilate_um`` so the soft ink rims go too.
3. **tissue**: saturation above an Otsu threshold computed on the remaining pixels
   (clamped to [``min_saturation``, ``max_saturation_threshold``] so an empty slide does
   not turn glass noise into tissue); optionally AND optical density > ``min_od``.
4. morphology: closing then opening with discs of ``close_um`` / ``open_um``; connected
   regions smaller than ``min_region_um2`` are dropped; holes are kept unless
   ``fill_holes`` (holes smaller than ``min_hole_um2`` are always filled).
5. optional user mask (GeoJSON polygons in level-0 pixels, or a PNG at a given downsample):
   tissue is restricted to it.
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
           "load_user_mask", "save_qc"]


@dataclass
class TissueParams:
    thumb_mpp: float = 8.0
    dark_value: float = 0.4
    pen_hue_ranges: list = field(default_factory=lambda: [[60.0, 250.0]])
    pen_min_saturation: float = 0.15
    exclude_dilate_um: float = 8.0
    min_saturation: float = 0.05
    max_saturation_threshold: float = 0.15
    min_od: float = 0.0
    close_um: float = 16.0
    open_um: float = 16.0
    min_region_um2: float = 5000.0
    fill_holes: bool = False
    min_hole_um2: float = 2000.0

    @classmethod
    def from_any(cls, p) -> "TissueParams":
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
        d = asdict(self)
        d["pen_hue_ranges"] = [[float(a), float(b)] for a, b in d["pen_hue_ranges"]]
        return d


@dataclass
class TissueMask:
    mask: np.ndarray          # bool (h, w) on the thumbnail grid
    thumb: np.ndarray         # uint8 (h, w, 3)
    scale: tuple              # level-0 pixels per thumbnail pixel (sx, sy)
    excluded: np.ndarray      # bool: dark / ink pixels removed before thresholding
    threshold: float          # saturation threshold used
    params: TissueParams

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean())


def thumbnail(slide: SlideReader, thumb_mpp: float, max_pixels: int = 64 << 20):
    """RGB thumbnail at ~``thumb_mpp`` µm/px from the coarsest level at least that fine,
    area-averaged (PIL BOX).  Returns (rgb, (sx, sy)) with sx, sy level-0 pixels per
    thumbnail pixel (exact: thumbnail pixel j spans level-0 x in [j*sx, (j+1)*sx)).

    A level larger than ``max_pixels`` (e.g. a single-level 40960² TIFF) is read in
    horizontal bands, each reduced on its own (fractional band edges via PIL's resize box),
    so memory stays bounded."""
    from PIL import Image

    W, H = slide.dimensions
    f = thumb_mpp / slide.mpp
    tw, th = max(1, int(round(W / f))), max(1, int(round(H / f)))
    levels = [i for i in range(slide.level_count) if slide.level_mpp(i) <= thumb_mpp * 1.001]
    lv = max(levels, key=slide.level_mpp) if levels else 0
    lw, lh = (int(v) for v in slide.level_dimensions[lv])
    if (lw, lh) == (tw, th):
        return slide.read_level(lv), (W / tw, H / th)
    if lw * lh <= max_pixels:
        img = np.asarray(Image.fromarray(slide.read_level(lv)).resize((tw, th), Image.BOX))
        return img, (W / tw, H / th)
    ds = float(slide.level_downsamples[lv])
    fy = lh / th  # level rows per thumbnail row
    rows = max(1, int(max_pixels // max(lw, 1) / max(fy, 1.0)))  # thumbnail rows per band
    out = np.empty((th, tw, 3), np.uint8)
    for r0 in range(0, th, rows):
        r1 = min(r0 + rows, th)
        a, b = int(np.floor(r0 * fy)), min(int(np.ceil(r1 * fy)), lh)
        band = slide.read_region((0, int(round(a * ds))), lv, (lw, b - a))
        out[r0:r1] = np.asarray(Image.fromarray(band).resize(
            (tw, r1 - r0), Image.BOX, box=(0.0, r0 * fy - a, float(lw), r1 * fy - a)))
    return out, (W / tw, H / th)


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


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size < 2 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values, nbins=256))


def _pixel_rules_torch(rgb: np.ndarray, px_um: float, p: TissueParams, device):
    """The per-pixel rules and the closing/opening of :func:`tissue_mask_from_rgb` in torch
    (float HSV instead of PIL's 8-bit steps; disc morphology as a convolution with zero
    padding, which equals scipy's ``border_value=0``).  Returns numpy (mask, excluded, thr)."""
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
    dark = mx < p.dark_value
    pen = torch.zeros_like(dark)
    for lo, hi in p.pen_hue_ranges:
        pen |= (hue >= lo) & (hue < hi)
    pen &= sat >= p.pen_min_saturation

    def conv(m, radius):
        k = torch.as_tensor(_disc(radius), dtype=torch.float32, device=m.device)
        out = F.conv2d(m.float()[None, None], k[None, None], padding=k.shape[-1] // 2)[0, 0]
        return out, float(k.sum())

    def dilate(m, radius):
        return conv(m, radius)[0] > 0.5

    def erode(m, radius):
        out, full = conv(m, radius)
        return out > full - 0.5

    excluded = dark | pen
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
    if p.close_um > 0:
        mask = erode(dilate(mask, p.close_um / px_um), p.close_um / px_um)
    if p.open_um > 0:
        mask = dilate(erode(mask, p.open_um / px_um), p.open_um / px_um)
    return mask.cpu().numpy(), excluded.cpu().numpy(), thr


def tissue_mask_from_rgb(rgb: np.ndarray, px_um: float, params=None, device=None):
    """Apply the rules of the module doc to an RGB thumbnail of ``px_um`` µm/px.
    Returns (mask, excluded, threshold).

    ``device`` (a torch device, e.g. "cuda"): run the per-pixel rules and the morphology in
    torch there; connected components and holes stay on the CPU (scipy).  ``None``: numpy /
    scipy throughout.  Both agree on >= 99 % of pixels (tests)."""
    p = TissueParams.from_any(params)
    if device is not None:
        mask, excluded, thr = _pixel_rules_torch(rgb, px_um, p, device)
        return _regions_and_holes(mask, excluded, px_um, p) + (thr,)
    hue, sat, val = _hsv(rgb)
    dark = val < p.dark_value
    pen = np.zeros_like(dark)
    for lo, hi in p.pen_hue_ranges:
        pen |= (hue >= lo) & (hue < hi)
    pen &= sat >= p.pen_min_saturation
    excluded = dark | pen
    if p.exclude_dilate_um > 0 and excluded.any():
        excluded = ndi.binary_dilation(excluded, _disc(p.exclude_dilate_um / px_um))
    candidates = sat[~excluded]
    thr = _otsu(candidates)
    thr = float(np.clip(thr, p.min_saturation, p.max_saturation_threshold))
    mask = (sat > thr) & ~excluded
    if p.min_od > 0:
        od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(-1)
        mask &= od > p.min_od
    if p.close_um > 0:
        mask = ndi.binary_closing(mask, _disc(p.close_um / px_um), border_value=0)
    if p.open_um > 0:
        mask = ndi.binary_opening(mask, _disc(p.open_um / px_um))
    mask, excluded = _regions_and_holes(mask, excluded, px_um, p)
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
        doc = json.loads(path.read_text())
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
    rgb, scale = thumbnail(slide, p.thumb_mpp)
    px_um = slide.mpp * math.sqrt(scale[0] * scale[1])
    mask, excluded, thr = tissue_mask_from_rgb(rgb, px_um, p, device=resolve_device(device))
    if user_mask is not None:
        if not isinstance(user_mask, np.ndarray):
            user_mask = load_user_mask(user_mask, mask.shape, scale, user_mask_downsample)
        if user_mask.shape != mask.shape:
            raise ValueError(f"user mask shape {user_mask.shape} != thumbnail {mask.shape}")
        mask &= user_mask.astype(bool)
    return TissueMask(mask, rgb, scale, excluded, thr, p)


def save_qc(path, tm: TissueMask, coords=None, patch_size_level0: int | None = None,
            title: str | None = None, n_grid: int | None = None) -> None:
    """PNG: the thumbnail, excluded (ink / dark) pixels hatched red, the tissue contour in
    green, the tile grid as blue rectangles and gap-fill tiles (``coords[n_grid:]``) orange."""
    from PIL import Image, ImageDraw

    img = tm.thumb.copy()
    edge = tm.mask & ~ndi.binary_erosion(tm.mask, border_value=0)
    excl = tm.excluded & ~tm.mask
    chk = (np.add.outer(np.arange(img.shape[0]), np.arange(img.shape[1])) % 4) == 0
    img[excl & chk] = (220, 30, 30)
    img[ndi.binary_dilation(edge)] = (0, 200, 0)
    scale_up = max(1, int(math.ceil(512 / max(img.shape[:2]))))
    pil = Image.fromarray(img)
    if scale_up > 1:
        pil = pil.resize((img.shape[1] * scale_up, img.shape[0] * scale_up), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    if coords is not None and patch_size_level0:
        sx, sy = tm.scale[0] / scale_up, tm.scale[1] / scale_up
        coords = np.asarray(coords)
        ng = len(coords) if n_grid is None else int(n_grid)
        for k, (x, y) in enumerate(coords):
            draw.rectangle([x / sx, y / sy, (x + patch_size_level0) / sx - 1,
                            (y + patch_size_level0) / sy - 1],
                           outline=(30, 60, 255) if k < ng else (255, 140, 0))
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    pil.save(tmp)
    tmp.replace(path)
