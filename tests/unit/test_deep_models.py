"""MIL heads, fusion with missing modalities, and the Lightning survival module's losses."""
import numpy as np
import pytest
import torch

from netsurv.models.fusion import (
    BilinearFusion,
    EarlyFusion,
    GatedAttentionFusion,
    LateFusion,
    SurvivalNet,
    TabularMLP,
)
from netsurv.models.mil import ABMIL, MaxPoolMIL, MeanPoolMIL, TransMIL, masked_softmax
from netsurv.survival.losses import cox_ph_loss
from netsurv.training.datamodule import PatientDataset, collate_patients
from netsurv.training.module import SurvivalModule

MILS = [ABMIL, TransMIL, MeanPoolMIL, MaxPoolMIL]
FUSIONS = [EarlyFusion, LateFusion, BilinearFusion, GatedAttentionFusion]


def test_masked_softmax_ignores_padding_and_empty_rows():
    s = torch.tensor([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    a = masked_softmax(s, m)
    assert torch.allclose(a[0], torch.tensor([1 / (1 + np.e), np.e / (1 + np.e), 0.0]))
    assert torch.equal(a[1], torch.zeros(3))


@pytest.mark.parametrize("cls", MILS)
def test_mil_padding_does_not_change_the_bag(cls):
    torch.manual_seed(0)
    net = cls(in_dim=12, dim=8).eval()
    x = torch.randn(1, 5, 12)
    z1, a1 = net(x, torch.ones(1, 5, dtype=torch.bool))
    xp = torch.cat([x, 100 * torch.randn(1, 4, 12)], 1)      # padded with junk
    mask = torch.tensor([[True] * 5 + [False] * 4])
    z2, a2 = net(xp, mask)
    assert torch.allclose(z1, z2, atol=1e-5)
    assert torch.allclose(a1, a2[:, :5], atol=1e-5)
    assert torch.all(a2[:, 5:] == 0)
    assert a2.sum().item() == pytest.approx(1.0, abs=1e-5)
    # an empty bag gives a zero embedding and zero attention, no NaN
    z0, a0 = net(torch.zeros(1, 3, 12), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(z0, torch.zeros_like(z0)) and torch.equal(a0, torch.zeros_like(a0))


def test_abmil_attention_follows_the_informative_tile():
    # one tile differs from the rest; after training to detect it, attention concentrates there
    torch.manual_seed(0)
    net = ABMIL(in_dim=4, dim=8, attn_dim=8, dropout=0.0)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=0.05)
    x = torch.randn(64, 10, 4) * 0.1
    y = torch.randint(0, 2, (64,)).float()
    x[y == 1, 3, 0] = 3.0   # positive bags have a signal in tile 3
    mask = torch.ones(64, 10, dtype=torch.bool)
    for _ in range(200):
        z, a = net(x, mask)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(z)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, a = net(x, mask)
    assert a[y == 1].argmax(1).eq(3).float().mean() > 0.9


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_ignores_what_an_absent_modality_holds(fusion):
    torch.manual_seed(0)
    f = fusion({"clinical": 4, "wsi": 6}, out_dim=3).eval()
    embs = {"clinical": torch.randn(5, 4), "wsi": torch.randn(5, 6)}
    present = {"clinical": torch.ones(5, dtype=torch.bool),
               "wsi": torch.tensor([True, False, True, False, True])}
    out1 = f(embs, present)
    embs2 = {"clinical": embs["clinical"], "wsi": embs["wsi"] + 10 * torch.randn(5, 6)}
    out2 = f(embs2, present)
    absent = ~present["wsi"]
    assert out1.shape == (5, 3)
    assert torch.allclose(out1[absent], out2[absent], atol=1e-5)
    assert not torch.allclose(out1[~absent], out2[~absent])


def test_late_fusion_is_the_sum_of_present_modality_heads():
    f = LateFusion({"a": 2, "b": 3}, out_dim=1).eval()
    ea, eb = torch.randn(4, 2), torch.randn(4, 3)
    pb = torch.tensor([True, False, True, False])
    out = f({"a": ea, "b": eb}, {"a": torch.ones(4, dtype=torch.bool), "b": pb})
    expect = f.heads["a"](ea) + f.heads["b"](eb) * pb[:, None]
    assert torch.allclose(out, expect)


def test_modality_dropout_keeps_one_present_modality():
    torch.manual_seed(0)
    net = SurvivalNet({"clinical": TabularMLP(3, 4), "radiomics": TabularMLP(2, 4)},
                      EarlyFusion({"clinical": 4, "radiomics": 4}), modality_dropout=0.9)
    present = {"clinical": torch.ones(500, dtype=torch.bool),
               "radiomics": torch.rand(500) < 0.5}
    new = net._drop(present)
    kept = new["clinical"] | new["radiomics"]
    assert kept.all()
    assert not (new["radiomics"] & ~present["radiomics"]).any()   # never resurrects a modality
    both = present["radiomics"]
    assert new["clinical"][both].float().mean() < 0.6             # but does drop
    assert new["clinical"][~both].all()                           # the only modality stays


def test_linear_term_adds_a_masked_linear_risk_per_tabular_modality():
    torch.manual_seed(0)
    fusion = EarlyFusion({"clinical": 4, "radiomics": 4})
    net = SurvivalNet({"clinical": TabularMLP(3, 4), "radiomics": TabularMLP(2, 4)}, fusion,
                      linear={"clinical": 3, "radiomics": 2}).eval()
    assert set(net.linear) == {"clinical", "radiomics"}
    assert all(not lin.weight.any() for lin in net.linear.values())   # starts as plain fusion
    batch = {"clinical": torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]),
             "radiomics": torch.tensor([[1.0, -1.0], [4.0, 5.0]]),
             "present": {"clinical": torch.tensor([True, True]),
                         "radiomics": torch.tensor([True, False])}}
    base = net(batch)["out"]
    embs = {m: net.branches[m](batch[m]) for m in ("clinical", "radiomics")}
    assert torch.allclose(base, fusion(embs, batch["present"]))
    with torch.no_grad():
        net.linear["clinical"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        net.linear["radiomics"].weight.copy_(torch.tensor([[2.0, 1.0]]))
    out = net(batch)["out"]
    # patient 0: clinical 1 - 3 = -2, radiomics 2 - 1 = 1; patient 1: clinical 0.5 - 2 = -1.5,
    # radiomics absent (its 2*4 + 5 = 13 must not count)
    assert torch.allclose(out - base, torch.tensor([[-1.0], [-1.5]]))


def test_linear_term_is_only_for_tabular_branches():
    with pytest.raises(ValueError, match="wsi"):
        SurvivalNet({"wsi": ABMIL(6, 8, 4)}, LateFusion({"wsi": 8}), linear={"wsi": 6})


def test_build_net_adds_linear_terms_from_config():
    from omegaconf import OmegaConf

    from netsurv.tasks.train_deep import build_net

    cfg = OmegaConf.create({
        "tabular": {"dim": 4, "hidden": [], "dropout": 0.0, "linear": True},
        "net": {"mil": {"_target_": "netsurv.models.mil.ABMIL", "dim": 8, "attn_dim": 4}},
        "fusion": {"module": {"_target_": "netsurv.models.fusion.EarlyFusion", "hidden": 8},
                   "modality_dropout": 0.0}})
    net = build_net(cfg, {"clinical": 5, "wsi": 6}, out_dim=3)
    assert list(net.linear) == ["clinical"]
    assert net.linear["clinical"].weight.shape == (3, 5)   # one term per output (NLL bins)
    cfg.tabular.linear = False
    assert len(build_net(cfg, {"clinical": 5, "wsi": 6}, out_dim=1).linear) == 0


def _batch(n, events, d=6, n_tiles=4):
    items = []
    for i in range(n):
        items.append({"pos": i, "time": float(10 - i), "event": float(events[i]),
                      "present": {"clinical": True, "wsi": True},
                      "clinical": torch.randn(3), "wsi": torch.randn(n_tiles + i, d)})
    return collate_patients(items)


@pytest.mark.parametrize("n,events", [(1, [1]), (1, [0]), (4, [0, 0, 0, 0]), (3, [1, 1, 1])])
def test_cox_training_step_is_finite_on_degenerate_batches(n, events):
    torch.manual_seed(0)
    net = SurvivalNet({"clinical": TabularMLP(3, 4), "wsi": ABMIL(6, 8, 4)},
                      EarlyFusion({"clinical": 4, "wsi": 8}))
    mod = SurvivalModule(net, loss="cox")
    batch = _batch(n, events)
    loss = mod._loss(net(batch)["out"], batch)[0]
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    if sum(events) == 0 or n == 1:
        assert loss.item() == 0.0   # no comparable pair: exact zero, not NaN


def test_module_cox_loss_equals_partial_likelihood_of_its_risks():
    torch.manual_seed(1)
    net = SurvivalNet({"clinical": TabularMLP(3, 4)}, LateFusion({"clinical": 4}))
    mod = SurvivalModule(net, loss="deepsurv", ties="breslow")
    batch = _batch(6, [1, 0, 1, 1, 0, 1])
    out = net(batch)["out"]
    expect = cox_ph_loss(out[:, 0], batch["time"], batch["event"], ties="breslow")
    assert mod._loss(out, batch)[0].item() == pytest.approx(expect.item())


def test_training_bags_are_subsampled_evaluation_bags_are_full():
    from netsurv.training.datamodule import Bag

    bags = {"p0": Bag(np.random.rand(50, 3).astype(np.float32), np.zeros((50, 2), np.int64),
                      np.zeros(50, np.int64), ["s"], [256], 0.5)}
    kw = dict(tab={}, present={}, time=[1.0], event=[1], feat_dim=3)
    tr = PatientDataset([0], ["p0"], bags, train=True, max_instances=8, **kw)
    ev = PatientDataset([0], ["p0"], bags, train=False, max_instances=8, **kw)
    assert tr[0]["wsi"].shape == (8, 3) and ev[0]["wsi"].shape == (50, 3)
    first, second = tr[0]["wsi"], tr[0]["wsi"]
    assert not torch.equal(first, second)   # a new subsample every time


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # emitted inside Lightning/torch
def test_snapshot_ensemble_keeps_the_selected_window_and_averages_it():
    import lightning as L

    torch.manual_seed(0)
    net = SurvivalNet({"clinical": TabularMLP(3, 4), "wsi": ABMIL(6, 8, 4)},
                      EarlyFusion({"clinical": 4, "wsi": 8}))
    mod = SurvivalModule(net, loss="cox", lr=3e-2, select_after=2, smooth=3, snapshots=True)
    train = [_batch(8, [1, 0, 1, 1, 0, 1, 1, 0]) for _ in range(2)]
    val = [_batch(8, [1, 1, 0, 1, 0, 1, 1, 1])]
    states = []

    class Record(L.Callback):  # weights after each epoch's validation, recorded independently
        def on_train_epoch_end(self, trainer, pl_module):
            states.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    trainer = L.Trainer(max_epochs=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Record()])
    def loader(batches):  # ready-made batches, one per step
        return torch.utils.data.DataLoader(batches, batch_size=None)

    trainer.fit(mod, train_dataloaders=loader(train), val_dataloaders=loader(val))
    h = mod.val_history
    assert len(h) == len(states) == 8
    smooth = [np.mean(h[max(0, e - 2):e + 1]) for e in range(2, 8)]
    best = 2 + int(np.argmax(smooth))  # first maximum, as ModelCheckpoint(mode="max")
    assert len(mod.best_snapshots) == 3
    for snap, ref in zip(mod.best_snapshots, states[best - 2:best + 1]):
        assert all(torch.equal(snap[k], ref[k]) for k in ref)
    # ensemble prediction = mean of the three nets' outputs, weights restored afterwards
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pred = mod.predict_snapshots(loader(val), mod.best_snapshots)
    outs = []
    for st in states[best - 2:best + 1]:
        net.load_state_dict(st)
        net.eval()
        with torch.no_grad():
            outs.append(net(val[0])["out"].numpy())
    np.testing.assert_allclose(pred["out"], np.mean(outs, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["risk"], pred["out"][:, 0], rtol=1e-6)
    assert len(pred["attention"]) == 8 and pred["attention"][3].shape == (7,)
    net.load_state_dict(before)
    assert all(torch.equal(mod.net.state_dict()[k], before[k]) for k in before)
