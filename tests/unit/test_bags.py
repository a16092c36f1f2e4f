"""Bag store: equality with the in-memory loader on embedded demo slides, TRIDENT/CLAM layouts,
fp16, one failure row per bad file, reads of only the chosen rows, per-epoch subsamples in
DataLoader workers, memory that does not grow with the number of slides, tile-budget batches."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from netsurv.evaluation.attention import attention_record
from netsurv.stages import FAILURE_COLUMNS
from netsurv.training import bags as bagmod
from netsurv.training.bags import BagError, BagStore, wsi_bag_store
from netsurv.training.datamodule import (
    PatientDataset,
    TileBudgetBatchSampler,
    collate_patients,
    load_bags,
    size_order,
)

PARAMS = {"patch_size": 256, "min_tissue_fraction": 0.25}


# --------------------------------------------------------------------------- helpers
def _slides(pairs) -> pd.DataFrame:
    return pd.DataFrame([{"patient_id": p, "slide_id": s} for p, s in pairs])


def _write_ours(path: Path, feats, coords, *, ps0=512, mpp=1.0, dtype=np.float32):
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.asarray(feats).astype(dtype))
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.attrs["patch_size_level0"] = ps0
        f.attrs["target_mpp"] = mpp
        f.attrs["encoder"] = "test_tiny"


def _grid(n, step=512):
    side = int(np.ceil(np.sqrt(n)))
    return np.stack([np.arange(n) % side * step, np.arange(n) // side * step], 1).astype(np.int64)


def _data(seed, n, d=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), _grid(n)


# --------------------------------------------------------------------------- our layout
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Four small demo slides of three patients (P0 has two), tiled and embedded by the
    embedding stage (test_tiny, fp32): our own layout."""
    from netsurv.demo.wsi import write_demo_slide

    d = tmp_path_factory.mktemp("bags_demo")
    rows = []
    for k, (pid, seed) in enumerate([("P0", 0), ("P0", 1), ("P1", 2), ("P2", 3)]):
        p = d / f"s{k}.tiff"
        write_demo_slide(p, rng=np.random.default_rng(seed), density_z=0.0, size_z=0.0,
                         pleomorphism_z=0.0, mpp=0.5, width_um=768, height_um=768)
        rows.append({"patient_id": pid, "slide_id": f"s{k}", "path": str(p)})
    (d / "broken.tiff").write_bytes(b"not a slide")      # fails in the tiling stage
    rows.append({"patient_id": "P3", "slide_id": "broken", "path": str(d / "broken.tiff")})
    slides = pd.DataFrame(rows)
    cfg = {"data": {"derived": str(d / "derived")}, "tiling": dict(PARAMS),
           "encoder": {"name": "test_tiny", "weights": "random", "batch_size": 8,
                       "precision": "fp32"},
           "embed": {"progress": False}, "tile": {"qc": False, "progress": False}}

    class Cohort:  # what wsi_bag_store needs of a cohort
        root = d
    Cohort.slides = slides
    with pytest.warns(UserWarning, match=r"1 slide\(s\) have no usable features"):
        store, info = wsi_bag_store(Cohort, cfg)
    return {"slides": slides, "store": store, "info": info, "cfg": cfg, "cohort": Cohort}


def test_store_equals_in_memory_bags_on_embedded_demo_slides(embedded):
    store, info = embedded["store"], embedded["info"]
    assert info["source"] == "embedding stage" and info["n_failed"] == 1
    # the stage's failure is in the run's failures table, with the patient and the reason
    fails = pd.read_csv(info["failures_csv"])
    assert list(fails.columns) == FAILURE_COLUMNS  # the failures table of every stage
    assert fails[["slide_id", "patient_id"]].values.tolist() == [["broken", "P3"]]
    assert fails.stage.tolist() == ["tiling"]
    assert "tiling failed" in fails.reason[0]
    mem, missing = load_bags(embedded["slides"], info["out"], ["P0", "P1", "P2"])
    assert not missing and set(store) == set(mem) == {"P0", "P1", "P2"}
    assert store.dim == info["dim"] == 64 and info["encoder"] == "test_tiny"
    for pid, bag in mem.items():
        got = store.load(pid)
        np.testing.assert_array_equal(got.features, bag.features)
        np.testing.assert_array_equal(got.coords, bag.coords)
        np.testing.assert_array_equal(got.slide, bag.slide)
        assert got.slide_ids == bag.slide_ids and got.patch_size_level0 == bag.patch_size_level0
        assert got.read_mpp == bag.read_mpp == 0.5   # the tiling default
        assert store.n_tiles(pid) == len(bag.features) == store[pid].n_tiles
        # rows across the two slides of P0: exactly those rows of the concatenated bag
        rows = np.arange(0, len(bag.features), 3)
        np.testing.assert_array_equal(store.read(pid, rows).numpy(), bag.features[rows])
    assert len(store.slides_of("P0")) == 2
    assert Path(info["index_csv"]).is_file() and Path(info["failures_csv"]).is_file()


def test_dataset_items_from_store_equal_in_memory_items(embedded):
    store = embedded["store"]
    mem, _ = load_bags(embedded["slides"], embedded["info"]["out"], ["P0", "P1", "P2"])
    patients = ["P0", "P1", "P2", "P3"]          # P3 has no slide
    kw = dict(tab={}, present={}, time=[1.0, 2.0, 3.0, 4.0], event=[1, 0, 1, 1], feat_dim=64)
    a = PatientDataset(range(4), patients, store, **kw)
    b = PatientDataset(range(4), patients, mem, **kw)
    for i in range(4):
        assert torch.equal(a[i]["wsi"], b[i]["wsi"])
        assert a[i]["present"]["wsi"] == (i < 3)
    np.testing.assert_array_equal(a.tile_counts(), [len(mem[p].features) for p in patients[:3]]
                                  + [0])
    batch = collate_patients([a[i] for i in range(4)])
    assert batch["wsi"].shape == (4, a.tile_counts().max(), 64)
    assert batch["wsi_mask"].sum(1).tolist() == a.tile_counts().tolist()


def test_fp16_files_read_as_float32(tmp_path):
    x, c = _data(0, 300, 16)
    _write_ours(tmp_path / "a.h5", x, c, dtype=np.float16)
    store, fails = BagStore.build(_slides([("P", "a")]), tmp_path)
    assert fails.empty and store.index().dtype.tolist() == ["float16"]
    got = store.read("P")
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), x.astype(np.float16).astype(np.float32))
    rows = np.array([1, 5, 299])
    np.testing.assert_array_equal(store.read("P", rows).numpy(),
                                  x.astype(np.float16).astype(np.float32)[rows])


# --------------------------------------------------------------------------- other tools
def _trident_h5(path, feats, coords):
    """TRIDENT's writer: datasets chunked by row, coords attrs on the dataset."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=feats, chunks=(1, feats.shape[1]),
                             maxshape=(None, feats.shape[1]))
        d.attrs["name"] = path.stem
        c = f.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
        for k, v in {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                     "target_magnification": 20, "overlap": 0, "name": path.stem}.items():
            c.attrs[k] = v


def test_trident_and_clam_folders_read_like_the_source_arrays(tmp_path):
    src = {sid: _data(i, 40 + 7 * i) for i, sid in enumerate(["t0", "t1", "c0", "c1", "q0"])}
    # TRIDENT: <job>/20x_256px_0px_overlap/features_uni_v1/<slide>.h5
    tri = tmp_path / "trident" / "20x_256px_0px_overlap" / "features_uni_v1"
    tri.mkdir(parents=True)
    for sid in ("t0", "t1"):
        _trident_h5(tri / f"{sid}.h5", *src[sid])
    # CLAM feature folder: h5_files/<slide>.h5 (float32 features, int32 coords, no attrs) and
    # pt_files/<slide>.pt
    clam = tmp_path / "clam_feats"
    (clam / "h5_files").mkdir(parents=True)
    (clam / "pt_files").mkdir()
    for sid in ("c0", "c1"):
        x, c = src[sid]
        with h5py.File(clam / "h5_files" / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=c.astype(np.int32))
        torch.save(torch.from_numpy(x), clam / "pt_files" / f"{sid}.pt")
    # CLAM .pt only, coords in the patch folder next to it (CLAM patch attrs), and a .pt
    # without any coords file
    ptonly = tmp_path / "ptonly" / "feats"
    (ptonly / "pt_files").mkdir(parents=True)
    (ptonly.parent / "patches").mkdir()
    x, c = src["q0"]
    torch.save(torch.from_numpy(x).half(), ptonly / "pt_files" / "q0.pt")
    with h5py.File(ptonly.parent / "patches" / "q0.h5", "w") as f:
        d = f.create_dataset("coords", data=c)
        d.attrs["patch_size"], d.attrs["patch_level"] = 256, 1
        d.attrs["downsample"] = np.array([2.0, 2.0])
    torch.save(torch.from_numpy(src["t0"][0]), ptonly / "pt_files" / "nocoords.pt")

    s_tri, f1 = BagStore.build(_slides([("A", "t0"), ("A", "t1")]), tri)
    s_clam, f2 = BagStore.build(_slides([("B", "c0"), ("C", "c1")]), clam)
    s_clam_pt, f3 = BagStore.build(_slides([("B", "c0")]), clam / "pt_files")
    s_pt, f4 = BagStore.build(_slides([("D", "q0"), ("E", "nocoords")]), ptonly)
    assert f1.empty and f2.empty and f3.empty and f4.empty
    np.testing.assert_array_equal(s_tri.read("A").numpy(),
                                  np.concatenate([src["t0"][0], src["t1"][0]]))
    meta = s_tri.tile_meta("A")
    np.testing.assert_array_equal(meta.coords, np.concatenate([src["t0"][1], src["t1"][1]]))
    assert meta.patch_size_level0 == [512, 512] and meta.has_coords == [True, True]
    for store, pid, sid in ((s_clam, "B", "c0"), (s_clam, "C", "c1"), (s_clam_pt, "B", "c0")):
        np.testing.assert_array_equal(store.read(pid).numpy(), src[sid][0])
        m = store.tile_meta(pid)
        np.testing.assert_array_equal(m.coords, src[sid][1])
        assert m.patch_size_level0 == [512]            # no attrs: the grid step
    assert s_clam.index().kind.tolist() == ["h5", "h5"]
    assert s_clam_pt.index().kind.tolist() == ["pt"]   # coords from h5_files/ beside pt_files/
    # .pt read rows: the memory-mapped tensor, fp16 -> float32
    np.testing.assert_array_equal(s_pt.read("D", [0, 3, 9]).numpy(),
                                  x.astype(np.float16).astype(np.float32)[[0, 3, 9]])
    m = s_pt.tile_meta("D")
    np.testing.assert_array_equal(m.coords, c)
    assert m.patch_size_level0 == [512]                # CLAM: patch_size 256 x downsample 2
    # without coords: trains, but no heatmap record
    e = s_pt["E"]
    assert e.n_tiles == len(src["t0"][0]) and e.has_coords == [False]
    assert (e.coords == -1).all()
    assert attention_record(e, "seed0", "E", np.full(e.n_tiles, 1.0 / e.n_tiles)) is None
    rec = attention_record(s_tri["A"], "seed0", "A", np.linspace(0, 1, s_tri.n_tiles("A")))
    assert rec.coords.shape == (s_tri.n_tiles("A"), 2) and rec.slide_ids == ["t0", "t1"]


def test_embeddings_dir_run_entry_point_needs_only_ids(tmp_path):
    x, c = _data(0, 50)
    feats = tmp_path / "feats"
    feats.mkdir()
    _trident_h5(feats / "s1.h5", x, c)

    class Cohort:
        root = tmp_path
        slides = _slides([("P1", "s1")])           # no path column
    cfg = {"data": {"derived": str(tmp_path / "derived")}, "embeddings": {"dir": str(feats)}}
    store, info = wsi_bag_store(Cohort, cfg)
    assert info["source"] == "embeddings.dir" and info["out"] == str(feats.resolve())
    assert info["n_tiles"] == 50 and info["dim"] == 8 and info["tiling_params_hash"] is None
    np.testing.assert_array_equal(store.read("P1").numpy(), x)
    with pytest.raises(FileNotFoundError, match="embeddings.dir=.*nowhere"):
        wsi_bag_store(Cohort, {**cfg, "embeddings": {"dir": str(tmp_path / "nowhere")}})


# --------------------------------------------------------------------------- bad files
def test_each_bad_file_gets_its_reason_and_the_other_slides_go_on(tmp_path):
    good = {}
    for sid in ("g0", "g1"):
        good[sid] = _data(int(sid[1]), 30)
        _write_ours(tmp_path / f"{sid}.h5", *good[sid])
    x, c = _data(5, 30)
    (tmp_path / "garbage.h5").write_bytes(b"this is not an HDF5 file")
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=c)
    _write_ours(tmp_path / "short.h5", x, c[:20])                      # coords != features
    _write_ours(tmp_path / "wide.h5", _data(6, 30, d=12)[0], c)        # other dimension
    xn = x.copy()
    xn[[4, 17]] = np.nan
    _write_ours(tmp_path / "nan.h5", xn, c)
    _write_ours(tmp_path / "empty.h5", np.zeros((0, 8)), np.zeros((0, 2)))
    _write_ours(tmp_path / "ints.h5", x, c, dtype=np.int16)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "notensor.pt")
    slides = _slides([("A", "g0"), ("A", "missing"), ("B", "g1"), ("C", "garbage"),
                      ("C", "nofeat"), ("D", "short"), ("D", "wide"), ("E", "nan"),
                      ("E", "empty"), ("F", "ints"), ("F", "notensor")])
    store, fails = BagStore.build(slides, tmp_path, cache_dir=tmp_path / "cache")
    assert list(fails.columns) == FAILURE_COLUMNS  # the failures table of every stage
    assert (fails.stage == "bags").all() and (fails.error == fails.reason).all()
    assert (fails.item_id == fails.slide_id).all() and (fails.status == "failed").all()
    why = fails.set_index("slide_id")
    expect = {
        "missing": r"no features file for slide missing \(looked for missing\.h5, "
                   r"h5_files/missing\.h5, missing\.pt, pt_files/missing\.pt\)",
        "garbage": r"garbage\.h5: cannot be read",
        "nofeat": r"nofeat\.h5: no 'features' dataset \(it holds \['coords'\]\)",
        "short": r"short\.h5: 'coords' has shape \(20, 2\) but 'features' has 30 rows",
        "wide": r"wide\.h5: feature dimension 12 differs from 8",
        "nan": r"nan\.h5: 2 of 30 tiles have non-finite features .*first at row 4",
        "empty": r"empty\.h5: 'features' has 0 tiles",
        "ints": r"ints\.h5: 'features' has dtype int16, expected floating point",
        "notensor": r"notensor\.pt: holds a dict, expected a tensor",
    }
    assert set(why.index) == set(expect)
    for sid, pattern in expect.items():
        assert pd.Series([why.at[sid, "reason"]]).str.contains(pattern).all(), why.at[sid, "reason"]
        assert why.at[sid, "patient_id"] == slides.set_index("slide_id").at[sid, "patient_id"]
        assert why.at[sid, "path"].endswith((".h5", ".pt"))
    assert why.at["nan", "path"] == str(tmp_path / "nan.h5")
    # the good slides are there, the patients without a usable slide are not
    assert set(store) == {"A", "B"} and store.n_tiles("A") == 30
    np.testing.assert_array_equal(store.read("A").numpy(), good["g0"][0])


def test_run_entry_point_records_failures_and_refuses_no_usable_slide(tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    _write_ours(feats / "ok.h5", *_data(0, 10))
    (feats / "bad.h5").write_bytes(b"junk")

    class Cohort:
        root = tmp_path
        slides = _slides([("P1", "ok"), ("P2", "bad")])
    cfg = {"data": {"derived": str(tmp_path / "derived")}, "embeddings": {"dir": str(feats)}}
    with pytest.warns(UserWarning, match=r"1 slide\(s\) have no usable features .*bad\.h5"):
        store, info = wsi_bag_store(Cohort, cfg)
    assert list(store) == ["P1"] and info["n_failed"] == 1
    table = pd.read_csv(info["failures_csv"])
    assert list(table.columns) == FAILURE_COLUMNS
    assert table.slide_id.tolist() == ["bad"] and table.patient_id.tolist() == ["P2"]
    assert table.stage.tolist() == ["bags"] and table.error_type.tolist() == ["BagError"]
    assert "bad.h5: cannot be read" in table.reason[0]
    Cohort.slides = _slides([("P2", "bad"), ("P3", "gone")])
    with pytest.raises(BagError, match=r"none of the 2 slide\(s\) .* has usable features .*"
                                       r"failures\.csv"):
        wsi_bag_store(Cohort, cfg)


def test_finite_scan_is_cached_and_redone_for_a_changed_file(tmp_path, monkeypatch):
    _write_ours(tmp_path / "a.h5", *_data(0, 20))
    slides = _slides([("P", "a")])
    BagStore.build(slides, tmp_path, cache_dir=tmp_path / "cache")
    calls = []
    real = bagmod._scan_finite
    monkeypatch.setattr(bagmod, "_scan_finite", lambda sf: calls.append(sf.slide_id) or real(sf))
    BagStore.build(slides, tmp_path, cache_dir=tmp_path / "cache")
    assert calls == []                                   # same size and mtime: not rescanned
    x, c = _data(1, 20)
    x[3] = np.inf
    _write_ours(tmp_path / "a.h5", x, c)
    store, fails = BagStore.build(slides, tmp_path, cache_dir=tmp_path / "cache")
    assert calls == ["a"] and len(store) == 0 and "non-finite" in fails.reason[0]


# --------------------------------------------------------------------------- reads
class _CountingFile(io.FileIO):
    nbytes = 0

    def readinto(self, b):
        k = super().readinto(b)
        _CountingFile.nbytes += k
        return k

    def read(self, n=-1):
        b = super().read(n)
        _CountingFile.nbytes += len(b)
        return b


def test_training_subsample_reads_only_the_chosen_rows(tmp_path, monkeypatch):
    x, c = _data(0, 4000, d=256)                   # 4 MB of features, 1 KiB per row
    _write_ours(tmp_path / "a.h5", x, c)
    store, _ = BagStore.build(_slides([("P", "a")]), tmp_path)
    monkeypatch.setattr(bagmod, "_h5", lambda p: h5py.File(_CountingFile(p, "r"), "r"))
    ds = PatientDataset([0], ["P"], store, tab={}, present={}, time=[1.0], event=[1],
                        train=True, max_instances=16, seed=3)
    seen = []
    real = bagmod.read_slide_rows
    monkeypatch.setattr(bagmod, "read_slide_rows",
                        lambda sf, rows=None: seen.append(rows) or real(sf, rows))
    _CountingFile.nbytes = 0
    item = ds[0]["wsi"]
    rows = seen[-1]
    assert item.shape == (16, 256) and len(rows) == 16 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(item.numpy(), x[rows])
    assert _CountingFile.nbytes < 16 * 1024 + 64 * 1024      # the rows + HDF5 metadata
    # a dense choice (2000 rows within rows 1000..3999) is read as one slab: bounded by the
    # SPAN_FACTOR x the chosen rows, not the whole file
    rng = np.random.default_rng(1)
    dense = np.sort(1000 + rng.choice(3000, 2000, replace=False))
    _CountingFile.nbytes = 0
    np.testing.assert_array_equal(store.read("P", dense).numpy(), x[dense])
    assert 2000 * 1024 <= _CountingFile.nbytes <= 3000 * 1024 + 64 * 1024
    _CountingFile.nbytes = 0
    full = PatientDataset([0], ["P"], store, tab={}, present={}, time=[1.0], event=[1])[0]["wsi"]
    assert full.shape == (4000, 256) and _CountingFile.nbytes >= x.nbytes


def test_subsamples_differ_between_epochs_in_dataloader_workers(tmp_path):
    x, c = _data(0, 200)
    _write_ours(tmp_path / "a.h5", x, c)
    store, _ = BagStore.build(_slides([("P", "a")]), tmp_path)
    ds = PatientDataset([0, 0], ["P"], store, tab={}, present={}, time=[1.0], event=[1],
                        train=True, max_instances=10, seed=0)
    dl = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_patients,
                    generator=torch.Generator().manual_seed(0))
    epochs = [[b["wsi"][0] for b in dl] for _ in range(2)]
    # a worker is a fresh copy of the dataset each epoch: its subsamples must still change
    assert not torch.equal(epochs[0][0], epochs[1][0])
    assert not torch.equal(epochs[0][0], epochs[0][1])
    # and the rows are real rows of the bag
    rows = [int(np.flatnonzero((x == r.numpy()).all(1))[0]) for r in epochs[1][0]]
    assert len(set(rows)) == 10 and rows == sorted(rows)


def test_store_pickles_into_workers_and_reads_the_same(tmp_path):
    for i in range(3):
        _write_ours(tmp_path / f"s{i}.h5", *_data(i, 20 + i))
    store, _ = BagStore.build(_slides([("A", "s0"), ("A", "s1"), ("B", "s2")]), tmp_path)
    ds = PatientDataset([0, 1], ["A", "B"], store, tab={}, present={}, time=[1.0, 2.0],
                        event=[1, 0])
    here = [ds[i]["wsi"] for i in range(2)]
    dl = DataLoader(ds, batch_size=None, num_workers=2)
    there = [it["wsi"] for it in dl]
    assert all(torch.equal(a, b) for a, b in zip(here, there))


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd, torch
    from pathlib import Path
    from torch.utils.data import DataLoader
    from netsurv.models.mil import ABMIL
    from netsurv.training.bags import BagStore
    from netsurv.training.datamodule import PatientDataset, collate_patients, load_bags

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def growth(root, n, mode):
        \"\"\"Peak resident memory above the current one while indexing n slides and running
        a training epoch (subsamples) and an evaluation pass (whole bags) through ABMIL.\"\"\"
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
            f.write("5")
        slides = pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)],
                               "slide_id": [f"s{i}" for i in range(n)]})
        pats = list(slides.patient_id)
        bags = (BagStore.build(slides, root)[0] if mode == "store"
                else load_bags(slides, root, pats)[0])
        for train in (True, False):
            ds = PatientDataset(range(n), pats, bags, tab={}, present={}, time=np.ones(n),
                                event=np.ones(n), train=train, max_instances=200)
            with torch.no_grad():
                for b in DataLoader(ds, batch_size=4, collate_fn=collate_patients):
                    net(b["wsi"], b["wsi_mask"])
        del bags, ds
        return status("VmHWM") - base

    torch.set_num_threads(1)
    net = ABMIL(128, dim=16, attn_dim=8).eval()
    root, small, big = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    growth(root, small, "store")                     # warm-up: allocator, lazy imports
    out = {"store_small": growth(root, small, "store"), "store_big": growth(root, big, "store"),
           "memory_big": growth(root, big, "memory")}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_does_not_grow_with_the_number_of_slides(tmp_path):
    rng = np.random.default_rng(0)
    small, big, tiles, dim = 50, 400, 500, 128
    for i in range(big):
        x = rng.standard_normal((tiles, dim), dtype=np.float32).astype(np.float16)
        with h5py.File(tmp_path / f"s{i}.h5", "w") as f:
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=np.zeros((tiles, 2), np.int64))
    # a fresh process: the peaks of this test process's other work do not count
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), str(small),
                          str(big)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    g = json.loads(res.stdout.strip().splitlines()[-1])
    extra = (big - small) * tiles * dim * 4          # float32 bytes of the 350 extra slides
    assert g["store_big"] - g["store_small"] < 0.1 * extra, (g, extra)
    # the check can fail: holding every bag in memory grows by about the data size
    assert g["memory_big"] - g["store_small"] > 0.8 * extra, (g, extra)


# --------------------------------------------------------------------------- tile budget
def test_tile_budget_batches_respect_the_budget_and_cover_everyone_once():
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3000, 200)
    sizes[[5, 50]] = [9000, 12000]                     # bigger than the budget: alone
    budget = 8000
    for order in (list(range(200)), size_order(sizes)):
        batches = list(TileBudgetBatchSampler(order, sizes, budget))
        flat = [i for b in batches for i in b]
        assert flat == order                           # each once, in sampler order
        for b in batches:
            cost = len(b) * max(1, int(max(sizes[b])))
            assert cost <= budget or len(b) == 1
        assert sorted(b for b in batches if max(sizes[b]) > budget) == [[5], [50]]
        # greedy: no two neighbouring batches could have been one
        for b1, b2 in zip(batches, batches[1:]):
            assert (len(b1) + 1) * max(1, int(max(sizes[b1 + b2[:1]]))) > budget
    # sorting by size pads less, so it needs no more batches
    assert (len(TileBudgetBatchSampler(size_order(sizes), sizes, budget))
            <= len(TileBudgetBatchSampler(range(200), sizes, budget)))
    capped = list(TileBudgetBatchSampler(range(200), np.zeros(200), budget, max_batch=64))
    assert [len(b) for b in capped] == [64, 64, 64, 8]
    with pytest.raises(ValueError, match="drop_last"):
        TileBudgetBatchSampler(range(3), [1, 1, 1], 10, drop_last=True)


def test_tile_budget_sampler_under_a_distributed_sampler(tmp_path):
    sizes = np.random.default_rng(1).integers(1, 500, 31)

    class _DS(torch.utils.data.Dataset):
        def __len__(self):
            return 31
    seen = []
    for rank in (0, 1):
        ds = DistributedSampler(_DS(), num_replicas=2, rank=rank, shuffle=False)
        for b in TileBudgetBatchSampler(ds, sizes, 1000):
            assert len(b) * max(sizes[b]) <= 1000 or len(b) == 1
            seen += b
    assert set(seen) == set(range(31))                 # (DistributedSampler pads one repeat)


def test_eval_loader_with_budget_yields_full_bags(tmp_path):
    for i in range(6):
        _write_ours(tmp_path / f"s{i}.h5", *_data(i, 10 * (i + 1)))
    store, _ = BagStore.build(_slides([(f"P{i}", f"s{i}") for i in range(6)]), tmp_path)
    pats = [f"P{i}" for i in range(6)]
    ds = PatientDataset(range(6), pats, store, tab={}, present={}, time=np.ones(6),
                        event=np.ones(6))
    sizes = ds.tile_counts()
    dl = DataLoader(ds, batch_sampler=TileBudgetBatchSampler(SequentialSampler(ds), sizes, 100),
                    collate_fn=collate_patients)
    got = {}
    for b in dl:
        assert b["wsi"].shape[0] * b["wsi"].shape[1] <= 100 or b["wsi"].shape[0] == 1
        for k, p in enumerate(b["pos"].tolist()):
            got[p] = b["wsi"][k][b["wsi_mask"][k]]
    assert sorted(got) == list(range(6))
    for p in range(6):
        assert torch.equal(got[p], store.read(pats[p]))
