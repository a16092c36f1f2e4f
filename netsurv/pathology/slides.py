"""Whole-slide image access with an explicit µm/px chain and exact-resolution reads.

``open_slide(path, mpp_override=None)`` returns a :class:`SlideReader`.  Coordinates are
always level-0 pixels.  The level-0 resolution (``mpp``, µm per pixel) is
resolved, in order, from

1. ``mpp_override`` (slides.csv ``mpp`` column or ``tiling.mpp_override``)  -> "override"
2. openslide's ``openslide.mpp-x`` / ``openslide.mpp-y``                     -> "openslide"
3. the TIFF ``XResolution``/``YResolution`` tags of the first page (cm/inch) -> "tiff-resolution"
4. ``openslide.objective-power`` (10 µm / power: 20x -> 0.5)                 -> "objective-power"

and otherwise :class:`SlideError` names the file and the fix.  There is no silent default.

Backends: :class:`OpenSlideReader` (default; every format openslide reads, including
pyramids with non-power-of-two downsamples) and :class:`TiffFileReader` (tifffile; for
TIFFs openslide refuses, e.g. stripped single-level TIFFs; it decodes whole levels into
memory, so use it for small images only).  Further backends (tiffslide, cuCIM) only need to
subclass :class:`SlideReader` and implement ``_read_level_region``, ``level_dimensions``,
``level_downsamples`` and ``properties``, then be added to ``BACKENDS``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SlideError", "SlideReader", "OpenSlideReader", "TiffFileReader", "ReadPlan",
           "open_slide", "resize_rgb", "BACKENDS"]

MPP_FIX = ("add an 'mpp' column (µm per level-0 pixel, e.g. 0.25 or 0.5) to slides.csv for this "
           "slide, or set tiling.mpp_override=<µm/px> for all slides")


class SlideError(RuntimeError):
    """A slide cannot be read or lacks information needed to read it exactly."""


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
        return tuple(self.level_dimensions[0])

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
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
        elif allow_upsample:
            lv = 0
        else:
            raise SlideError(
                f"{self.path}: target {target_mpp:g} µm/px is finer than the slide's level 0 "
                f"({self.mpp:g} µm/px, source: {self.mpp_source}) beyond the tolerance "
                f"{tolerance:g}; upsampling is refused. Ask for a coarser target_mpp, widen "
                "the tolerance, or set allow_upsample=true (tiling.allow_upsample).")
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
        w, h = self.level_dimensions[level]
        return self._read_level_region(0, 0, level, int(w), int(h))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, dims={self.dimensions}, "
                f"levels={len(self.level_dimensions)}, mpp={self.mpp:g} [{self.mpp_source}])")

    # ---------------------------------------------------------------- mpp chain
    def _resolve_mpp(self, override) -> None:
        if override is not None and not (isinstance(override, float) and math.isnan(override)):
            v = float(override)
            if not v > 0:
                raise SlideError(f"{self.path}: mpp override {override!r} must be > 0 µm/px")
            self.mpp, self.mpp_source = v, "override"
            return
        props = self.properties
        try:
            mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
            if mx > 0 and my > 0:
                self.mpp, self.mpp_source = self._check_square(mx, my), "openslide"
                return
        except (KeyError, TypeError, ValueError):
            pass
        res = _tiff_resolution_mpp(self.path)
        if res is not None:
            self.mpp, self.mpp_source = self._check_square(*res), "tiff-resolution"
            return
        try:
            power = float(props["openslide.objective-power"])
            if power > 0:
                self.mpp, self.mpp_source = 10.0 / power, "objective-power"
                return
        except (KeyError, TypeError, ValueError):
            pass
        raise SlideError(f"{self.path}: no pixel size found (no override, no openslide.mpp-x, "
                         f"no TIFF resolution tags in cm/inch, no objective power); {MPP_FIX}")

    def _check_square(self, mx: float, my: float) -> float:
        if abs(mx - my) > 0.02 * max(mx, my):
            raise SlideError(f"{self.path}: non-square pixels ({mx:g} x {my:g} µm) are not "
                             f"supported; {MPP_FIX}")
        return (mx + my) / 2.0


def _tiff_resolution_mpp(path: Path):
    """(mpp_x, mpp_y) from the first TIFF page's resolution tags, or None."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            if unit is None or xr is None or yr is None:
                return None
            per = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # µm per inch / cm
            if per is None:
                return None

            def px_per_unit(v):
                num, den = v if isinstance(v, tuple) else (v, 1)
                return float(num) / float(den) if den else 0.0

            fx, fy = px_per_unit(xr.value), px_per_unit(yr.value)
            if fx <= 1.0 or fy <= 1.0:  # 1 px per unit: a placeholder, not a measurement
                return None
            return per / fx, per / fy
    except Exception:  # noqa: BLE001 - not a TIFF, unreadable tags: fall through the chain
        return None


class OpenSlideReader(SlideReader):
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
        except SlideError as e2:
            raise SlideError(f"{e}; tifffile fallback: {e2}") from e2
