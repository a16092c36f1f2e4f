"""Calibration slope: the one-covariate Cox coefficient of a risk score, checked against
lifelines' CoxPHFitter on simulated Cox data, its clipping, and the cases where it cannot be
estimated (1.0)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from netsurv.survival.calibration import SLOPE_RANGE, calibration_slope

RAW = (-10.0, 10.0)  # wide enough that nothing below is clipped


def _cox_data(n=300, beta=0.3, seed=0):
    """Exponential survival with log-hazard ``beta * x`` and independent uniform censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, n)                      # strong signal: a precise slope
    t_event = rng.exponential(1.0 / np.exp(beta * x))
    t_cens = rng.uniform(0.0, np.quantile(t_event, 0.9), n)
    time = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(int)
    return x, time, event


def _lifelines_slope(risk, time, event) -> float:
    from lifelines import CoxPHFitter

    df = pd.DataFrame({"risk": risk, "T": time, "E": event})
    cph = CoxPHFitter(penalizer=0.0).fit(df, duration_col="T", event_col="E")
    return float(cph.params_["risk"])


def test_default_range_is_zero_to_one():
    assert SLOPE_RANGE == (0.0, 1.0)


def test_slope_of_an_over_dispersed_score_matches_lifelines_and_is_about_one_half():
    x, time, event = _cox_data()
    assert 100 < event.sum() < 300            # a real mix of events and censoring
    risk = 0.6 * x                            # the true log-hazard is 0.3 * x: 2x too spread
    raw = calibration_slope(risk, time, event, clip=RAW)
    ref = _lifelines_slope(risk, time, event)
    assert raw == pytest.approx(ref, abs=1e-3)
    assert raw == pytest.approx(0.5, abs=0.08)
    # inside the default range nothing is clipped
    assert calibration_slope(risk, time, event) == pytest.approx(raw, abs=1e-12)


def test_slope_is_invariant_to_a_shift_and_scales_inversely_with_the_score():
    x, time, event = _cox_data(seed=1)
    a = calibration_slope(0.6 * x, time, event, clip=RAW)
    b = calibration_slope(0.6 * x + 5.0, time, event, clip=RAW)   # Cox: shift-invariant
    c = calibration_slope(1.2 * x, time, event, clip=RAW)         # twice the spread
    assert b == pytest.approx(a, abs=1e-6)
    assert c == pytest.approx(a / 2, abs=1e-4)


def test_under_dispersed_score_is_capped_at_one():
    x, time, event = _cox_data(seed=2)
    risk = 0.1 * x                            # 3x too narrow: raw slope about 3
    raw = calibration_slope(risk, time, event, clip=RAW)
    assert raw == pytest.approx(_lifelines_slope(risk, time, event), abs=1e-3)
    assert raw > 2.0
    assert calibration_slope(risk, time, event) == 1.0


def test_reversed_score_gives_zero():
    x, time, event = _cox_data(seed=3)
    risk = -0.6 * x
    raw = calibration_slope(risk, time, event, clip=RAW)
    assert raw == pytest.approx(_lifelines_slope(risk, time, event), abs=1e-3)
    assert raw < -0.3
    assert calibration_slope(risk, time, event) == 0.0


def test_non_finite_risks_are_left_out():
    x, time, event = _cox_data(seed=4)
    risk = 0.6 * x
    bad = risk.copy()
    bad[[3, 50, 120]] = [np.nan, np.inf, -np.inf]
    keep = np.isfinite(bad)
    got = calibration_slope(bad, time, event, clip=RAW)
    assert got == pytest.approx(calibration_slope(risk[keep], time[keep], event[keep], clip=RAW),
                                abs=1e-12)
    assert got == pytest.approx(_lifelines_slope(risk[keep], time[keep], event[keep]), abs=1e-3)


@pytest.mark.parametrize("n_events", [0, 1])
def test_fewer_than_two_events_give_one(n_events):
    x, time, _ = _cox_data(n=50, seed=5)
    event = np.zeros(50, int)
    event[:n_events] = 1
    assert calibration_slope(0.6 * x, time, event) == 1.0
    assert calibration_slope(-0.6 * x, time, event, clip=RAW) == 1.0


def test_constant_score_gives_one():
    _, time, event = _cox_data(n=80, seed=6)
    assert calibration_slope(np.full(80, 0.7), time, event) == 1.0
    assert calibration_slope(np.full(80, -3.0), time, event, clip=RAW) == 1.0


def test_constant_after_dropping_non_finite_gives_one():
    _, time, event = _cox_data(n=80, seed=7)
    risk = np.full(80, 2.0)
    risk[:5] = np.nan
    assert calibration_slope(risk, time, event, clip=RAW) == 1.0
