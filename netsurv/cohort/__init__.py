"""Cohort folder contract, demo cohort and patient splits."""
from .schema import Cohort, CohortError, CohortWarning, load_cohort

__all__ = ["Cohort", "CohortError", "CohortWarning", "load_cohort"]
