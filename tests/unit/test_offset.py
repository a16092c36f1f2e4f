"""The classical model as a fixed offset of the deep network (netsurv.training.offset):
the network's offset arithmetic, the offset through dataset and collate, leak-free
cross-fitting against a manual refit, offsets of new patients, the offset's modalities,
mean tile embeddings (the linear-probe table) and the bag store's in-memory cache."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from sksurv.util import Surv
from torch.utils.data import DataLoader

from netsurv.features.clinical import ClinicalEncoder
from netsurv.models.classical import ClassicalPipeline, ImagingBlock
from netsurv.models.fusion import EarlyFusion, SurvivalNet, TabularMLP
from netsurv.survival.coxnet import CoxNet
from netsurv.training.bags import Bag, BagStore, embedding_means
from netsurv.training.datamodule import PatientDataset, collate_patients
from netsurv.training.offset import CHOICES, _cross_fit, offset_modalities, predict_offset

DIMS = {"clinical": 5, "radiomics": 3}


# --------------------------------------------------------------------------- the network
def _net(out_dim=1, seed=0) -> SurvivalNet:
    """A small offset network as build_net makes it: TabularMLP branches + early fusion."""
    torch.manual_seed(seed)
    branches = {m: TabularMLP(d, dim=6, hidden=[8], dropout=0.1) for m, d in DIMS.items()}
    fusion = EarlyFusion({m: b.dim for m, b in branches.items()}, out_dim=out_dim, hidden=16,
                         dropout=0.25)
    net = SurvivalNet(branches, fusion, offset=True).double()
    return net.eval()


def _batch(b=7, seed=1, offset=None):
    g = torch.Generator().manual_seed(seed)
    batch = {m: 3 * torch.randn(b, d, generator=g, dtype=torch.float64) for m, d in DIMS.items()}
    batch["present"] = {"clinical": torch.ones(b, dtype=torch.bool),
                        "radiomics": torch.arange(b) % 3 != 0}   # some patients lack radiomics
    batch["offset"] = (torch.randn(b, generator=g, dtype=torch.float64) * 2
                       if offset is None else offset)
    return batch


def test_offset_net_starts_as_the_offset_whatever_the_inputs():
    net = _net()
    assert net.offset_gate.item() == 0.0 and net.offset_scale.item() == 0.0
    assert torch.count_nonzero(net.offset_bias) == 0
    for seed in (1, 2, 3):
        batch = _batch(seed=seed)
        with torch.no_grad():
            out = net(batch)["out"]
        assert out.shape == (7, 1)
        assert torch.equal(out[:, 0], batch["offset"])
        # the network's own output is not trivially zero: the gate hides it
        with torch.no_grad():
            embs = {m: net.branches[m](batch[m]) for m in DIMS}
            assert net.fusion(embs, batch["present"]).abs().max() > 1e-3


def test_offset_net_in_training_mode_also_starts_as_the_offset():
    net = _net().train()                      # dropout active: still hidden by the zero gate
    batch = _batch(seed=4)
    out = net(batch)["out"]
    assert torch.equal(out[:, 0], batch["offset"])


def test_gate_adds_the_fusion_output_to_the_offset():
    net = _net()
    with torch.no_grad():
        net.offset_gate.data.fill_(0.5)
        batch = _batch(seed=5)
        out = net(batch)["out"][:, 0]
        zero = dict(batch, offset=torch.zeros_like(batch["offset"]))
        out0 = net(zero)["out"][:, 0]
        embs = {m: net.branches[m](batch[m]) for m in DIMS}
        fused = net.fusion(embs, batch["present"])[:, 0]
    assert out0.abs().max() > 1e-3
    torch.testing.assert_close(out0, 0.5 * fused, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, batch["offset"] + out0, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, batch["offset"] + 0.5 * fused, rtol=0, atol=1e-12)


def test_scale_and_bias_enter_as_documented():
    net = _net()
    with torch.no_grad():
        net.offset_gate.data.fill_(-0.3)
        net.offset_scale.data.fill_(0.25)
        net.offset_bias.data.fill_(0.7)
        batch = _batch(seed=6)
        embs = {m: net.branches[m](batch[m]) for m in DIMS}
        fused = net.fusion(embs, batch["present"])[:, 0]
        out = net(batch)["out"][:, 0]
    torch.testing.assert_close(out, 0.7 + 1.25 * batch["offset"] - 0.3 * fused,
                               rtol=0, atol=1e-12)


def test_discrete_time_head_starts_as_the_offset_in_every_bin():
    net = _net(out_dim=4)
    assert net.offset_bias.shape == (4,)
    batch = _batch(seed=7)
    with torch.no_grad():
        out = net(batch)["out"]
    assert out.shape == (7, 4)
    assert torch.equal(out, batch["offset"][:, None].expand(7, 4))


def test_offset_dtype_follows_the_network():
    net = _net()
    off32 = torch.tensor([0.1, -2.5, 3.25], dtype=torch.float32)
    batch = _batch(b=3, seed=8, offset=off32)
    with torch.no_grad():
        out = net(batch)["out"][:, 0]
    assert out.dtype == torch.float64
    assert torch.equal(out, off32.double())


def test_network_without_offset_has_no_offset_parameters():
    torch.manual_seed(0)
    branches = {m: TabularMLP(d, dim=6) for m, d in DIMS.items()}
    net = SurvivalNet(branches, EarlyFusion(dict.fromkeys(DIMS, 6), out_dim=1))
    assert not any("offset" in n for n, _ in net.named_parameters())


# --------------------------------------------------------------------------- dataset
def _dataset(offset, idx=(3, 0, 4, 5)):
    n = 6
    patients = [f"P{i}" for i in range(n)]
    tab = {"clinical": np.arange(n * 2, dtype=np.float32).reshape(n, 2)}
    present = {"clinical": np.array([True, True, False, True, True, True])}
    time = np.linspace(1, 6, n)
    event = np.array([1, 0, 1, 1, 0, 1])
    return PatientDataset(list(idx), patients, None, tab, present, time, event, offset=offset)


def test_dataset_and_collate_carry_the_offset_of_each_item():
    off = np.array([0.5, -1.25, 2.0, 3.5, -0.125, 7.0])   # float64 in
    ds = _dataset(off)
    assert ds[0]["offset"].dtype == torch.float32 and ds[0]["offset"].shape == ()
    batch = collate_patients([ds[i] for i in range(len(ds))])
    assert batch["offset"].dtype == torch.float32 and batch["offset"].shape == (4,)
    np.testing.assert_array_equal(batch["offset"].numpy(), off[[3, 0, 4, 5]].astype(np.float32))
    np.testing.assert_array_equal(batch["pos"].numpy(), [3, 0, 4, 5])
    np.testing.assert_array_equal(batch["clinical"].numpy(),
                                  np.arange(12, dtype=np.float32).reshape(6, 2)[[3, 0, 4, 5]])
    # through a DataLoader, in batches of 3
    dl = DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_patients)
    got = torch.cat([b["offset"] for b in dl]).numpy()
    np.testing.assert_array_equal(got, off[[3, 0, 4, 5]].astype(np.float32))


def test_dataset_without_offset_gives_no_offset_key():
    batch = collate_patients([_dataset(None)[i] for i in range(4)])
    assert "offset" not in batch


def test_collated_batch_feeds_the_offset_network():
    off = np.array([0.5, -1.25, 2.0, 3.5, -0.125, 7.0])
    ds = _dataset(off)
    batch = collate_patients([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    net = SurvivalNet({"clinical": TabularMLP(2, dim=4)},
                      EarlyFusion({"clinical": 4}, out_dim=1), offset=True).eval()
    with torch.no_grad():
        out = net(batch)["out"][:, 0]
    np.testing.assert_array_equal(out.numpy(), off[[3, 0, 4, 5]].astype(np.float32))


# --------------------------------------------------------------------------- cross-fitting
def _clinical(n=60, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"C{i:03d}" for i in range(n)]
    age = rng.normal(60, 10, n)
    sex = rng.choice(["F", "M"], n)
    lp = 0.06 * (age - 60) + 0.8 * (sex == "M")
    t_ev = rng.exponential(10 * np.exp(-lp))
    t_c = rng.uniform(0, 25, n)
    time = np.minimum(t_ev, t_c)
    event = (t_ev <= t_c).astype(int)
    df = pd.DataFrame({"age": age.round(1), "sex": sex}, index=pd.Index(ids, name="patient_id"))
    return df, time, event


def _y(time, event):
    return Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, float))


def _pipe(**kw) -> ClassicalPipeline:
    enc = ClinicalEncoder(numeric=["age"], categorical=["sex"], scale_indicators=True)
    return ClassicalPipeline(clinical_encoder=enc, model=CoxNet(l1_ratio=0.5, alpha=0.05), **kw)


def _manual_oof(frames, time, event, folds, seed):
    from sklearn.model_selection import StratifiedKFold

    out = np.full(len(time), np.nan)
    for fit, pred in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
            np.zeros(len(time)), event):
        p = _pipe().fit({m: f.iloc[fit] for m, f in frames.items()}, _y(time[fit], event[fit]))
        out[pred] = p.predict({m: f.iloc[pred] for m, f in frames.items()})
    return out


def test_cross_fit_equals_a_manual_stratified_refit():
    df, time, event = _clinical()
    assert 15 < event.sum() < 50
    frames = {"clinical": df}
    pipe = _pipe()
    oof = _cross_fit(pipe, frames, time, event, 5, 11)
    assert oof.shape == (60,) and np.isfinite(oof).all() and np.ptp(oof) > 0
    np.testing.assert_allclose(oof, _manual_oof(frames, time, event, 5, 11), rtol=0, atol=1e-12)
    # a fitted pipeline is not altered by cross-fitting (clones are refitted)
    fitted = _pipe().fit(frames, _y(time, event))
    coef = fitted.model_.coef_.copy()
    again = _cross_fit(fitted, frames, time, event, 5, 11)
    np.testing.assert_array_equal(again, oof)
    np.testing.assert_array_equal(fitted.model_.coef_, coef)
    # out-of-fold risks are not the in-sample ones
    assert np.abs(oof - fitted.predict(frames)).max() > 1e-3


def test_cross_fit_folds_are_capped_by_the_events():
    df, time, _ = _clinical()
    event = np.zeros(60, int)
    event[[2, 9, 30]] = 1                                    # 3 events: 3 folds, not 5
    frames = {"clinical": df}
    oof = _cross_fit(_pipe(), frames, time, event, 5, 3)
    np.testing.assert_allclose(oof, _manual_oof(frames, time, event, 3, 3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("i", [0, 17, 42])
def test_cross_fit_is_leak_free(i):
    """A patient's own outcome never reaches its out-of-fold risk; it does reach the
    in-sample (full-fit) risk.  Only the time is changed: the event decides the stratified
    folds, so changing it would legitimately move patients between folds."""
    df, time, event = _clinical()
    frames = {"clinical": df}
    oof = _cross_fit(_pipe(), frames, time, event, 5, 7)
    for new_t in (time.max() * 3, time.min() / 10):
        t2 = time.copy()
        t2[i] = new_t
        oof2 = _cross_fit(_pipe(), frames, t2, event, 5, 7)
        assert oof2[i] == oof[i]
        assert np.abs(oof2 - oof).max() > 1e-6            # the other folds did see it
        full = _pipe().fit(frames, _y(time, event)).predict(frames)
        full2 = _pipe().fit(frames, _y(t2, event)).predict(frames)
        assert abs(full2[i] - full[i]) > 1e-6


# --------------------------------------------------------------------------- new patients
def _emb_frame(ids, seed=3, d=3):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(len(ids), d)), index=pd.Index(ids, name="patient_id"),
                        columns=[f"emb_{j}" for j in range(d)])


def test_predict_offset_centres_and_zeroes_patients_lacking_a_modality():
    df, time, event = _clinical()
    frames = {"clinical": df}
    pipe = _pipe().fit(frames, _y(time, event))
    center = 0.375
    state = {"name": "coxnet", "modalities": ["clinical"], "pipe": pipe, "center": center}
    have = list(df.index[[5, 0, 33]])
    new = {"clinical": df.loc[have]}
    patients = ["X1", have[0], have[1], "X2", have[2]]
    got = predict_offset(state, new, patients)
    risk = pipe.predict({"clinical": df.loc[have]})
    np.testing.assert_allclose(got, [0.0, risk[0] - center, risk[1] - center, 0.0,
                                     risk[2] - center], rtol=0, atol=1e-12)
    # nobody has the modality: all zeros
    np.testing.assert_array_equal(predict_offset(state, {"clinical": df.iloc[:0]}, ["X1", "X2"]),
                                  [0.0, 0.0])


def test_predict_offset_needs_every_modality_of_the_offset():
    df, time, event = _clinical()
    ids = list(df.index)
    emb = _emb_frame(ids)
    pipe = ClassicalPipeline(
        clinical_encoder=ClinicalEncoder(numeric=["age"], categorical=["sex"],
                                         scale_indicators=True),
        imaging={"embeddings": ImagingBlock(None, corr_threshold=0.9)},
        model=CoxNet(l1_ratio=0.5, alpha=0.05), k="all")
    pipe.fit({"clinical": df, "embeddings": emb}, _y(time, event))
    state = {"name": "coxnet", "modalities": ["clinical", "embeddings"], "pipe": pipe,
             "center": -0.2}
    frames = {"clinical": df.loc[ids[:10]], "embeddings": emb.loc[ids[5:15]]}
    patients = ids[:15]
    got = predict_offset(state, frames, patients, meta=None)
    both = ids[5:10]
    risk = pipe.predict({"clinical": df.loc[both], "embeddings": emb.loc[both]})
    want = np.zeros(15)
    want[5:10] = risk + 0.2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.all(got[5:10] != 0)
    # with the clinical-only fallback model, patients lacking the embeddings get its offset
    fb = ClassicalPipeline(
        clinical_encoder=ClinicalEncoder(numeric=["age"], categorical=["sex"],
                                         scale_indicators=True),
        model=CoxNet(l1_ratio=0.5, alpha=0.05)).fit({"clinical": df}, _y(time, event))
    state["fallback"] = {"modalities": ["clinical"], "pipe": fb, "center": 0.3}
    got = predict_offset(state, frames, patients, meta=None)
    want[:5] = fb.predict({"clinical": df.loc[ids[:5]]}) - 0.3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)   # 10..14: no clinical, 0


# --------------------------------------------------------------------------- modalities
def _cfg(mods, choice="__absent__"):
    d = {"modalities": list(mods), "seed": 0}
    if choice != "__absent__":
        d["offset"] = {"modalities": choice, "folds": 5}
    return OmegaConf.create(d)


@pytest.mark.parametrize("choice, want", [
    ("tabular", ["clinical"]),
    ("tabular+embeddings", ["clinical", "embeddings"]),
    ("embeddings", ["embeddings"]),
    ("none", []),
    (None, []),
    ("auto", ["clinical"]),
])
def test_offset_modalities_of_a_clinical_and_slides_run(choice, want):
    assert offset_modalities(_cfg(["clinical", "wsi"], choice)) == want


def test_offset_modalities_other_runs():
    assert offset_modalities(_cfg(["clinical", "radiomics", "wsi"], "tabular")) == \
        ["clinical", "radiomics"]
    assert offset_modalities(_cfg(["clinical", "radiomics"], "tabular+embeddings")) == \
        ["clinical", "radiomics"]                          # no slides: no embeddings
    assert offset_modalities(_cfg(["clinical"], "embeddings")) == []
    assert offset_modalities(_cfg(["wsi"], "tabular")) == []
    assert offset_modalities(_cfg(["clinical", "wsi"])) == []   # no offset section
    assert offset_modalities(_cfg(["wsi"], "auto")) == ["embeddings"]  # the linear probe
    assert offset_modalities(_cfg(["clinical", "radiomics"], "auto")) == ["clinical", "radiomics"]


def test_offset_modalities_unknown_choice_names_the_choices():
    assert CHOICES == ("auto", "none", "tabular", "embeddings", "tabular+embeddings")
    with pytest.raises(ValueError) as e:
        offset_modalities(_cfg(["clinical", "wsi"], "clinical"))
    msg = str(e.value)
    assert "'clinical'" in msg
    for c in CHOICES:
        assert c in msg


# --------------------------------------------------------------------------- embeddings
class _RecordingBag(Bag):
    """An in-memory bag that records the rows each read asked for."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reads = []

    def read(self, rows=None):
        self.reads.append(None if rows is None else np.asarray(rows).copy())
        return super().read(rows)


def _bags(sizes, d=4, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for p, n in sizes.items():
        x = (rng.normal(size=(n, d)) * 10 + rng.normal(size=d)).astype(np.float32)
        out[p] = _RecordingBag(x, np.zeros((n, 2), np.int64), np.zeros(n, np.int64), [f"{p}-s"])
    return out


def test_embedding_means_equal_numpy_means_read_in_blocks():
    bags = _bags({"A": 7, "B": 1, "C": 12, "D": 5})
    patients = ["C", "X", "A", "B"]                        # X has no bag; D is not asked for
    got = embedding_means(bags, patients, block=3)
    assert list(got.index) == ["C", "A", "B"] and got.index.name == "patient_id"
    assert list(got.columns) == ["emb_0", "emb_1", "emb_2", "emb_3"]
    for p in ["C", "A", "B"]:
        np.testing.assert_allclose(got.loc[p].to_numpy(),
                                   bags[p].features.astype(np.float64).mean(0),
                                   rtol=0, atol=1e-6)
    # every bag read in blocks of at most 3 consecutive rows covering it once
    # (the first bag's first whole read is the dimension probe of a plain dict)
    for p, n in [("C", 12), ("A", 7), ("B", 1)]:
        blocks = [r for r in bags[p].reads if r is not None]
        assert all(1 <= len(r) <= 3 for r in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks), np.arange(n))
        assert len(blocks) == -(-n // 3)
    assert bags["D"].reads == [] or all(r is None for r in bags["D"].reads)


def test_embedding_means_of_all_patients_and_block_size_does_not_matter():
    bags = _bags({"A": 7, "B": 2, "C": 12}, d=3, seed=1)
    a = embedding_means(bags)
    b = embedding_means(bags, block=5)
    assert list(a.index) == ["A", "B", "C"] and list(a.columns) == ["emb_0", "emb_1", "emb_2"]
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        a.to_numpy(), np.stack([bags[p].features.astype(np.float64).mean(0) for p in "ABC"]),
        rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- bag store
from tests.unit.test_bags import _data, _slides, _write_ours  # noqa: E402 - shared writers


@pytest.fixture
def store_files(tmp_path):
    """P0: two slides (11 + 6 tiles), P1: one slide (9 tiles), P2: one fp16 slide (4 tiles)."""
    arrays = {}
    for sid, seed, n, dtype in [("s0", 0, 11, np.float32), ("s1", 1, 6, np.float32),
                                ("s2", 2, 9, np.float32), ("s3", 3, 4, np.float16)]:
        x, c = _data(seed, n)
        _write_ours(tmp_path / f"{sid}.h5", x, c, dtype=dtype)
        arrays[sid] = x.astype(dtype).astype(np.float32)
    slides = _slides([("P0", "s0"), ("P0", "s1"), ("P1", "s2"), ("P2", "s3")])
    want = {"P0": np.concatenate([arrays["s0"], arrays["s1"]]), "P1": arrays["s2"],
            "P2": arrays["s3"]}
    return tmp_path, slides, want


def _store(store_files) -> BagStore:
    root, slides, _ = store_files
    store, fails = BagStore.build(slides, root)
    assert fails.empty
    return store


ROWS = {"P0": np.array([0, 3, 10, 11, 16]), "P1": np.array([2, 8]), "P2": np.array([1])}


def test_cache_in_memory_reads_equal_disk_reads(store_files):
    _, _, want = store_files
    store = _store(store_files)
    assert store.total_tiles == 30 and store.dim == 8
    disk = {p: store.read(p).numpy().copy() for p in store}
    disk_rows = {p: store.read(p, ROWS[p]).numpy().copy() for p in store}
    for p in store:
        np.testing.assert_array_equal(disk[p], want[p])
    assert store.cache_in_memory(1e9) is True
    assert store.cache_in_memory(1e9) is True              # idempotent
    # the files are no longer needed
    for f in store_files[0].glob("*.h5"):
        f.unlink()
    for p in store:
        x, xr = store.read(p), store.read(p, ROWS[p])
        assert x.dtype == torch.float32 and xr.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), disk[p])
        np.testing.assert_array_equal(xr.numpy(), disk_rows[p])
        np.testing.assert_array_equal(store[p].read(ROWS[p]).numpy(), disk_rows[p])
    # embedding means from the cached store
    got = embedding_means(store, ["P1", "P0", "P9"], block=4)
    assert list(got.index) == ["P1", "P0"]
    for p in ["P1", "P0"]:
        np.testing.assert_allclose(got.loc[p].to_numpy(), want[p].astype(np.float64).mean(0),
                                   rtol=0, atol=1e-6)


def test_cache_in_memory_refuses_when_the_bags_do_not_fit(store_files):
    store = _store(store_files)
    assert store.cache_in_memory(1) is False
    need = store.total_tiles * store.dim * 4
    assert store.cache_in_memory(need - 1) is False
    assert store._mem is None
    np.testing.assert_array_equal(store.read("P1").numpy(), store_files[2]["P1"])
    fresh = _store(store_files)
    assert fresh.cache_in_memory(need) is True              # exactly the budget fits


def test_embedding_means_of_a_disk_store(store_files):
    _, _, want = store_files
    store = _store(store_files)
    got = embedding_means(store, block=3)
    assert list(got.index) == ["P0", "P1", "P2"]
    for p in got.index:
        np.testing.assert_allclose(got.loc[p].to_numpy(), want[p].astype(np.float64).mean(0),
                                   rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- stacked probe
def _partial_loglik(time, event, lp):
    """Cox partial log-likelihood without ties (written out, independent of lifelines)."""
    order = np.argsort(-time)
    lp_sorted, ev_sorted = lp[order], event[order]
    log_risk_set = np.logaddexp.accumulate(lp_sorted)   # log sum exp over t_j >= t_i
    return float(np.sum(ev_sorted * (lp_sorted - log_risk_set)))


def _stack_data(effects, n=240, seed=0):
    """``main`` (effect 0.9) and one probe per entry of ``effects``, all independent normal."""
    rng = np.random.default_rng(seed)
    main = rng.normal(size=n)
    probes = {f"p{j}": rng.normal(size=n) for j in range(len(effects))}
    lp = 0.9 * main + sum(e * probes[f"p{j}"] for j, e in enumerate(effects))
    t_ev = rng.exponential(np.exp(-lp))
    t_c = rng.exponential(1.5, n)
    return main, probes, np.minimum(t_ev, t_c), (t_ev <= t_c).astype(int)


def _sksurv_cox(cols, time, event):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    X = np.column_stack(cols)
    return CoxPHSurvivalAnalysis(alpha=0).fit(X, Surv.from_arrays(event.astype(bool), time)).coef_


def test_stack_probes_coefficients_and_likelihood_ratio_against_independent_fits():
    from scipy.stats import chi2

    from netsurv.training.offset import stack_probes

    main, probes, time, event = _stack_data([0.6, 0.3])
    got = stack_probes(main, probes, time, event)
    both = _sksurv_cox([main, probes["p0"], probes["p1"]], time, event)
    one = _sksurv_cox([main], time, event)
    np.testing.assert_allclose([got["weights"][k] for k in ("main", "p0", "p1")], both,
                               atol=1e-4)
    lr = 2 * (_partial_loglik(time, event, np.c_[main, probes["p0"], probes["p1"]] @ both)
              - _partial_loglik(time, event, main * one[0]))
    assert got["lr"] == pytest.approx(lr, abs=1e-4)
    assert got["p"] == pytest.approx(chi2.sf(lr, 2), rel=1e-3) and got["p"] < 1e-4
    assert got["used"] == ["p0", "p1"] and 0.4 < got["weights"]["p0"] < 0.8


def test_stack_probes_drops_a_probe_with_a_negative_weight_and_refits():
    """Non-negative probe weights: the harmful probe goes, the others' weights are those of
    the refit without it (not of the fit with it)."""
    from netsurv.training.offset import stack_probes

    main, probes, time, event = _stack_data([0.6, -0.5], seed=2)
    got = stack_probes(main, probes, time, event)
    assert got["used"] == ["p0"] and "p1" not in got["weights"]
    np.testing.assert_allclose([got["weights"]["main"], got["weights"]["p0"]],
                               _sksurv_cox([main, probes["p0"]], time, event), atol=1e-4)


def test_stack_probes_gate_and_degenerate_probes():
    from netsurv.training.offset import stack_probes

    main, probes, time, event = _stack_data([0.0], seed=1)
    free = stack_probes(main, probes, time, event)
    gated = stack_probes(main, probes, time, event, p_max=0.05)
    assert free["p"] > 0.05 and gated["used"] == []
    assert free["used"] == (["p0"] if free["weights"].get("p0", 0) > 0 else [])
    const = stack_probes(main, {"c": np.zeros_like(main)}, time, event)   # constant probe
    assert const["used"] == [] and const["p"] == 1.0
    assert stack_probes(np.ones_like(main), probes, time, event) is None  # constant main


def test_wants_probe_only_for_auto_runs_with_tables_and_slides():
    from netsurv.training.offset import probe_modalities, wants_probe

    def cfg(mods, choice="auto", probes=("embeddings", "pathomics")):
        return OmegaConf.create({"modalities": mods, "offset": {"modalities": choice,
                                                                "probes": list(probes),
                                                                "probe_p": None}})
    assert wants_probe(cfg(["clinical", "wsi"]))
    assert wants_probe(cfg(["clinical", "radiomics", "wsi"]))
    assert not wants_probe(cfg(["wsi"]))                  # slides only: the probe is the offset
    assert not wants_probe(cfg(["clinical", "radiomics"]))
    assert not wants_probe(cfg(["clinical", "wsi"], choice="tabular"))
    assert not wants_probe(cfg(["clinical", "wsi"], probes=()))
    assert probe_modalities(cfg(["clinical", "wsi"])) == ["embeddings", "pathomics"]
    # a table the tabular model already holds is not stacked a second time
    assert probe_modalities(cfg(["clinical", "pathomics", "wsi"])) == ["embeddings"]
    assert probe_modalities(cfg(["wsi"])) == []


def test_predict_offset_with_stacked_probes():
    """a * tabular + sum b_j * probe_j; patients without a probe's table get 0 for it (the
    training mean); a run saved with the older single ``probe`` gives the same."""
    from netsurv.training.offset import state_modalities

    df, time, event = _clinical()
    ids = list(df.index)
    emb = _emb_frame(ids)
    pipe = _pipe().fit({"clinical": df}, _y(time, event))
    probe = ClassicalPipeline(imaging={"embeddings": ImagingBlock(None, corr_threshold=0.9)},
                              model=CoxNet(l1_ratio=0.5, alpha=0.05), k="all")
    probe.fit({"embeddings": emb}, _y(time, event))
    morph = emb.iloc[:, :6].rename(columns=lambda c: f"m_{c}") * 2 + 1
    probe2 = ClassicalPipeline(imaging={"pathomics": ImagingBlock(None, corr_threshold=0.9)},
                               model=CoxNet(l1_ratio=0.5, alpha=0.05), k="all")
    probe2.fit({"pathomics": morph}, _y(time, event))
    part = {"modalities": ["embeddings"], "pipe": probe, "center": -0.4}
    part2 = {"modalities": ["pathomics"], "pipe": probe2, "center": 0.2}
    base = {"name": "coxnet", "modalities": ["clinical"], "pipe": pipe, "center": 0.1,
            "fallback": None}
    state = {**base, "stack": {"main": 0.9, "probes": [{**part, "weight": 0.7},
                                                        {**part2, "weight": 0.3}]}}
    assert state_modalities(state) == ["clinical", "embeddings", "pathomics"]
    frames = {"clinical": df.loc[ids[:12]], "embeddings": emb.loc[ids[4:12]],
              "pathomics": morph.loc[ids[6:12]]}
    got = predict_offset(state, frames, ids[:12])
    main = pipe.predict({"clinical": df.loc[ids[:12]]}) - 0.1
    pr, pr2 = np.zeros(12), np.zeros(12)
    pr[4:] = probe.predict({"embeddings": emb.loc[ids[4:12]]}) + 0.4
    pr2[6:] = probe2.predict({"pathomics": morph.loc[ids[6:12]]}) - 0.2
    assert np.abs(pr[4:]).max() > 1e-3 and np.abs(pr2[6:]).max() > 1e-3
    np.testing.assert_allclose(got, 0.9 * main + 0.7 * pr + 0.3 * pr2, rtol=0, atol=1e-12)
    legacy = {**base, "probe": {**part, "weights": [0.9, 0.7]}}
    np.testing.assert_allclose(predict_offset(legacy, frames, ids[:12]), 0.9 * main + 0.7 * pr,
                               rtol=0, atol=1e-12)
