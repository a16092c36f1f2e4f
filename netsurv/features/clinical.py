"""Clinical covariate encoding, fitted on training rows only (scikit-learn style)."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


class ClinicalEncoder(TransformerMixin, BaseEstimator):
    """Median-impute + standardise numerics; impute 'missing' + one-hot categoricals.

    Categories unseen in training are encoded as all-zero (the reference), never a crash, and a
    warning names the column and values. The first level of each categorical is dropped so the Cox
    design has no perfectly collinear columns (``drop='first'`` would fail on an unseen level,
    so ``handle_unknown='ignore'`` with ``drop='first'`` is used, supported by sklearn >= 1.0).
    """

    def __init__(self, numeric=(), categorical=(), scale_indicators: bool = False):
        self.numeric = numeric
        self.categorical = categorical
        self.scale_indicators = scale_indicators

    def _frame(self, X: pd.DataFrame) -> pd.DataFrame:
        cols = list(self.numeric) + list(self.categorical)
        missing = [c for c in cols if c not in X.columns]
        if missing:
            raise KeyError(
                f"clinical column(s) {missing} declared in the data config are not in "
                f"clinical.csv (columns: {list(X.columns)}); fix data.clinical.numeric/categorical"
            )
        X = X[cols].copy()
        for c in self.numeric:
            num = pd.to_numeric(X[c], errors="coerce")
            bad = num.isna() & X[c].notna()
            if bad.any():
                raise ValueError(
                    f"clinical column {c!r} is declared numeric but has non-numeric values "
                    f"{sorted(set(X.loc[bad, c].astype(str)))[:5]} (patients "
                    f"{list(X.index[bad])[:5]}); declare it categorical or fix the values"
                )
            X[c] = num.astype(float)
        for c in self.categorical:
            X[c] = X[c].astype(object).where(X[c].notna(), None)
            X[c] = X[c].map(lambda v: v if v is None else str(v))
        return X

    def fit(self, X: pd.DataFrame, y=None):
        X = self._frame(X)
        transformers = []
        if self.numeric:
            transformers.append(("num", Pipeline([
                ("impute", SimpleImputer(strategy="median")),
                ("scale", StandardScaler()),
            ]), list(self.numeric)))
        if self.categorical:
            transformers.append(("cat", Pipeline([
                ("impute", SimpleImputer(strategy="constant", fill_value="missing",
                                         missing_values=None)),
                ("onehot", OneHotEncoder(drop="first", handle_unknown="ignore",
                                         sparse_output=False)),
                *([("scale", StandardScaler())] if self.scale_indicators else []),
            ]), list(self.categorical)))
        if not transformers:
            raise ValueError("ClinicalEncoder has no columns: set data.clinical.numeric/categorical")
        self.transformer_ = ColumnTransformer(transformers, verbose_feature_names_out=False)
        self.transformer_.fit(X)
        self.categories_ = {}
        if self.categorical:
            enc = self.transformer_.named_transformers_["cat"].named_steps["onehot"]
            self.categories_ = {c: list(cats) for c, cats in zip(self.categorical, enc.categories_)}
        self.feature_names_out_ = list(self.transformer_.get_feature_names_out())
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        X = self._frame(X)
        for c, cats in self.categories_.items():
            vals = set(X[c].dropna()) - set(cats)
            if vals:
                warnings.warn(
                    f"clinical column {c!r}: level(s) {sorted(vals)} not seen in training are "
                    "encoded as the reference level", UserWarning, stacklevel=2)
        with warnings.catch_warnings():
            # sklearn warns on unknown categories too; ours above names the column
            warnings.simplefilter("ignore", UserWarning)
            Z = self.transformer_.transform(X)
        return pd.DataFrame(np.asarray(Z, float), index=X.index, columns=self.feature_names_out_)

    def get_feature_names_out(self, input_features=None):
        return np.asarray(self.feature_names_out_, dtype=object)
