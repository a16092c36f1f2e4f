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
from sklearn.utils.validation import check_is_fitted

from netsurv.cohort.schema import CohortError, line_of, source_of


def _cells(X: pd.DataFrame, col: str, bad: pd.Series, k: int = 5) -> str:
    """'value' for patient 'P' (line N), ... for the first ``k`` flagged rows."""
    out = []
    for pid in X.index[bad][:k]:
        n, v = line_of(X, pid), X.at[pid, col]
        shown = repr(v) if isinstance(v, str) else str(v)
        out.append(f"{shown} for patient {pid!r}" + (f" (line {n})" if n else ""))
    more = f" and {int(bad.sum()) - k} more" if bad.sum() > k else ""
    return ", ".join(out) + more


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
        # tables read by netsurv.cohort keep their file and line numbers: errors name them
        src = source_of(X) or "clinical table"
        cols = list(self.numeric) + list(self.categorical)
        missing = [c for c in cols if c not in X.columns]
        if missing:
            raise CohortError(
                f"{src}: clinical column(s) {missing} declared in the data config "
                f"(data.clinical.numeric / categorical) are not in the file (columns: "
                f"{list(X.columns)}); fix the config or the file's header"
            )
        X = X[cols].copy()
        for c in self.numeric:
            num = pd.to_numeric(X[c], errors="coerce")
            bad = num.isna() & X[c].notna()
            if bad.any():
                raise CohortError(
                    f"{src}: column {c!r} is declared numeric (data.clinical.numeric) but holds "
                    f"text: {_cells(X, c, bad)}; fix the values (leave the cell empty when "
                    "unknown) or declare the column in data.clinical.categorical"
                )
            inf = np.isinf(num)
            if inf.any():
                raise CohortError(f"{src}: column {c!r} is not finite: {_cells(X, c, inf)}; "
                                  "leave the cell empty when the value is unknown")
            X[c] = num.astype(float)
        changed = []
        for c in self.categorical:
            v = X[c].astype(object).where(X[c].notna(), None)
            v = v.map(lambda s: s if s is None else str(s))
            stripped = v.map(lambda s: s if s is None else (s.strip() or None))
            if any(a is not None and a != b for a, b in zip(v, stripped)):
                changed.append(c)
            X[c] = stripped
        if changed:  # tables from netsurv.cohort are stripped already (with their own warning)
            warnings.warn(f"clinical column(s) {changed}: leading/trailing whitespace removed "
                          "from levels (e.g. 'M ' counts as 'M')", UserWarning, stacklevel=3)
        return X

    def fit(self, X: pd.DataFrame, y=None):
        """Fit imputation, scaling and the one-hot levels on the training rows ``X``.

        Parameters
        ----------
        X : pandas.DataFrame
            Clinical table holding every declared ``numeric`` and ``categorical`` column.
        y : None
            Ignored.

        Returns
        -------
        ClinicalEncoder
            ``self``, with ``categories_`` (training levels per categorical column) and
            ``feature_names_out_`` set.

        Raises
        ------
        CohortError
            If a declared column is missing, or a numeric column holds text or infinite values.
        ValueError
            If no numeric or categorical column is declared.
        """
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
        """Encode ``X`` with the fitted steps; warns about levels not seen in training.

        Returns
        -------
        pandas.DataFrame
            Float table with ``X``'s index and the columns ``feature_names_out_``.
        """
        check_is_fitted(self, "transformer_")
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
        """The encoded column names (``input_features`` is ignored)."""
        return np.asarray(self.feature_names_out_, dtype=object)
