"""Penalised Cox proportional-hazards model with an sklearn-style interface."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from sklearn.base import BaseEstimator


class CoxPH(BaseEstimator):
    """lifelines ``CoxPHFitter`` with elastic-net penalty; ``predict_risk`` = linear predictor,
    ``predict_survival`` = S(t | x) with lifelines' Breslow baseline of the training data.

    Constant columns are dropped before fitting (lifelines' Newton steps fail on them) and named
    in a warning. Fitted attributes: ``columns_``, ``coef_``, ``summary_`` (HRs with 95 % CIs).
    """

    def __init__(self, penalizer: float = 0.1, l1_ratio: float = 0.0, ties: str = "efron"):
        self.penalizer = penalizer
        self.l1_ratio = l1_ratio
        self.ties = ties

    def fit(self, X: pd.DataFrame, time, event):
        X = pd.DataFrame(X).astype(float)
        const = [c for c in X.columns if X[c].nunique(dropna=False) <= 1]
        if const:
            warnings.warn(f"CoxPH: dropping constant column(s) in the training split: {const}",
                          UserWarning, stacklevel=2)
        self.columns_ = [c for c in X.columns if c not in const]
        if not self.columns_:
            raise ValueError("CoxPH: no non-constant feature left to fit")
        df = X[self.columns_].copy()
        df["__time"] = np.asarray(time, float)
        df["__event"] = np.asarray(event, int)
        if self.ties != "efron":
            raise ValueError("lifelines CoxPHFitter supports ties='efron' only")
        self.model_ = CoxPHFitter(penalizer=self.penalizer, l1_ratio=self.l1_ratio)
        self.model_.fit(df, duration_col="__time", event_col="__event")
        self.coef_ = self.model_.params_.reindex(self.columns_).to_numpy()
        self.summary_ = self.model_.summary
        return self

    def predict_risk(self, X: pd.DataFrame) -> np.ndarray:
        X = pd.DataFrame(X).astype(float)
        return (X[self.columns_].to_numpy() * self.coef_).sum(axis=1)  # row-wise: see CoxNet

    def predict_survival(self, X: pd.DataFrame, times) -> np.ndarray:
        """S(t | x) at ``times``, ``[n_patients, n_times]`` (lifelines' Breslow baseline
        hazard of the training data); what the integrated Brier score of a run needs.

        The baseline is evaluated as the step function it is: lifelines'
        ``predict_survival_function(times=...)`` interpolates it linearly between training
        times, which made this model's curves (and IBS) differ from those of the package's
        Breslow (:class:`netsurv.survival.breslow.Breslow`) and CoxNet's between event times."""
        X = pd.DataFrame(X).astype(float)[self.columns_]
        H0 = self.model_.baseline_cumulative_hazard_.iloc[:, 0]
        t0, h0 = H0.index.to_numpy(float), H0.to_numpy(float)
        times = np.atleast_1d(np.asarray(times, float))
        i = np.searchsorted(t0, times, side="right") - 1
        h = np.where(i >= 0, h0[np.clip(i, 0, None)], 0.0)
        rel = np.asarray(self.model_.predict_partial_hazard(X), float).reshape(-1)
        return np.exp(-rel[:, None] * h[None, :])
