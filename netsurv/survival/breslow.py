"""The one Breslow baseline of the package: survival curves S(t | x) = S0(t) ** exp(risk) from a
linear predictor (a Cox model's, or any risk score treated as one).

Why one: the report's figures, the deep models' integrated Brier score and their calibration
each had a way of turning risks into curves, so one report could show two integrated Brier
scores.  Everything that needs a Breslow baseline of a risk uses :class:`Breslow`; the
classical estimators keep their library's own (scikit-survival's in ``CoxnetSurvivalAnalysis``,
lifelines' in ``CoxPHFitter``), which ``tests/unit/test_one_breslow.py`` checks agree with it.

The estimate itself is scikit-survival's :class:`~sksurv.linear_model.coxph.BreslowEstimator`
(H0(t) = sum over event times u <= t of d(u) / sum_{T_j >= u} exp(risk_j)); this class adds
what its callers need around it:

* the risk is centred on its training mean before ``exp`` (the baseline absorbs any shift,
  so the curves are unchanged) and clipped to +-50 around it: scikit-survival exponentiates
  the raw predictor, which overflows for a network's log-hazards of a few hundred;
* H0 is evaluated as the step function it is on the whole time axis: 0 before the first
  training time and constant after the last.  scikit-survival's ``StepFunction`` raises beyond
  the last training time (a deep model whose baseline is fitted on part of the training split
  then lost its Brier score) and returns H0 of the first time before it;
* curves of many patients at many times are one vectorised ``[n, len(times)]`` array.
"""
from __future__ import annotations

import numpy as np

CLIP = 50.0  # |risk - training mean| beyond this is clipped: exp(50) ~ 5e21, far past any model


class Breslow:
    """Breslow baseline hazard fitted on training ``risk`` (linear predictor), ``time``,
    ``event``; ``survival(risk, times)`` gives S(t | x) = exp(-H0(t) exp(risk)).

    Fitted attributes: ``times_`` (unique training times, ascending), ``cum_hazard_`` (H0 at
    them, for the centred risk), ``centre_`` (the training mean of the risk subtracted).
    """

    def fit(self, risk, time, event) -> Breslow:
        """Fit the baseline on training risks (linear predictor), times and event indicators.

        Returns
        -------
        Breslow
            ``self``, with ``times_``, ``cum_hazard_`` and ``centre_`` set.

        Raises
        ------
        ValueError
            If the three arrays differ in length or are empty.
        """
        from sksurv.linear_model.coxph import BreslowEstimator

        risk = np.asarray(risk, float).reshape(-1)
        time = np.asarray(time, float).reshape(-1)
        event = np.asarray(event).reshape(-1).astype(bool)
        if not (len(risk) == len(time) == len(event)) or len(risk) == 0:
            raise ValueError(f"Breslow: risk, time, event lengths {len(risk)}, {len(time)}, "
                             f"{len(event)} (must be equal and non-zero)")
        self.centre_ = float(np.mean(risk))
        est = BreslowEstimator().fit(self._rel_log(risk), event, time)
        self.times_ = np.asarray(est.cum_baseline_hazard_.x, float)
        self.cum_hazard_ = np.asarray(est.cum_baseline_hazard_.y, float)
        return self

    def _rel_log(self, risk) -> np.ndarray:
        return np.clip(np.asarray(risk, float).reshape(-1) - self.centre_, -CLIP, CLIP)

    def cum_baseline_hazard(self, times) -> np.ndarray:
        """H0(t) (of the centred risk) at ``times``: a right-continuous step function, 0 before
        the first training time, constant after the last."""
        times = np.atleast_1d(np.asarray(times, float))
        idx = np.searchsorted(self.times_, times, side="right") - 1
        return np.where(idx >= 0, self.cum_hazard_[np.clip(idx, 0, None)], 0.0)

    def baseline_survival(self, times) -> np.ndarray:
        """S0(t) = exp(-H0(t)) at ``times`` (the curve of a patient with the mean risk)."""
        return np.exp(-self.cum_baseline_hazard(times))

    def survival(self, risk, times) -> np.ndarray:
        """S(t | x) = exp(-H0(t) exp(risk - centre)), ``[len(risk), len(times)]``."""
        h = self.cum_baseline_hazard(times)
        return np.exp(-np.exp(self._rel_log(risk))[:, None] * h[None, :])
