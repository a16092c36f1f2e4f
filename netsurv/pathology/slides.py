"""Whole-slide image access with an explicit µm/px chain and exact-resolution reads.

``open_slide(path, mpp_override=None)`` returns a :class:`SlideReader`.  Coordinates are
always level-0 pixels.  The level-0 resolution (``mpp``, µm per pixel) is
resolved, in order, from

1. ``mpp_override`` (slides.csv ``mpp`` column or ``tiling.mpp_override``)  -> "override"
2. openslide's ``openslide.mpp-x`` / ``openslide.mpp-y``                     -> "openslide"
3. the TIFF ``XResolution``/``YResolution`` tags of the first page (cm/inch) -> "tiff-resolution"
4. ``openslide.objective-power`` (10 µm / power: 20x -> 0.5)                 -> "objective-power"

and otherwise :class:`SlideError` names the file and the fix.  There is no silent default.

Sanity (a wrong mpp silently changes every tile's physical size, so it is checked):

- a value read from the file outside :data:`MPP_RANGE` (0.1-16 µm/px: 0.1 is beyond any
  optical scanner, 16 coarser than a 1x macro image), or a TIFF resolution that is a
  screen/print density (72, 96, 300 ... dpi, which image editors and converters write by
  default; 72 dpi reads as 352.8 µm/px), is a :class:`SlideError` saying what was read and
  how to give the real mpp; an override replaces it (the implausible value is kept in
  ``mpp_file`` for the provenance);
- an override outside :data:`MPP_RANGE` is an error too;
- an override that differs from a plausible file value by more than
  :data:`MPP_DISAGREEMENT` (10 %) is kept (the user decides) but recorded in
  ``mpp_conflict`` and logged as a warning; the tiling turns it into an error with
  ``tiling.strict_mpp=true``.

Reads never upsample by more than :data:`MAX_UPSAMPLE` (4x), even with ``allow_upsample``.

Backends: :class:`OpenSlideReader` (default; every format openslide reads, including
pyramids with non-power-of-two downsamples) and :class:`TiffFileReader` (tifffile; for
TIFFs openslide refuses, e.g. stripped single-level TIFFs; it decodes whole levels into
memory, so use it for small images only).  Further backends (tiffslide, cuCIM) only need to
subclass :class:`SlideReader` and implement ``_read_level_region``, ``level_dimensions``,
``level_downsamples`` and ``properties``, then be added to ``BACKENDS``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SlideError", "MppError", "SlideReader", "OpenSlideReader", "TiffFileReader", "ReadPlan",
           "open_slide", "resize_rgb", "BACKENDS", "MPP_RANGE", "MAX_UPSAMPLE",
           "MPP_DISAGREEMENT"]

log = logging.getLogger(__name__)

MPP_FIX = ("add an 'mpp' column (µm per level-0 pixel, e.g. 0.25 or 0.5) to slides.csv for this "
           "slide, or set tiling.mpp_override=<µm/px> for all slides")
MPP_RANGE = (0.1, 16.0)   # plausible µm per level-0 pixel of a slide scan
MPP_DISAGREEMENT = 0.10   # relative override / file difference that is reported
MAX_UPSAMPLE = 4.0        # reads never upsample more than this, whatever allow_upsample says
# pixel densities that image editors, converters and screen captures write by default
SCREEN_DPI = (72, 75, 96, 100, 120, 144, 150, 200, 240, 300, 400, 600, 1200)


class SlideError(RuntimeError):
    """A slide cannot be read or lacks information needed to read it exactly."""


class MppError(SlideError):
    """The slide opens, but its pixel size is missing, implausible or contradicted."""


@dataclass(frozen=True)
class ReadPlan:
    """How to obtain ``size_px`` x ``size_px`` pixels at ``target_mpp``.

    Read ``read_size`` x ``read_size`` pixels at pyramid level ``level`` (µm/px
    ``read_mpp``), covering ``size_level0`` level-0 pixels, then resize to ``size_px`` when
    ``resize`` is true (antialiased downsampling; upsampling only when allowed)."""

    level: int
    read_size: int
    size_px: int
    size_level0: int
    target_mpp: float
    read_mpp: float
    resize: bool

    @property
    def effective_mpp(self) -> float:
        """µm per output pixel actually delivered."""
        return self.read_mpp * self.read_size / self.size_px


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an (h, w, 3) uint8 image to size x size: area/box filter when shrinking by an
    integer factor (exact pixel averaging), Lanczos otherwise (antialiased in PIL)."""
    from PIL import Image

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    pil = Image.fromarray(img)
    integer = h % size == 0 and w % size == 0 and h >= size
    return np.asarray(pil.resize((size, size), Image.BOX if integer else Image.LANCZOS))


class SlideReader:
    """Backend-independent slide interface.  Subclasses provide ``level_dimensions``,
    ``level_downsamples``, ``properties`` and ``_read_level_region``."""

    backend = "base"
    path: Path
    level_dimensions: tuple
    level_downsamples: tuple
    properties: dict
    mpp: float
    mpp_source: str

    # ---------------------------------------------------------------- basic geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size as (width, height) in pixels."""
        return tuple(self.level_dimensions[0])

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """µm per pixel of pyramid level ``level`` (level-0 mpp times the level's downsample)."""
        return self.mpp * float(self.level_downsamples[level])

    # ---------------------------------------------------------------- reading
    def _read_level_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, location, level: int, size) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level``; ``location`` in level-0 pixels; areas outside
        the slide are white (like openslide's transparent pixels composited on white)."""
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        return self._read_level_region(x, y, int(level), w, h)

    def plan(self, size_px: int, target_mpp: float, tolerance: float = 0.05,
             allow_upsample: bool = False) -> ReadPlan:
        """Choose the pyramid level for reading ``size_px`` pixels at ``target_mpp``.

        The coarsest level whose µm/px is within ``tolerance`` (relative) of the target is
        read as is; otherwise the coarsest level finer than the target is read and
        downsampled with antialiasing.  If even level 0 is coarser than the target (beyond
        the tolerance) a SlideError is raised unless ``allow_upsample`` (then level 0 is
        read and upsampled with Lanczos)."""
        size_px, target_mpp = int(size_px), float(target_mpp)
        if size_px <= 0 or not target_mpp > 0:
            raise ValueError(f"size_px ({size_px}) and target_mpp ({target_mpp}) must be > 0")
        mpps = [self.level_mpp(i) for i in range(self.level_count)]
        within = [i for i, m in enumerate(mpps) if abs(m - target_mpp) <= tolerance * target_mpp]
        if within:
            lv = max(within, key=lambda i: mpps[i])
            ds = float(self.level_downsamples[lv])
            return ReadPlan(lv, size_px, size_px, int(round(size_px * ds)), target_mpp,
                            mpps[lv], False)
        size0 = int(round(size_px * target_mpp / self.mpp))
        finer = [i for i, m in enumerate(mpps) if m < target_mpp]
        if finer:
            lv = max(finer, key=lambda i: mpps[i])
        elif allow_upsample and self.mpp <= MAX_UPSAMPLE * target_mpp:
            lv = 0
        elif allow_upsample:
            raise SlideError(
                f"{self.path}: target {target_mpp:g} µm/px would upsample the slide's level 0 "
                f"({self.mpp:g} µm/px, source: {self.mpp_source}) "
                f"{self.mpp / target_mpp:.1f}x; more than {MAX_UPSAMPLE:g}x is refused even with "
                "allow_upsample (it invents detail and costs memory). If the slide's mpp is "
                f"wrong, {MPP_FIX}; otherwise ask for a coarser tiling.target_mpp.")
        else:
            raise SlideError(
                f"{self.path}: target {target_mpp:g} µm/px is finer than the slide's level 0 "
                f"({self.mpp:g} µm/px, source: {self.mpp_source}) beyond the tolerance "
                f"{tolerance:g}; upsampling is refused. Ask for a coarser target_mpp, widen "
                "the tolerance, or set allow_upsample=true (tiling.allow_upsample).")
        if size0 < 1:  # unreachable with MAX_UPSAMPLE; a guard against a zero-size read
            raise SlideError(f"{self.path}: a {size_px} px tile at {target_mpp:g} µm/px covers "
                             f"no level-0 pixel at {self.mpp:g} µm/px; {MPP_FIX}")
        ds = float(self.level_downsamples[lv])
        read_size = max(1, int(round(size0 / ds)))
        return ReadPlan(lv, read_size, size_px, size0, target_mpp, mpps[lv],
                        read_size != size_px)

    def read_plan(self, x: int, y: int, plan: ReadPlan) -> np.ndarray:
        """Read one tile with a precomputed :class:`ReadPlan` (level-0 top-left x, y)."""
        img = self._read_level_region(int(x), int(y), plan.level, plan.read_size, plan.read_size)
        return resize_rgb(img, plan.size_px) if plan.resize else img

    def read_at_mpp(self, x: int, y: int, size_px: int, target_mpp: float,
                    tolerance: float = 0.05, allow_upsample: bool = False) -> np.ndarray:
        """``size_px`` x ``size_px`` RGB uint8 pixels at ``target_mpp`` whose top-left corner
        is level-0 pixel (x, y); see :meth:`plan` for the level choice."""
        return self.read_plan(x, y, self.plan(size_px, target_mpp, tolerance, allow_upsample))

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole pyramid level as an RGB uint8 (h, w, 3) array.

        Decodes the full level into memory; meant for small (coarse) levels.
        """
        w, h = self.level_dimensions[level]
        return self._read_level_region(0, 0, level, int(w), int(h))

    def close(self) -> None:
        """Release the backend's file handles (no-op in the base class)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, dims={self.dimensions}, "
                f"levels={len(self.level_dimensions)}, mpp={self.mpp:g} [{self.mpp_source}])")

    # ---------------------------------------------------------------- mpp chain
    mpp_file: float | None = None        # what the file says (None: nothing)
    mpp_file_source: str | None = None
    mpp_file_problem: str | None = None  # why the file's value is not usable
    mpp_conflict: str | None = None      # override vs file disagreement (> MPP_DISAGREEMENT)

    def _resolve_mpp(self, override) -> None:
        has_override = override is not None and not (
            isinstance(override, float) and math.isnan(override))
        self.mpp_file, self.mpp_file_source, self.mpp_file_problem = self._file_mpp()
        self.mpp_conflict = None
        if has_override:
            v = float(override)
            if not v > 0:
                raise MppError(f"{self.path}: mpp override {override!r} must be > 0 µm/px")
            if not MPP_RANGE[0] <= v <= MPP_RANGE[1]:
                raise MppError(
                    f"{self.path}: mpp override {v:g} µm/px is outside the plausible range of "
                    f"slide scans ({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px); give µm per level-0 "
                    "pixel (0.25 at 40x, 0.5 at 20x), not a magnification or dpi")
            self.mpp, self.mpp_source = v, "override"
            f = self.mpp_file
            if f is not None and self.mpp_file_problem is None and (
                    abs(v - f) > MPP_DISAGREEMENT * f):
                self.mpp_conflict = (
                    f"mpp override {v:g} µm/px differs from the file's {f:g} µm/px "
                    f"({self.mpp_file_source}) by {100 * abs(v - f) / f:.0f} %")
                log.warning("%s: %s; the override is used (tiling.strict_mpp=true makes this "
                            "an error)", self.path, self.mpp_conflict)
            return
        if self.mpp_file is None:
            raise MppError(f"{self.path}: no pixel size found (no override, no "
                             "openslide.mpp-x, no TIFF resolution tags in cm/inch, no objective "
                             f"power); {MPP_FIX}")
        if self.mpp_file_problem is not None:
            raise MppError(f"{self.path}: {self.mpp_file_problem}; {MPP_FIX}")
        self.mpp, self.mpp_source = self.mpp_file, self.mpp_file_source

    def _file_mpp(self):
        """(mpp, source, problem) from the file's metadata; problem (str) when the value is
        not a plausible scan resolution; (None, None, None) when there is none."""
        props = self.properties
        res = _tiff_resolution(self.path)
        dpi = _screen_dpi(res)
        found = None
        try:
            mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
            if mx > 0 and my > 0:
                found = (mx, my, "openslide")
        except (KeyError, TypeError, ValueError):
            pass
        if found is None and res is not None:
            found = (*res["mpp"], "tiff-resolution")
        if found is None:
            try:
                power = float(props["openslide.objective-power"])
                if power > 0:
                    found = (10.0 / power, 10.0 / power, "objective-power")
            except (KeyError, TypeError, ValueError):
                pass
        if found is None:
            return None, None, None
        mx, my, source = found
        if abs(mx - my) > 0.02 * max(mx, my):
            return mx, source, (f"non-square pixels ({mx:g} x {my:g} µm, {source}) are not "
                                "supported")
        m = (mx + my) / 2.0
        from_tiff_tags = source == "tiff-resolution" or (
            res is not None and abs(res["mpp"][0] - mx) <= 1e-3 * mx)
        if dpi is not None and from_tiff_tags:
            return m, source, (f"the TIFF resolution is {dpi:g} dpi (= {m:g} µm/px, {source}), "
                               "a screen/print density written by image software, not a "
                               "scanner's pixel size")
        if not MPP_RANGE[0] <= m <= MPP_RANGE[1]:
            return m, source, (f"the file reports {m:g} µm/px ({source}), outside the "
                               f"plausible range of slide scans ({MPP_RANGE[0]:g}-"
                               f"{MPP_RANGE[1]:g} µm/px)")
        return m, source, None


def _tiff_resolution(path: Path):
    """First TIFF page's resolution tags: {"unit": "inch"|"cm", "per_unit": (x, y),
    "mpp": (x, y)}, or None (no tags, unit none, placeholder 1 px/unit, not a TIFF)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xr is None or yr is None:
                return None
            name, per = {2: ("inch", 25400.0), 3: ("cm", 10000.0)}.get(int(unit.value),
                                                                     (None, None))
            if per is None:
                return None

            def px_per_unit(v):
                num, den = v if isinstance(v, tuple) else (v, 1)
                return float(num) / float(den) if den else 0.0

            fx, fy = px_per_unit(xr.value), px_per_unit(yr.value)
            if fx <= 1.0 or fy <= 1.0:  # 1 px per unit: a placeholder, not a measurement
                return None
            return {"unit": name, "per_unit": (fx, fy), "mpp": (per / fx, per / fy)}
    except Exception:  # noqa: BLE001 - not a TIFF, unreadable tags: fall through the chain
        return None


def _tiff_resolution_mpp(path: Path):
    """(mpp_x, mpp_y) from the first TIFF page's resolution tags, or None."""
    r = _tiff_resolution(path)
    return None if r is None else r["mpp"]


def _screen_dpi(res) -> float | None:
    """The dpi if the TIFF resolution is one of :data:`SCREEN_DPI` (within 0.5 %)."""
    if res is None:
        return None
    fx = res["per_unit"][0] * (2.54 if res["unit"] == "cm" else 1.0)
    for d in SCREEN_DPI:
        if abs(fx - d) <= 0.005 * d:
            return float(d)
    return None


class OpenSlideReader(SlideReader):
    """openslide backend: every format openslide reads, pyramid levels as openslide reports them.

    Transparent pixels (outside the scanned area) are composited on white.

    Raises
    ------
    SlideError
        If the file does not exist or openslide cannot open it.
    MppError
        If the pixel size cannot be resolved (see the module docstring).
    """

    backend = "openslide"

    def __init__(self, path, mpp_override=None):
        import openslide

        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: file not found")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as e:  # OpenSlideError / OpenSlideUnsupportedFormatError
            raise SlideError(f"{self.path}: openslide cannot open it ({type(e).__name__}: {e})"
                             ) from e
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.properties = dict(self._osr.properties)
        self._resolve_mpp(mpp_override)

    def _read_level_region(self, x, y, level, w, h):
        import openslide

        try:
            img = self._osr.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: read failed at ({x}, {y}) level {level}: {e}") from e
        if img.getchannel("A").getextrema()[0] == 255:  # fully opaque: PIL's C conversion
            return np.asarray(img.convert("RGB"))
        rgba = np.asarray(img)
        rgb = rgba[..., :3]
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # outside the slide / no data: composite on white
            a = alpha[..., None].astype(np.uint16)
            rgb = ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)

    def close(self):
        """Close the underlying ``openslide.OpenSlide`` handle."""
        self._osr.close()


class TiffFileReader(SlideReader):
    """tifffile backend: pages of the main series (and its pyramid levels) as levels.
    Each level is decoded whole on first use and cached: small images only."""

    backend = "tifffile"

    def __init__(self, path, mpp_override=None):
        import tifffile

        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: file not found")
        try:
            self._tf = tifffile.TiffFile(self.path)
            series = self._tf.series[0]
            levels = list(series.levels)
            dims = []
            for lv in levels:
                shape = lv.shape
                if len(shape) != 3 or shape[-1] not in (3, 4):
                    raise SlideError(f"{self.path}: not an RGB(A) image (shape {shape})")
                dims.append((int(shape[1]), int(shape[0])))
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(f"{self.path}: tifffile cannot read it ({type(e).__name__}: {e})"
                             ) from e
        self._levels = levels
        self.level_dimensions = tuple(dims)
        w0 = dims[0][0]
        self.level_downsamples = tuple(w0 / d[0] for d in dims)
        self.properties = {}
        self._cache: dict[int, np.ndarray] = {}
        self._resolve_mpp(mpp_override)

    def _read_level_region(self, x, y, level, w, h):
        if level not in self._cache:
            self._cache[level] = np.asarray(self._levels[level].asarray())[..., :3]
        arr = self._cache[level]
        ds = self.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = arr.shape[:2]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, W), min(ly + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = arr[y0:y1, x0:x1]
        return out

    def close(self):
        """Close the underlying ``tifffile.TiffFile``."""
        self._tf.close()


BACKENDS = {"openslide": OpenSlideReader, "tifffile": TiffFileReader}


def open_slide(path, mpp_override=None, backend: str = "auto") -> SlideReader:
    """Open a slide.  ``backend``: "openslide", "tifffile" or "auto" (openslide, then
    tifffile for TIFFs openslide does not support).  Raises :class:`SlideError`."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown slide backend {backend!r}; choose from {sorted(BACKENDS)}")
        return BACKENDS[backend](path, mpp_override)
    try:
        return OpenSlideReader(path, mpp_override)
    except SlideError as e:
        if "cannot open" not in str(e) or Path(path).suffix.lower() not in (".tif", ".tiff"):
            raise
        try:
            return TiffFileReader(path, mpp_override)
        except MppError:
            raise  # tifffile reads it: the pixel size is the problem, not the format
        except SlideError as e2:
            raise SlideError(f"{e}; tifffile fallback: {e2}") from e2
