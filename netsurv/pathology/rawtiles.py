"""Raw-tile fast path: decode a tiled JPEG TIFF/SVS's compressed tiles directly.

When the requested tiles line up with the file's tile grid at the read level (level
coordinates and read size multiples of the file tile size, no resampling of the level
grid), the compressed bytes of each file tile are read with ``os.pread`` from the offsets
in the TIFF directory (``dataoffsets`` / ``databytecounts``) and decoded with tifffile's
page decoder (imagecodecs ``jpeg8_decode``: libjpeg-turbo, releases the GIL, handles
``JPEGTables`` and the photometric interpretation), skipping openslide's cache and
compositing.  Pixels equal openslide's up to JPEG-decoder differences (identical libjpeg-turbo
builds give identical pixels; the test allows max |diff| <= 3).  Regions that straddle file
tiles (the tiler's off-grid gap-fill tiles) are cropped from the decoded neighbours, which a
small LRU cache keeps so that adjacent regions decode each file tile once.

``decode_jpeg_torch`` decodes lists of tile streams with ``torchvision.io.decode_jpeg``,
on CUDA in batches when ``device="cuda"`` (JPEGTables are merged into each stream first);
it applies to YCbCr (photometric 6) tiles only.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .slides import ReadPlan, SlideError, resize_rgb

__all__ = ["RawTileReader", "merge_jpeg_tables", "decode_jpeg_torch"]

JPEG = 7


def merge_jpeg_tables(tables: bytes | None, data: bytes) -> bytes:
    """Abbreviated JPEG stream + JPEGTables -> a self-contained stream."""
    if not tables:
        return data
    return bytes(tables[:-2]) + bytes(data[2:])  # drop tables' EOI and the tile's SOI


class RawTileReader:
    """Direct access to the JPEG tiles of a tiled TIFF (Aperio SVS, generic pyramidal TIFF).

    Levels are the tiled JPEG RGB pages, identified by their pixel size (``level_for``)."""

    cache_tiles = 64  # decoded file tiles kept for regions that straddle tiles

    def __init__(self, path):
        import tifffile

        self.path = Path(path)
        try:
            self._tf = tifffile.TiffFile(self.path)
        except Exception as e:
            raise SlideError(f"{self.path}: not a readable TIFF ({e})") from e
        self.pages = []
        for page in self._tf.pages:
            if (page.is_tiled and int(page.compression) == JPEG and page.samplesperpixel == 3
                    and page.imagedepth == 1):
                self.pages.append(page)
        if not self.pages:
            raise SlideError(f"{self.path}: no tiled JPEG RGB pages; use the openslide path")
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # -------------------------------------------------------------- geometry
    def level_for(self, width: int, height: int) -> int:
        for i, p in enumerate(self.pages):
            if (p.imagewidth, p.imagelength) == (width, height):
                return i
        raise SlideError(f"{self.path}: no tiled JPEG page of {width}x{height} px")

    def tile_size(self, level: int) -> tuple[int, int]:
        p = self.pages[level]
        return p.tilewidth, p.tilelength

    def supports(self, coords: np.ndarray, plan: ReadPlan, level: int, downsample: float,
                 aligned: bool = False) -> bool:
        """True if every tile of ``coords`` (level 0) falls on whole pixels of the read level
        inside it; with ``aligned=True``, only if each also maps onto whole file tiles (the
        fastest case: one decode per file tile, no cropping)."""
        tw, th = self.tile_size(level)
        c = np.asarray(coords, np.float64).reshape(-1, 2) / downsample
        if not np.allclose(c, np.round(c)):
            return False
        c = np.round(c).astype(np.int64)
        p = self.pages[level]
        if len(c) and (c.min() < 0 or (c[:, 0] + plan.read_size).max() > p.imagewidth
                       or (c[:, 1] + plan.read_size).max() > p.imagelength):
            return False
        if not aligned:
            return True
        if plan.read_size % tw or plan.read_size % th:
            return False
        return bool(np.all(c[:, 0] % tw == 0) and np.all(c[:, 1] % th == 0))

    # -------------------------------------------------------------- reading
    def tile_bytes(self, level: int, tx: int, ty: int) -> bytes:
        p = self.pages[level]
        nx = -(-p.imagewidth // p.tilewidth)
        ny = -(-p.imagelength // p.tilelength)
        if not (0 <= tx < nx and 0 <= ty < ny):
            raise SlideError(f"{self.path}: tile ({tx}, {ty}) outside the {nx}x{ny} grid")
        i = ty * nx + tx
        n = int(p.databytecounts[i])
        if n == 0:
            raise SlideError(f"{self.path}: tile ({tx}, {ty}) of level {level} is empty")
        return os.pread(self._fd, n, int(p.dataoffsets[i]))

    def decode_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        p = self.pages[level]
        nx = -(-p.imagewidth // p.tilewidth)
        data = self.tile_bytes(level, tx, ty)
        arr, _, _ = p.decode(data, ty * nx + tx, jpegtables=p.jpegtables)
        return arr.reshape(p.tilelength, p.tilewidth, -1)[..., :3]

    def _cached_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """Decoded file tile through a small LRU cache: regions that straddle file tiles
        (gap-fill tiles) share their neighbours' tiles, which are then decoded once."""
        key = (level, tx, ty)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        arr = self.decode_tile(level, tx, ty)
        with self._lock:
            self._cache[key] = arr
            while len(self._cache) > self.cache_tiles:
                self._cache.popitem(last=False)
        return arr

    def read_level_region(self, lx: int, ly: int, level: int, size: int) -> np.ndarray:
        """``size`` x ``size`` pixels of ``level`` at (lx, ly): one decode per file tile when
        aligned, else the 1-4+ file tiles it straddles, decoded (cached) and cropped."""
        tw, th = self.tile_size(level)
        p = self.pages[level]
        if lx < 0 or ly < 0 or lx + size > p.imagewidth or ly + size > p.imagelength:
            raise SlideError(f"{self.path}: region ({lx}, {ly}, {size}) outside level {level}")
        if not (lx % tw or ly % th or size % tw or size % th):
            kx, ky = size // tw, size // th
            if kx == 1 and ky == 1:
                return self.decode_tile(level, lx // tw, ly // th)
            out = np.empty((size, size, 3), np.uint8)
            for j in range(ky):
                for i in range(kx):
                    out[j * th:(j + 1) * th, i * tw:(i + 1) * tw] = self.decode_tile(
                        level, lx // tw + i, ly // th + j)
            return out
        out = np.empty((size, size, 3), np.uint8)
        for ty in range(ly // th, (ly + size - 1) // th + 1):
            for tx in range(lx // tw, (lx + size - 1) // tw + 1):
                t = self._cached_tile(level, tx, ty)
                x0, y0 = max(lx, tx * tw), max(ly, ty * th)
                x1, y1 = min(lx + size, (tx + 1) * tw), min(ly + size, (ty + 1) * th)
                out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = t[y0 - ty * th:y1 - ty * th,
                                                          x0 - tx * tw:x1 - tx * tw]
        return out

    def read_plan(self, x: int, y: int, plan: ReadPlan, level: int, downsample: float
                  ) -> np.ndarray:
        """One tile (level-0 top-left x, y) as the slide reader's ``read_plan`` would give."""
        lx, ly = int(round(x / downsample)), int(round(y / downsample))
        img = self.read_level_region(lx, ly, level, plan.read_size)
        return resize_rgb(img, plan.size_px) if plan.resize else img

    def read_batch(self, coords, plan: ReadPlan, level: int, downsample: float,
                   threads: int = 0, executor: ThreadPoolExecutor | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """(N, size, size, 3) uint8 for level-0 ``coords``; ``threads`` > 1 (or an
        ``executor`` to reuse across batches) decodes in a thread pool (the decoder releases
        the GIL).  ``out``: optional preallocated array to fill (reuse it across batches)."""
        coords = np.asarray(coords)
        if out is None:
            out = np.empty((len(coords), plan.size_px, plan.size_px, 3), np.uint8)

        def one(i):
            out[i] = self.read_plan(int(coords[i, 0]), int(coords[i, 1]), plan, level,
                                    downsample)

        if executor is not None:
            list(executor.map(one, range(len(coords))))
        elif threads and threads > 1:
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(one, range(len(coords))))
        else:
            for i in range(len(coords)):
                one(i)
        return out

    def close(self):
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:  # close once: the number may be reused by another file later
            os.close(fd)
            self._tf.close()

    def __del__(self):  # best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __getstate__(self):
        raise TypeError("RawTileReader holds a file descriptor; open one per process")


def decode_jpeg_torch(reader: RawTileReader, level: int, tiles, device: str = "cpu"):
    """Decode file tiles ``[(tx, ty), ...]`` of ``level`` with torchvision (batched on CUDA
    when ``device`` is "cuda").  Returns a list of uint8 CHW tensors on ``device``."""
    import torch
    from torchvision.io import decode_jpeg

    p = reader.pages[level]
    if int(p.photometric) != 6:
        raise SlideError(f"{reader.path}: torchvision decoding needs YCbCr JPEG tiles "
                         f"(photometric {int(p.photometric)}); use RawTileReader.decode_tile")
    datas = [torch.frombuffer(bytearray(merge_jpeg_tables(p.jpegtables,
                                                          reader.tile_bytes(level, tx, ty))),
                              dtype=torch.uint8) for tx, ty in tiles]
    return decode_jpeg(datas, device=device)
