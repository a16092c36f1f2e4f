"""Penalised Cox proportional-hazards model (lifelines inside), a scikit-survival estimator."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from sksurv.functions import StepFunction

from .base import SurvivalMixin, check_survival_y


class CoxPH(SurvivalMixin, BaseEstimator):
    """lifelines ``CoxPHFitter`` with elastic-net penalty, with scikit-survival's interface.

    ``predict`` = linear predictor (risk, higher = worse); ``predict_survival_function`` /
    ``predict_survival`` = S(t | x) with lifelines' Breslow baseline of the training data;
    ``score`` = Harrell's C-index.

    Parameters
    ----------
    penalizer : float
        Strength of lifelines' elastic-net penalty.
    l1_ratio : float
        Share of the L1 part of the penalty.
    ties : str
        Handling of tied event times; lifelines supports ``"efron"`` only.

    Attributes
    ----------
    columns_ : list
        Features used (constant training columns are dropped, with a warning naming them:
        lifelines' Newton steps fail on them).
    coef_ : ndarray
        Log hazard ratios of ``columns_``.
    summary_ : pandas.DataFrame
        lifelines' summary (HRs with 95 % CIs).
    model_ : lifelines.CoxPHFitter
        The fitted lifelines model.
    unique_times_ : ndarray
        Times of the baseline hazard (``predict_survival_function(X, return_array=True)``
        evaluates the curves there).
    """

    def __init__(self, penalizer: float = 0.1, l1_ratio: float = 0.0, ties: str = "efron"):
        self.penalizer = penalizer
        self.l1_ratio = l1_ratio
        self.ties = ties

    def fit(self, X: pd.DataFrame, y):
        """Fit the Cox model.

        Parameters
        ----------
        X : pandas.DataFrame
            Numeric features, one row per patient.
        y : structured ndarray
            Survival outcome, ``sksurv.util.Surv.from_arrays(event, time)`` (a ``(time, event)``
            pair is accepted too).

        Returns
        -------
        self
        """
        X = pd.DataFrame(X).astype(float)
        time, event = check_survival_y(y, len(X), "CoxPH")
        if self.ties != "efron":
            raise ValueError("lifelines CoxPHFitter supports ties='efron' only")
        const = [c for c in X.columns if X[c].nunique(dropna=False) <= 1]
        if const:
            warnings.warn(f"CoxPH: dropping constant column(s) in the training split: {const}",
                          UserWarning, stacklevel=2)
        columns = [c for c in X.columns if c not in const]
        if not columns:
            raise ValueError("CoxPH: no non-constant feature left to fit")
        df = X[columns].copy()
        df["__time"] = time
        df["__event"] = event
        model = CoxPHFitter(penalizer=self.penalizer, l1_ratio=self.l1_ratio)
        model.fit(df, duration_col="__time", event_col="__event")
        self.columns_ = columns
        self.model_ = model
        self.coef_ = model.params_.reindex(columns).to_numpy()
        self.summary_ = model.summary
        self.unique_times_ = model.baseline_cumulative_hazard_.index.to_numpy(float)
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Risk score (linear predictor) of each row; higher = worse prognosis.

        Parameters
        ----------
        X : pandas.DataFrame
            Rows to score, with the training columns.

        Returns
        -------
        ndarray, shape (n_samples,)
        """
        check_is_fitted(self, "coef_")
        X = pd.DataFrame(X).astype(float)
        return (X[self.columns_].to_numpy() * self.coef_).sum(axis=1)  # row-wise: see CoxNet

    def _baseline(self) -> tuple[np.ndarray, np.ndarray]:
        H0 = self.model_.baseline_cumulative_hazard_.iloc[:, 0]
        return H0.index.to_numpy(float), H0.to_numpy(float)

    def _partial_hazard(self, X) -> np.ndarray:
        X = pd.DataFrame(X).astype(float)[self.columns_]
        return np.asarray(self.model_.predict_partial_hazard(X), float).reshape(-1)

    def predict_survival(self, X: pd.DataFrame, times) -> np.ndarray:
        """S(t | x) at ``times``, ``[n_patients, n_times]`` (lifelines' Breslow baseline
        hazard of the training data); what the integrated Brier score of a run needs.

        The baseline is evaluated as the step function it is: lifelines'
        ``predict_survival_function(times=...)`` interpolates it linearly between training
        times, which made this model's curves (and IBS) differ from those of the package's
        Breslow (:class:`netsurv.survival.breslow.Breslow`) and CoxNet's between event times.

        Parameters
        ----------
        X : pandas.DataFrame
            Rows to predict.
        times : array-like
            Time points; before the first training time S = 1.

        Returns
        -------
        ndarray, shape (n_samples, n_times)
        """
        check_is_fitted(self, "coef_")
        t0, h0 = self._baseline()
        times = np.atleast_1d(np.asarray(times, float))
        i = np.searchsorted(t0, times, side="right") - 1
        h = np.where(i >= 0, h0[np.clip(i, 0, None)], 0.0)
        rel = self._partial_hazard(X)
        return np.exp(-rel[:, None] * h[None, :])

    def predict_cumulative_hazard_function(self, X: pd.DataFrame, return_array: bool = False):
        """Cumulative hazard H(t | x) of each row (scikit-survival's API).

        Parameters
        ----------
        X : pandas.DataFrame
            Rows to predict.
        return_array : bool
            ``True``: values at ``unique_times_``, shape ``(n_samples, n_times)``; ``False``:
            one :class:`sksurv.functions.StepFunction` per row.

        Returns
        -------
        ndarray
        """
        check_is_fitted(self, "coef_")
        t0, h0 = self._baseline()
        rel = self._partial_hazard(X)
        if return_array:
            return rel[:, None] * h0[None, :]
        return np.array([StepFunction(t0, h0, a=r) for r in rel], dtype=object)

    def predict_survival_function(self, X: pd.DataFrame, return_array: bool = False):
        """Survival function S(t | x) of each row (scikit-survival's API).

        Parameters
        ----------
        X : pandas.DataFrame
            Rows to predict.
        return_array : bool
            ``True``: values at ``unique_times_``, shape ``(n_samples, n_times)``; ``False``:
            one :class:`sksurv.functions.StepFunction` per row.

        Returns
        -------
        ndarray
        """
        check_is_fitted(self, "coef_")
        t0, h0 = self._baseline()
        rel = self._partial_hazard(X)
        surv = np.exp(-rel[:, None] * h0[None, :])
        if return_array:
            return surv
        return np.array([StepFunction(t0, s) for s in surv], dtype=object)
