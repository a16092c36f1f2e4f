"""Elastic-net Cox (scikit-survival ``CoxnetSurvivalAnalysis``) with alpha chosen by inner CV."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.validation import check_is_fitted
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from .base import SurvivalMixin, check_survival_y
from .metrics import harrell_cindex


def breslow_loglik(eta, time, event) -> float:
    """Cox partial log-likelihood (Breslow ties) of linear predictors ``eta``."""
    order = np.argsort(-time, kind="stable")
    eta, time, event = eta[order], time[order], event[order]
    # running log-sum-exp: finite for any finite eta (a global shift by max(eta) underflows
    # to log(0) = -inf when eta spans +-1e4, and 0 * inf = NaN for censored patients)
    log_risk = np.logaddexp.accumulate(np.asarray(eta, float))
    # tied times share one risk set: everyone with time >= t, i.e. the end of the tie run
    run_end = np.searchsorted(-time, -time, side="right") - 1
    return float(np.sum(np.where(event.astype(bool), eta - log_risk[run_end], 0.0)))


def _fit_path(X, time, event, l1_ratio, n_alphas, alpha_min_ratio, alphas=None, baseline=False):
    y = Surv.from_arrays(np.asarray(event).astype(bool), np.asarray(time, float))
    ratio = alpha_min_ratio
    for _ in range(4):
        try:
            with warnings.catch_warnings():
                # convergence chatter on the weakly penalised end of the path
                warnings.simplefilter("ignore")
                return CoxnetSurvivalAnalysis(
                    l1_ratio=l1_ratio, n_alphas=n_alphas, alpha_min_ratio=ratio, alphas=alphas,
                    fit_baseline_model=baseline, max_iter=100_000,
                ).fit(X, y)
        except ArithmeticError:
            # glmnet's coordinate descent diverges when the path goes too close to the
            # unpenalised fit on small samples: stop the path earlier
            ratio *= 10
            if alphas is not None:
                alphas = [a * 10 for a in alphas]
    raise ArithmeticError("Coxnet failed to converge even with a strongly penalised path")


class CoxNet(SurvivalMixin, BaseEstimator):
    """Elastic-net Cox (scikit-survival's ``CoxnetSurvivalAnalysis``) at one penalty.

    ``alpha=None`` selects the penalty on the path by inner stratified ``cv``-fold C-index (or
    cross-validated partial likelihood, ``cv_metric="deviance"``) on the training rows given to
    ``fit`` (never on test data). ``predict`` = linear predictor (risk, higher = worse);
    ``predict_survival_function`` / ``predict_survival`` = S(t | x) with the Breslow baseline
    of the training data; ``score`` = Harrell's C-index.

    Parameters
    ----------
    l1_ratio : float
        Elastic-net mixing (1 = lasso).
    alpha : float or None
        Penalty; ``None``: chosen by inner CV.
    n_alphas, alpha_min_ratio : int, float
        The penalty path searched when ``alpha=None``.
    cv : int
        Inner folds when ``alpha=None``.
    cv_metric : {"cindex", "deviance"}
        Inner CV criterion.
    seed : int
        Seed of the inner folds.

    Attributes
    ----------
    columns_ : list
        Features, in training order.
    alpha_ : float
        The penalty used.
    coef_ : ndarray
        Coefficients of ``columns_`` at ``alpha_``.
    model_ : sksurv.linear_model.CoxnetSurvivalAnalysis
        The fitted scikit-survival model (with its baseline model).
    unique_times_ : ndarray
        Observed training times, the baseline's grid (where ``return_array=True`` evaluates
        the curves).
    cv_scores_ : ndarray
        Inner CV score per penalty of the path (``alpha=None`` with at least 2 folds only).
    """

    def __init__(self, l1_ratio: float = 0.5, alpha: float | None = None, n_alphas: int = 100,
                 alpha_min_ratio: float = 0.01, cv: int = 3, cv_metric: str = "cindex",
                 seed: int = 0):
        self.l1_ratio = l1_ratio
        self.alpha = alpha
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.cv = cv
        self.cv_metric = cv_metric
        self.seed = seed

    # -- penalty path (shared with the inner grid search, which picks alpha on its own folds) ---
    def alpha_path(self, X, time, event) -> tuple[np.ndarray, np.ndarray]:
        """The penalty path of these (training) rows, strongest first, and which of its penalties
        give a non-empty fit. Fold paths can keep a feature at penalties where the full-data fit
        is already empty; a null model ranks nobody (test C = 0.5), so only the non-empty ones
        are eligible."""
        X = np.asarray(X, float)
        path = _fit_path(X, np.asarray(time, float), np.asarray(event).astype(int), self.l1_ratio,
                         self.n_alphas, self.alpha_min_ratio)
        return path.alphas_, np.abs(path.coef_).sum(axis=0) > 0

    def path_coefs(self, X, time, event, alphas) -> np.ndarray:
        """Coefficients (n_features, n_alphas) fitted on these rows at each penalty of ``alphas``.

        glmnet ends a path early once the deviance stops changing; the penalties it did not reach
        get the last fit (the weakest penalty reached), so every penalty has a column."""
        m = _fit_path(np.asarray(X, float), np.asarray(time, float), np.asarray(event).astype(int),
                      self.l1_ratio, 100, 0.01, alphas=alphas)
        coef = m.coef_
        if coef.shape[1] < len(alphas):
            coef = np.hstack([coef, np.repeat(coef[:, -1:], len(alphas) - coef.shape[1], axis=1)])
        return coef

    def _choose_alpha(self, X, time, event) -> float:
        alphas, eligible = self.alpha_path(X, time, event)
        n_splits = int(min(self.cv, event.sum(), len(event) - event.sum()))
        if n_splits < 2:
            return float(alphas[len(alphas) // 2])
        scores = np.zeros(len(alphas))
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=self.seed)
        for tr, va in folds.split(X, event):
            if event[va].sum() == 0 or event[tr].sum() == 0:
                continue
            coefs = self.path_coefs(X[tr], time[tr], event[tr], alphas)
            for j in range(coefs.shape[1]):
                b = coefs[:, j]
                if self.cv_metric == "deviance":
                    # Verweij & van Houwelingen cross-validated partial likelihood (glmnet's
                    # default for Cox): stable with few events per fold, unlike the C-index
                    scores[j] += (breslow_loglik(X @ b, time, event)
                                  - breslow_loglik(X[tr] @ b, time[tr], event[tr]))
                else:
                    risk = X[va] @ b
                    scores[j] += harrell_cindex(time[va], event[va], risk) if np.ptp(risk) else 0.5
        self.cv_scores_ = scores / n_splits
        if not eligible.any():
            return float(alphas[-1])
        return float(alphas[int(np.argmax(np.where(eligible, self.cv_scores_, -np.inf)))])

    def fit(self, X: pd.DataFrame, y):
        """Fit the elastic-net Cox model (choosing ``alpha`` first when it is ``None``).

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
        time, event = check_survival_y(y, len(X), "CoxNet")
        self.columns_ = list(X.columns)
        A = X.to_numpy()
        self.alpha_ = float(self.alpha) if self.alpha is not None else self._choose_alpha(A, time, event)
        self.model_ = _fit_path(A, time, event, self.l1_ratio, 100, 0.01, alphas=[self.alpha_],
                                baseline=True)
        self.coef_ = self.model_.coef_[:, -1]
        self.unique_times_ = np.unique(time)  # the baseline's time grid (all observed times)
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
        # a row-wise sum, not BLAS `@`: gemv's blocking makes a patient's last bits depend on the
        # other rows scored with it, and scoring a cohort again (scripts/predict.py) must
        # reproduce the run's risks exactly (exact ties among risks then stay ties)
        return (pd.DataFrame(X)[self.columns_].astype(float).to_numpy() * self.coef_).sum(axis=1)

    def _design(self, X) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return pd.DataFrame(X)[self.columns_].astype(float).to_numpy()

    def predict_survival(self, X: pd.DataFrame, times) -> np.ndarray:
        """S(t | x) at ``times``, ``[n_patients, n_times]`` (Breslow baseline of the training
        data); what the integrated Brier score of a run needs.

        Parameters
        ----------
        X : pandas.DataFrame
            Rows to predict.
        times : array-like
            Time points within the training follow-up (scikit-survival's step functions raise
            outside ``[0, last training time]``).

        Returns
        -------
        ndarray, shape (n_samples, n_times)
        """
        fns = self.model_.predict_survival_function(self._design(X), alpha=self.model_.alphas_[-1])
        return np.vstack([f(np.asarray(times, float)) for f in fns])

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
        return self.model_.predict_survival_function(self._design(X),
                                                     alpha=self.model_.alphas_[-1],
                                                     return_array=return_array)

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
        return self.model_.predict_cumulative_hazard_function(
            self._design(X), alpha=self.model_.alphas_[-1], return_array=return_array)
