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
from sklearn.base import clone
from sklearn.model_selection import RepeatedStratifiedKFold

from netsurv.features.select import CorrelationFilter, DropInvalid, UnivariateCoxSelector
from netsurv.features.tabular import TableScaler
from netsurv.survival.metrics import harrell_cindex


def take_rows(frames: dict[str, pd.DataFrame], idx) -> dict[str, pd.DataFrame]:
    """The same patient rows (integer positions) of every modality table."""
    return {name: frame.iloc[idx] for name, frame in frames.items()}


class ImagingBlock:
    """One numeric modality: DropInvalid -> impute+scale -> [ComBat -> rescale] -> correlation filter."""

    def __init__(self, harmonizer=None, corr_threshold: float | None = 0.9):
        self.harmonizer = harmonizer
        self.corr_threshold = corr_threshold

    def fit_transform(self, X: pd.DataFrame, y, meta=None) -> pd.DataFrame:
        self.drop_ = DropInvalid().fit(X)
        Z = self.drop_.transform(X)
        self.scale_ = TableScaler().fit(Z)
        Z = self.scale_.transform(Z)
        if self.harmonizer is not None:
            self.harm_ = clone(self.harmonizer).fit(Z, meta.loc[Z.index])
            Z = self.harm_.transform(Z, meta.loc[Z.index])
            self.rescale_ = TableScaler().fit(Z)
            Z = self.rescale_.transform(Z)
        self.corr_ = None
        if self.corr_threshold is not None and Z.shape[1] > 1:
            self.corr_ = CorrelationFilter(threshold=self.corr_threshold).fit(Z, y)
            Z = self.corr_.transform(Z)
        return Z

    def transform(self, X: pd.DataFrame, meta=None) -> pd.DataFrame:
        Z = self.scale_.transform(self.drop_.transform(X))
        if self.harmonizer is not None:
            Z = self.rescale_.transform(self.harm_.transform(Z, meta.loc[Z.index]))
        return self.corr_.transform(Z) if self.corr_ is not None else Z


@dataclass
class _Prepared:
    clinical: pd.DataFrame | None
    imaging: pd.DataFrame | None
    scores: pd.Series | None  # univariate Cox |z| of the imaging features, training rows


class ClassicalPipeline:
    """Clinical encoder + imaging blocks + top-k selection + Cox model (sklearn-style pieces)."""

    def __init__(self, clinical_encoder=None, imaging: dict | None = None, model=None, k=10,
                 meta: pd.DataFrame | None = None):
        self.clinical_encoder = clinical_encoder
        self.imaging = imaging or {}
        self.model = model
        self.k = k
        self.meta = meta  # acquisition table by patient (ComBat batches)

    # -- fitting pieces -----------------------------------------------------------------------
    def _prepare(self, frames, time, event) -> tuple[_Prepared, dict]:
        y = (np.asarray(time, float), np.asarray(event, int))
        fitted = {}
        Zc = Zi = scores = None
        if "clinical" in frames:
            enc = clone(self.clinical_encoder).fit(frames["clinical"])
            fitted["clinical"] = enc
            Zc = enc.transform(frames["clinical"]).add_prefix("clinical:")
        parts = []
        for name, block in self.imaging.items():
            b = ImagingBlock(block.harmonizer, block.corr_threshold)
            parts.append(b.fit_transform(frames[name], y, self.meta).add_prefix(f"{name}:"))
            fitted[name] = b
        if parts:
            Zi = pd.concat(parts, axis=1)
            sel = UnivariateCoxSelector(k="all", min_events_per_feature=None).fit(Zi, y)
            scores = pd.Series(sel.scores_, index=Zi.columns).sort_values(ascending=False,
                                                                          kind="stable")
        return _Prepared(Zc, Zi, scores), fitted

    def _transform(self, fitted, frames) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
        Zc = Zi = None
        if "clinical" in fitted:
            Zc = fitted["clinical"].transform(frames["clinical"]).add_prefix("clinical:")
        parts = [fitted[n].transform(frames[n], self.meta).add_prefix(f"{n}:") for n in self.imaging]
        if parts:
            Zi = pd.concat(parts, axis=1)
        return Zc, Zi

    @staticmethod
    def _design(Zc, Zi, selected):
        parts = [z for z in (Zc, None if Zi is None else Zi[selected]) if z is not None]
        return pd.concat(parts, axis=1)

    def _top(self, scores, k):
        if scores is None:
            return []
        k = len(scores) if k in (None, "all") else min(int(k), len(scores))
        return list(scores.index[:k])

    # -- public API ---------------------------------------------------------------------------
    def fit(self, frames, time, event):
        prep, self.fitted_ = self._prepare(frames, time, event)
        self.selected_ = self._top(prep.scores, self.k)
        n_ev = int(np.sum(event))
        if self.selected_ and n_ev < 10 * len(self.selected_):
            warnings.warn(f"too few events per feature: {n_ev} events for "
                          f"{len(self.selected_)} selected imaging features", UserWarning)
        X = self._design(prep.clinical, prep.imaging, self.selected_)
        self.model_ = clone(self.model).fit(X, time, event)
        self.columns_ = list(X.columns)
        return self

    def design(self, frames) -> pd.DataFrame:
        Zc, Zi = self._transform(self.fitted_, frames)
        return self._design(Zc, Zi, self.selected_)

    def predict_risk(self, frames) -> np.ndarray:
        return self.model_.predict_risk(self.design(frames))

    def predict_survival(self, frames, times) -> np.ndarray:
        return self.model_.predict_survival(self.design(frames), times)


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


def inner_search(pipe: ClassicalPipeline, frames, time, event, grid: dict, cv: int = 3,
                 seed: int = 0, repeats: int = 1, score: str = "pooled") -> tuple[dict, pd.DataFrame]:
    """Choose ``k`` and model parameters by stratified ``cv``-fold C-index on the given (training)
    rows. Preprocessing is fitted once per fold (it does not depend on the grid); the selection
    and the model are refitted per grid point.

    ``score="pooled"``: one Harrell C over the out-of-fold risks of each partition (mean over
    ``repeats`` partitions); ``"mean"``: mean of the per-fold Cs. A CoxNet with ``alpha=None`` gets
    its penalty chosen here too, on the same folds: the path of the whole (training) rows is fitted
    per grid point (penalties with an empty full fit are not eligible), every fold is fitted along
    that path, and the best (k, grid point, alpha) wins -- instead of a second CV nested inside
    every fold. Returns the best parameters (with ``alpha`` in that case) and the score table (one
    row per ``k`` x grid point, at its best alpha)."""
    if score not in ("pooled", "mean"):
        raise ValueError(f"inner_search: score must be 'pooled' or 'mean', got {score!r}")
    time = np.asarray(time, float)
    event = np.asarray(event, int)
    ks = list(grid.get("k", [pipe.k])) if pipe.imaging else [None]
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
            prep, _ = pipe._prepare(frames, time, event)
        for c, (k, _) in enumerate(combos):
            X = pipe._design(prep.clinical, prep.imaging, pipe._top(prep.scores, k))
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
            prep, fitted = pipe._prepare(take_rows(frames, tr), time[tr], event[tr])
            Zc_va, Zi_va = pipe._transform(fitted, take_rows(frames, va))
            for c, (k, _) in enumerate(combos):
                sel = pipe._top(prep.scores, k)
                Xtr = pipe._design(prep.clinical, prep.imaging, sel)
                Xva = pipe._design(Zc_va, Zi_va, sel)
                try:
                    if on_path:
                        coefs = models[c].path_coefs(Xtr.to_numpy(float), time[tr], event[tr],
                                                     alphas[c])
                        risk = Xva.to_numpy(float) @ coefs
                    else:
                        m = clone(models[c]).fit(Xtr, time[tr], event[tr])
                        risk = np.asarray(m.predict_risk(Xva), float)[:, None]
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
