"""Cost of trusting the stage caches: checksum verification, the verification memo, item locks.

    python benchmarks/stage_cache.py [--tiles 10000] [--dim 1536] [--slides 200]

Writes one embeddings-like HDF5 file (``features`` [tiles, dim] + ``coords`` [tiles, 2]) in
float32 and in float16 to a temp folder and prints, best of 3:

- full verification (:func:`netsurv.stages.verify_h5`: read + sha256) in ms and MB/s;
- a verification-memo hit (:class:`netsurv.stages.VerifiedFiles`: one ``stat``) in ms;
- per-item lock acquire + release (:class:`netsurv.stages.ItemLocks`) over ``--slides`` items.

A cohort of N such slides costs N x the first figure on the first reuse after a change and N x
the second one afterwards.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from netsurv.stages import ItemLocks, VerifiedFiles, h5_attach_checksum, verify_h5


def best(fn, n=3):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--slides", type=int, default=200)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for dtype in ("float32", "float16"):
            p = d / f"{dtype}.h5"
            with h5py.File(p, "w") as f:
                f["features"] = rng.normal(size=(a.tiles, a.dim)).astype(dtype)
                f["coords"] = rng.integers(0, 10**5, size=(a.tiles, 2))
                h5_attach_checksum(f, ["features", "coords"])
            mb = p.stat().st_size / 1e6
            s = best(lambda p=p: verify_h5(p))
            memo = VerifiedFiles(d)
            memo.verify(p)
            hit = best(lambda memo=memo, p=p: memo.verify(p), 5)
            print(f"{dtype}: {a.tiles} x {a.dim} ({mb:.0f} MB): verify {1e3 * s:.0f} ms "
                  f"({mb / s:.0f} MB/s), memo hit {1e3 * hit:.3f} ms")
        locks = ItemLocks(d)

        def cycle():
            for k in range(a.slides):
                locks.try_acquire(f"slide-{k}").release()

        s = best(cycle)
        print(f"item lock acquire+release: {1e6 * s / a.slides:.0f} us per item "
              f"({a.slides} items)")


if __name__ == "__main__":
    main()
