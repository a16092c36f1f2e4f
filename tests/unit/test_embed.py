"""Embedding job: HDF5 layout/attrs, equality with a direct encoder call, determinism,
resume, failure recording, rank sharding, hydra config."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from netsurv.demo.wsi import write_demo_slide
from netsurv.pathology.embed import (
    embed_slide,
    is_embedded,
    iter_tile_batches,
    read_embeddings,
    weights_tag,
)
from netsurv.pathology.encoders import build_encoder
from netsurv.pathology.slides import SlideError
from netsurv.pathology.tiling import TileDataset, params_hash
from netsurv.stages import FAILURE_COLUMNS, h5_attach_checksum
from netsurv.tasks.embed import embed_cohort, shard, shard_info
from netsurv.tasks.tile import output_dir, tile_cohort

PARAMS = {"patch_size": 256, "min_tissue_fraction": 0.25}


@pytest.fixture(scope="module")
def encoder():
    # precision pinned: "auto" depends on the CPU (bf16 where it is native), and these tests
    # compare files, attrs and direct calls of one fixed encoder
    return build_encoder("test_tiny", weights="random", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    """Three tiny slides (768 µm², 0.5 µm/px) and their coords files."""
    d = tmp_path_factory.mktemp("embed_wsi")
    rows = []
    for k, seed in enumerate((0, 1, 2)):
        p = d / f"s{k}.tiff"
        write_demo_slide(p, rng=np.random.default_rng(seed), density_z=0.0, size_z=0.0,
                         pleomorphism_z=0.0, mpp=0.5, width_um=768, height_um=768)
        rows.append({"patient_id": f"P{k}", "slide_id": f"s{k}", "path": str(p)})
    slides = pd.DataFrame(rows)
    tiles = output_dir(d / "derived", PARAMS)
    res = tile_cohort(slides, PARAMS, tiles, qc=False, progress=False)
    assert res["n_failed"] == 0, res["failures"]
    return {"dir": d, "slides": slides, "tiles": tiles}


def _cfg(derived, **embed):
    return {"data": {"derived": str(derived)}, "tiling": dict(PARAMS),
            "encoder": {"name": "test_tiny", "weights": "random", "batch_size": 4},
            "embed": {"progress": False, **embed}, "tile": {"qc": False, "progress": False}}


def test_layout_attrs_and_equal_to_direct_call(wsi, encoder, tmp_path):
    h5c = wsi["tiles"] / "s0.h5"
    out = tmp_path / "s0.h5"
    n = embed_slide(h5c, encoder, out, batch_size=5, num_workers=0)
    ds = TileDataset(h5c, backend="auto")
    assert n == len(ds) > 5  # several batches, last one partial
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (n, encoder.dim)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (n, 2)
        a = dict(f.attrs)
    feats, coords, attrs = read_embeddings(out)
    np.testing.assert_array_equal(coords, ds.coords)
    assert attrs["encoder"] == "test_tiny" and attrs["dim"] == encoder.dim
    assert attrs["weights_source"] == encoder.weights_source == "random(seed=0)"
    assert attrs["weights_tag"] == weights_tag(encoder) == "random-seed0"
    assert attrs["precision"] == "fp32"
    assert json.loads(attrs["transform_config"]) == json.loads(
        json.dumps(encoder.transform_config()))
    assert attrs["tiling_params_hash"] == params_hash(PARAMS)
    assert attrs["netsurv_version"] and attrs["n_tiles"] == n and attrs["tile_backend"] == "raw"
    assert set(a) >= {"encoder", "weights_source", "precision", "transform_config",
                      "tiling_params_hash", "netsurv_version"}
    # same tiles through the encoder directly (one batch, openslide reader: JPEG decode of
    # both readers may differ by a few levels, so compare to the raw reader's tiles exactly)
    tiles = np.stack([ds[i] for i in range(n)])
    with torch.inference_mode():
        direct = encoder(encoder.preprocess(tiles)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-4)
    # openslide path and a DataLoader worker process give (nearly) the same embeddings
    out2 = tmp_path / "s0-os.h5"
    embed_slide(h5c, encoder, out2, batch_size=8, num_workers=1, backend="openslide")
    f2, c2, a2 = read_embeddings(out2)
    np.testing.assert_array_equal(c2, coords)
    assert a2["tile_backend"] == "openslide"
    cos = (f2 * feats).sum(1) / np.linalg.norm(f2, axis=1) / np.linalg.norm(feats, axis=1)
    assert cos.min() > 0.99
    # synchronous reading (prefetch=0, the CPU default) gives the very same embeddings
    out3 = tmp_path / "s0-sync.h5"
    embed_slide(h5c, encoder, out3, batch_size=5, num_workers=0, prefetch=0)
    np.testing.assert_array_equal(read_embeddings(out3)[0], feats)
    from netsurv.tasks.embed import default_prefetch

    assert default_prefetch(None, "cpu") == 0 and default_prefetch(None, "cuda") == 2
    assert default_prefetch(3, "cpu") == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_deterministic_and_batch_iterator_order(wsi, encoder, tmp_path):
    h5c = wsi["tiles"] / "s1.h5"
    embed_slide(h5c, encoder, tmp_path / "a.h5", batch_size=4)
    embed_slide(h5c, encoder, tmp_path / "b.h5", batch_size=4)
    fa, _, _ = read_embeddings(tmp_path / "a.h5")
    fb, _, _ = read_embeddings(tmp_path / "b.h5")
    np.testing.assert_array_equal(fa, fb)
    ds = TileDataset(h5c, backend="raw")
    got = list(iter_tile_batches(ds, 3, decode_threads=2, prefetch=1))
    assert [s for s, _ in got] == list(range(0, len(ds), 3))
    allt = torch.cat([b for _, b in got]).numpy()
    np.testing.assert_array_equal(allt, np.stack([ds[i] for i in range(len(ds))]))
    # an error in the prefetch thread reaches the caller
    bad = TileDataset(h5c, backend="raw")
    bad.coords = bad.coords.copy()
    bad.coords[len(bad) - 1] = (10 ** 7, 10 ** 7)
    with pytest.raises(SlideError, match="outside"):
        list(iter_tile_batches(bad, 2))


def test_cohort_job_resume_and_failures(wsi, encoder, tmp_path):
    derived = tmp_path / "derived"
    slides = wsi["slides"].copy()
    # nothing tiled under this derived folder yet: the job tiles the slides first
    res = embed_cohort(slides, _cfg(derived), encoder=encoder)
    assert (res["n_done"], res["n_skipped"], res["n_failed"]) == (3, 0, 0)
    out = Path(res["out"])
    assert out == derived / "embeddings" / "test_tiny-random-seed0" / params_hash(PARAMS)
    assert (out / "index.csv").is_file() and (out / "encoder.json").is_file()
    assert pd.read_csv(out / "failures.csv").empty
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("s*.h5")}
    assert len(mtimes) == 3
    for sid in ("s0", "s1", "s2"):
        assert is_embedded(out / f"{sid}.h5", encoder, Path(res["tiles_dir"]) / f"{sid}.h5")

    # the pipeline (batches of 4 across slides) gave each slide its per-slide embeddings
    for sid in ("s0", "s1", "s2"):
        ds = TileDataset(Path(res["tiles_dir"]) / f"{sid}.h5", backend="raw")
        with torch.inference_mode():
            ref = encoder(encoder.preprocess(np.stack([ds[i] for i in range(len(ds))]))).numpy()
        np.testing.assert_allclose(read_embeddings(out / f"{sid}.h5")[0], ref, rtol=1e-4,
                                   atol=1e-4)

    # rerun: everything skipped, files untouched, nothing embedded
    import netsurv.pathology.embed as pe

    calls = []
    orig, orig_embed = pe.embed_slide, pe.CohortEmbedder.embed
    pe.embed_slide = lambda *a, **k: calls.append(a) or orig(*a, **k)
    pe.CohortEmbedder.embed = lambda self, *a: calls.append(a) or orig_embed(self, *a)
    try:
        res2 = embed_cohort(slides, _cfg(derived), encoder=encoder)
    finally:
        pe.embed_slide, pe.CohortEmbedder.embed = orig, orig_embed
    assert (res2["n_done"], res2["n_skipped"], res2["n_failed"]) == (0, 3, 0) and not calls
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("s*.h5")} == mtimes

    # a different precision/encoder config is not "done"
    enc_bf16 = build_encoder("test_tiny", weights="random", device="cpu", precision="bf16")
    assert not is_embedded(out / "s0.h5", enc_bf16, Path(res["tiles_dir"]) / "s0.h5")

    # partial / corrupt output file is redone
    (out / "s1.h5").write_bytes(b"garbage")
    # corrupt coords for s0 (attrs kept, so tiling treats the file as done) and a slide
    # whose file was deleted (tiling fails)
    tiles = Path(res["tiles_dir"])
    with h5py.File(tiles / "s0.h5", "r+") as f:
        c = f["coords"][:]
        c[:, 0] = 10 ** 8  # far outside the slide
        del f["coords"]
        f.create_dataset("coords", data=c)
        h5_attach_checksum(f)  # consistent file (else it is re-tiled as corrupt)
    os.remove(out / "s0.h5")
    gone = tmp_path / "gone.tiff"
    slides = pd.concat([slides, pd.DataFrame([{"patient_id": "P3", "slide_id": "s3",
                                               "path": str(gone)}])], ignore_index=True)
    res3 = embed_cohort(slides, _cfg(derived), encoder=encoder)
    fails = pd.read_csv(out / "failures.csv")
    assert set(fails.slide_id) == {"s0", "s3"}, fails
    # the failures table of every stage (this one and the tiling stage's)
    assert list(fails.columns) == FAILURE_COLUMNS
    tfails = pd.read_csv(tiles / "failures.csv")
    assert list(tfails.columns) == FAILURE_COLUMNS and tfails.slide_id.tolist() == ["s3"]
    assert fails.set_index("slide_id").stage.to_dict() == {"s0": "embedding", "s3": "tiling"}
    assert fails.reason.str.len().min() > 0
    assert "tiling failed" in fails.set_index("slide_id").reason["s3"]
    assert "outside" in fails.set_index("slide_id").reason["s0"]  # corrupt coords named
    assert (res3["n_done"], res3["n_skipped"], res3["n_failed"]) == (1, 1, 2)
    idx = pd.read_csv(out / "index.csv").set_index("slide_id")
    assert idx.status.to_dict() == {"s0": "failed", "s1": "done", "s2": "skipped",
                                    "s3": "failed"}
    assert not (out / "s0.h5").exists()


def test_rank_sharding():
    assert shard_info({}) == (0, 1, 0)
    assert shard_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError):
        shard_info({"RANK": "4", "WORLD_SIZE": "4"})
    df = pd.DataFrame({"slide_id": [f"x{i}" for i in range(11)][::-1], "path": "p"})
    parts = [set(shard(df, r, 3).slide_id) for r in range(3)]
    assert set().union(*parts) == set(df.slide_id) and sum(map(len, parts)) == 11
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    # two ranks of a real job (processes meeting at a barrier): tests/unit/test_stages_ranks.py


def test_hydra_config_composes_and_runs(wsi, tmp_path, clinical_df):
    from hydra import compose, initialize_config_dir

    from netsurv.tasks.embed import run

    root = tmp_path / "cohort"
    root.mkdir()
    clinical_df.to_csv(root / "clinical.csv", index=False)
    ids = clinical_df.patient_id.tolist()
    pd.DataFrame([{"patient_id": ids[0], "slide_id": "a", "path": str(wsi["slides"].path[0])}]
                 ).to_csv(root / "slides.csv", index=False)
    cfg_dir = str(Path(__file__).resolve().parents[2] / "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose("embed", overrides=["data=cohort", f"data.root={root}", "encoder=test_tiny",
                                          "encoder.weights=random", "embed.progress=false",
                                          "tile.progress=false", "tile.qc=false",
                                          "tiling.min_tissue_fraction=0.25"])
    assert cfg.embed.num_workers == 0 and cfg.encoder.name == "test_tiny"
    res = run(cfg)
    assert res["n_done"] == 1 and res["n_failed"] == 0 and res["n_tiles"] > 0
    out = Path(res["out"])
    assert out.parent.parent == root / "derived" / "embeddings"
    assert (out / "a.h5").is_file()
    assert run(cfg)["n_skipped"] == 1
