"""ComBat batch harmonisation of feature tables (e.g. radiomics across CT scanners).

Why a hand-written ComBat: the maintained Python ports (``neuroCombat``, ``neuroHarmonize``,
``pycombat``) either harmonise one data set in one go (no fit-on-train / apply-on-test, so test
rows would leak into the estimates), are not ``numpy>=2`` compatible, or both. This module is an
independent, vectorised implementation of Johnson, Li & Rabinovic (2007, Biostatistics 8:118)
that reproduces ``neuroCombat``/``sva::ComBat`` on the training rows (including their stopping
rule and quirks, documented inline) and stores every estimate needed to apply the *same*
correction to new rows.

Model, per feature ``g`` and sample ``j`` of batch ``i``::

    x_jg = alpha_g + c_j' beta_g + gamma_ig + sqrt(delta_ig) * sigma_g * eps_jg

``c_j`` are the biological covariates (numeric as-is, categorical one-hot with the first sorted
level as reference). Their effect ``beta`` is estimated jointly with the batch intercepts and
*added back* after the batch location/scale ``(gamma, delta)`` has been removed, so
biology is preserved while scanner effects are removed.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .select import _names, _numeric_frame

# sva/neuroCombat stopping rule of the parametric EB iteration (relative change of gamma/delta)
_CONV = 1e-4
_MAX_ITER = 1000
# a feature whose pooled residual variance is below _REL_VAR_TOL x its total variance is
# (numerically) constant once batch and covariates are accounted for: it cannot be standardised
_REL_VAR_TOL = 1e-12
UNSEEN = ("pass", "error", "estimate")


def _sorted_levels(values) -> list:
    """Sorted unique levels (as ``np.unique`` in neuroCombat); mixed types sorted by str."""
    uniq = list(pd.unique(pd.Series(values, dtype=object)))
    try:
        return sorted(uniq)
    except TypeError:
        return sorted(uniq, key=str)


class ComBat(TransformerMixin, BaseEstimator):
    """ComBat harmonisation fitted on training rows, applicable to new rows.

    Parameters
    ----------
    batch_col : column of ``meta`` holding the batch (scanner / site / protocol) label.
    covariates : numeric columns of ``meta`` whose effect on the features is preserved.
    categorical_covariates : categorical columns of ``meta`` whose effect is preserved (one-hot,
        first sorted level = reference).
    parametric : parametric (normal / inverse-gamma priors, iterative) or non-parametric
        (Monte-Carlo integration over the other features, as sva/neuroCombat) empirical Bayes.
    eb : ``False`` = plain location/scale adjustment with the per-batch estimates.
    mean_only : adjust only the batch location (``delta = 1``).
    ref_batch : keep this batch unchanged and map the others onto it (pooled variance and grand
        mean are then those of the reference batch, as in sva/neuroCombat).
    unseen : what ``transform`` does with rows whose batch was not in the training data.
        ``"pass"`` (default) warns (naming the batch and the number of rows) and applies the
        pooled standardisation with no batch correction (``gamma = 0, delta = 1``), which is
        exactly the identity: those rows are returned unharmonised. ``"error"`` raises.
        ``"estimate"`` (reference-batch style): the training fit is the fixed reference (grand
        mean, pooled variance, covariate effects); the new batch's location/scale
        ``(gamma, delta)`` are estimated from the new rows' own standardised features, with
        the same empirical-Bayes shrinkage over features as for a training batch, and removed.
        No outcome is used, and no training estimate changes. A new batch with fewer than 2
        rows cannot be estimated and is passed through (warned); one with fewer than
        ``unseen_min_cases`` rows is estimated with a warning (noisy estimates).
    unseen_min_cases : below this many rows a new batch's estimates are flagged as unreliable.

    ``fit(X, meta=meta)`` / ``transform(X, meta=meta)`` (``meta`` is keyword-only, so that
    inside a scikit-learn pipeline the outcome ``y`` can never land there): ``X`` is a numeric
    DataFrame (rows = samples, columns = features, no NaN: impute first); ``meta`` is a
    DataFrame indexed like ``X`` (it may hold more rows, e.g. the whole cohort; rows are matched
    on the index) with ``batch_col`` and the covariate columns, or a Series of batch labels when
    there are no covariates.

    Fallbacks (each with a ``UserWarning`` naming what it applies to):

    - a training batch with a single sample has no within-batch variance: that batch is adjusted
      in location only (``delta = 1``; EB shrinkage of ``gamma`` as in mean-only ComBat);
    - a feature with zero variance in the training data (after removing batch and covariate
      effects, e.g. a constant column) is passed through unchanged and excluded from the EB
      priors;
    - a categorical covariate level unseen in training is encoded as the reference level;
    - empirical Bayes needs at least two harmonisable features; with fewer, ``eb=False`` is used.

    Fitted attributes: ``batches_`` (sorted batch levels), ``n_per_batch_``,
    ``feature_names_in_``, ``design_columns_`` (covariate design columns), ``grand_mean_``,
    ``var_pooled_`` (Series over features), ``beta_`` (covariate design columns x features),
    ``gamma_hat_``, ``delta_hat_``, ``gamma_star_``, ``delta_star_`` (batches x features),
    ``gamma_bar_``, ``t2_``, ``a_prior_``, ``b_prior_`` (per batch; NaN where not used),
    ``passthrough_`` (features left unchanged), ``single_sample_batches_``.
    """

    def __init__(self, batch_col: str = "scanner", covariates=(), categorical_covariates=(),
                 parametric: bool = True, eb: bool = True, mean_only: bool = False,
                 ref_batch=None, unseen: str = "pass", unseen_min_cases: int = 10):
        self.batch_col = batch_col
        self.covariates = covariates
        self.categorical_covariates = categorical_covariates
        self.parametric = parametric
        self.eb = eb
        self.mean_only = mean_only
        self.ref_batch = ref_batch
        self.unseen = unseen
        self.unseen_min_cases = unseen_min_cases

    # ------------------------------------------------------------------ input checks
    def _check_X(self, X) -> pd.DataFrame:
        if isinstance(X, pd.DataFrame) and X.index.has_duplicates:
            raise ValueError(f"ComBat: duplicated row index {_names(X.index[X.index.duplicated()])}")
        return _numeric_frame(X, "ComBat")

    def _check_meta(self, X: pd.DataFrame, meta) -> pd.DataFrame:
        if meta is None:
            raise ValueError(f"ComBat needs `meta`: a DataFrame indexed like X with the batch "
                             f"column {self.batch_col!r} (and covariate columns)")
        if isinstance(meta, pd.Series):
            meta = meta.to_frame(self.batch_col)
        if not isinstance(meta, pd.DataFrame):
            raise TypeError("ComBat: `meta` must be a pandas DataFrame (or a Series of batch "
                            "labels) indexed like X")
        cols = [self.batch_col, *self.covariates, *self.categorical_covariates]
        missing = [c for c in cols if c not in meta.columns]
        if missing:
            raise KeyError(f"ComBat: column(s) {missing} not in meta (columns: {list(meta.columns)})")
        if meta.index.has_duplicates:
            raise ValueError("ComBat: meta has a duplicated index")
        absent = X.index.difference(meta.index)
        if len(absent):
            raise KeyError(f"ComBat: {len(absent)} row(s) of X have no meta row, e.g. "
                           f"{_names(absent, 5)}")
        meta = meta.loc[X.index, cols]
        nan_cols = [c for c in cols if meta[c].isna().any()]
        if nan_cols:
            raise ValueError(f"ComBat: missing values in meta column(s) {nan_cols} (rows "
                             f"{_names(meta.index[meta[nan_cols].isna().any(axis=1)], 5)})")
        return meta

    def _covariate_design(self, meta: pd.DataFrame, warn_unseen: bool) -> np.ndarray:
        parts = []
        for c in self.categorical_covariates:
            levels = self.categories_[c]
            vals = meta[c].to_numpy(dtype=object)
            if warn_unseen:
                new = sorted({v for v in vals if v not in set(levels)}, key=str)
                if new:
                    warnings.warn(f"ComBat: covariate {c!r} level(s) {new} not seen in training "
                                  "are encoded as the reference level", UserWarning, stacklevel=3)
            parts.append(np.column_stack([vals == lev for lev in levels[1:]]).astype(float)
                         if len(levels) > 1 else np.empty((len(meta), 0)))
        for c in self.covariates:
            try:
                parts.append(meta[c].to_numpy(dtype=float)[:, None])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"ComBat: numeric covariate {c!r} has non-numeric values; "
                                 "declare it in categorical_covariates") from exc
        return np.hstack(parts) if parts else np.empty((len(meta), 0))

    # ------------------------------------------------------------------ fit
    def fit(self, X: pd.DataFrame, y=None, *, meta=None):
        """Estimate the ComBat model on training rows ``X`` with batches/covariates in ``meta``.

        Parameters
        ----------
        X : pandas.DataFrame
            Numeric features (rows = samples, no NaN: impute first).
        y : None
            Ignored (no outcome is used); there for the scikit-learn API.
        meta : pandas.DataFrame or pandas.Series
            Keyword-only: batch column ``batch_col`` and covariates, indexed like ``X`` (it may
            hold more rows), or a Series of batch labels when there are no covariates.

        Returns
        -------
        self
        """
        if self.unseen not in UNSEEN:
            raise ValueError(f"ComBat: unseen must be one of {UNSEEN}, got {self.unseen!r}")
        Xf = self._check_X(X)
        meta = self._check_meta(Xf, meta)
        n, p = Xf.shape
        self.feature_names_in_ = np.asarray(Xf.columns, dtype=object)
        self.n_features_in_ = p

        batch = meta[self.batch_col].to_numpy(dtype=object)
        self.batches_ = np.asarray(_sorted_levels(batch), dtype=object)
        nb = len(self.batches_)
        idx = {b: i for i, b in enumerate(self.batches_)}
        bcode = np.array([idx[b] for b in batch])
        counts = np.bincount(bcode, minlength=nb)
        self.n_per_batch_ = pd.Series(counts, index=self.batches_, name="n")
        if nb < 2:
            warnings.warn(f"ComBat: a single batch {list(self.batches_)} in the training data; "
                          "nothing to harmonise across (only a variance rescaling is applied)",
                          UserWarning, stacklevel=2)
        ref = None
        if self.ref_batch is not None:
            if self.ref_batch not in idx:
                raise ValueError(f"ComBat: ref_batch {self.ref_batch!r} is not among the training "
                                 f"batches {list(self.batches_)}")
            ref = idx[self.ref_batch]
            if counts[ref] < 2:
                raise ValueError(f"ComBat: ref_batch {self.ref_batch!r} has {counts[ref]} "
                                 "training sample(s); at least 2 are needed for its variance")
        self.ref_index_ = ref

        # design = [batch one-hot (ref column all ones, as sva) | categorical one-hot | numeric]
        self.categories_ = {c: _sorted_levels(meta[c]) for c in self.categorical_covariates}
        onehot = np.zeros((n, nb))
        onehot[np.arange(n), bcode] = 1.0
        batch_design = onehot.copy()
        if ref is not None:
            batch_design[:, ref] = 1.0
        cov = self._covariate_design(meta, warn_unseen=False)
        self.design_columns_ = (
            [f"{c}_{lev}" for c in self.categorical_covariates for lev in self.categories_[c][1:]]
            + list(self.covariates))
        design = np.hstack([batch_design, cov])
        if n <= design.shape[1] or np.linalg.matrix_rank(design) < design.shape[1]:
            raise ValueError(
                "ComBat: the design (batch indicators + covariates) is rank-deficient or has no "
                "residual degrees of freedom: a covariate (level) is confounded with batch, "
                "constant, or there are too few samples")

        Xv = Xf.to_numpy()
        B_hat = np.linalg.lstsq(design, Xv, rcond=None)[0]            # (k, p)
        if ref is None:
            grand_mean = (counts / n) @ B_hat[:nb]
        else:
            grand_mean = B_hat[ref].copy()
        beta = B_hat[nb:]
        resid = Xv - design @ B_hat
        rows = slice(None) if ref is None else (bcode == ref)
        var_pooled = np.mean(resid[rows] ** 2, axis=0)

        degenerate = (np.ptp(Xv, axis=0) == 0) | (var_pooled <= _REL_VAR_TOL * Xv.var(axis=0))
        if degenerate.any():
            warnings.warn(
                f"ComBat: feature(s) {_names(Xf.columns[degenerate])} have zero variance in the "
                "training data (after removing batch/covariate effects); passed through "
                "unchanged", UserWarning, stacklevel=2)
        act = ~degenerate
        single = [b for b, c in zip(self.batches_, counts) if c == 1]
        if single:
            warnings.warn(f"ComBat: batch(es) {single} have a single training sample; no "
                          "within-batch variance can be estimated, so they are adjusted in "
                          "location only (delta = 1)", UserWarning, stacklevel=2)
        self.single_sample_batches_ = single

        # standardised data of the harmonisable features
        mod_mean = cov @ beta
        s = (Xv[:, act] - grand_mean[act] - mod_mean[:, act]) / np.sqrt(var_pooled[act])
        gamma_hat = np.linalg.lstsq(batch_design, s, rcond=None)[0]   # (nb, p_act)
        delta_hat = np.ones_like(gamma_hat)
        scale_ok = np.array([(not self.mean_only) and c > 1 for c in counts])
        for i in np.flatnonzero(scale_ok):
            delta_hat[i] = s[bcode == i].var(axis=0, ddof=1)
        delta_hat[delta_hat == 0] = 1.0        # as sva/neuroCombat: no within-batch spread

        pa = int(act.sum())
        eb = self.eb
        if eb and pa < 2:
            warnings.warn("ComBat: empirical Bayes needs at least two harmonisable features; "
                          "using eb=False", UserWarning, stacklevel=2)
            eb = False
        gamma_bar = np.full(nb, np.nan)
        t2 = np.full(nb, np.nan)
        a_prior = np.full(nb, np.nan)
        b_prior = np.full(nb, np.nan)
        if not eb:
            gamma_star, delta_star = gamma_hat.copy(), delta_hat.copy()
        else:
            gamma_bar = gamma_hat.mean(axis=1)
            t2 = gamma_hat.var(axis=1, ddof=1)
            m = delta_hat.mean(axis=1)
            s2 = delta_hat.var(axis=1, ddof=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                a_prior = np.where(scale_ok, (2 * s2 + m ** 2) / s2, np.nan)
                b_prior = np.where(scale_ok, (m * s2 + m ** 3) / s2, np.nan)
            gamma_star = np.empty_like(gamma_hat)
            delta_star = np.ones_like(delta_hat)
            for i in range(nb):
                sb = s[bcode == i]
                if self.parametric:
                    if scale_ok[i]:
                        gamma_star[i], delta_star[i] = _it_sol(
                            sb, gamma_hat[i], delta_hat[i], gamma_bar[i], t2[i], a_prior[i],
                            b_prior[i], batch=self.batches_[i])
                    else:
                        # sva/neuroCombat mean-only posterior: postmean(g, g_bar, n=1, d=1, t2)
                        gamma_star[i] = (t2[i] * gamma_hat[i] + gamma_bar[i]) / (t2[i] + 1)
                else:
                    gamma_star[i], delta_star[i] = _int_eprior(sb, gamma_hat[i], delta_hat[i])
        if ref is not None:
            gamma_star[ref] = 0.0
            delta_star[ref] = 1.0

        def full(a, fill):
            out = np.full((nb, p), fill, dtype=float)
            out[:, act] = a
            return pd.DataFrame(out, index=self.batches_, columns=Xf.columns)

        self.grand_mean_ = pd.Series(grand_mean, index=Xf.columns)
        self.var_pooled_ = pd.Series(var_pooled, index=Xf.columns)
        self.beta_ = pd.DataFrame(beta, index=self.design_columns_, columns=Xf.columns)
        self.gamma_hat_ = full(gamma_hat, 0.0)
        self.delta_hat_ = full(delta_hat, 1.0)
        self.gamma_star_ = full(gamma_star, 0.0)
        self.delta_star_ = full(delta_star, 1.0)
        self.gamma_bar_ = pd.Series(gamma_bar, index=self.batches_)
        self.t2_ = pd.Series(t2, index=self.batches_)
        self.a_prior_ = pd.Series(a_prior, index=self.batches_)
        self.b_prior_ = pd.Series(b_prior, index=self.batches_)
        self.passthrough_ = list(Xf.columns[degenerate])
        return self

    # ------------------------------------------------------------------ transform
    def transform(self, X: pd.DataFrame, *, meta=None) -> pd.DataFrame:
        """Harmonise rows of ``X`` (any split) with the training estimates.

        Each row is standardised with the training grand mean, pooled variance and covariate
        effects (computed from *its own* covariates), corrected with the estimates of its batch
        and mapped back; rows of ``ref_batch`` are returned unchanged.

        Parameters
        ----------
        X : pandas.DataFrame
            Numeric features with the training columns.
        meta : pandas.DataFrame or pandas.Series
            Keyword-only: batches/covariates of these rows (as in :meth:`fit`).

        Returns
        -------
        pandas.DataFrame
            Harmonised ``X`` (same index and columns).
        """
        check_is_fitted(self, "gamma_star_")
        Xf = self._check_X(X)
        cols = list(self.feature_names_in_)
        if set(Xf.columns) != set(cols) or len(Xf.columns) != len(cols):
            missing = [c for c in cols if c not in Xf.columns]
            extra = [c for c in Xf.columns if c not in set(cols)]
            raise ValueError(f"ComBat: X columns differ from the fitted ones (missing "
                             f"{_names(missing)}, unexpected {_names(extra)})")
        meta = self._check_meta(Xf, meta)
        Xv = Xf[cols].to_numpy()
        batch = meta[self.batch_col].to_numpy(dtype=object)
        idx = {b: i for i, b in enumerate(self.batches_)}
        bcode = np.array([idx.get(b, -1) for b in batch], dtype=int)
        self.unseen_report_ = {}
        if (bcode < 0).any():
            new = pd.Series(batch[bcode < 0]).value_counts(sort=False)
            desc = ", ".join(f"{b!r} ({k} row{'s' if k > 1 else ''})" for b, k in new.items())
            if self.unseen == "error":
                raise ValueError(f"ComBat: batch(es) not seen in training: {desc}")
            if self.unseen == "pass":
                warnings.warn(f"ComBat: batch(es) not seen in training: {desc}; these rows are "
                              "not batch-corrected (gamma = 0, delta = 1: returned unchanged)",
                              UserWarning, stacklevel=2)
                self.unseen_report_ = {str(b): {"n": int(k), "action": "passed unharmonised"}
                                       for b, k in new.items()}
        cov = self._covariate_design(meta, warn_unseen=True)
        gm = self.grand_mean_.to_numpy()
        sd = np.sqrt(self.var_pooled_.to_numpy())
        mod_mean = cov @ self.beta_.to_numpy()
        seen = bcode >= 0
        gamma = np.zeros_like(Xv)
        delta = np.ones_like(Xv)
        gamma[seen] = self.gamma_star_.to_numpy()[bcode[seen]]
        delta[seen] = self.delta_star_.to_numpy()[bcode[seen]]
        keep = ~seen
        if self.ref_index_ is not None:
            keep |= bcode == self.ref_index_
        act = ~self.var_pooled_.index.isin(self.passthrough_)
        out = Xv.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (Xv - gm - mod_mean) / sd
        if self.unseen == "estimate" and (~seen).any():
            for b in _sorted_levels(batch[~seen]):
                rows_b = batch == b
                n_b = int(rows_b.sum())
                if n_b < 2:
                    warnings.warn(f"ComBat: batch {b!r} not seen in training has {n_b} row; its "
                                  "location/scale cannot be estimated, so it is returned "
                                  "unharmonised", UserWarning, stacklevel=2)
                    self.unseen_report_[str(b)] = {"n": n_b, "action": "passed unharmonised "
                                                   "(fewer than 2 rows)"}
                    continue
                g, d = self._new_batch_estimates(s[np.ix_(rows_b, act)], b)
                gamma[np.ix_(rows_b, act)] = g
                delta[np.ix_(rows_b, act)] = d
                keep[rows_b] = False
                msg = (f"ComBat: batch {b!r} not seen in training: location/scale estimated from "
                       f"its own {n_b} rows against the training reference")
                if n_b < int(self.unseen_min_cases):
                    msg += (f"; fewer than unseen_min_cases={self.unseen_min_cases} rows, so "
                            "these estimates are noisy")
                warnings.warn(msg, UserWarning, stacklevel=2)
                self.unseen_report_[str(b)] = {
                    "n": n_b, "action": "estimated from its own rows",
                    "few_cases": bool(n_b < int(self.unseen_min_cases))}
        with np.errstate(divide="ignore", invalid="ignore"):
            adj = (s - gamma) / np.sqrt(delta) * sd + gm + mod_mean
        rows = ~keep
        out[np.ix_(rows, act)] = adj[np.ix_(rows, act)]
        res = pd.DataFrame(out, index=Xf.index, columns=cols)
        return res[list(Xf.columns)]

    def _new_batch_estimates(self, sb: np.ndarray, batch) -> tuple[np.ndarray, np.ndarray]:
        """(gamma*, delta*) of an unseen batch from its standardised rows ``sb`` (n_b x
        harmonisable features): the per-batch step of :meth:`fit` with the training model held
        fixed, EB priors taken across this batch's features as sva does for every batch."""
        n, p = sb.shape
        g_hat = sb.mean(axis=0)
        d_hat = np.ones(p) if self.mean_only else sb.var(axis=0, ddof=1)
        d_hat[d_hat == 0] = 1.0
        if not self.eb or p < 2:
            return g_hat, d_hat
        if not self.parametric:
            return _int_eprior(sb, g_hat, d_hat)
        g_bar, t2 = g_hat.mean(), g_hat.var(ddof=1)
        if self.mean_only:
            return (t2 * n * g_hat + g_bar) / (t2 * n + 1), d_hat
        m, s2 = d_hat.mean(), d_hat.var(ddof=1)
        if not s2 > 0:  # identical spreads: no prior on delta, keep the estimates
            return (t2 * n * g_hat + d_hat * g_bar) / (t2 * n + d_hat), d_hat
        a, b = (2 * s2 + m ** 2) / s2, (m * s2 + m ** 3) / s2
        return _it_sol(sb, g_hat, d_hat, g_bar, t2, a, b, batch=batch)

    def fit_transform(self, X: pd.DataFrame, y=None, *, meta=None) -> pd.DataFrame:
        """:meth:`fit` on ``X``, then :meth:`transform` it.

        Parameters
        ----------
        X : pandas.DataFrame
            Numeric training features.
        y : None
            Ignored.
        meta : pandas.DataFrame or pandas.Series
            Keyword-only: batches/covariates of these rows.

        Returns
        -------
        pandas.DataFrame
        """
        return self.fit(X, meta=meta).transform(X, meta=meta)

    def get_feature_names_out(self, input_features=None):
        """The fitted input column names: ComBat keeps every column (``input_features`` ignored)."""
        check_is_fitted(self, "feature_names_in_")
        return np.asarray(self.feature_names_in_, dtype=object)


def _it_sol(sdat, g_hat, d_hat, g_bar, t2, a, b, batch=None):
    """Parametric EB posterior (gamma*, delta*) for one batch, iterated to sva's stopping rule.

    ``sdat`` is (n_b, p). The rule, ``max(|g_new - g_old| / g_old, |d_new - d_old| / d_old) <
    1e-4`` (signed denominator included), is sva's/neuroCombat's, kept so results agree."""
    n = sdat.shape[0]
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(_MAX_ITER):
        g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
        sum2 = ((sdat - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max((np.abs(g_new - g_old) / g_old).max(),
                         (np.abs(d_new - d_old) / d_old).max())
        g_old, d_old = g_new, d_new
        if not change > _CONV:
            break
    else:
        warnings.warn(f"ComBat: parametric EB for batch {batch!r} did not converge in "
                      f"{_MAX_ITER} iterations", UserWarning, stacklevel=3)
    return g_new, d_new


def _int_eprior(sdat, g_hat, d_hat, chunk: int = 1024):
    """Non-parametric EB (sva's ``int.eprior``) for one batch, vectorised over features.

    For feature ``i``, gamma*/delta* are averages of the other features' (gamma_hat, delta_hat)
    weighted by the likelihood of feature ``i``'s data under them. Sum of squares uses the
    centred form ``SS_i + n (mean_i - g_k)^2`` and weights are normalised in log space, so there
    is no underflow for large batches (where sva/neuroCombat return NaN)."""
    n, p = sdat.shape
    mean = sdat.mean(axis=0)
    ss = ((sdat - mean) ** 2).sum(axis=0)
    log_norm = -0.5 * n * np.log(2 * np.pi * d_hat)            # (p,) over k
    g_star = np.empty(p)
    d_star = np.empty(p)
    for start in range(0, p, chunk):
        i = np.arange(start, min(start + chunk, p))
        sum2 = ss[i, None] + n * (mean[i, None] - g_hat[None, :]) ** 2
        loglh = log_norm[None, :] - sum2 / (2 * d_hat[None, :])
        loglh[np.arange(len(i)), i] = -np.inf                    # leave feature i out
        w = np.exp(loglh - loglh.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        g_star[i] = w @ g_hat
        d_star[i] = w @ d_hat
    return g_star, d_star
