"""Cohort embedding pipeline (CohortEmbedder): batches that run across slides give each slide
the embeddings of the per-slide path; failures stay with their slide; claims out of plan order;
both ``precision=auto`` branches of the CPU."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from netsurv.demo.wsi import write_demo_slide
from netsurv.pathology.embed import CohortEmbedder, SlideJob, read_embeddings
from netsurv.pathology.encoders import build_encoder
from netsurv.pathology.tiling import TileDataset
from netsurv.tasks.tile import output_dir, tile_cohort

PARAMS = {"patch_size": 256, "min_tissue_fraction": 0.25}
BATCH = 6  # not a divisor of any slide's tile count: batches straddle slides


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small slides (two sizes) and their coords files."""
    d = tmp_path_factory.mktemp("pipe_wsi")
    rows = []
    for k, (seed, um) in enumerate(((0, 640), (1, 512), (2, 512), (3, 640))):
        p = d / f"s{k}.tiff"
        write_demo_slide(p, rng=np.random.default_rng(seed), density_z=0.0, size_z=0.0,
                         pleomorphism_z=0.0, mpp=0.5, width_um=um, height_um=um)
        rows.append({"patient_id": f"P{k}", "slide_id": f"s{k}", "path": str(p)})
    slides = pd.DataFrame(rows)
    tiles = output_dir(d / "derived", PARAMS)
    res = tile_cohort(slides, PARAMS, tiles, qc=False, progress=False)
    assert res["n_failed"] == 0, res["failures"]
    n = {s: len(TileDataset(tiles / f"{s}.h5")) for s in slides.slide_id}
    assert all(v > 0 and v % BATCH for v in n.values()), n
    return {"slides": slides, "tiles": tiles, "n": n}


@pytest.fixture(scope="module")
def fp32(cohort):
    """The fp32 encoder and the per-slide path's embeddings of every slide."""
    enc = build_encoder("test_tiny", weights="random", device="cpu", precision="fp32")
    return enc, {s: per_slide(enc, cohort["tiles"] / f"{s}.h5") for s in cohort["slides"].slide_id}


def per_slide(enc, coords_h5, bs=BATCH):
    """The per-slide path, written independently: the slide's tiles in batches of ``bs``."""
    ds = TileDataset(coords_h5, backend="raw")
    t = np.stack([ds[i] for i in range(len(ds))])
    with torch.inference_mode():
        return torch.cat([enc(enc.preprocess(t[s:s + bs])) for s in range(0, len(t), bs)]
                         ).numpy()


def jobs(cohort, out):
    return [SlideJob(s, cohort["tiles"] / f"{s}.h5", out / f"{s}.h5", None, s)
            for s in cohort["slides"].slide_id]


def cos_min(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("flags,want,prefetch", [("none", "fp32", 0), ("avx512_bf16", "bf16", 2)])
def test_cross_slide_batches_match_per_slide_path(cohort, fp32, tmp_path, monkeypatch, flags,
                                                  want, prefetch):
    # each branch of precision=auto on CPU, whatever this machine's CPU (emulated bf16 is slow
    # but exact enough for the comparison)
    monkeypatch.setenv("NETSURV_CPU_FLAGS", flags)
    enc = build_encoder("test_tiny", weights="random", device="cpu", precision="auto")
    assert enc.precision == want
    with CohortEmbedder(enc, BATCH, prefetch=prefetch, decode_threads=2) as ce:
        ce.plan(jobs(cohort, tmp_path))
        got = {s: ce.embed(s) for s in cohort["slides"].slide_id}
    assert got == cohort["n"]
    for s in got:
        f, c, a = read_embeddings(tmp_path / f"{s}.h5", verify=True)
        ref = fp32[1][s] if want == "fp32" else per_slide(enc, cohort["tiles"] / f"{s}.h5")
        np.testing.assert_array_equal(c, TileDataset(cohort["tiles"] / f"{s}.h5").coords)
        assert a["slide_id"] == s and a["n_tiles"] == len(ref) and a["precision"] == want
        assert f.shape == ref.shape
        if want == "fp32":  # batch composition may change the last bits only
            np.testing.assert_allclose(f, ref, rtol=1e-4, atol=1e-5)
        assert cos_min(f, ref) >= 0.999
    assert not list(tmp_path.glob(".*.tmp"))


def test_failures_stay_with_their_slide_and_claims_out_of_order(cohort, fp32, tmp_path,
                                                                monkeypatch):
    enc, ref = fp32
    # s1 fails on its 4th tile, after its first tiles went into a batch shared with s0
    real = TileDataset.read_into

    def read_into(self, out, i, k, executor=None):
        if self.coords_path.stem == "s1" and i <= 3 < i + k:
            real(self, out, i, 3 - i, executor)
            raise OSError("disk error in s1")
        return real(self, out, i, k, executor)

    monkeypatch.setattr(TileDataset, "read_into", read_into)
    for prefetch in (0, 1):
        out = tmp_path / f"p{prefetch}"
        out.mkdir()
        with CohortEmbedder(enc, BATCH, prefetch=prefetch) as ce:
            ce.plan(jobs(cohort, out))
            assert ce.embed("s0") == cohort["n"]["s0"]
            with pytest.raises(OSError, match="disk error in s1"):
                ce.embed("s1")
            # s2 passed over (e.g. another job holds it): s3 first, then s2 planned again
            assert ce.embed("s3") == cohort["n"]["s3"]
            assert ce.embed("s2") == cohort["n"]["s2"]
            with pytest.raises(KeyError):
                ce.embed("nope")
        assert not (out / "s1.h5").exists()
        for s in ("s0", "s2", "s3"):
            np.testing.assert_allclose(read_embeddings(out / f"{s}.h5")[0], ref[s],
                                       rtol=1e-4, atol=1e-5)
