"""Process-level settings for the batch jobs (train, embed, pathomics, radiomics, tile).

glibc's malloc serves blocks above a (dynamic, at most 32 MiB) threshold with ``mmap`` and
unmaps them on ``free``.  CPU inference and training allocate activations of tens to hundreds
of MiB per batch, so every batch page-faults its memory in afresh: on this 2-core box the
EfficientNet-Lite0 embedding ran 29 img/s with as much system time as user time (18 M minor
faults for 192 tiles x 3 passes), and 65 img/s once freed memory stayed in the heap
(``benchmarks/embed.py``).  PyTorch has no caching allocator on the CPU and glibc only reads
its ``MALLOC_*`` environment variables at start-up, so :func:`keep_freed_memory` sets the same
options with ``mallopt`` at run time.  The cost: the process keeps its peak heap instead of
returning freed memory to the system, which suits these one-shot jobs.  Set
``NETSURV_MALLOC=default`` to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap, no trimming).  Returns True when
    applied (Linux with glibc, not disabled by ``NETSURV_MALLOC=default``); idempotent."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("NETSURV_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
