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

    # decoded file tiles kept for regions that straddle tiles: at least 64, up to 128 MiB
    # (about one row of a wide tissue region, so that the next batch's first row of regions,
    # which shares file tiles with this batch's last row, decodes none of them again)
    cache_tiles, cache_bytes = 64, 128 << 20

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
        """Index (into ``pages``) of the tiled JPEG page of exactly ``width`` x ``height`` pixels.

        Raises
        ------
        SlideError
            If no such page exists.
        """
        for i, p in enumerate(self.pages):
            if (p.imagewidth, p.imagelength) == (width, height):
                return i
        raise SlideError(f"{self.path}: no tiled JPEG page of {width}x{height} px")

    def tile_size(self, level: int) -> tuple[int, int]:
        """File tile size (width, height) of ``level``."""
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
        """Compressed bytes of file tile (``tx``, ``ty``) of ``level``, read with ``os.pread``.

        The stream lacks the page's ``JPEGTables`` where the file shares them (see
        :func:`merge_jpeg_tables`).

        Raises
        ------
        SlideError
            If the tile lies outside the page's tile grid or is empty (byte count 0).
        """
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
        """Decode file tile (``tx``, ``ty``) of ``level`` to RGB uint8 (tile height, tile width, 3).

        Uses tifffile's page decoder with the page's ``JPEGTables``; edge tiles keep the file's
        full tile size (including padding).
        """
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
            self._trim_cache()
        return arr

    def _trim_cache(self) -> None:
        if self._cache:
            per = next(iter(self._cache.values())).nbytes
            cap = max(self.cache_tiles, self.cache_bytes // max(per, 1))
            while len(self._cache) > cap:
                self._cache.popitem(last=False)

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
        for tx, ty in _covered(lx, ly, size, tw, th):
            _paste(out, lx, ly, size, self._cached_tile(level, tx, ty), tx, ty, tw, th)
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
        the GIL).  ``out``: optional preallocated array to fill (reuse it across batches).

        The batch is read file tile by file tile, not region by region: the file tiles the
        regions cover are collected first, each is decoded once (regions that straddle file
        tiles share them; per-region reads in parallel decoded shared tiles twice, 1.5 decodes
        per tile instead of 1.25 on a demo slide), then the regions are cut from them.  The
        file tiles the batch's last regions used stay in the LRU cache for the next batch,
        whose first regions are their neighbours in the tiling order."""
        coords = np.asarray(coords).reshape(-1, 2)
        n, size = len(coords), plan.read_size
        if out is None:
            out = np.empty((n, plan.size_px, plan.size_px, 3), np.uint8)
        if n == 0:
            return out
        tw, th = self.tile_size(level)
        p = self.pages[level]
        lxy = np.round(coords.astype(np.float64) / downsample).astype(np.int64)
        if (lxy.min() < 0 or (lxy[:, 0] + size).max() > p.imagewidth
                or (lxy[:, 1] + size).max() > p.imagelength):
            raise SlideError(f"{self.path}: a region of the batch lies outside level {level}")
        # file tiles of each region, in order of last use (dict order = the LRU order to keep)
        spans = []
        last_use: dict = {}
        for lx, ly in lxy.tolist():
            keys = [(level, tx, ty) for tx, ty in _covered(lx, ly, size, tw, th)]
            spans.append(keys)
            for k in keys:
                last_use.pop(k, None)
                last_use[k] = True
        with self._lock:
            tiles = {k: self._cache[k] for k in last_use if k in self._cache}
        missing = [k for k in last_use if k not in tiles]
        pool = executor
        own = pool is None and threads and threads > 1 and len(missing) > 1
        if own:
            pool = ThreadPoolExecutor(threads)
        try:
            def decode(key):
                return self.decode_tile(*key)

            many = pool is not None and len(missing) > 1
            tiles.update(zip(missing, pool.map(decode, missing) if many else map(decode, missing)))

            def cut(rows):
                tmp = np.empty((size, size, 3), np.uint8) if plan.resize else None
                for i in rows:
                    lx, ly = (int(v) for v in lxy[i])
                    dst = tmp if plan.resize else out[i]
                    for k in spans[i]:
                        _paste(dst, lx, ly, size, tiles[k], k[1], k[2], tw, th)
                    if plan.resize:
                        out[i] = resize_rgb(dst, plan.size_px)

            if pool is not None and n > 1:  # numpy copies and PIL resizes release the GIL
                halves = np.array_split(np.arange(n), 2)
                list(pool.map(cut, halves))
            else:
                cut(range(n))
        finally:
            if own:
                pool.shutdown()
        with self._lock:
            for k in last_use:  # oldest use first: the batch's last file tiles end up newest
                self._cache.pop(k, None)
                self._cache[k] = tiles[k]
            self._trim_cache()
        return out

    def close(self):
        """Close the file descriptor and the TIFF file; later calls do nothing."""
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


def _covered(lx: int, ly: int, size: int, tw: int, th: int) -> list[tuple[int, int]]:
    """(tx, ty) of the file tiles (``tw`` x ``th``) that the ``size`` x ``size`` region at level
    pixel (lx, ly) covers, row by row."""
    return [(tx, ty) for ty in range(ly // th, (ly + size - 1) // th + 1)
            for tx in range(lx // tw, (lx + size - 1) // tw + 1)]


def _paste(dst: np.ndarray, lx: int, ly: int, size: int, tile: np.ndarray, tx: int, ty: int,
           tw: int, th: int) -> None:
    """Copy the part of decoded file tile (tx, ty) that lies in the region at (lx, ly) into the
    region's array ``dst``."""
    x0, y0 = max(lx, tx * tw), max(ly, ty * th)
    x1, y1 = min(lx + size, (tx + 1) * tw), min(ly + size, (ty + 1) * th)
    dst[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = tile[y0 - ty * th:y1 - ty * th,
                                                 x0 - tx * tw:x1 - tx * tw]


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
