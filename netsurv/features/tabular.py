"""Numeric feature tables (radiomics, pathomics, user tables): fitted on training rows only."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted


class TableScaler(TransformerMixin, BaseEstimator):
    """Train-median imputation, then standardisation; constant or all-NaN columns are dropped
    with a warning naming them (a Cox fit cannot use them)."""

    def fit(self, X: pd.DataFrame, y=None):
        """Learn the training medians, means and standard deviations of the usable columns of ``X``.

        Constant and all-NaN columns are dropped with a warning.  ``y`` is ignored.

        Returns
        -------
        TableScaler
            ``self``, with ``columns_``, ``median_``, ``mean_`` and ``scale_`` set.
        """
        X = pd.DataFrame(X).astype(float)
        med = X.median()
        filled = X.fillna(med)
        sd = filled.std(ddof=0)
        bad = [c for c in X.columns if not np.isfinite(med[c]) or sd[c] == 0]
        if bad:
            warnings.warn(f"dropping constant or all-NaN feature column(s) in the training "
                          f"split: {bad[:20]}{' ...' if len(bad) > 20 else ''}", UserWarning,
                          stacklevel=2)
        self.columns_ = [c for c in X.columns if c not in bad]
        self.median_ = med[self.columns_]
        self.mean_ = filled[self.columns_].mean()
        self.scale_ = sd[self.columns_]
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        """Keep the fitted columns, fill NaN with the training medians and standardise."""
        check_is_fitted(self, "columns_")
        X = pd.DataFrame(X)[self.columns_].astype(float).fillna(self.median_)
        return (X - self.mean_) / self.scale_
