"""Inner search of the classical pipeline: pooled out-of-fold C and the penalty chosen on its folds."""
import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import RepeatedStratifiedKFold
from sksurv.util import Surv

from netsurv.features.clinical import ClinicalEncoder
from netsurv.models.classical import (
    ClassicalPipeline,
    ImagingBlock,
    inner_search,
    pooled_cindex,
    take_rows,
)
from netsurv.survival.coxnet import CoxNet
from netsurv.survival.metrics import harrell_cindex


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(3)
    n = 120
    ids = [f"P{i:03d}" for i in range(n)]
    clin = pd.DataFrame({"age": rng.normal(60, 8, n), "grp": rng.choice(["a", "b"], n)}, index=ids)
    genes = pd.DataFrame(rng.normal(size=(n, 6)), index=ids, columns=[f"g{i}" for i in range(6)])
    eta = (0.8 * genes.g0 - 0.6 * genes.g1 + 0.03 * (clin.age - 60)).to_numpy()
    t_ev = rng.exponential(np.exp(-eta))
    t_c = rng.exponential(1.5, n)
    time = np.minimum(t_ev, t_c)
    event = (t_ev <= t_c).astype(int)
    return {"clinical": clin, "genes": genes}, time, event


def _y(time, event):
    return Surv.from_arrays(np.asarray(event).astype(bool), time)


def _pipe(model):
    return ClassicalPipeline(clinical_encoder=ClinicalEncoder(["age"], ["grp"], True),
                             imaging={"genes": ImagingBlock(corr_threshold=0.9)}, model=model, k=2)


def _oof(frames, time, event, model, k, repeats=1, seed=0):
    """Out-of-fold risks per repeat, refitting the whole pipeline on each inner fold."""
    folds = RepeatedStratifiedKFold(n_splits=3, n_repeats=repeats, random_state=seed)
    out = [np.full(len(event), np.nan) for _ in range(repeats)]
    fold_cs = []
    for f, (tr, va) in enumerate(folds.split(np.zeros(len(event)), event)):
        p = _pipe(model).set_params(k=k)
        risk = p.fit(take_rows(frames, tr), _y(time[tr], event[tr])).predict(take_rows(frames, va))
        out[f // 3][va] = risk
        fold_cs.append(harrell_cindex(time[va], event[va], risk))
    return out, fold_cs


def test_pooled_cindex_is_harrell_over_concatenated_oof_risks(cohort):
    frames, time, event = cohort
    model = CoxNet(l1_ratio=0.5, alpha=0.05)  # fixed penalty: the grid is k only
    best, table = inner_search(_pipe(model), frames, _y(time, event), {"k": [1, 3]}, repeats=2)
    for k in (1, 3):
        oof, _ = _oof(frames, time, event, model, k, repeats=2)
        expected = np.mean([harrell_cindex(time, event, r) for r in oof])
        assert table.set_index("k").loc[k, "cindex"] == pytest.approx(expected, abs=1e-12)
        assert 0.6 < expected < 0.9
    assert best == {"k": table.k[table.cindex.idxmax()]}
    assert pooled_cindex(time, event, np.zeros(len(time))) == 0.5


def test_mean_score_is_mean_of_fold_cindex(cohort):
    frames, time, event = cohort
    model = CoxNet(l1_ratio=0.5, alpha=0.05)
    _, table = inner_search(_pipe(model), frames, _y(time, event), {"k": [3]}, score="mean")
    _, fold_cs = _oof(frames, time, event, model, 3)
    assert table.cindex[0] == pytest.approx(np.mean(fold_cs), abs=1e-12)
    with pytest.raises(ValueError, match="score"):
        inner_search(_pipe(model), frames, _y(time, event), {"k": [3]}, score="median")


def test_penalty_chosen_on_the_inner_folds(cohort):
    """CoxNet(alpha=None): alpha comes from the path of all the given rows, scored by pooled OOF C
    of fold fits along that path, jointly with k and l1_ratio."""
    frames, time, event = cohort
    pipe = _pipe(CoxNet(alpha=None))
    best, table = inner_search(pipe, frames, _y(time, event),
                               {"k": [2, "all"], "l1_ratio": [0.5, 0.9]})
    assert set(best) == {"k", "l1_ratio", "alpha"} and len(table) == 4
    row = table[(table.k.astype(str) == str(best["k"])) & (table.l1_ratio == best["l1_ratio"])]
    assert row.cindex.iloc[0] == table.cindex.max()
    # recompute the winner's score by hand
    model = CoxNet(l1_ratio=best["l1_ratio"])
    _, feats = pipe.fit_features(frames, _y(time, event))
    X = feats.design(feats.top(best["k"]))
    alphas, eligible = model.alpha_path(X.to_numpy(), time, event)
    j = int(np.flatnonzero(alphas == best["alpha"])[0])
    assert eligible[j]
    oof = np.full((len(event), len(alphas)), np.nan)
    for tr, va in RepeatedStratifiedKFold(n_splits=3, n_repeats=1, random_state=0).split(
            np.zeros(len(event)), event):
        steps, ftr = pipe.fit_features(take_rows(frames, tr), _y(time[tr], event[tr]))
        sel = ftr.top(best["k"])
        fva = pipe.transform_features(steps, take_rows(frames, va))
        coefs = model.path_coefs(ftr.design(sel).to_numpy(), time[tr], event[tr], alphas)
        oof[va] = fva.design(sel).to_numpy() @ coefs
    scores = [harrell_cindex(time, event, oof[:, i]) if np.ptp(oof[:, i]) else 0.5
              for i in range(len(alphas))]
    assert row.cindex.iloc[0] == pytest.approx(scores[j], abs=1e-12)
    assert scores[j] == pytest.approx(max(s for s, e in zip(scores, eligible) if e), abs=1e-12)
    # the chosen penalty is used as is by the final fit (no second, nested CV)
    pipe.set_params(k=best.pop("k"), model=pipe.model.set_params(**best))
    pipe.fit(frames, _y(time, event))
    assert pipe.model_.alpha_ == best["alpha"] and np.abs(pipe.model_.coef_).sum() > 0


def test_exact_ties_go_to_the_smaller_k_whatever_the_list_order(cohort):
    """Two k that select the same features tie exactly (here 6 and "all": the table has six
    genes); the smaller k wins in either list order (deep runs list their network's k first,
    e.g. [10, 5, 20, all])."""
    frames, time, event = cohort
    model = CoxNet(l1_ratio=0.5, alpha=0.05)
    res = [inner_search(_pipe(model), frames, _y(time, event), {"k": ks})
           for ks in (["all", 6, 1], [1, 6, "all"])]
    (b1, t1), (b2, t2) = res
    pd.testing.assert_frame_equal(t1, t2)
    c = t1.set_index("k").cindex
    assert c.loc[6] == c.loc["all"] > c.loc[1]  # the tie this test is about, and the best
    assert b1 == b2 == {"k": 6}
    assert list(t1.k) == [1, 6, "all"]  # searched from the smallest k up
