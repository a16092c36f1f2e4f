"""Tile grids on the tissue mask, coords HDF5 files and a tile Dataset.

Grid
----
Tiles are ``patch_size`` x ``patch_size`` pixels at ``target_mpp`` µm/px (default 256 px at
0.5 µm/px); on the slide each covers ``patch_size_level0`` level-0 pixels (from the
:class:`~netsurv.pathology.slides.ReadPlan`: 256 at 0.5 µm/px, 512 at 0.25 µm/px).  The grid
starts at level-0 (0, 0) with stride ``patch_size_level0 * (patch_size - overlap) /
patch_size`` (``overlap`` in target pixels, 0 <= overlap < patch_size).

Edge policy ("inside"): a tile is kept only if it lies fully inside the level-0 image
(x + patch_size_level0 <= width, same for y); partial edge strips are never tiled, so no
tile contains padding invented by the reader.

A tile is kept when the fraction of its area covered by the tissue mask is at least
``min_tissue_fraction`` and the fraction covered by excluded pixels (pen ink, black padding,
other very dark areas; see :mod:`.tissue`) is at most ``max_artefact_fraction`` (both
computed exactly on the thumbnail grid with summed-area tables).

Gap fill (``fill_gaps``, default on): the grid loses the tissue of boundary tiles below
``min_tissue_fraction``; a second pass places off-grid tiles meeting the same two rules where
they add at least ``fill_min_new`` of a tile's area of still uncovered tissue (greedy).  On the
demo cohort this took coverage of the true tissue from 86 % to 98 % for 35 % more tiles, all
still >= 50 % tissue.  They follow the grid tiles in ``coords``; dataset ``gap_fill`` (uint8)
marks them, so ``coords[gap_fill == 0]`` is the plain grid.

Coords file (one per slide, HDF5)
---------------------------------
dataset ``coords``: int64 (N, 2), level-0 top-left (x, y), row-major order (grid tiles, then
gap-fill tiles); attributes
``patch_size``, ``patch_size_level0``, ``level0_width``, ``level0_height`` (the CLAM /
TRIDENT names), plus ``target_mpp``, ``read_level``, ``read_mpp``, ``read_size``,
``mpp``, ``mpp_source``, ``mpp_override``, ``overlap``, ``min_tissue_fraction``,
``max_artefact_fraction``, ``fill_gaps``, ``fill_min_new``, ``n_grid_tiles``,
``n_gap_fill_tiles``, ``edge_policy``, ``tissue_params`` (json), ``tissue_threshold``, ``reader``, ``slide_path``,
``slide_id``, ``netsurv_version``, ``params`` (json) and ``params_hash``.  Dataset
``tissue_fraction`` (float32, N) holds each tile's mask fraction.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # a torch Dataset when torch is installed (it is a dependency); plain class otherwise
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object

from .slides import ReadPlan, SlideError, SlideReader, open_slide
from .tissue import TissueMask, TissueParams, segment_tissue

__all__ = ["TILING_DEFAULTS", "NoTissueError", "TilingResult", "params_hash", "normalise_params",
           "grid_coords", "tile_fractions", "tile_slide", "write_coords", "read_coords",
           "TileDataset"]

TILING_DEFAULTS = {
    "patch_size": 256,
    "target_mpp": 0.5,
    "mpp_tolerance": 0.05,
    "overlap": 0,
    "min_tissue_fraction": 0.5,
    "max_artefact_fraction": 0.05,
    "allow_upsample": False,
    "edge_policy": "inside",
    "fill_gaps": True,
    "fill_min_new": 0.1,
    "mpp_override": None,
    "tissue": TissueParams().to_dict(),
}
HASH_VERSION = 2  # bump when the algorithm changes in a way that changes coords


class NoTissueError(RuntimeError):
    """No tile passed the tissue criteria."""


def normalise_params(params=None) -> dict:
    """Defaults filled in, types normalised, validated.  Raises ValueError."""
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TILING_DEFAULTS.items()}
    params = dict(params or {})
    tissue = params.pop("tissue", None)
    unknown = set(params) - set(TILING_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiling parameter(s) {sorted(unknown)}; "
                         f"known: {sorted(TILING_DEFAULTS)}")
    p.update(params)
    p["tissue"] = TissueParams.from_any({**TILING_DEFAULTS["tissue"], **dict(tissue or {})}
                                        ).to_dict()
    p["patch_size"] = int(p["patch_size"])
    p["overlap"] = int(p["overlap"])
    p["target_mpp"] = float(p["target_mpp"])
    p["mpp_tolerance"] = float(p["mpp_tolerance"])
    p["min_tissue_fraction"] = float(p["min_tissue_fraction"])
    p["max_artefact_fraction"] = float(p["max_artefact_fraction"])
    p["allow_upsample"] = bool(p["allow_upsample"])
    if p["mpp_override"] is not None:
        p["mpp_override"] = float(p["mpp_override"])
    if p["patch_size"] <= 0:
        raise ValueError(f"tiling.patch_size must be > 0, got {p['patch_size']}")
    if not 0 <= p["overlap"] < p["patch_size"]:
        raise ValueError(f"tiling.overlap ({p['overlap']} px) must be >= 0 and smaller than "
                         f"tiling.patch_size ({p['patch_size']} px)")
    if not p["target_mpp"] > 0:
        raise ValueError("tiling.target_mpp must be > 0")
    if not 0.0 <= p["min_tissue_fraction"] <= 1.0:
        raise ValueError("tiling.min_tissue_fraction must be in [0, 1]")
    if not 0.0 <= p["max_artefact_fraction"] <= 1.0:
        raise ValueError("tiling.max_artefact_fraction must be in [0, 1]")
    p["fill_gaps"] = bool(p["fill_gaps"])
    p["fill_min_new"] = float(p["fill_min_new"])
    if not 0.0 < p["fill_min_new"] <= 1.0:
        raise ValueError("tiling.fill_min_new must be in (0, 1]")
    if p["edge_policy"] != "inside":
        raise ValueError(f"tiling.edge_policy {p['edge_policy']!r}: only 'inside' is supported")
    return p


def params_hash(params: dict) -> str:
    """12 hex digits identifying all parameters that change the coords."""
    p = normalise_params(params)
    blob = json.dumps({"v": HASH_VERSION, **p}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def grid_coords(width: int, height: int, size0: int, stride0: int) -> np.ndarray:
    """Level-0 top-left corners of all tiles fully inside width x height (row-major)."""
    if size0 > width or size0 > height:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, width - size0 + 1, stride0, dtype=np.int64)
    ys = np.arange(0, height - size0 + 1, stride0, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tile_fractions(mask: np.ndarray, scale, coords: np.ndarray, size0: int) -> np.ndarray:
    """Exact fraction of each tile's area covered by ``mask`` (thumbnail grid, ``scale``
    level-0 px per mask px), by bilinear lookup in the summed-area table."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    sx, sy = scale

    def at(x, y):
        x = np.clip(x, 0, mask.shape[1])
        y = np.clip(y, 0, mask.shape[0])
        x0 = np.minimum(np.floor(x).astype(int), mask.shape[1] - 1)
        y0 = np.minimum(np.floor(y).astype(int), mask.shape[0] - 1)
        fx, fy = x - x0, y - y0
        return (sat[y0, x0] * (1 - fx) * (1 - fy) + sat[y0, x0 + 1] * fx * (1 - fy)
                + sat[y0 + 1, x0] * (1 - fx) * fy + sat[y0 + 1, x0 + 1] * fx * fy)

    x0, y0 = coords[:, 0] / sx, coords[:, 1] / sy
    x1, y1 = (coords[:, 0] + size0) / sx, (coords[:, 1] + size0) / sy
    area = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    return (area / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def _thumb_box(x, y, size0, scale, shape):
    """Thumbnail-pixel slice (rows, cols) of a level-0 tile (rounded edges)."""
    sx, sy = scale
    c0, c1 = int(round(x / sx)), int(round((x + size0) / sx))
    r0, r1 = int(round(y / sy)), int(round((y + size0) / sy))
    return slice(max(r0, 0), min(r1, shape[0])), slice(max(c0, 0), min(c1, shape[1]))


def fill_gap_coords(tm: TissueMask, grid: np.ndarray, width: int, height: int, size0: int,
                    p: dict, snap: float = 1.0) -> np.ndarray:
    """Extra, off-grid tiles over tissue that the regular grid leaves uncovered.

    A fixed grid with a minimum tissue fraction per tile loses the tissue of every boundary
    tile below that fraction: on the demo's 1.5 mm sections, 256 px tiles at 0.5 µm/px covered
    only 86 % of the true tissue.  Lowering the fraction instead fills the bag with tiles that
    are mostly glass.  So, as a second pass, tiles that meet the same tissue and artefact
    criteria are placed anywhere (thumbnail-pixel positions, level-0 coords snapped to
    multiples of ``snap``, the read level's downsample), greedily by the amount of still
    uncovered tissue they add, while that amount is >= ``fill_min_new`` of a tile's area.
    No library offers this (CLAM/TRIDENT tile a fixed grid), hence written here.
    Returns level-0 top-left corners, row-major.
    """
    import heapq

    mask, excl, scale = tm.mask, tm.excluded, tm.scale
    sx, sy = scale
    unc = mask.copy()
    for x, y in grid:
        unc[_thumb_box(x, y, size0, scale, mask.shape)] = False
    kw, kh = max(1, int(round(size0 / sx))), max(1, int(round(size0 / sy)))
    if not unc.any() or kw > mask.shape[1] or kh > mask.shape[0]:
        return np.zeros((0, 2), np.int64)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    sat[1:, 1:] = unc.cumsum(0).cumsum(1)
    gain = sat[kh:, kw:] - sat[:-kh, kw:] - sat[kh:, :-kw] + sat[:-kh, :-kw]
    need = p["fill_min_new"] * kw * kh
    ii, jj = np.nonzero(gain >= need)
    if len(ii) == 0:
        return np.zeros((0, 2), np.int64)
    snap = max(1.0, float(snap))
    xs = np.clip(np.round(jj * sx / snap) * snap, 0, (width - size0) // snap * snap)
    ys = np.clip(np.round(ii * sy / snap) * snap, 0, (height - size0) // snap * snap)
    cand = np.stack([xs, ys], 1).astype(np.int64)
    ok = tile_fractions(mask, scale, cand, size0) >= p["min_tissue_fraction"] - 1e-6
    if p["max_artefact_fraction"] < 1.0 and excl.any():
        ok &= tile_fractions(excl, scale, cand, size0) <= p["max_artefact_fraction"] + 1e-6
    heap = [(-int(g), k) for k, g in enumerate(gain[ii, jj]) if ok[k]]
    heapq.heapify(heap)
    out = []
    while heap:  # lazy greedy: gains only shrink, so a re-scored top that stays on top is best
        _, k = heapq.heappop(heap)
        box = _thumb_box(cand[k, 0], cand[k, 1], size0, scale, mask.shape)
        g = int(unc[box].sum())
        if g < need:
            continue
        if heap and g < -heap[0][0]:
            heapq.heappush(heap, (-g, k))
            continue
        unc[box] = False
        out.append(cand[k])
    if not out:
        return np.zeros((0, 2), np.int64)
    out = np.unique(np.asarray(out, np.int64), axis=0)
    return out[np.lexsort((out[:, 0], out[:, 1]))]


@dataclass
class TilingResult:
    coords: np.ndarray
    tissue_fraction: np.ndarray
    plan: ReadPlan
    stride_level0: int
    tissue: TissueMask
    params: dict
    n_grid: int = -1  # coords[:n_grid] form the regular grid, the rest are gap-fill tiles

    def __post_init__(self):
        if self.n_grid < 0:
            self.n_grid = len(self.coords)

    @property
    def n_tiles(self) -> int:
        return len(self.coords)


def tile_slide(slide: SlideReader, params=None, user_mask=None,
               user_mask_downsample: float | None = None, device="auto") -> TilingResult:
    """Tissue mask + grid + filtering for one open slide.  Raises NoTissueError.
    ``device``: where the thumbnail is segmented ("auto": the GPU when present)."""
    p = normalise_params(params)
    plan = slide.plan(p["patch_size"], p["target_mpp"], p["mpp_tolerance"], p["allow_upsample"])
    size0 = plan.size_level0
    stride0 = max(1, int(round(size0 * (p["patch_size"] - p["overlap"]) / p["patch_size"])))
    tm = segment_tissue(slide, p["tissue"], user_mask, user_mask_downsample, device=device)
    W, H = slide.dimensions
    coords = grid_coords(W, H, size0, stride0)
    frac = tile_fractions(tm.mask, tm.scale, coords, size0)
    keep = frac >= p["min_tissue_fraction"] - 1e-6
    if p["min_tissue_fraction"] == 0:
        keep &= frac > 0
    if p["max_artefact_fraction"] < 1.0 and tm.excluded.any():
        keep &= tile_fractions(tm.excluded, tm.scale, coords, size0) <= (
            p["max_artefact_fraction"] + 1e-6)
    coords, frac = coords[keep], frac[keep]
    n_grid = len(coords)
    if p["fill_gaps"]:
        extra = fill_gap_coords(tm, coords, W, H, size0, p,
                                snap=slide.level_downsamples[plan.level])
        if len(extra):
            coords = np.concatenate([coords, extra])
            frac = np.concatenate([frac, tile_fractions(tm.mask, tm.scale, extra, size0)])
    if not len(coords):
        raise NoTissueError(
            f"{slide.path}: no tile has a tissue fraction >= {p['min_tissue_fraction']} (mask "
            f"covers {100 * tm.tissue_fraction:.2f} % of the thumbnail); check the QC image, "
            "lower tiling.min_tissue_fraction or adjust tiling.tissue.*")
    return TilingResult(coords, frac, plan, stride0, tm, p, n_grid)


def write_coords(path, result: TilingResult, slide: SlideReader, *, slide_id: str = "",
                 params_hash_: str | None = None) -> Path:
    """Write the coords HDF5 atomically (temp file in the same folder + os.replace)."""
    import h5py

    import netsurv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    p, plan = result.params, result.plan
    try:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=result.coords.astype(np.int64))
            f.create_dataset("tissue_fraction", data=result.tissue_fraction.astype(np.float32))
            # 0 = regular grid tile, 1 = gap-fill tile placed off the grid (tiling.fill_gaps)
            f.create_dataset("gap_fill", data=(np.arange(len(result.coords)) >= result.n_grid
                                               ).astype(np.uint8))
            W, H = slide.dimensions
            attrs = {
                "patch_size": int(plan.size_px),
                "patch_size_level0": int(plan.size_level0),
                "level0_width": int(W),
                "level0_height": int(H),
                "target_mpp": float(plan.target_mpp),
                "read_level": int(plan.level),
                "read_mpp": float(plan.read_mpp),
                "read_size": int(plan.read_size),
                "read_downsample": float(slide.level_downsamples[plan.level]),
                "read_level_width": int(slide.level_dimensions[plan.level][0]),
                "read_level_height": int(slide.level_dimensions[plan.level][1]),
                "resized": bool(plan.resize),
                "mpp": float(slide.mpp),
                "mpp_source": slide.mpp_source,
                "mpp_override": float(slide.mpp) if slide.mpp_source == "override" else np.nan,
                "overlap": int(p["overlap"]),
                "stride_level0": int(result.stride_level0),
                "min_tissue_fraction": float(p["min_tissue_fraction"]),
                "max_artefact_fraction": float(p["max_artefact_fraction"]),
                "edge_policy": p["edge_policy"],
                "fill_gaps": bool(p["fill_gaps"]),
                "fill_min_new": float(p["fill_min_new"]),
                "n_grid_tiles": int(result.n_grid),
                "n_gap_fill_tiles": int(len(result.coords) - result.n_grid),
                "tissue_params": json.dumps(p["tissue"], sort_keys=True),
                "tissue_threshold": float(result.tissue.threshold),
                "thumb_scale": np.asarray(result.tissue.scale, np.float64),
                "reader": slide.backend,
                "slide_path": str(slide.path),
                "slide_id": str(slide_id),
                "netsurv_version": netsurv.__version__,
                "params": json.dumps(p, sort_keys=True, default=str),
                "params_hash": params_hash_ or params_hash(p),
            }
            for k, v in attrs.items():
                f.attrs[k] = v
                d.attrs[k] = v  # CLAM reads the attrs from the coords dataset
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_coords(path) -> tuple[np.ndarray, dict]:
    import h5py

    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return coords, attrs


class TileDataset(_TorchDataset):
    """Tiles of one slide at the target resolution, read with the coords file's plan.

    ``__getitem__`` returns an RGB uint8 numpy array (patch_size, patch_size, 3) (HWC), or
    ``transform(tile)`` if a transform is given (e.g. ``torch.from_numpy(t).permute(2, 0, 1)``
    for CHW tensors).  ``backend``: "openslide" (any format, via the slide reader), "raw"
    (decode the file's JPEG tiles directly, see :mod:`netsurv.pathology.rawtiles`; requires
    a tiled JPEG TIFF read without resampling of the level grid, see :meth:`raw_supported`)
    or "auto" (raw when supported).  Slide handles are opened
    lazily per process, so the dataset works with DataLoader workers.
    """

    def __init__(self, coords_path, slide_path=None, *, backend: str = "openslide",
                 transform=None, mpp_override=None):
        self.coords_path = Path(coords_path)
        self.coords, self.attrs = read_coords(self.coords_path)
        self.slide_path = Path(slide_path or self.attrs["slide_path"])
        if backend not in ("openslide", "raw", "auto"):
            raise ValueError(f"TileDataset backend {backend!r}: choose 'openslide', 'raw' or "
                             "'auto'")
        self.transform = transform
        a = self.attrs
        self.plan = ReadPlan(int(a["read_level"]), int(a["read_size"]), int(a["patch_size"]),
                             int(a["patch_size_level0"]), float(a["target_mpp"]),
                             float(a["read_mpp"]), bool(a["resized"]))
        mo = a.get("mpp_override")
        self._mpp = mpp_override if mpp_override is not None else (
            None if mo is None or (isinstance(mo, float) and np.isnan(mo)) else float(mo))
        W, H, s0 = int(a["level0_width"]), int(a["level0_height"]), int(a["patch_size_level0"])
        c = self.coords.reshape(-1, 2)
        bad = (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] + s0 > W) | (c[:, 1] + s0 > H)
        if bad.any():  # openslide would return blank pixels for them without complaint
            x, y = c[np.argmax(bad)]
            raise SlideError(f"{self.coords_path}: {int(bad.sum())} tile(s) lie outside the "
                             f"{W}x{H} px slide (e.g. at ({x}, {y}), size {s0}); the coords "
                             "file is corrupt or belongs to another slide: delete it and re-tile")
        self._reader = None
        self._pid = None
        if backend == "auto":
            backend = "raw" if self.raw_supported() else "openslide"
        self.backend = backend

    def raw_supported(self) -> bool:
        """True if the raw-tile fast path can serve every tile of this coords file."""
        from .rawtiles import RawTileReader

        try:
            rd = RawTileReader(self.slide_path)
        except Exception:  # noqa: BLE001 - not a tiled JPEG TIFF
            return False
        try:
            lv = rd.level_for(int(self.attrs["read_level_width"]),
                              int(self.attrs["read_level_height"]))
            return rd.supports(self.coords, self.plan, lv, float(self.attrs["read_downsample"]))
        except Exception:  # noqa: BLE001
            return False
        finally:
            rd.close()

    def __len__(self) -> int:
        return len(self.coords)

    def _get_reader(self):
        if self._reader is None or self._pid != os.getpid():
            if self.backend == "raw":
                from .rawtiles import RawTileReader

                self._reader = RawTileReader(self.slide_path)
                self._raw_level = self._reader.level_for(int(self.attrs["read_level_width"]),
                                                         int(self.attrs["read_level_height"]))
            else:
                rd = self.attrs.get("reader", "openslide")
                self._reader = open_slide(self.slide_path, self._mpp,
                                          backend=rd if rd in ("openslide", "tifffile") else "auto")
            self._pid = os.getpid()
        return self._reader

    def read(self, i: int) -> np.ndarray:
        x, y = (int(v) for v in self.coords[i])
        rd = self._get_reader()
        if self.backend == "raw":
            return rd.read_plan(x, y, self.plan, self._raw_level,
                                float(self.attrs["read_downsample"]))
        return rd.read_plan(x, y, self.plan)

    def __getitem__(self, i: int):
        tile = self.read(int(i))
        return self.transform(tile) if self.transform is not None else tile

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_reader"], d["_pid"] = None, None
        return d
