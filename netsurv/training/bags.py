"""Bags of tile embeddings read from the per-slide feature files on demand.

A :class:`BagStore` indexes, per patient, the slide files and their tile counts (shapes and
attributes only, nothing of the features), and reads a patient's tiles when a DataLoader asks
for them: all of them for evaluation, or only the chosen rows of a training-time subsample.
Peak memory per process is therefore one batch of bags, whatever the number of slides.  The
store holds file paths and integers only, so it pickles into DataLoader worker processes; every
read opens the file and closes it again (≈0.3 ms), so no HDF5 handle crosses a ``fork`` and
none stays open across the thousands of slides of a cohort.

Files (one per slide, looked up in this order inside the features folder)
-------------------------------------------------------------------------
``<slide_id>.h5``            datasets ``features`` [N, D] and ``coords`` [N, 2] (level-0 x, y):
                             netsurv's embedding stage and TRIDENT write this; so does CLAM in
                             its ``h5_files/`` folder, which can be given directly
``h5_files/<slide_id>.h5``   CLAM's feature folder given as a whole
``<slide_id>.pt``            a torch tensor [N, D] (TRIDENT ``--saveas pt``)
``pt_files/<slide_id>.pt``   CLAM's ``.pt`` files

Any float dtype is accepted (netsurv's ``embed.dtype=float16`` files included); reads return
float32.  A file without ``coords`` (a ``.pt``) takes them from a patch-coordinates file
``<slide_id>.h5`` or ``<slide_id>_patches.h5`` in the features folder, its ``h5_files/``, ``patches/`` or
``../patches/`` (CLAM's and TRIDENT's folders); without one the slide still trains, but has no heatmap.
The tile side in level-0 pixels (heatmaps) comes from the attribute ``patch_size_level0`` (file
or ``coords`` dataset: netsurv, TRIDENT), else ``patch_size`` x ``downsample`` (CLAM's patch
files), else the step of the tile grid.

Each unusable slide (no file, unreadable, no ``features``, 0 tiles, coords and features of
different lengths, a feature dimension that differs from the other slides', non-finite values)
becomes one row of the failures table (:mod:`netsurv.stages.failures`; ``stage`` ``bags``,
``error_type`` ``BagError``, the ``reason`` naming the file) and the other slides go on.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from netsurv.stages.failures import (  # FAILURE_COLUMNS: the failures table of every stage
    FAILURE_COLUMNS,
    failure_row,
    failures_frame,
    write_failures,
)

log = logging.getLogger(__name__)

__all__ = ["Bag", "SlideFeatures", "BagStore", "BagError", "StoredBag", "wsi_bag_store",
           "find_features", "inspect_slide", "read_slide_rows",
           "FAILURE_COLUMNS"]

INDEX_COLUMNS = ["slide_id", "patient_id", "path", "kind", "n_tiles", "dim", "dtype",
                 "coords_path", "patch_size_level0", "read_mpp"]
CANDIDATES = ("{sid}.h5", "h5_files/{sid}.h5", "{sid}.pt", "pt_files/{sid}.pt")
SCAN_ROWS = 8192   # rows per block of the non-finite scan (bounded memory)
SPAN_FACTOR = 4    # chosen rows spanning at most 4x their number are read as one slab


class BagError(ValueError):
    """A slide's feature file cannot be used (the message names the file and the problem)."""


# --------------------------------------------------------------------------- in-memory bag
@dataclass
class Bag:
    """All tiles of one patient. ``slide[i]`` indexes ``slide_ids`` for tile i.

    ``features`` is None for tile metadata without the features (:meth:`BagStore.tile_meta`).
    ``has_coords[s]`` is False for a slide whose features came without tile coordinates (its
    ``coords`` rows are -1 and it gets no heatmap)."""

    features: np.ndarray | None            # float32 [N, D]
    coords: np.ndarray                     # int64 [N, 2] level-0 top-left (x, y)
    slide: np.ndarray                      # int64 [N]
    slide_ids: list[str] = field(default_factory=list)
    patch_size_level0: list[int] = field(default_factory=list)
    read_mpp: float = float("nan")
    has_coords: list[bool] | None = None

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the bag."""
        return int(len(self.slide))

    def read(self, rows=None) -> torch.Tensor:
        """float32 tensor of all tiles, or of the (increasing) tile positions ``rows``."""
        x = self.features if rows is None else self.features[np.asarray(rows, np.int64)]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# --------------------------------------------------------------------------- one slide
@dataclass(frozen=True)
class SlideFeatures:
    """Where one slide's tiles are and what they look like (read from shapes/attributes)."""

    slide_id: str
    path: str                  # features file
    kind: str                  # "h5" | "pt"
    n_tiles: int
    dim: int
    dtype: str
    coords_path: str | None    # file whose `coords` dataset lists the same tiles (None: none)
    patch_size_level0: int     # tile side in level-0 px; 0 = infer from the coords grid
    read_mpp: float            # µm/px the tiles were read at (NaN if not recorded)
    encoder: str | None = None


def _h5(path):
    import h5py

    # read-only and never modified in place (writers replace files atomically): no HDF5 file
    # lock, which fails on some cluster file systems
    return h5py.File(path, "r", locking=False)


def _load_pt(path) -> torch.Tensor:
    """The tensor of a ``.pt`` file, memory-mapped when the file allows it (rows are then read
    from disk on access, not the whole slide)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if not torch.is_tensor(obj):
        raise BagError(f"{path}: holds a {type(obj).__name__}, expected a tensor [N, D] of tile "
                       "features (CLAM/TRIDENT .pt)")
    return obj


def find_features(root, slide_id: str) -> tuple[Path, str]:
    """(features file, "h5" | "pt") of ``slide_id`` in ``root`` (order: module docstring)."""
    root = Path(root)
    for pat in CANDIDATES:
        p = root / pat.format(sid=slide_id)
        if p.is_file():
            return p, p.suffix[1:]
    looked = ", ".join(pat.format(sid=slide_id) for pat in CANDIDATES)
    raise BagError(f"{root}: no features file for slide {slide_id} (looked for {looked})")


def _attr(attrs: list[dict], *keys):
    for a in attrs:
        for k in keys:
            if k in a:
                v = a[k]
                return v.item() if isinstance(v, np.generic) else v
    return None


def _patch_size(attrs: list[dict]) -> int:
    v = _attr(attrs, "patch_size_level0")
    if v is not None:
        return int(v)
    for a in attrs:  # CLAM patch files: patch_size at patch_level, downsample of that level
        if "patch_size" in a and "downsample" in a:
            return int(round(float(a["patch_size"]) * float(np.atleast_1d(a["downsample"])[0])))
        if "patch_size" in a and int(np.atleast_1d(a.get("patch_level", -1))[0]) == 0:
            return int(a["patch_size"])
    return 0


def _read_mpp(attrs: list[dict]) -> float:
    v = _attr(attrs, "target_mpp", "read_mpp", "mpp")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _str_or_none(v):
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _coords_file(root: Path, feat: Path, slide_id: str, n: int) -> tuple[str | None, list[dict]]:
    """A separate patch-coordinates file for a features file without ``coords``: in the
    features folder ``root`` or beside the file, in ``h5_files/`` (CLAM), ``patches/`` or
    ``../patches/`` (TRIDENT's job folder, CLAM's patch folder)."""
    here = feat.parent
    dirs = list(dict.fromkeys([here, root, root / "h5_files", here / "h5_files",
                               root / "patches", here / "patches", root.parent / "patches",
                               here.parent / "patches", here.parent / "h5_files"]))
    for d in dirs:
        for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
            p = d / name
            if not p.is_file() or p.resolve() == feat.resolve():
                continue
            try:
                with _h5(p) as f:
                    if "coords" not in f:
                        continue
                    shape = f["coords"].shape
                    attrs = [dict(f["coords"].attrs), dict(f.attrs)]
            except OSError:
                continue
            if shape != (n, 2):
                raise BagError(f"{feat}: {n} feature rows but its coords file {p} has 'coords' "
                               f"of shape {shape}; they must list the same tiles")
            return str(p), attrs
    return None, []


def inspect_slide(root, slide_id: str) -> SlideFeatures:
    """Find and check one slide's features file from its shapes and attributes (no feature
    values are read). Raises :class:`BagError` naming the file."""
    path, kind = find_features(root, slide_id)
    try:
        if kind == "h5":
            with _h5(path) as f:
                if "features" not in f or not hasattr(f["features"], "shape"):
                    raise BagError(f"{path}: no 'features' dataset (it holds {sorted(f.keys())}); "
                                   "expected 'features' [N, D] and 'coords' [N, 2]")
                d = f["features"]
                shape, dtype = tuple(d.shape), str(np.dtype(d.dtype))
                is_float = np.dtype(d.dtype).kind == "f"
                attrs = [dict(f.attrs), dict(d.attrs)]
                coords_shape = tuple(f["coords"].shape) if "coords" in f else None
                if coords_shape is not None:
                    attrs.insert(1, dict(f["coords"].attrs))
        else:
            t = _load_pt(path)
            shape, dtype = tuple(t.shape), str(t.dtype).replace("torch.", "")
            is_float = t.is_floating_point()
            attrs, coords_shape = [], None
    except BagError:
        raise
    except Exception as exc:  # any reader error = unreadable file
        raise BagError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if len(shape) != 2:
        raise BagError(f"{path}: 'features' has shape {shape}, expected [N tiles, D]")
    n, dim = int(shape[0]), int(shape[1])
    if n == 0:
        raise BagError(f"{path}: 'features' has 0 tiles")
    if not is_float:
        raise BagError(f"{path}: 'features' has dtype {dtype}, expected floating point")
    if coords_shape is not None:
        if coords_shape != (n, 2):
            raise BagError(f"{path}: 'coords' has shape {coords_shape} but 'features' has {n} "
                           "rows; both must list the same tiles")
        coords_path = str(path)
    else:
        coords_path, cattrs = _coords_file(Path(root), path, slide_id, n)
        attrs += cattrs
    return SlideFeatures(slide_id=str(slide_id), path=str(path), kind=kind, n_tiles=n, dim=dim,
                         dtype=dtype, coords_path=coords_path,
                         patch_size_level0=_patch_size(attrs), read_mpp=_read_mpp(attrs),
                         encoder=_str_or_none(_attr(attrs[:1], "encoder")))


def read_slide_rows(sf: SlideFeatures, rows=None) -> np.ndarray:
    """float32 [k, D]: all rows of the slide, or the increasing positions ``rows`` only: HDF5
    reads just those rows, or the slab from the first to the last when it holds at most
    ``SPAN_FACTOR`` times as many rows (far faster for a dense subsample, and still bounded by
    the choice); a memory-mapped ``.pt`` touches just their pages."""
    if sf.kind == "h5":
        with _h5(sf.path) as f:
            d = f["features"]
            # read in the stored dtype, convert in numpy: 2.5x faster than HDF5's conversion
            if rows is None:
                x = d[:]
            else:
                rows = np.asarray(rows, np.int64)
                lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
                if hi - lo <= SPAN_FACTOR * len(rows):
                    # dense choice: one slab read, then the rows (an HDF5 point selection
                    # costs ~60 µs a row on TRIDENT's row-chunked files; a slab ~8 µs)
                    x = d[lo:hi][rows - lo]
                else:
                    x = d[rows]
        return np.asarray(x).astype(np.float32, copy=False)
    t = _load_pt(sf.path)
    if rows is not None:
        t = t[torch.as_tensor(np.asarray(rows, np.int64))]
    return t.to(torch.float32).numpy().copy() if rows is None else t.to(torch.float32).numpy()


def _read_coords(sf: SlideFeatures) -> np.ndarray | None:
    if sf.coords_path is None:
        return None
    with _h5(sf.coords_path) as f:
        return np.asarray(f["coords"][:], np.int64).reshape(-1, 2)


def _grid_step(coords: np.ndarray) -> int:
    """Tile side guessed from the grid: the smallest positive step between distinct x or y."""
    steps = []
    for c in (coords[:, 0], coords[:, 1]):
        u = np.unique(c)
        if len(u) > 1:
            steps.append(int(np.diff(u).min()))
    return min(steps) if steps else 0


def _scan_finite(sf: SlideFeatures) -> str | None:
    """None if every feature value is finite, else the failure reason (blockwise read)."""
    bad, first = 0, None
    if sf.kind == "h5":
        with _h5(sf.path) as f:
            d = f["features"]
            for s in range(0, sf.n_tiles, SCAN_ROWS):
                ok = np.isfinite(d[s:s + SCAN_ROWS]).all(1)
                if not ok.all():
                    bad += int((~ok).sum())
                    first = first if first is not None else s + int(np.flatnonzero(~ok)[0])
    else:
        t = _load_pt(sf.path)
        for s in range(0, sf.n_tiles, SCAN_ROWS):
            ok = torch.isfinite(t[s:s + SCAN_ROWS]).all(1).numpy()
            if not ok.all():
                bad += int((~ok).sum())
                first = first if first is not None else s + int(np.flatnonzero(~ok)[0])
    if bad:
        return (f"{sf.path}: {bad} of {sf.n_tiles} tiles have non-finite features (NaN/inf), "
                f"first at row {first}; re-extract this slide's features")
    return None


# --------------------------------------------------------------------------- store
class StoredBag:
    """One patient's bag in a :class:`BagStore`: the same attributes as :class:`Bag`, read from
    disk when used (``features`` reads every tile; :meth:`read` the rows asked for)."""

    def __init__(self, store: BagStore, patient_id: str):
        self.store, self.patient_id = store, patient_id
        self._meta = None

    @property
    def n_tiles(self) -> int:
        """Number of tiles in the patient's bag (no file is read)."""
        return self.store.n_tiles(self.patient_id)

    def read(self, rows=None) -> torch.Tensor:
        """The patient's tiles as float32 [k, D] (all, or the increasing positions ``rows``)."""
        return self.store.read(self.patient_id, rows)

    @property
    def features(self) -> np.ndarray:
        """Every tile's features as a float32 array [N, D], read on each access (not kept)."""
        return self.read().numpy()

    def _m(self) -> Bag:
        if self._meta is None:
            self._meta = self.store.tile_meta(self.patient_id)
        return self._meta

    coords = property(lambda self: self._m().coords)
    slide = property(lambda self: self._m().slide)
    slide_ids = property(lambda self: self._m().slide_ids)
    patch_size_level0 = property(lambda self: self._m().patch_size_level0)
    read_mpp = property(lambda self: self._m().read_mpp)
    has_coords = property(lambda self: self._m().has_coords)


class BagStore(Mapping):
    """Patients' bags on disk: ``store[patient_id]`` is a :class:`StoredBag`.

    Build with :meth:`build` (or :func:`wsi_bag_store` in a training run).  A tile's position in
    a patient's bag runs over the patient's slides in ``slides.csv`` order, then the slide's
    rows.  Picklable (paths and integers only); reads open and close the files."""

    def __init__(self, slides: dict[str, list[SlideFeatures]], dim: int, root=None):
        self._slides = {p: list(s) for p, s in slides.items() if s}
        self.dim = int(dim)
        self.root = None if root is None else str(root)
        self._offsets = {p: np.concatenate([[0], np.cumsum([s.n_tiles for s in sl])])
                         for p, sl in self._slides.items()}
        self._mem: dict[str, np.ndarray] | None = None

    def cache_in_memory(self, max_bytes: float) -> bool:
        """Hold every bag in memory (float32) when all of them take at most ``max_bytes``:
        small cohorts then train without re-reading HDF5 files every epoch (the demo's 83
        patients: 39 MB, epochs about twice as fast); larger ones keep reading per batch.
        Returns whether the bags are now in memory."""
        need = float(self.total_tiles) * self.dim * 4
        if self._mem is None and need <= float(max_bytes):
            self._mem = {p: self.read(p).numpy() for p in self._slides}
        return self._mem is not None

    # -- mapping ---------------------------------------------------------------------------
    def __getitem__(self, patient_id) -> StoredBag:
        if patient_id not in self._slides:
            raise KeyError(patient_id)
        return StoredBag(self, patient_id)

    def __iter__(self):
        return iter(self._slides)

    def __len__(self) -> int:
        return len(self._slides)

    def __contains__(self, patient_id) -> bool:
        return patient_id in self._slides

    def __repr__(self) -> str:
        return (f"BagStore({len(self)} patients, {self.n_slides} slides, {self.total_tiles} "
                f"tiles x {self.dim}, root={self.root})")

    # -- sizes -----------------------------------------------------------------------------
    def slides_of(self, patient_id) -> list[SlideFeatures]:
        """The patient's slides, in bag order."""
        return list(self._slides[patient_id])

    def n_tiles(self, patient_id) -> int:
        """Number of tiles in the patient's bag (0 for a patient without one)."""
        off = self._offsets.get(patient_id)
        return 0 if off is None else int(off[-1])

    @property
    def n_slides(self) -> int:
        """Number of slides over all patients."""
        return sum(len(s) for s in self._slides.values())

    @property
    def total_tiles(self) -> int:
        """Number of tiles over all patients."""
        return int(sum(int(o[-1]) for o in self._offsets.values()))

    @property
    def encoder(self) -> str | None:
        """The encoder named in the slides' feature files.

        ``None`` when no file names one; the sorted names joined by ``", "`` when they differ.
        """
        names = {s.encoder for sl in self._slides.values() for s in sl if s.encoder}
        return next(iter(names)) if len(names) == 1 else (", ".join(sorted(names)) or None)

    def index(self) -> pd.DataFrame:
        """One row per usable slide (columns ``INDEX_COLUMNS``)."""
        rows = [{"slide_id": s.slide_id, "patient_id": p, "path": s.path, "kind": s.kind,
                 "n_tiles": s.n_tiles, "dim": s.dim, "dtype": s.dtype,
                 "coords_path": s.coords_path or "", "patch_size_level0": s.patch_size_level0,
                 "read_mpp": s.read_mpp}
                for p, sl in self._slides.items() for s in sl]
        return pd.DataFrame(rows, columns=INDEX_COLUMNS)

    # -- reads -----------------------------------------------------------------------------
    def read(self, patient_id, rows=None) -> torch.Tensor:
        """float32 tensor [k, D]: the patient's whole bag (``rows=None``) or the tiles at the
        increasing positions ``rows`` (only those rows are read from disk)."""
        sl, off = self._slides[patient_id], self._offsets[patient_id]
        if rows is not None:
            rows = np.asarray(rows, np.int64).ravel()
            if len(rows) and (rows[0] < 0 or rows[-1] >= off[-1] or np.any(np.diff(rows) <= 0)):
                raise ValueError(f"patient {patient_id}: rows must be increasing positions in "
                                 f"[0, {int(off[-1])})")
        if self._mem is not None:  # a copy, as a disk read gives: callers may write into it
            x = self._mem[patient_id]
            return torch.from_numpy(x.copy() if rows is None else x[rows])
        if rows is None:
            parts = [read_slide_rows(s) for s in sl]
        else:
            which = np.searchsorted(off[1:], rows, side="right")
            parts = [read_slide_rows(s, rows[which == i] - off[i])
                     for i, s in enumerate(sl) if np.any(which == i)]
        x = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts
                                               else np.zeros((0, self.dim), np.float32))
        return torch.from_numpy(x)

    def sample(self, patient_id, k: int, rng: np.random.Generator) -> torch.Tensor:
        """``k`` distinct random tiles of the patient (all of them if the bag is smaller),
        kept in bag order; only those rows are read."""
        n = self.n_tiles(patient_id)
        if k >= n:
            return self.read(patient_id)
        return self.read(patient_id, np.sort(rng.choice(n, int(k), replace=False)))

    def tile_meta(self, patient_id) -> Bag:
        """Coordinates, slide index and per-slide attributes of the patient's tiles (heatmaps),
        without the features (``features=None``).  Coordinates of a slide without a coords file
        are -1 (``has_coords`` False)."""
        sl = self._slides[patient_id]
        coords, slide, ps, has = [], [], [], []
        for i, s in enumerate(sl):
            c = _read_coords(s)
            has.append(c is not None)
            p = s.patch_size_level0
            if c is None:
                c = np.full((s.n_tiles, 2), -1, np.int64)
            elif p <= 0:
                p = _grid_step(c)
            coords.append(c)
            slide.append(np.full(s.n_tiles, i, np.int64))
            ps.append(int(p))
        mpp = next((s.read_mpp for s in sl if np.isfinite(s.read_mpp)), float("nan"))
        return Bag(None, np.concatenate(coords), np.concatenate(slide),
                   [s.slide_id for s in sl], ps, mpp, has)

    def load(self, patient_id) -> Bag:
        """The whole bag in memory (features and metadata), as the in-memory :class:`Bag`."""
        meta = self.tile_meta(patient_id)
        meta.features = self.read(patient_id).numpy()
        return meta

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, slides: pd.DataFrame, features_dir, patients=None, *,
              check_finite: bool = True, cache_dir=None) -> tuple[BagStore, pd.DataFrame]:
        """Index the features of ``slides`` (``patient_id``, ``slide_id``) in ``features_dir``.

        Reads shapes and attributes of every slide; with ``check_finite`` also scans each
        slide's values once (blockwise; shared between the ranks of a distributed job; results
        cached in ``cache_dir/checked.csv`` by file size and mtime, so later runs skip it).
        Returns the store (patients with at least one usable slide) and the failures table
        (``FAILURE_COLUMNS``), one row per unusable slide."""
        root = Path(features_dir)
        wanted = None if patients is None else set(map(str, patients))
        todo = [(str(r.patient_id), str(r.slide_id))
                for r in slides[["patient_id", "slide_id"]].itertuples(index=False)
                if wanted is None or str(r.patient_id) in wanted]
        found, fails = [], []

        def fail(sid, pid, path, reason):
            fails.append(failure_row("bags", sid, patient_id=pid, path=path,
                                     error_type="BagError", error=reason, reason=reason,
                                     slide_id=sid))

        for pid, sid in todo:
            try:
                found.append((pid, inspect_slide(root, sid)))
            except BagError as exc:
                fail(sid, pid, _expected_path(root, sid), str(exc))
        dims = Counter(sf.dim for _, sf in found)
        dim = dims.most_common(1)[0][0] if dims else 0
        ok = []
        for pid, sf in found:
            if sf.dim != dim:
                fail(sf.slide_id, pid, sf.path,
                     f"{sf.path}: feature dimension {sf.dim} differs from {dim}, the dimension "
                     f"of {dims[dim]} of the {len(found)} slides (features from another "
                     "encoder?)")
            else:
                ok.append((pid, sf))
        if check_finite and ok:
            bad = _finite_check([sf for _, sf in ok], cache_dir)
            for pid, sf in ok:
                if sf.path in bad:
                    fail(sf.slide_id, pid, sf.path, bad[sf.path])
            ok = [(pid, sf) for pid, sf in ok if sf.path not in bad]
        by_patient: dict[str, list[SlideFeatures]] = {}
        for pid, sf in ok:
            by_patient.setdefault(pid, []).append(sf)
        order = {sid: i for i, (_, sid) in enumerate(todo)}
        failures = failures_frame(sorted(fails, key=lambda r: order.get(r["slide_id"], 0)))
        return cls(by_patient, dim, root), failures


def _expected_path(root: Path, sid: str) -> str:
    try:
        return str(find_features(root, sid)[0])
    except BagError:
        return str(root / f"{sid}.h5")


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _finite_check(sfs: list[SlideFeatures], cache_dir) -> dict[str, str]:
    """{path: reason} of the slides with non-finite values.  Slides already checked (same
    size and mtime, in ``cache_dir/checked.csv``) are skipped; the rest are scanned, split
    between the ranks of a distributed job and gathered."""
    from netsurv import distributed

    cache = None if cache_dir is None else Path(cache_dir) / "checked.csv"
    known: dict[tuple, str] = {}
    if cache is not None and cache.is_file():
        try:
            t = pd.read_csv(cache, keep_default_na=False, dtype={"reason": str})
            known = {(r.path, int(r.size), int(r.mtime_ns)): r.reason
                     for r in t.itertuples(index=False)}
        except Exception:  # noqa: BLE001 - a damaged cache only costs a rescan
            known = {}
    keys = {sf.path: (sf.path, *_stat_key(sf.path)) for sf in sfs}
    todo = sorted({sf.path: sf for sf in sfs if keys[sf.path] not in known}.values(),
                  key=lambda s: s.path)
    mine = [todo[i] for i in distributed.shard_indices(len(todo))]
    t0 = time.perf_counter()
    results = {}
    for sf in mine:
        try:
            results[sf.path] = _scan_finite(sf) or ""
        except Exception as exc:  # noqa: BLE001 - unreadable while scanning
            results[sf.path] = f"{sf.path}: cannot be read ({type(exc).__name__}: {exc})"
    if distributed.is_distributed():
        merged = {}
        for part in distributed.all_gather_object(results):
            merged.update(part)
        results = merged
    if todo:
        log.info("bags: scanned %d slide file(s) for non-finite values in %.1f s", len(todo),
                 time.perf_counter() - t0)
    for path, reason in results.items():
        known[keys[path]] = reason
    if cache is not None and todo and distributed.is_rank_zero():
        rows = [{"path": k[0], "size": k[1], "mtime_ns": k[2], "reason": v}
                for k, v in known.items()]
        _atomic_csv(pd.DataFrame(rows, columns=["path", "size", "mtime_ns", "reason"]), cache)
    return {sf.path: known[keys[sf.path]] for sf in sfs if known[keys[sf.path]]}


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV through a temp file unique to this process and thread, then rename (two jobs
    writing the same file never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- run entry point
def _cfg_get(cfg, key, default=None):
    try:
        v = cfg.get(key, default)
    except AttributeError:
        v = getattr(cfg, key, default)
    return default if v is None else v


def wsi_bag_store(cohort, cfg, patients=None) -> tuple[BagStore, dict]:
    """The bag store of a training run and a summary of where it came from.

    ``embeddings.dir`` set: the features folder of another tool (TRIDENT, CLAM) or an earlier
    run, used as it is (``slides.csv`` then needs only ``patient_id`` and ``slide_id``).
    Otherwise the embedding stage (:func:`netsurv.tasks.embed.embed_cohort`) tiles and embeds
    the slides that have no cached output yet, and the store reads its output folder.

    Slides that cannot be used are listed in ``<data.derived>/bags/<key>/failures.csv``
    (the failures table of every stage, :mod:`netsurv.stages.failures`: ``stage`` ``bags``
    for unusable feature files, the embedding stage's failures included with their own
    ``stage``) and left out with a warning; a patient without any usable slide has no WSI
    modality.  No usable slide at all is an error.

    Returns ``(store, info)``; ``info``: ``source`` ("embeddings.dir" | "embedding stage"),
    ``out`` (features folder), ``encoder``, ``weights_source``, ``precision``, ``device``,
    ``tiling_params_hash`` (None for features from elsewhere), ``dim``, ``n_slides`` (usable),
    ``n_patients``, ``n_tiles``, ``n_failed``, ``failures`` (DataFrame), ``failures_csv``,
    ``index_csv``, ``seconds``.
    """
    from netsurv import distributed
    from netsurv.cohort.schema import CohortError

    t0 = time.perf_counter()
    slides = getattr(cohort, "slides", None)
    where = getattr(cohort, "root", "the cohort")
    if slides is None or len(slides) == 0:
        raise CohortError(f"{where}: modality 'wsi' needs slides.csv (patient_id, slide_id; "
                          "plus path unless embeddings.dir holds the features)")
    emb = _cfg_get(cfg, "embeddings", {}) or {}
    ext = _cfg_get(emb, "dir")
    check = bool(_cfg_get(emb, "check_finite", True))
    stage_fail = failures_frame()
    if ext:
        root = Path(str(ext)).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(
                f"embeddings.dir={ext}: folder not found; give the folder holding "
                "<slide_id>.h5 (datasets 'features' and 'coords'; TRIDENT's features_<encoder>/, "
                "CLAM's feature folder with h5_files/ or pt_files/)")
        info = {"source": "embeddings.dir", "out": str(root), "encoder": None,
                "weights_source": None, "precision": None, "device": None,
                "tiling_params_hash": None}
        todo = slides
    else:
        from netsurv.tasks.embed import embed_cohort

        res = embed_cohort(cohort, cfg)
        root = Path(res["out"])
        info = {k: v for k, v in res.items() if k not in ("index", "failures")}
        info["source"] = "embedding stage"
        log.info("embeddings: %s (%d new, %d reused, %.1f s)", res["out"], res.get("n_done", 0),
                 res.get("n_skipped", 0), res.get("seconds", 0.0))
        sf = res.get("failures")
        if sf is not None and len(sf):  # the embedding stage's rows, as it wrote them
            stage_fail = failures_frame(sf)
        todo = slides[~slides["slide_id"].astype(str)
                      .isin(set(stage_fail["slide_id"].astype(str)))]
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    derived = _cfg_get(_cfg_get(cfg, "data", {}), "derived")
    cache = (Path(str(derived)) if derived else root) / "bags" / key
    store, fails = BagStore.build(todo, root, patients, check_finite=check, cache_dir=cache)
    failures = failures_frame(pd.concat([stage_fail, fails], ignore_index=True)
                              if len(stage_fail) else fails)
    if distributed.is_rank_zero():
        write_failures(cache / "failures.csv", failures)
        _atomic_csv(store.index(), cache / "index.csv")
    if len(store) == 0:
        first = "; ".join(failures["reason"].head(3))
        raise BagError(f"none of the {len(todo)} slide(s) of {where} has usable features in "
                       f"{root} ({first}{' ...' if len(failures) > 3 else ''}); every slide's "
                       f"reason is in {cache / 'failures.csv'}")
    if len(failures):
        for r in failures.itertuples(index=False):
            log.warning("slide %s (patient %s) left out: %s", r.slide_id, r.patient_id, r.reason)
        warnings.warn(f"{len(failures)} slide(s) have no usable features and are left out "
                      f"(first: {failures['reason'].iloc[0]}); all of them with the reason: "
                      f"{cache / 'failures.csv'}", UserWarning)
    if ext:
        info["encoder"] = store.encoder or f"unknown (features from {root})"
    budget = float(_cfg_get(emb, "memory_gb", 1.0) or 0.0) * 2**30
    info.update(dim=store.dim, n_slides=store.n_slides, n_patients=len(store),
                in_memory=store.cache_in_memory(budget),
                n_tiles=store.total_tiles, n_failed=len(failures), failures=failures,
                failures_csv=str(cache / "failures.csv"), index_csv=str(cache / "index.csv"),
                seconds=time.perf_counter() - t0)
    return store, info


def embedding_means(bags, patients=None, block: int = SCAN_ROWS) -> pd.DataFrame:
    """Mean tile embedding per patient (all tiles of all the patient's slides, each tile
    weighted equally): the "linear probe" input of foundation-model papers and Patho-Bench,
    as a feature table (``emb_0 ...`` columns, indexed by patient_id).  Read in blocks of
    ``block`` rows, so a 100,000-tile bag never sits in memory whole.  Patients without a
    bag are left out (a missing modality)."""
    keep = list(bags) if patients is None else [p for p in patients if p in bags]
    dim = int(getattr(bags, "dim", 0) or next(iter(bags.values())).read().shape[1])
    rows = np.zeros((len(keep), dim), np.float64)
    for i, p in enumerate(keep):
        bag = bags[p]
        n = int(bag.n_tiles)
        acc = np.zeros(dim, np.float64)
        for s in range(0, n, block):
            acc += bag.read(np.arange(s, min(n, s + block))).double().sum(0).numpy()
        rows[i] = acc / max(n, 1)
    return pd.DataFrame(rows, index=pd.Index(keep, name="patient_id"),
                        columns=[f"emb_{j}" for j in range(rows.shape[1])])
