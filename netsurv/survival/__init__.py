"""Survival estimators, the Breslow baseline, losses, metrics and calibration.

Risk convention throughout: ``risk`` is a log-hazard score, higher means an earlier event.
"""
