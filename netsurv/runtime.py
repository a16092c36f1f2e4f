"""Process-level memory settings for the CPU-heavy loops (tile embedding).

glibc's malloc serves blocks above a (dynamic, at most 32 MiB) threshold with ``mmap`` and
unmaps them on ``free``.  CPU inference and training allocate activations of tens to hundreds
of MiB per batch, so every batch page-faults its memory in afresh.  Measured with
``benchmarks/embed.py`` on a 2-core CPU, the EfficientNet-Lite0 embedding ran 29 img/s with as
much system time as user time (18 M minor faults for 192 tiles x 3 passes), and 65 img/s once
freed memory stayed in the heap.  PyTorch has no caching allocator on the CPU and glibc only
reads its ``MALLOC_*`` environment variables at start-up, so :func:`keep_freed_memory` sets the
same options with ``mallopt`` at run time.  The cost: the process keeps its peak heap instead of
returning freed memory to the system, so it is applied around the embedding loop only (on the
same 2-core CPU the demo's main job peaked at 12.7 GB RSS with it process-wide, 4.9 GB
without).  Within the loop the heap stays bounded because the cohort pipeline
(:class:`netsurv.pathology.embed.CohortEmbedder`) runs every batch at one shape: the blocks
freed by a batch are exactly those the next one asks for, so the heap stops growing after a
few batches and is returned once, at the end of the job.  Trimming after each slide (what the
per-slide loop needed, where every slide ended in a batch of another size) costs a re-fault
of the whole working set per slide: system time on a par with user time on small slides.  Set
``NETSURV_MALLOC=default`` to leave malloc alone.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "release_free_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}


def _libc():
    if not sys.platform.startswith("linux") or os.environ.get("NETSURV_MALLOC") == "default":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return None


@contextlib.contextmanager
def keep_freed_memory():
    """Within the block, glibc malloc keeps freed memory for reuse (no mmap, no trimming);
    afterwards its defaults are restored and the free heap is returned to the system
    (``malloc_trim``).  Yields True when applied (Linux with glibc, not disabled by
    ``NETSURV_MALLOC=default``)."""
    libc = _libc()
    # trim threshold -1 (SIZE_MAX inside glibc) turns trimming off; the largest positive int,
    # 2**31 - 1, did not: a batch of 256 tiles leaves over 2 GiB free at the top of the heap,
    # which glibc then returned and the next batch faulted in again (fp32: ~4,800 page faults
    # per tile, ~30 % of the embedding time)
    applied = libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, -1))
    try:
        yield applied
    finally:
        if libc is not None:
            for k, v in _GLIBC_DEFAULTS.items():
                libc.mallopt(k, v)
            libc.malloc_trim(0)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system now (``malloc_trim``); called after each
    slide by the per-slide loop (``embed.num_workers > 0``) so that batches of changing sizes
    cannot pile up fragmentation over a cohort while mmap is off.  Measured on a 2-core CPU,
    demo cohort, per-slide loop (7,397 tiles): 173 s / 11.6 GB peak RSS without it, 311 s /
    5.6 GB with it, 359 s with glibc's defaults; the gain grows with tiles per slide (one
    574-tile slide: 29 -> 65 img/s model-only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
