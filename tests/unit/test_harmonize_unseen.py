"""ComBat on a batch unseen in training (``unseen="estimate"``): the new batch's location/scale
are estimated from its own rows against the fixed training reference."""
import warnings

import numpy as np
import pandas as pd
import pytest

from netsurv.features.harmonize import ComBat


def make(seed=0, p=8):
    rng = np.random.default_rng(seed)
    sizes = {"A": 30, "B": 25, "Z": 20, "Y": 1}
    shift = {"A": 0.0, "B": 1.0, "Z": 6.0, "Y": 3.0}
    scale = {"A": 1.0, "B": 1.5, "Z": 3.0, "Y": 1.0}
    rows, batch = [], []
    for b, n in sizes.items():
        rows.append(shift[b] + scale[b] * rng.normal(size=(n, p)))
        batch += [b] * n
    X = pd.DataFrame(np.vstack(rows), columns=[f"f{k}" for k in range(p)])
    X.index = [f"p{i:03d}" for i in range(len(X))]
    return X, pd.Series(batch, index=X.index, name="scanner")


def test_unseen_batch_is_estimated_without_outcomes_and_without_nan():
    X, b = make()
    tr = b.isin(["A", "B"])
    cb = ComBat(unseen="estimate", eb=False, unseen_min_cases=10).fit(X[tr], meta=b[tr])
    new = b == "Z"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = cb.transform(X[new], meta=b[new])
    assert np.isfinite(out.to_numpy()).all()
    assert any("'Z' not seen in training: location/scale estimated from its own 20 rows"
               in str(x.message) for x in w)
    assert cb.unseen_report_ == {"Z": {"n": 20, "action": "estimated from its own rows",
                                       "few_cases": False}}
    # independent: without EB, the new batch is standardised against the training reference
    # (grand mean, pooled sd) and its own mean / sd (ddof=1) are removed
    gm, sd = cb.grand_mean_.to_numpy(), np.sqrt(cb.var_pooled_.to_numpy())
    z = (X[new].to_numpy() - gm) / sd
    want = (z - z.mean(0)) / z.std(0, ddof=1) * sd + gm
    np.testing.assert_allclose(out.to_numpy(), want, rtol=1e-10)
    # training rows are unaffected by the unseen batch being in the same call
    both = cb.transform(X[tr | new], meta=b[tr | new])
    np.testing.assert_allclose(both.loc[tr[tr].index], cb.transform(X[tr], meta=b[tr]))
    np.testing.assert_allclose(both.loc[new[new].index], out)


def test_unseen_batch_with_eb_lands_on_the_reference_and_pass_does_not():
    X, b = make(1)
    tr = b.isin(["A", "B"])
    new = b == "Z"
    est = ComBat(unseen="estimate").fit(X[tr], meta=b[tr])
    passed = ComBat(unseen="pass").fit(X[tr], meta=b[tr])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e, p = est.transform(X[new], meta=b[new]), passed.transform(X[new], meta=b[new])
    ref = est.transform(X[tr], meta=b[tr])
    # harmonised: the batch's mean within 0.5 of the training reference's (it was 6 away)
    assert np.abs(e.mean() - ref.mean()).max() < 0.5
    assert np.abs(p.mean() - ref.mean()).min() > 4
    np.testing.assert_allclose(p, X[new])  # "pass": unchanged


def test_tiny_unseen_batches_are_passed_or_flagged():
    X, b = make(2)
    tr = b.isin(["A", "B"])
    cb = ComBat(unseen="estimate", unseen_min_cases=10).fit(X[tr], meta=b[tr])
    sub = b.isin(["Y"]) | (b == "Z") & (np.arange(len(b)) < 60)   # Y: 1 row, Z: 5 rows
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = cb.transform(X[sub], meta=b[sub])
    msgs = " | ".join(str(x.message) for x in w)
    assert "'Y' not seen in training has 1 row" in msgs and "returned unharmonised" in msgs
    assert "fewer than unseen_min_cases=10 rows" in msgs
    assert cb.unseen_report_["Y"]["action"].startswith("passed")
    assert cb.unseen_report_["Z"] == {"n": 5, "action": "estimated from its own rows",
                                      "few_cases": True}
    np.testing.assert_allclose(out.loc[b[sub] == "Y"], X.loc[(b == "Y")])
    assert np.isfinite(out.to_numpy()).all()


def test_unseen_option_is_validated():
    X, b = make()
    with pytest.raises(ValueError, match="unseen must be one of"):
        ComBat(unseen="guess").fit(X, meta=b)
