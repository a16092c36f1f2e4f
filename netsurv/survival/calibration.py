"""Calibration slope of a risk score (the shrinkage factor of Van Houwelingen & Le Cessie):
the coefficient of a one-covariate Cox model of held-out patients' survival on the score.
1 = well calibrated; below 1 = the score is over-dispersed (overfitted), and its survival
curves are too confident unless it is shrunk by the slope."""
from __future__ import annotations

import warnings

import numpy as np

# a negative slope (no discrimination held out) gives the null curves; a slope above 1 (an
# under-dispersed score, e.g. a penalised model's) is not applied: spreading a score on the
# strength of ~10 held-out events made curves overconfident (demo IBS above the null's)
SLOPE_RANGE = (0.0, 1.0)


def calibration_slope(risk, time, event, clip=SLOPE_RANGE) -> float:
    """Slope of ``risk`` on held-out patients (scikit-survival's CoxPHSurvivalAnalysis, Efron
    ties), clipped to ``clip``; 1.0 when it cannot be estimated (fewer than 2 events, a
    constant score, or a fit that does not converge)."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    risk, time, event = (np.asarray(a, float) for a in (risk, time, event))
    ok = np.isfinite(risk)
    risk, time, event = risk[ok], time[ok], event[ok].astype(bool)
    if event.sum() < 2 or np.ptp(risk) == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter of separable tiny sets
        try:
            m = CoxPHSurvivalAnalysis(ties="efron", alpha=1e-4).fit(
                risk[:, None], Surv.from_arrays(event, time))
        except (ValueError, ArithmeticError, np.linalg.LinAlgError):
            return 1.0
    b = float(m.coef_[0])
    return float(np.clip(b, *clip)) if np.isfinite(b) else 1.0
