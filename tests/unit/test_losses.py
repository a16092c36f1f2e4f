"""Survival losses vs. lifelines / scikit-survival / pycox and an independent numpy reference."""
import warnings

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from sksurv.linear_model.coxph import CoxPHOptimizer

from netsurv.survival.losses import (
    CoxPHLoss,
    LogisticHazardLoss,
    TimeBins,
    cox_ph_loss,
    cox_ph_loss_with_flag,
    hazard_to_survival,
    nll_logistic_hazard,
    risk_from_logits,
)

DT = torch.float64


def neg_log_pl_reference(eta, time, event, ties):
    """Plain O(n * events) numpy -log partial likelihood, straight from the textbook formulas."""
    eta, time, event = np.asarray(eta, float), np.asarray(time, float), np.asarray(event, bool)
    ll = 0.0
    for t in np.unique(time[event]):
        at_risk = time >= t
        dead = (time == t) & event
        d = dead.sum()
        r, dsum = np.exp(eta[at_risk]).sum(), np.exp(eta[dead]).sum()
        ll += eta[dead].sum()
        if ties == "breslow":
            ll -= d * np.log(r)
        else:
            ll -= sum(np.log(r - k / d * dsum) for k in range(d))
    return -ll


@pytest.fixture(scope="module")
def rossi():
    df = load_rossi()
    X = df.drop(columns=["week", "arrest"]).astype(float)
    cph = CoxPHFitter().fit(df, "week", "arrest")
    return dict(df=df, X=X.to_numpy(), cols=list(X.columns), T=df.week.to_numpy(float),
                E=df.arrest.to_numpy(bool), cph=cph, beta=cph.params_[X.columns].to_numpy())


def _loss(X, beta, T, E, **kw):
    return cox_ph_loss(torch.tensor(X, dtype=DT) @ torch.tensor(beta, dtype=DT), T, E,
                       **kw).item()


# ------------------------------------------------------------------------------- Cox -----
def test_efron_equals_lifelines_loglik_at_mle(rossi):
    assert rossi["df"].groupby("week").arrest.sum().max() > 1  # the data do have tied events
    ours = _loss(rossi["X"], rossi["beta"], rossi["T"], rossi["E"], ties="efron", reduction="sum")
    assert ours == pytest.approx(-rossi["cph"].log_likelihood_, rel=1e-9)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.7])
def test_efron_and_breslow_at_other_beta(rossi, scale):
    X, T, E = rossi["X"], rossi["T"], rossi["E"]
    beta = scale * rossi["beta"] + (scale > 1) * np.linspace(-0.1, 0.1, X.shape[1])
    for ties in ("efron", "breslow"):
        ours = _loss(X, beta, T, E, ties=ties, reduction="sum")
        # scikit-survival's optimiser returns the *average* over all samples
        sk = CoxPHOptimizer(X, E, T, np.zeros(X.shape[1]), ties).nlog_likelihood(beta) * len(T)
        assert ours == pytest.approx(sk, rel=1e-9)
        assert ours == pytest.approx(neg_log_pl_reference(X @ beta, T, E, ties), rel=1e-9)
    # lifelines' own Efron log-likelihood at an arbitrary beta (private helper, if present)
    cph = rossi["cph"]
    if hasattr(cph, "_get_efron_values_single"):
        import pandas as pd
        o = np.argsort(T, kind="stable")
        Xd = pd.DataFrame(X[o], columns=rossi["cols"])
        _, _, ll = cph._get_efron_values_single(Xd, pd.Series(T[o]), pd.Series(E[o]),
                                                pd.Series(np.ones(len(T))), None, beta)
        assert _loss(X, beta, T, E, reduction="sum") == pytest.approx(-ll, rel=1e-9)


def test_no_ties_efron_equals_breslow_and_mean_reduction():
    g = torch.Generator().manual_seed(0)
    eta = torch.randn(200, generator=g, dtype=DT)
    t = torch.rand(200, generator=g, dtype=DT)
    e = torch.rand(200, generator=g) < 0.6
    ef = cox_ph_loss(eta, t, e, ties="efron", reduction="sum")
    br = cox_ph_loss(eta, t, e, ties="breslow", reduction="sum")
    assert ef.item() == pytest.approx(br.item(), rel=1e-12)
    assert ef.item() == pytest.approx(neg_log_pl_reference(eta, t, e, "efron"), rel=1e-10)
    mean = cox_ph_loss(eta[:, None], t, e)  # [N, 1] accepted, mean = sum / n_events
    assert mean.item() == pytest.approx(ef.item() / e.sum().item(), rel=1e-12)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_heavy_ties_permutation_shift_and_gradcheck(ties):
    rng = np.random.default_rng(1)
    t = rng.integers(0, 6, 40).astype(float)
    e = rng.random(40) < 0.7
    e[t == t.max()] = True  # last risk set = only events (D_k == R_k edge case for Efron)
    eta = torch.tensor(rng.normal(size=40), dtype=DT, requires_grad=True)
    ref = neg_log_pl_reference(eta.detach().numpy(), t, e, ties)
    assert cox_ph_loss(eta, t, e, ties, "sum").item() == pytest.approx(ref, rel=1e-10)
    p = rng.permutation(40)
    assert cox_ph_loss(eta[p], t[p], e[p], ties, "sum").item() == pytest.approx(ref, rel=1e-10)
    assert cox_ph_loss(eta + 123.0, t, e, ties, "sum").item() == pytest.approx(ref, rel=1e-10)
    assert torch.autograd.gradcheck(lambda r: cox_ph_loss(r, t, e, ties), (eta,))


def test_lbfgs_recovers_lifelines_coefficients(rossi):
    X = torch.tensor(rossi["X"], dtype=DT)
    beta = torch.zeros(X.shape[1], dtype=DT, requires_grad=True)
    opt = torch.optim.LBFGS([beta], lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(X @ beta, rossi["T"], rossi["E"], ties="efron")
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), rossi["beta"], atol=1e-5)


def test_event_free_single_patient_and_module_flag():
    crit = CoxPHLoss()
    r = torch.randn(5, dtype=DT, requires_grad=True)
    loss = crit(r, torch.arange(5.0), torch.zeros(5))
    assert loss.item() == 0.0 and crit.last_has_events is False
    loss.backward()
    assert torch.equal(r.grad, torch.zeros(5, dtype=DT))
    _, flag = cox_ph_loss_with_flag(r, torch.arange(5.0), torch.tensor([0, 1, 0, 0, 0]))
    assert flag is True
    for ev in (0, 1):  # one patient: no comparison -> exactly 0, finite gradient
        r1 = torch.tensor([[3.0]], requires_grad=True)
        for ties in ("efron", "breslow"):
            l1 = cox_ph_loss(r1, [2.0], [ev], ties=ties)
            l1.backward()
            assert l1.item() == 0.0 and torch.isfinite(r1.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_large_risk_values_are_finite(dtype, ties):
    rng = np.random.default_rng(2)
    t = rng.integers(0, 10, 64).astype(float)
    e = rng.random(64) < 0.5
    r = torch.tensor(rng.choice([-500.0, 500.0], 64) + rng.normal(size=64), dtype=dtype,
                     requires_grad=True)
    loss = cox_ph_loss(r, t, e, ties=ties)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r.grad).all()
    if dtype == torch.float64:  # exp(+-501) is still representable in float64
        ref = neg_log_pl_reference(r.detach().numpy(), t, e, ties) / e.sum()
        assert loss.item() == pytest.approx(ref, rel=1e-9)


def test_input_validation():
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(torch.zeros(3), [1, 2, 3], [1, 1, 1], ties="exact")
    with pytest.raises(ValueError, match="lengths"):
        cox_ph_loss(torch.zeros(3), [1, 2], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        cox_ph_loss(torch.zeros(3, 2), [1, 2, 3], [1, 1, 1])


# ------------------------------------------------------------------- discrete time -----
@pytest.fixture(scope="module")
def pycox():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pc = pytest.importorskip("pycox")
        from pycox.models.loss import nll_logistic_hazard as ref_nll
        from pycox.preprocessing.label_transforms import LabTransDiscreteTime
    return dict(nll=ref_nll, LabTrans=LabTransDiscreteTime, version=pc.__version__)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_matches_pycox(pycox, reduction):
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        logits = (3 * torch.randn(300, 12, generator=g)).to(dtype)
        idx = torch.randint(0, 12, (300,), generator=g)
        ev = (torch.rand(300, generator=g) < 0.5).to(dtype)  # pycox needs matching dtypes
        ours = nll_logistic_hazard(logits, idx, ev, reduction)
        ref = pycox["nll"](logits, idx, ev, reduction)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(LogisticHazardLoss()(logits, idx, ev), pycox["nll"](logits, idx, ev))


def _survival_data(n, seed, integer):
    rng = np.random.default_rng(seed)
    t = rng.exponential(10, n)
    t = np.ceil(t) if integer else t
    return t, rng.random(n) < 0.6


@pytest.mark.parametrize("n_bins", [4, 10, 30, 60])
@pytest.mark.parametrize("integer", [False, True])
def test_time_bins_match_pycox(pycox, n_bins, integer):
    t_tr, e_tr = _survival_data(500, 4, integer)
    t_te, e_te = _survival_data(300, 5, integer)
    t_te[:3] = [0.0, t_tr.max(), t_tr.max() + 5]  # time zero, last edge, beyond the horizon
    e_te[:3] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn identically when edges collapse
        lt = pycox["LabTrans"](n_bins, scheme="quantiles").fit(t_tr, e_tr)
        tb = TimeBins(n_bins, "quantiles").fit(t_tr, e_tr)
    np.testing.assert_array_equal(tb.edges_, lt.cuts)
    assert tb.n_bins_ == lt.out_features
    for t, e in ((t_tr, e_tr), (t_te, e_te)):
        idx, ev = tb.transform(t, e)
        idx_ref, ev_ref = lt.transform(t, e)
        np.testing.assert_array_equal(idx, idx_ref)
        np.testing.assert_array_equal(ev, ev_ref)
    eq = pycox["LabTrans"](n_bins, scheme="equidistant").fit(t_tr, e_tr)
    np.testing.assert_allclose(TimeBins(n_bins, "equidistant").fit(t_tr, e_tr).edges_, eq.cuts)


def test_time_bins_documented_properties():
    t, e = _survival_data(400, 6, False)
    tb = TimeBins().fit(t, e, n_bins=8)
    edges = tb.edges_
    assert edges[0] == 0 and edges[-1] == t.max() and (np.diff(edges) > 0).all()
    assert tb.n_bins_ == 8
    # edges depend on the training split only; test data never move them
    t_te = np.array([0.0, edges[2], edges[2] + 1e-9, (edges[2] + edges[3]) / 2, t.max() * 2])
    idx, ev = tb.transform(t_te, np.ones(5))
    assert idx.tolist() == [0, 2, 3, 3, 7] and ev.tolist() == [1, 1, 1, 1, 0]
    idx, _ = tb.transform(t_te, np.zeros(5))  # censored -> last edge <= t (left edge)
    assert idx.tolist() == [0, 2, 2, 2, 7]
    with pytest.warns(UserWarning, match="duplicate edges"):
        TimeBins(50).fit(np.ceil(t / 5), e)
    with pytest.raises(RuntimeError):
        TimeBins().transform(t, e)


def test_default_edges_use_uncensored_training_times_only():
    t, e = _survival_data(400, 7, False)
    tb = TimeBins(6).fit(t, e)
    np.testing.assert_allclose(tb.edges_[1:-1], np.quantile(t[e.astype(bool)], [0.2, 0.4, 0.6, 0.8]))
    assert tb.edges_[0] == 0 and tb.edges_[-1] == t.max()
    # moving censored times (below the horizon) leaves the interior edges where they were
    t2 = t.copy()
    cens = ~e.astype(bool) & (t < t.max())
    t2[cens] = t2[cens] * 0.5
    np.testing.assert_array_equal(TimeBins(6).fit(t2, e).edges_[1:-1], tb.edges_[1:-1])


def test_survival_monotone_and_risk():
    logits = torch.cat([torch.randn(50, 15, dtype=DT) * 4, torch.full((1, 15), 60.0, dtype=DT),
                        torch.full((1, 15), -60.0, dtype=DT)])
    s = hazard_to_survival(logits)
    assert ((s >= 0) & (s <= 1)).all() and (s.diff(dim=1) <= 0).all()
    h = torch.sigmoid(logits)
    torch.testing.assert_close(s, torch.cumprod(1 - h, 1))
    edges = np.linspace(0, 28, 15)
    risk = risk_from_logits(logits, edges)
    torch.testing.assert_close(risk, -(s[:, :-1] * 2.0).sum(1))
    assert risk[-2] > risk[-1]  # always-dying patient ranks above never-dying one
    # raising every hazard raises the risk
    up, base = risk_from_logits(logits + 0.5), risk_from_logits(logits)
    assert (up[:50] > base[:50]).all() and (up >= base).all()  # saturated rows may tie


# ------------------------------------------------------------ extreme but finite risks -----
def neg_log_pl_mpmath(eta, time, event, ties):
    """The textbook -log partial likelihood in 60-digit arithmetic (exp(+-1e4) representable)."""
    import mpmath

    mpmath.mp.dps = 60
    eta = [mpmath.mpf(float(v)) for v in eta]
    time, event = np.asarray(time, float), np.asarray(event, bool)
    ll = mpmath.mpf(0)
    for t in np.unique(time[event]):
        risk_set = [eta[i] for i in np.flatnonzero(time >= t)]
        dead = [eta[i] for i in np.flatnonzero((time == t) & event)]
        r = mpmath.fsum(mpmath.exp(v) for v in risk_set)
        dsum = mpmath.fsum(mpmath.exp(v) for v in dead)
        ll += mpmath.fsum(dead)
        d = len(dead)
        if ties == "breslow":
            ll -= d * mpmath.log(r)
        else:
            ll -= mpmath.fsum(mpmath.log(r - mpmath.mpf(k) / d * dsum) for k in range(d))
    return float(-ll)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_latest_censored_with_very_low_risk_is_finite(dtype, ties):
    # the case: Efron was NaN for risks [0, 0, -1e4] in float32 (0 * inf in frac * ratio);
    # a patient with risk -1e4 adds nothing to any risk set, so the loss is the 2-patient loss
    r = torch.tensor([0.0, 0.0, -1e4], dtype=dtype, requires_grad=True)
    loss = cox_ph_loss(r, [1.0, 2.0, 3.0], [1, 1, 0], ties=ties)
    loss.backward()
    two = cox_ph_loss(torch.zeros(2, dtype=dtype), [1.0, 2.0], [1, 1], ties=ties)
    assert torch.isfinite(loss) and torch.isfinite(r.grad).all()
    assert loss.item() == pytest.approx(two.item(), rel=1e-6) == pytest.approx(np.log(2) / 2)
    torch.testing.assert_close(r.grad, torch.tensor([-0.25, 0.25, 0.0], dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_risks_spanning_1e4_are_finite_and_exact(dtype, ties):
    rng = np.random.default_rng(5)
    for trial in range(20):
        n = 30
        t = rng.integers(0, 6, n).astype(float)                   # heavy ties
        e = rng.random(n) < 0.5
        e[0] = True
        eta = rng.choice([-1e4, -1e3, -100.0, 0.0, 100.0, 1e3, 1e4], n) + rng.normal(size=n)
        r = torch.tensor(eta, dtype=dtype, requires_grad=True)
        loss = cox_ph_loss(r, t, e, ties=ties, reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(r.grad).all(), (trial, loss)
        ref = neg_log_pl_mpmath(r.detach().double().numpy(), t, e, ties)
        # float32 rounds risks of 1e4 to ~1e-3; the loss is a sum of such differences
        tol = dict(rel=1e-9, abs=1e-6) if dtype == torch.float64 else dict(rel=1e-5, abs=0.05)
        assert loss.item() == pytest.approx(ref, **tol), trial


def test_breslow_loglik_of_coxnet_is_finite_and_exact():
    from netsurv.survival.coxnet import breslow_loglik

    # the latest patient, censored, with risk -1e4 while another has +1e4: was NaN (log(0) * 0)
    eta3, t3, e3 = np.array([1e4, 0.0, -1e4]), np.array([1.0, 2.0, 3.0]), np.array([1, 1, 0])
    assert breslow_loglik(eta3, t3, e3) == pytest.approx(
        -neg_log_pl_mpmath(eta3, t3, e3, "breslow"), rel=1e-12)
    rng = np.random.default_rng(6)
    t = rng.integers(0, 8, 40).astype(float)
    e = (rng.random(40) < 0.5).astype(int)
    e[0] = 1
    eta = rng.choice([-1e4, 0.0, 1e4], 40) + rng.normal(size=40)  # was NaN (log(0) * 0)
    ll = breslow_loglik(eta, t, e)
    assert np.isfinite(ll)
    assert ll == pytest.approx(-neg_log_pl_mpmath(eta, t, e, "breslow"), rel=1e-12)
    assert ll == pytest.approx(-cox_ph_loss(torch.tensor(eta, dtype=DT), t, e, "breslow",
                                            "sum").item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Loss objects: the training module uses the object; no loss-name switches elsewhere
# --------------------------------------------------------------------------------------------
def test_make_loss_builds_the_objects_and_rejects_unknown_names():
    from netsurv.survival.losses import LOSSES, canonical_loss, make_loss

    cox = make_loss("deepsurv", ties="breslow")
    assert isinstance(cox, CoxPHLoss) and cox.ties == "breslow" and cox.out_dim == 1
    assert cox.name == canonical_loss("deepsurv") == "cox" and cox.classical
    nll = make_loss("nll", edges=[0.0, 1.0, 3.0])
    assert isinstance(nll, LogisticHazardLoss) and nll.needs_bins and nll.out_dim == 3
    assert set(LOSSES) == {"cox", "deepsurv", "nll"}
    with pytest.raises(ValueError, match=r"loss='weibull': choose one of \['cox', 'deepsurv', "
                                         r"'nll'\]"):
        make_loss("weibull")


def test_module_calls_the_loss_object_it_was_given():
    from netsurv.survival.losses import SurvivalLoss
    from netsurv.training.module import SurvivalModule

    class Recording(SurvivalLoss):  # no ``names``: not registered in LOSSES
        name = "recording"
        sync_log = False

        def __init__(self):
            super().__init__()
            self.calls = []

        @property
        def out_dim(self):
            return 2

        def risk(self, out):
            return out.sum(1)

        def batch_loss(self, out, batch):
            self.calls.append(batch["tag"])
            return (out ** 2).mean(), batch["tag"] != "eventless", out.shape[0]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, batch):
            return {"out": self.lin(batch["x"])}

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    crit = Recording()
    mod = SurvivalModule(Net(), loss=crit)
    mod.net.lin = net
    mod.log = lambda *a, **k: None  # no Trainer attached
    x = torch.randn(4, 3)
    loss = mod.training_step({"x": x, "tag": "b0"}, 0)
    mod.training_step({"x": x, "tag": "eventless"}, 1)
    assert mod.criterion is crit and crit.calls == ["b0", "eventless"]
    assert torch.equal(loss, (net(x) ** 2).mean()) and mod.eventless_batches == 1
    assert torch.equal(mod.risk(net(x)), net(x).sum(1)) and mod._out_dim() == 2
    assert mod.loss_name == "recording" and mod.edges is None
    with pytest.raises(TypeError, match="loss object"):
        SurvivalModule(net, loss=crit, edges=[0.0, 1.0])
    # a name builds the registered object with the module's ties / edges
    named = SurvivalModule(net, loss="nll", edges=[0.0, 2.0])
    assert isinstance(named.criterion, LogisticHazardLoss)
    assert np.array_equal(named.edges, [0.0, 2.0])


def _loss_name_compares(source: str, filename: str = "<snippet>") -> list[str]:
    """``file:line`` of every comparison of a loss name literal ("cox", "nll", "deepsurv"), also
    as a member of a literal tuple/list/set (``x in ("cox", ...)``) or a ``case "cox":``."""
    import ast

    names = {"cox", "nll", "deepsurv"}

    def is_name(node):
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(e) for e in node.elts)
        return False

    def switches(node):
        if isinstance(node, ast.Compare):
            return any(map(is_name, [node.left, *node.comparators]))
        return isinstance(node, ast.MatchValue) and is_name(node.value)

    return [f"{filename}:{node.lineno}" for node in ast.walk(ast.parse(source, filename))
            if switches(node)]


def test_loss_name_check_catches_string_switches():
    snippet = ('if loss == "cox":\n    pass\nout = 1 if "nll" != name else 2\n'
               'ok = name in ("deepsurv", "x")\nmatch name:\n    case "cox":\n        pass\n'
               'fine = make_loss(name).name\ntext = "cox"\n')
    assert sorted(_loss_name_compares(snippet)) == [f"<snippet>:{i}" for i in (1, 3, 4, 6)]


def test_no_module_outside_losses_switches_on_a_loss_name():
    """Per-loss behaviour lives on the loss objects (netsurv.survival.losses): anywhere else a
    comparison with "cox" / "nll" is a name switch that a new loss would have to extend."""
    from pathlib import Path

    import netsurv

    root = Path(netsurv.__file__).parent
    losses = root / "survival" / "losses.py"
    files = sorted(p for p in root.rglob("*.py") if p != losses)
    assert len(files) > 20
    hits = [h for p in files
            for h in _loss_name_compares(p.read_text(encoding="utf-8"), str(p.relative_to(root.parent)))]
    assert hits == []
