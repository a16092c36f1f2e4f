"""netsurv.runtime.keep_freed_memory: large freed blocks are reused instead of re-faulted."""
import subprocess
import sys

import pytest

CODE = """
import resource, sys
import torch
if sys.argv[1] == "tuned":
    from netsurv.runtime import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # applied, idempotent
for _ in range(6):  # warm-up: the tuned heap settles after a few 64 MiB blocks
    a = torch.ones(16 << 20)
    del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = torch.ones(16 << 20)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}, check=True)
        return int(r.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    assert default > 10 * 16000  # 10 x 64 MiB of 4 KiB pages faulted in again
    assert tuned < 0.4 * default  # reused (0-2 of the 10 blocks re-fault while glibc settles)
