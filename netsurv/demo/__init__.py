"""The synthetic demo cohort: clinical table with known true risk (:mod:`.cohort`), CT volumes
with tumour masks from several scanners (:mod:`.ct`) and pyramidal H&E slides (:mod:`.wsi`),
written in the cohort folder contract (``docs/cohort.md``) so that every pipeline runs offline.

Kept apart from :mod:`netsurv.cohort`, which holds the contract itself (schema, loading,
splits): nothing in a real-cohort run imports the generators."""
from .cohort import make_demo_cohort

__all__ = ["make_demo_cohort"]
