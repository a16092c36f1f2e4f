"""netsurv.runtime.keep_freed_memory: inside the block, large freed blocks are reused instead of
page-faulted in again; after it, glibc's defaults are back and the kept memory is returned.

Every figure is compared with a baseline measured in the same subprocess, and block sizes are
chosen there above everything the heap could already hold (so that neither glibc's mmap
threshold, at most 32 MiB on 64-bit, nor a free chunk left by earlier allocations can serve
them): the outcome does not depend on the machine, the environment or the heap's history.
"""
import os
import subprocess
import sys

import pytest

CODE = r"""
import ctypes, json, resource
from netsurv.runtime import keep_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


libc.mallinfo2.restype = Mallinfo2
PAGE = os.sysconf("SC_PAGESIZE")


def size_above_free_heap():
    # larger than all free bytes of the heap: no free chunk can serve it
    free = libc.mallinfo2().fordblks
    return max(64 << 20, (free + (32 << 20)) // PAGE * PAGE)


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cycles(size, n):
    # malloc, touch every page, free; returns the minor page faults of the n cycles
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        p = libc.malloc(size)
        assert p
        ctypes.memset(p, 1, size)
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


# a fragmented heap, as after importing torch and running a few batches: free chunks of all
# sizes between live blocks (the sizes below are chosen to exceed them all)
libc.free(libc.malloc(30 << 20))  # raises glibc's dynamic mmap threshold to 30 MiB
live = [libc.malloc(s << 10) for s in range(64, 4064, 40)]  # so these come from the heap
for p in live[::2]:
    libc.free(p)

N = 5
res = {"free_heap": libc.mallinfo2().fordblks}
size = size_above_free_heap()
res["pages"] = size // PAGE
res["baseline"] = cycles(size, N)                 # glibc defaults: mmap + munmap every time
with keep_freed_memory() as on:
    res["on"] = on
    size = size_above_free_heap()
    cycles(size, 1)                               # the heap grows once ...
    res["inside"] = cycles(size, N)               # ... and is reused
    res["kept"] = size
    res["rss_kept"] = rss()
res["rss_after"] = rss()                          # malloc_trim on exit: kept memory returned
size = size_above_free_heap()
res["after"] = cycles(size, N)                    # defaults back: faulted in every time
print(json.dumps(res))
"""

linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    or tuple(int(v) for v in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2]) < (2, 33),
    reason="glibc >= 2.33 malloc (mallinfo2) only")


def _measure(**env):
    import json

    r = subprocess.run([sys.executable, "-c", "import os\n" + CODE], capture_output=True,
                       text=True, check=True,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                            "PYTHONPATH": os.pathsep.join(sys.path), **env})
    return json.loads(r.stdout)


@linux_glibc
def test_keep_freed_memory_stops_refaulting_large_blocks():
    m = _measure()
    assert m["on"] is True
    n = 5
    # baseline (defaults): at least one fault per cycle (one per page without transparent huge
    # pages, one per 2 MiB with them); the tuned block faults in far fewer pages
    assert m["baseline"] >= n
    assert m["inside"] <= 0.1 * m["baseline"] + 20, m
    # after the block: the kept block is given back and large blocks are mmapped again
    assert m["rss_kept"] - m["rss_after"] >= 0.5 * m["kept"], m
    assert m["after"] >= 0.5 * m["baseline"], m


@linux_glibc
def test_netsurv_malloc_default_leaves_malloc_alone():
    m = _measure(NETSURV_MALLOC="default")
    assert m["on"] is False
    assert m["inside"] >= 0.5 * m["baseline"] >= 2  # not tuned: refaults like the baseline
