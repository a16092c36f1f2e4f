"""ComBat: agreement with neuroCombat (the reference Python port of sva::ComBat) on training
data, and fit-on-train / apply-on-test behaviour that neuroCombat does not offer."""
import contextlib
import io
import time

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kruskal

from netsurv.features.harmonize import ComBat

COV = dict(covariates=["age"], categorical_covariates=["sex", "hist"])


def make_data(seed=0, sizes=(12, 25, 33, 18), p=40, age_shift=(0, 0, 0, 0)):
    """Batches of unequal sizes with batch-specific shift and scale, an age (numeric) and a sex
    (categorical) effect on every feature, and a 3-level categorical (histology)."""
    rng = np.random.default_rng(seed)
    labels = [f"s{i + 1}" for i in range(len(sizes))]
    batches = np.repeat(labels, sizes)
    n = len(batches)
    # float32-representable ages: neuroCombat casts numeric covariates to float32
    age = (rng.normal(60, 8, n) + np.repeat(age_shift[:len(sizes)], sizes))
    age = age.astype(np.float32).astype(float)
    sex = rng.choice(["F", "M"], n)
    hist = rng.choice(["ac", "lc", "sq"], n)
    base = rng.normal(0, 5, p)
    shift = {b: rng.normal(0, 1.5, p) for b in labels}
    scale = {b: rng.uniform(0.5, 2.0, p) for b in labels}
    X = np.array([base + 0.05 * age[j] + 1.0 * (sex[j] == "M") + shift[batches[j]]
                  + scale[batches[j]] * rng.normal(size=p) for j in range(n)])
    idx = [f"p{i:03d}" for i in range(n)]
    return (pd.DataFrame(X, index=idx, columns=[f"f{k}" for k in range(p)]),
            pd.DataFrame({"scanner": batches, "age": age, "sex": sex, "hist": hist}, index=idx))


def run_neurocombat(X, meta, **kw):
    nc = pytest.importorskip("neuroCombat")
    with contextlib.redirect_stdout(io.StringIO()):            # it prints progress
        out = nc.neuroCombat(X.to_numpy().T.copy(), meta.reset_index(drop=True), "scanner",
                             categorical_cols=["sex", "hist"], continuous_cols=["age"], **kw)
    return out["data"].T, out["estimates"]


MODES = {
    "parametric-eb": {},
    "nonparametric-eb": dict(parametric=False),
    "no-eb": dict(eb=False),
    "mean-only": dict(mean_only=True),
    "mean-only-nonparametric": dict(mean_only=True, parametric=False),
    "ref-batch": dict(ref_batch="s2"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_neurocombat(mode, monkeypatch):
    kw = MODES[mode]
    # neuroCombat's ref_batch path uses np.int, removed in numpy 2
    monkeypatch.setattr(np, "int", int, raising=False)
    X, meta = make_data()
    ref, est = run_neurocombat(X, meta, **kw)
    cb = ComBat(**COV, **kw)
    out = cb.fit_transform(X, meta=meta)
    assert list(out.columns) == list(X.columns) and list(out.index) == list(X.index)
    assert np.abs(out.to_numpy() - ref).max() < 1e-6
    np.testing.assert_allclose(cb.gamma_star_.to_numpy(), np.asarray(est["gamma.star"], float),
                               atol=1e-8)
    np.testing.assert_allclose(cb.delta_star_.to_numpy(), np.asarray(est["delta.star"], float),
                               rtol=1e-8)
    np.testing.assert_allclose(cb.var_pooled_.to_numpy(), est["var.pooled"].ravel(), rtol=1e-8)


def test_transform_of_new_rows_uses_stored_estimates():
    X, meta = make_data(seed=1)
    rng = np.random.default_rng(0)
    test = rng.permutation(X.index)[:20]
    train = X.index.difference(test)
    cb = ComBat(**COV).fit(X.loc[train], meta=meta)
    # refitting on the same rows and transforming them == fit_transform; meta may be a superset
    # of X's rows in any order
    np.testing.assert_allclose(cb.transform(X.loc[train], meta=meta.sample(frac=1, random_state=0)),
                               ComBat(**COV).fit_transform(X.loc[train], meta=meta.loc[train]),
                               atol=1e-12)
    out = cb.transform(X.loc[test], meta=meta)
    m = meta.loc[test]
    design = pd.DataFrame({"sex_M": (m.sex == "M").astype(float),
                           "hist_lc": (m["hist"] == "lc").astype(float),
                           "hist_sq": (m["hist"] == "sq").astype(float), "age": m.age})
    assert cb.design_columns_ == list(design.columns)
    mod = design.to_numpy() @ cb.beta_.to_numpy()
    gm, sd = cb.grand_mean_.to_numpy(), np.sqrt(cb.var_pooled_.to_numpy())
    g = cb.gamma_star_.loc[m.scanner].to_numpy()
    d = cb.delta_star_.loc[m.scanner].to_numpy()
    by_hand = gm + mod + (X.loc[test].to_numpy() - gm - mod - g * sd) / np.sqrt(d)
    np.testing.assert_allclose(out.to_numpy(), by_hand, atol=1e-10)
    # the estimates came from the training rows only
    cb_all = ComBat(**COV).fit(X, meta=meta)
    assert not np.allclose(cb_all.gamma_star_, cb.gamma_star_)


def test_unseen_batch_pass_warns_and_returns_rows_unchanged():
    X, meta = make_data(seed=2)
    cb = ComBat(**COV).fit(X, meta=meta)
    new_meta = meta.iloc[:3].copy()
    new_meta["scanner"] = ["s1", "new-ct", "new-ct"]
    with pytest.warns(UserWarning, match=r"not seen in training: 'new-ct' \(2 rows\)"):
        out = cb.transform(X.iloc[:3], meta=new_meta)
    np.testing.assert_allclose(out.iloc[1:], X.iloc[1:3], atol=1e-12)
    np.testing.assert_allclose(out.iloc[:1], cb.transform(X.iloc[:1], meta=meta), atol=1e-12)
    with pytest.raises(ValueError, match="new-ct"):
        ComBat(**COV, unseen="error").fit(X, meta=meta).transform(X.iloc[:3], meta=new_meta)


def test_single_sample_batch_is_location_only_with_warning():
    X, meta = make_data(seed=3, sizes=(15, 20, 1, 18))
    with pytest.warns(UserWarning, match=r"\['s3'\] have a single training sample"):
        cb = ComBat(**COV).fit(X, meta=meta)
    assert (cb.delta_star_.loc["s3"] == 1).all() and (cb.delta_star_.loc["s1"] != 1).all()
    # location-only posterior, as sva's mean-only ComBat: (t2 g + g_bar) / (t2 + 1)
    t2, gbar = cb.t2_["s3"], cb.gamma_bar_["s3"]
    np.testing.assert_allclose(cb.gamma_star_.loc["s3"],
                               (t2 * cb.gamma_hat_.loc["s3"] + gbar) / (t2 + 1))
    assert np.isfinite(cb.transform(X, meta=meta).to_numpy()).all()
    for kw in (dict(parametric=False), dict(eb=False)):
        with pytest.warns(UserWarning, match="single training sample"):
            out = ComBat(**COV, **kw).fit_transform(X, meta=meta)
        assert np.isfinite(out.to_numpy()).all()


def test_covariate_effect_preserved_batch_effect_removed():
    # age differs between scanners, so harmonising without the covariate would remove part of
    # the (biological) age effect along with the scanner effect
    X, meta = make_data(seed=4, sizes=(40, 40, 40), p=30, age_shift=(-8, 0, 8))
    X["bio"] = (0.2 * meta.age + 2.0 * (meta.sex == "M")
                + meta.scanner.map({"s1": 0.0, "s2": 3.0, "s3": -2.0})
                + np.random.default_rng(0).normal(0, 1, len(X)))

    def stats(df):
        slope, sex_eff = np.linalg.lstsq(
            np.column_stack([np.ones(len(df)), meta.age, meta.sex == "M"]).astype(float),
            df["bio"], rcond=None)[0][1:]
        resid = df["bio"] - slope * meta.age - sex_eff * (meta.sex == "M")
        p = kruskal(*[resid[meta.scanner == b] for b in ("s1", "s2", "s3")]).pvalue
        return slope, sex_eff, p

    _, _, p_before = stats(X)
    assert p_before < 1e-10
    slope, sex_eff, p_after = stats(ComBat(**COV).fit_transform(X, meta=meta))
    assert p_after > 0.5
    assert slope == pytest.approx(0.2, abs=0.04) and sex_eff == pytest.approx(2.0, abs=0.5)
    # without the covariates, ComBat mistakes part of the age effect for a scanner effect: the
    # age slope is eroded and age-adjusted scanner differences are re-introduced
    slope_nocov, _, p_nocov = stats(ComBat().fit_transform(X, meta=meta))
    assert slope_nocov < slope - 0.03 and p_nocov < 1e-4


def test_constant_feature_passthrough_and_nan_error():
    X, meta = make_data(seed=5, p=10)
    X["const"] = 3.0
    with pytest.warns(UserWarning, match=r"\['const'\] have zero variance"):
        cb = ComBat(**COV).fit(X, meta=meta)
    new = X.iloc[:5].copy()
    new["const"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    out = cb.transform(new, meta=meta)
    assert (out["const"] == new["const"]).all() and cb.passthrough_ == ["const"]
    # the other features are unaffected by the extra constant column
    np.testing.assert_allclose(out.drop(columns="const"),
                               ComBat(**COV).fit(X.drop(columns="const"), meta=meta)
                               .transform(new.drop(columns="const"), meta=meta), atol=1e-12)
    bad = X.copy()
    bad.iloc[0, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in feature column\(s\) \['f2'\]"):
        ComBat(**COV).fit(bad, meta=meta)


def test_input_errors_and_unseen_covariate_level():
    X, meta = make_data(seed=6, p=8)
    with pytest.raises(ValueError, match="needs `meta`"):
        ComBat().fit(X)
    with pytest.raises(KeyError, match=r"\['site'\] not in meta"):
        ComBat(batch_col="site").fit(X, meta=meta)
    confounded = meta.assign(grp=meta.scanner.map({"s1": "a", "s2": "a", "s3": "b", "s4": "b"}))
    with pytest.raises(ValueError, match="rank-deficient"):
        ComBat(categorical_covariates=["grp"]).fit(X, meta=confounded)
    cb = ComBat(**COV).fit(X, meta=meta)
    with pytest.raises(ValueError, match="columns differ"):
        cb.transform(X.drop(columns="f1"), meta=meta)
    with pytest.warns(UserWarning, match=r"'hist' level\(s\) \['sclc'\] not seen"):
        cb.transform(X.iloc[:2], meta=meta.iloc[:2].assign(hist=["sclc", "ac"]))
    # batch labels as a Series when there are no covariates
    np.testing.assert_allclose(ComBat().fit_transform(X, meta=meta.scanner),
                               ComBat().fit_transform(X, meta=meta), atol=1e-12)


def test_nonparametric_is_fast_for_radiomics_sizes():
    X, meta = make_data(seed=7, sizes=(20, 30, 25, 25), p=1500)
    t0 = time.perf_counter()
    out = ComBat(**COV, parametric=False).fit_transform(X, meta=meta)
    assert time.perf_counter() - t0 < 5
    assert np.isfinite(out.to_numpy()).all()
