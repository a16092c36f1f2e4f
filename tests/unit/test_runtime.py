"""netsurv.runtime.keep_freed_memory: large freed blocks are reused instead of re-faulted
inside the block; glibc's defaults come back after it."""
import subprocess
import sys

import pytest

CODE = """
import contextlib, resource, sys
import torch
from netsurv.runtime import keep_freed_memory

def faults():
    for _ in range(6):  # warm-up: the tuned heap settles after a few 64 MiB blocks
        a = torch.ones(16 << 20)
        del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        a = torch.ones(16 << 20)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

ctx = keep_freed_memory() if sys.argv[1] == "tuned" else contextlib.nullcontext(True)
with ctx as on:
    assert on
    inside = faults()
print(inside, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}, check=True)
        return [int(v) for v in r.stdout.split()]

    (default, _), (tuned, after) = faults("default"), faults("tuned")
    assert default > 10 * 16000  # 10 x 64 MiB of 4 KiB pages faulted in again
    assert tuned < 0.4 * default  # reused (0-2 of the 10 blocks re-fault while glibc settles)
    assert after > 0.8 * default  # defaults restored after the block
