"""The stage entry points on the 2 ranks of a real torchrun job, from an empty cache: demo
generation, tiling, embedding, radiomics and pathomics; every rank returns the same complete
result, rank 0 writes one merged index, and (slow) the files are byte for byte those of one
process."""
from __future__ import annotations

import filecmp
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]

JOB = """
import os, pickle, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # the same arithmetic in every process, whatever the core count
from omegaconf import OmegaConf
from netsurv.distributed import dist_env
from netsurv.tasks.cohort import resolve_cohort
from netsurv.tasks.tile import output_dir, tile_cohort
from netsurv.tasks.embed import embed_cohort
from netsurv.tasks import pathomics as TP, radiomics as TR

cache, dump = Path(sys.argv[1]), Path(sys.argv[2])
env = dist_env()
cfg = OmegaConf.create({
    "data": {"root": str(cache / "demo"), "derived": str(cache / "demo" / "derived"),
             "demo": {"n_patients": 12, "seed": 3, "n_jobs": 1}},
    "tiling": {"target_mpp": 1.0},
    "encoder": {"name": "test_tiny", "weights": "random", "precision": "fp32", "batch_size": 16},
    "embed": {"progress": False}, "tile": {"progress": False, "qc": True},
    "radiology": {"name": "original", "label": 1, "n_jobs": 1, "image_types": {"Original": {}},
                  "settings": {"binWidth": 25, "interpolator": "sitkBSpline"}},
    "morphology": {"max_tiles": 2, "max_nuclei_per_tile": 4, "n_jobs": 1},
})
c = resolve_cohort(cfg.data)
t = tile_cohort(c.slides, dict(cfg.tiling), output_dir(cfg.data.derived, dict(cfg.tiling)),
                progress=False)
e = embed_cohort(c, cfg)
r, _ = TR.extract(c, cfg, progress=False)
p, pf = TP.extract(c, cfg)
err = None
if env.world_size > 1:  # an error on one rank reaches every rank (nobody waits forever)
    from netsurv.stages import StageRankError, gather
    try:
        gather(lambda: 1 / (env.rank - 1), what="probe")
    except StageRankError as exc:
        err = f"StageRankError: {exc}"
    except ZeroDivisionError:
        err = "ZeroDivisionError"
dump.mkdir(parents=True, exist_ok=True)
with open(dump / f"rank{env.rank}.pkl", "wb") as f:
    pickle.dump({"rank": env.rank, "world": env.world_size, "tile": t["index"],
                 "tile_counts": (t["n_done"], t["n_skipped"], t["n_failed"]),
                 "embed": e["index"].drop(columns="seconds"), "embed_out": e["out"],
                 "embed_counts": (e["n_done"], e["n_skipped"], e["n_failed"]),
                 "radiomics": r, "pathomics": p, "pathomics_failures": pf, "err": err}, f)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run(args, capture_output=True, text=True, timeout=900,
                       env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    return p


def _load(d: Path):
    return [pickle.loads((d / f"rank{r}.pkl").read_bytes())
            for r in range(len(list(d.glob("rank*.pkl"))))]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The job on 2 torchrun ranks from an empty cache; its derived files moved aside."""
    tmp = tmp_path_factory.mktemp("ranks")
    job = tmp / "job.py"
    job.write_text(textwrap.dedent(JOB))
    cache = tmp / "cache"  # empty: the ranks generate the demo cohort themselves
    p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              f"--master_port={_port()}", str(job), str(cache), str(tmp / "two")])
    r0, r1 = _load(tmp / "two")
    return {"tmp": tmp, "job": job, "cache": cache, "log": p.stdout + p.stderr, "r0": r0,
            "r1": r1}


def test_two_ranks_return_the_same_complete_result(two_ranks):
    r0, r1, cache = two_ranks["r0"], two_ranks["r1"], two_ranks["cache"]
    assert two_ranks["log"].count("netsurv demo: generating") == 1
    assert (r0["world"], r1["world"]) == (2, 2)
    # every rank has the whole cohort's result, the same on both
    for k in ("tile", "embed", "radiomics", "pathomics", "pathomics_failures"):
        pd.testing.assert_frame_equal(r0[k], r1[k], obj=k)
    for k in ("tile_counts", "embed_counts"):
        assert r0[k] == r1[k]
    slides = pd.read_csv(cache / "demo" / "slides.csv")
    assert sorted(r0["tile"].slide_id) == sorted(slides.slide_id)
    assert r0["tile_counts"] == (len(slides), 0, 0)       # each slide tiled once
    assert r0["embed_counts"] == (len(slides), 0, 0)      # ... and embedded once
    assert len(r0["radiomics"]) == len(pd.read_csv(cache / "demo" / "ct.csv"))
    assert len(r0["pathomics"]) > 0
    assert r0["err"].startswith("StageRankError: probe: rank 1 of 2 failed: ZeroDivisionError")
    assert r1["err"] == "ZeroDivisionError"  # the failing rank raises its own error
    # one merged index per stage folder, written by rank 0
    out = Path(r0["embed_out"])
    for d in (out, out.parents[2] / "tiles" / out.name):
        idx = pd.read_csv(d / "index.csv")
        assert sorted(idx.slide_id) == sorted(slides.slide_id), d
        assert not list(d.glob("index.rank*.csv"))


@pytest.mark.slow
def test_two_ranks_write_the_files_of_one_process(two_ranks):
    tmp, cache, r0 = two_ranks["tmp"], two_ranks["cache"], two_ranks["r0"]
    a, b = tmp / "derived-two-ranks", cache / "demo" / "derived"
    shutil.move(b, a)
    # the same job in one process, on the same cohort folder (so every path is the same)
    _run([sys.executable, str(two_ranks["job"]), str(cache), str(tmp / "one")])
    (one,) = _load(tmp / "one")
    assert one["world"] == 1
    for k in ("radiomics", "pathomics"):
        pd.testing.assert_frame_equal(one[k], r0[k], obj=k)
    pd.testing.assert_frame_equal(one["tile"].drop(columns="status"),
                                  r0["tile"].drop(columns="status"))
    # embeddings and coords files identical byte for byte
    n = len(pd.read_csv(cache / "demo" / "slides.csv"))
    files = sorted(f.relative_to(a) for f in a.rglob("*.h5"))
    assert len(files) == 2 * n
    assert sorted(f.relative_to(b) for f in b.rglob("*.h5")) == files
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
