"""Shared scikit-survival-style interface of netsurv's survival estimators.

A netsurv survival estimator is fitted as ``fit(X, y)`` with ``y`` a structured survival array
(``sksurv.util.Surv.from_arrays(event, time)``; any two fields, the bool one being the event)
and predicts, as scikit-survival's estimators do:

- ``predict(X)``: a risk score per row, higher = worse prognosis (shape ``(n,)``);
- ``predict_survival_function(X, return_array=False)``: one
  :class:`sksurv.functions.StepFunction` per row, or their values at ``unique_times_``;
- ``predict_survival(X, times)``: ``S(t | x)`` at ``times``, ``(n, len(times))`` (what netsurv's
  metrics, e.g. the integrated Brier score, need);
- ``score(X, y)``: Harrell's concordance index of ``predict(X)``
  (:func:`sksurv.metrics.concordance_index_censored`).
"""
from __future__ import annotations

import numpy as np

from netsurv.features.select import as_time_event


def check_survival_y(y, n: int | None = None, who: str = "estimator") -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Validate a survival target and split it into arrays.

    Parameters
    ----------
    y : structured ndarray or tuple
        Structured array with one bool event field and one time field (as made by
        ``sksurv.util.Surv.from_arrays(event, time)``), or a ``(time, event)`` pair.
    n : int, optional
        Number of rows of ``X``; ``y`` must have one entry per row.
    who : str
        Name used in error messages.

    Returns
    -------
    time : ndarray of float, shape (n,)
    event : ndarray of int (0/1), shape (n,)

    Raises
    ------
    ValueError
        If ``y`` is missing, malformed, of the wrong length, has negative or non-finite times
        or a non-binary event indicator.
    """
    if y is None:
        raise ValueError(f"{who}: fit needs a survival target y, e.g. "
                         "sksurv.util.Surv.from_arrays(event, time)")
    try:
        return as_time_event(y, n)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc} (use sksurv.util.Surv.from_arrays(event, time))") from exc


class SurvivalMixin:
    """``score`` (Harrell's C of ``predict``) and scikit-survival's estimator tags.

    Subclasses implement ``predict(X)`` returning a risk score (higher = worse).
    """

    def score(self, X, y, **predict_params) -> float:
        """Harrell's concordance index of the predicted risks.

        Parameters
        ----------
        X : pandas.DataFrame
            Samples to score (what ``predict`` accepts).
        y : structured ndarray or tuple
            Their survival outcome (see :func:`check_survival_y`).
        **predict_params
            Passed to ``predict`` (e.g. the ``meta`` of a
            :class:`~netsurv.models.classical.ClassicalPipeline`).

        Returns
        -------
        float
            :func:`sksurv.metrics.concordance_index_censored` of ``predict(X)``.
        """
        from sksurv.metrics import concordance_index_censored

        risk = np.asarray(self.predict(X, **predict_params), float)
        time, event = check_survival_y(y, len(risk), type(self).__name__)
        return float(concordance_index_censored(event.astype(bool), time, risk)[0])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags
