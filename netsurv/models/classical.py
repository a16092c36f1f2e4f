"""The founding study's classical pipeline, leak-free.

Per training split: clinical encoding; for each imaging/feature-table modality: drop invalid
columns -> train-median imputation -> optional ComBat (batches from ct.csv) -> standardisation ->
correlation filter; then the top-k imaging features by univariate Cox score (clinical variables are
always kept) -> Cox model. ``k`` and the model's ``l1_ratio`` are chosen by an inner stratified
k-fold grid on the training split only; every step is refitted inside each inner fold. The grid is
scored by the pooled out-of-fold C-index, and a CoxNet's penalty is chosen on the same inner folds
along its path (as cv.glmnet does), jointly with ``k`` and ``l1_ratio``.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.utils.validation import check_is_fitted
from sksurv.util import Surv

from netsurv.features.select import CorrelationFilter, DropInvalid, UnivariateCoxSelector
from netsurv.features.tabular import TableScaler
from netsurv.modalities import CLINICAL
from netsurv.survival.base import SurvivalMixin, check_survival_y
from netsurv.survival.metrics import harrell_cindex


def take_rows(frames: dict[str, pd.DataFrame], idx) -> dict[str, pd.DataFrame]:
    """The same patient rows (integer positions) of every modality table."""
    return {name: frame.iloc[idx] for name, frame in frames.items()}


class ImagingBlock(TransformerMixin, BaseEstimator):
    """One numeric modality: DropInvalid -> impute+scale -> [ComBat -> rescale] -> correlation
    filter.

    Parameters
    ----------
    harmonizer : estimator or None
        Unfitted batch harmonisation step (:class:`netsurv.features.harmonize.ComBat`), cloned
        at fit time; ``None``: no harmonisation.
    corr_threshold : float or None
        :class:`netsurv.features.select.CorrelationFilter` threshold; ``None``: no filter.

    Attributes
    ----------
    drop_, scale_ : fitted DropInvalid, TableScaler
    harm_, rescale_ : fitted harmonizer and the TableScaler after it (``None`` without one)
    corr_ : fitted CorrelationFilter or None
    """

    def __init__(self, harmonizer=None, corr_threshold: float | None = 0.9):
        self.harmonizer = harmonizer
        self.corr_threshold = corr_threshold

    def fit(self, X: pd.DataFrame, y, *, meta=None):
        """Fit every step on the training rows ``X``.

        Parameters
        ----------
        X : pandas.DataFrame
            Feature table of the training patients.
        y : structured ndarray or tuple
            Their survival outcome (the correlation filter keeps the feature more associated
            with it).
        meta : pandas.DataFrame, optional
            Keyword-only: acquisition table indexed by patient (the harmonizer's batches).

        Returns
        -------
        self
        """
        self.fit_transform(X, y, meta=meta)
        return self

    def fit_transform(self, X: pd.DataFrame, y, *, meta=None) -> pd.DataFrame:
        """:meth:`fit`, returning the transformed training rows.

        Parameters
        ----------
        X, y, meta
            As in :meth:`fit`.

        Returns
        -------
        pandas.DataFrame
        """
        self.drop_ = DropInvalid().fit(X)
        Z = self.drop_.transform(X)
        self.scale_ = TableScaler().fit(Z)
        Z = self.scale_.transform(Z)
        self.harm_ = self.rescale_ = None
        if self.harmonizer is not None:
            self.harm_ = clone(self.harmonizer).fit(Z, meta=meta)
            Z = self.harm_.transform(Z, meta=meta)
            self.rescale_ = TableScaler().fit(Z)
            Z = self.rescale_.transform(Z)
        self.corr_ = None
        if self.corr_threshold is not None and Z.shape[1] > 1:
            self.corr_ = CorrelationFilter(threshold=self.corr_threshold).fit(Z, y)
            Z = self.corr_.transform(Z)
        return Z

    def transform(self, X: pd.DataFrame, *, meta=None) -> pd.DataFrame:
        """Apply the fitted steps to any rows.

        Parameters
        ----------
        X : pandas.DataFrame
            Feature table (the training columns).
        meta : pandas.DataFrame, optional
            Keyword-only: acquisition table of these rows (needed with a harmonizer).

        Returns
        -------
        pandas.DataFrame
        """
        check_is_fitted(self, "scale_")
        Z = self.scale_.transform(self.drop_.transform(X))
        if getattr(self, "harm_", None) is not None:
            Z = self.rescale_.transform(self.harm_.transform(Z, meta=meta))
        return self.corr_.transform(Z) if self.corr_ is not None else Z


@dataclass
class Features:
    """Preprocessed features of some patients (see :meth:`ClassicalPipeline.fit_features`).

    ``clinical``: the encoded clinical table (``clinical:``-prefixed columns) or None;
    ``imaging``: the imaging blocks' outputs side by side (``<modality>:``-prefixed) or None;
    ``ranking``: univariate Cox ``|z|`` of the imaging features on the rows the steps were
    fitted on, strongest first (None for transformed rows or without imaging).
    """

    clinical: pd.DataFrame | None
    imaging: pd.DataFrame | None
    ranking: pd.Series | None = None

    def top(self, k) -> list[str]:
        """The ``k`` best-ranked imaging features (all for ``k`` None/"all"; [] without any).

        Parameters
        ----------
        k : int, "all" or None

        Returns
        -------
        list of str
        """
        if self.ranking is None:
            return []
        k = len(self.ranking) if k in (None, "all") else min(int(k), len(self.ranking))
        return list(self.ranking.index[:k])

    def design(self, selected) -> pd.DataFrame:
        """The model's design matrix: every clinical column, then the ``selected`` imaging ones.

        Parameters
        ----------
        selected : list of str
            Imaging columns to keep (e.g. from :meth:`top` of the training features).

        Returns
        -------
        pandas.DataFrame
        """
        imaging = None if self.imaging is None else self.imaging[selected]
        parts = [z for z in (self.clinical, imaging) if z is not None]
        return pd.concat(parts, axis=1)


class ClassicalPipeline(SurvivalMixin, BaseEstimator):
    """Clinical encoder + imaging blocks + top-k univariate Cox selection + Cox model.

    The inputs are ``frames``: a dict ``{modality: DataFrame}`` with the same patients (rows)
    in every table; ``"clinical"`` goes through ``clinical_encoder``, every modality of
    ``imaging`` through its :class:`ImagingBlock`. The acquisition table ``meta`` (ComBat
    batches, by patient) is data, not a parameter: it is passed to ``fit`` and to every
    prediction method.

    Parameters
    ----------
    clinical_encoder : transformer or None
        Unfitted encoder of the clinical table (e.g.
        :class:`~netsurv.features.clinical.ClinicalEncoder`).
    imaging : dict of {str: ImagingBlock} or None
        Unfitted block per feature-table modality.
    model : survival estimator
        Unfitted Cox model (``fit(X, y)``, ``predict``, ``predict_survival[_function]``).
    k : int, "all" or None
        Number of imaging features kept (by univariate Cox ``|z|``); clinical variables are
        always kept.

    Attributes
    ----------
    fitted_ : dict
        Fitted clinical encoder (``"clinical"``) and imaging blocks, by modality.
    selected_ : list of str
        Imaging features kept.
    model_ : survival estimator
        The fitted model.
    columns_ : list of str
        Columns of the model's design matrix.
    """

    def __init__(self, clinical_encoder=None, imaging: dict | None = None, model=None, k=10):
        self.clinical_encoder = clinical_encoder
        self.imaging = imaging
        self.model = model
        self.k = k

    # -- preprocessing pieces (also used by :func:`inner_search`) ----------------------------
    def fit_features(self, frames, y, *, meta=None) -> tuple[dict, Features]:
        """Fit fresh clones of the preprocessing steps on these rows (``self`` is unchanged).

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
            Tables of the (training) patients.
        y : structured ndarray or tuple
            Their survival outcome.
        meta : pandas.DataFrame, optional
            Keyword-only: acquisition table indexed by patient (harmonizer batches).

        Returns
        -------
        steps : dict
            Fitted clinical encoder and imaging blocks, by modality (for
            :meth:`transform_features`).
        features : Features
            The transformed rows, with the univariate ranking of the imaging features.
        """
        y = check_survival_y(y, _n_rows(frames), "ClassicalPipeline")
        steps = {}
        Zc = Zi = ranking = None
        if CLINICAL in frames:
            enc = clone(self.clinical_encoder).fit(frames[CLINICAL])
            steps[CLINICAL] = enc
            Zc = enc.transform(frames[CLINICAL]).add_prefix("clinical:")
        parts = []
        for name, block in (self.imaging or {}).items():
            b = clone(block)
            parts.append(b.fit_transform(frames[name], y, meta=meta).add_prefix(f"{name}:"))
            steps[name] = b
        if parts:
            Zi = pd.concat(parts, axis=1)
            sel = UnivariateCoxSelector(k="all", min_events_per_feature=None).fit(Zi, y)
            ranking = pd.Series(sel.scores_, index=Zi.columns).sort_values(ascending=False,
                                                                           kind="stable")
        return steps, Features(Zc, Zi, ranking)

    def transform_features(self, steps: dict, frames, *, meta=None) -> Features:
        """Apply preprocessing steps fitted by :meth:`fit_features` to any rows.

        Parameters
        ----------
        steps : dict
            The fitted steps.
        frames : dict of {str: pandas.DataFrame}
            Tables of the patients to transform.
        meta : pandas.DataFrame, optional
            Keyword-only: their acquisition table.

        Returns
        -------
        Features
            Without a ranking.
        """
        Zc = Zi = None
        if CLINICAL in steps:
            Zc = steps[CLINICAL].transform(frames[CLINICAL]).add_prefix("clinical:")
        parts = [steps[n].transform(frames[n], meta=meta).add_prefix(f"{n}:")
                 for n in (self.imaging or {})]
        if parts:
            Zi = pd.concat(parts, axis=1)
        return Features(Zc, Zi)

    # -- estimator API ------------------------------------------------------------------------
    def fit(self, frames, y, *, meta=None):
        """Fit the preprocessing, the top-``k`` selection and the model on these patients.

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
            Tables of the training patients (same rows in every table).
        y : structured ndarray
            Their survival outcome, ``sksurv.util.Surv.from_arrays(event, time)`` (a
            ``(time, event)`` pair is accepted too).
        meta : pandas.DataFrame, optional
            Keyword-only: acquisition table indexed by patient (ComBat batches).

        Returns
        -------
        self
        """
        time, event = check_survival_y(y, _n_rows(frames), "ClassicalPipeline")
        fitted, feats = self.fit_features(frames, (time, event), meta=meta)
        selected = feats.top(self.k)
        n_ev = int(np.sum(event))
        if selected and n_ev < 10 * len(selected):
            warnings.warn(f"too few events per feature: {n_ev} events for "
                          f"{len(selected)} selected imaging features", UserWarning)
        X = feats.design(selected)
        self.fitted_ = fitted
        self.selected_ = selected
        self.model_ = clone(self.model).fit(X, Surv.from_arrays(event.astype(bool), time))
        self.columns_ = list(X.columns)
        return self

    def design(self, frames, *, meta=None) -> pd.DataFrame:
        """The fitted model's design matrix of these patients.

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
            Tables of the patients.
        meta : pandas.DataFrame, optional
            Keyword-only: their acquisition table (needed with a harmonizer).

        Returns
        -------
        pandas.DataFrame
        """
        check_is_fitted(self, "model_")
        return self.transform_features(self.fitted_, frames, meta=meta).design(self.selected_)

    def predict(self, frames, *, meta=None) -> np.ndarray:
        """Risk score of each patient (higher = worse).

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
        meta : pandas.DataFrame, optional
            Keyword-only: acquisition table of these patients.

        Returns
        -------
        ndarray, shape (n_patients,)
        """
        X = self.design(frames, meta=meta)
        return self.model_.predict(X)

    def predict_survival(self, frames, times, *, meta=None) -> np.ndarray:
        """S(t | x) at ``times``, ``(n_patients, len(times))``.

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
        times : array-like
        meta : pandas.DataFrame, optional

        Returns
        -------
        ndarray
        """
        X = self.design(frames, meta=meta)
        return self.model_.predict_survival(X, times)

    def predict_survival_function(self, frames, return_array: bool = False, *, meta=None):
        """The model's survival functions of these patients (scikit-survival's API).

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
        return_array : bool
            ``True``: values at the model's ``unique_times_``; ``False``: StepFunctions.
        meta : pandas.DataFrame, optional

        Returns
        -------
        ndarray
        """
        X = self.design(frames, meta=meta)
        return self.model_.predict_survival_function(X, return_array=return_array)

    def predict_cumulative_hazard_function(self, frames, return_array: bool = False, *,
                                           meta=None):
        """The model's cumulative hazard functions of these patients (scikit-survival's API).

        Parameters
        ----------
        frames : dict of {str: pandas.DataFrame}
        return_array : bool
        meta : pandas.DataFrame, optional

        Returns
        -------
        ndarray
        """
        X = self.design(frames, meta=meta)
        return self.model_.predict_cumulative_hazard_function(X, return_array=return_array)


def _n_rows(frames) -> int | None:
    return len(next(iter(frames.values()))) if frames else None


def _on_path(model) -> bool:
    """Models whose penalty is chosen on a path (CoxNet with ``alpha=None``): the inner search
    picks that penalty on its own folds, jointly with ``k`` and the grid, as cv.glmnet does."""
    return (hasattr(model, "alpha_path") and hasattr(model, "path_coefs")
            and model.get_params().get("alpha", 0) is None)


def pooled_cindex(time, event, risk) -> float:
    """Harrell's C of out-of-fold risks concatenated over the folds of one partition (every row
    predicted once, by the model that did not see it). Steadier than the mean of per-fold Cs when
    a validation fold holds few events; a constant risk ranks nobody (0.5)."""
    risk = np.asarray(risk, float)
    return harrell_cindex(time, event, risk) if np.ptp(risk) else 0.5


def inner_search(pipe: ClassicalPipeline, frames, y, grid: dict, cv: int = 3, seed: int = 0,
                 repeats: int = 1, score: str = "pooled", *,
                 meta=None) -> tuple[dict, pd.DataFrame]:
    """Choose ``k`` and model parameters by stratified ``cv``-fold C-index on the given (training)
    rows. Preprocessing is fitted once per fold (it does not depend on the grid); the selection
    and the model are refitted per grid point.

    ``score="pooled"``: one Harrell C over the out-of-fold risks of each partition (mean over
    ``repeats`` partitions); ``"mean"``: mean of the per-fold Cs. A CoxNet with ``alpha=None`` gets
    its penalty chosen here too, on the same folds: the path of the whole (training) rows is fitted
    per grid point (penalties with an empty full fit are not eligible), every fold is fitted along
    that path, and the best (k, grid point, alpha) wins -- instead of a second CV nested inside
    every fold.

    Parameters
    ----------
    pipe : ClassicalPipeline
        Unfitted pipeline whose ``k`` and ``model`` parameters are searched (not modified).
    frames : dict of {str: pandas.DataFrame}
        Tables of the training patients.
    y : structured ndarray or tuple
        Their survival outcome (``sksurv.util.Surv.from_arrays(event, time)``).
    grid : dict
        ``"k"``: candidate ``k``; every other key: candidate values of a model parameter.
    cv, seed, repeats : int
        Stratified folds, their seed and the number of repeated partitions.
    score : {"pooled", "mean"}
        Scoring of a grid point (see above).
    meta : pandas.DataFrame, optional
        Keyword-only: acquisition table indexed by patient (ComBat batches).

    Returns
    -------
    best : dict
        The best parameters (with ``alpha`` for a path model).
    table : pandas.DataFrame
        One row per ``k`` x grid point (at its best alpha) with its ``cindex``.
    """
    if score not in ("pooled", "mean"):
        raise ValueError(f"inner_search: score must be 'pooled' or 'mean', got {score!r}")
    time, event = check_survival_y(y, _n_rows(frames), "inner_search")
    ys = Surv.from_arrays(event.astype(bool), time)
    ks = list(grid.get("k", [pipe.k])) if pipe.imaging else [None]
    # searched from the smallest k up ("all" last), so that an exact tie (an elastic net keeping
    # the same features at two k) goes to the smaller one whatever the order of the list (deep
    # runs list their network's k first, netsurv.evaluation.groups.net_top_k)
    ks = sorted(ks, key=lambda k: (k is not None and not isinstance(k, int | np.integer),
                                   k if isinstance(k, int | np.integer) else 0))
    model_keys = [k for k in grid if k != "k"]
    model_grid = [dict(zip(model_keys, v)) for v in
                  itertools.product(*(list(grid[k]) for k in model_keys))] or [{}]
    n_splits = int(min(cv, event.sum(), len(event) - event.sum()))
    if n_splits < 2:
        raise ValueError(f"inner search needs {cv} events and censored patients; the training "
                         f"split has {int(event.sum())} events in {len(event)} patients")
    combos = [(k, params) for k in ks for params in model_grid]
    models = [clone(pipe.model).set_params(**params) for _, params in combos]
    on_path = all(_on_path(m) for m in models)
    alphas, eligible = [None] * len(combos), [np.ones(1, bool)] * len(combos)
    if on_path:
        # the penalty path of each grid point on all the given rows (cv.glmnet's lambda sequence)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, feats = pipe.fit_features(frames, (time, event), meta=meta)
        for c, (k, _) in enumerate(combos):
            X = feats.design(feats.top(k))
            try:
                alphas[c], eligible[c] = models[c].alpha_path(X.to_numpy(float), time, event)
            except ArithmeticError:
                alphas[c], eligible[c] = np.array([np.nan]), np.zeros(1, bool)
    width = [1 if a is None else len(a) for a in alphas]
    # out-of-fold risks: per repeat, per grid point, (rows, penalties)
    oof = np.full((repeats, len(combos)), None, dtype=object)
    for r in range(repeats):
        for c in range(len(combos)):
            oof[r, c] = np.full((len(event), width[c]), np.nan)
    fold_c = [[] for _ in combos]  # per fold: C per penalty
    folds = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=repeats, random_state=seed)
    for f, (tr, va) in enumerate(folds.split(np.zeros(len(event)), event)):
        r = f // n_splits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fold-level warnings repeat the outer ones
            steps, feats_tr = pipe.fit_features(take_rows(frames, tr), (time[tr], event[tr]),
                                                meta=meta)
            feats_va = pipe.transform_features(steps, take_rows(frames, va), meta=meta)
            for c, (k, _) in enumerate(combos):
                sel = feats_tr.top(k)
                Xtr = feats_tr.design(sel)
                Xva = feats_va.design(sel)
                try:
                    if on_path:
                        coefs = models[c].path_coefs(Xtr.to_numpy(float), time[tr], event[tr],
                                                     alphas[c])
                        risk = Xva.to_numpy(float) @ coefs
                    else:
                        m = clone(models[c]).fit(Xtr, ys[tr])
                        risk = np.asarray(m.predict(Xva), float)[:, None]
                    if not np.isfinite(risk).all():
                        raise ArithmeticError("non-finite risk")
                    oof[r, c][va] = risk
                    fold_c[c].append([harrell_cindex(time[va], event[va], risk[:, j])
                                      if np.ptp(risk[:, j]) else 0.5 for j in range(width[c])])
                except (ArithmeticError, ValueError, np.linalg.LinAlgError):
                    fold_c[c].append([np.nan] * width[c])
    records, best, best_score = [], None, -np.inf
    for c, (k, params) in enumerate(combos):
        if score == "pooled":
            per = np.array([[pooled_cindex(time, event, oof[r, c][:, j])
                             if np.isfinite(oof[r, c][:, j]).all() else np.nan
                             for j in range(width[c])] for r in range(repeats)])
        else:
            per = np.array(fold_c[c])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: failed fits
            s = np.nanmean(per, axis=0)
        s = np.where(eligible[c] & ~np.isnan(s), s, -np.inf)
        j = int(np.argmax(s))
        rec = {"k": k, **params}
        if on_path:
            rec["alpha"] = float(alphas[c][j])
        rec["cindex"] = float(s[j]) if np.isfinite(s[j]) else np.nan
        records.append(rec)
        if s[j] > best_score:
            best_score, best = s[j], {key: v for key, v in rec.items() if key != "cindex"}
    if best is None:
        raise ArithmeticError("every grid point failed in the inner search")
    return best, pd.DataFrame(records)
