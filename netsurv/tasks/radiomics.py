"""CT radiomics stage: ``python scripts/extract_radiomics.py data=demo [radiology=default]``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from netsurv.cohort.schema import Cohort, CohortError


def output_dir(cfg: DictConfig, params: dict) -> Path:
    """The stage's output folder: ``<data.derived>/radiomics/<name>-<params hash>``."""
    from netsurv.radiology.radiomics import params_hash

    return Path(str(cfg.data.derived)) / "radiomics" / f"{params['name']}-{params_hash(params)}"


def extract(cohort: Cohort, cfg: DictConfig, progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Run (or resume) extraction for ``cohort``; cached cases are not recomputed.

    May be called on every rank of a job: each rank extracts its share of the cases and every
    rank returns the whole table."""
    from netsurv.radiology.radiomics import case_notes, extract_cohort
    from netsurv.stages import stage_env

    if cohort.ct is None:
        raise CohortError(f"{cohort.root}: no ct.csv, so there is no CT to extract radiomics from")
    params = OmegaConf.to_container(cfg.radiology, resolve=True)
    out = output_dir(cfg, params)
    table, failures = extract_cohort(cohort.ct, params, out, n_jobs=int(params.get("n_jobs", 1)),
                                     progress=progress)
    if stage_env().rank == 0:
        summarise(failures, case_notes(out), out)
    return table, out


def summarise(failures: pd.DataFrame, notes: pd.DataFrame, out: Path, shown: int = 5) -> None:
    """Console summary of failed cases and of cases with reading notes."""
    if len(failures):
        print(f"radiomics: {len(failures)} case(s) failed; reasons in {out / 'failures.csv'}")
        for r in failures.head(shown).itertuples(index=False):
            print(f"  {r.patient_id}: {r.reason}")
    if len(notes):
        print(f"radiomics: {len(notes)} case(s) extracted with notes (column 'notes' of "
              f"{out / 'failures.csv'}):")
        for r in notes.head(shown).itertuples(index=False):
            print(f"  {r.patient_id}: {r.notes}")
        if len(notes) > shown:
            print(f"  ... and {len(notes) - shown} more")


def run(cfg: DictConfig) -> dict:
    """Extract the radiomics table of the configured cohort (``scripts/extract_radiomics.py``).

    Returns
    -------
    dict
        ``n_cases``, ``n_features`` (pyradiomics feature columns) and ``table`` (path of
        ``radiomics.csv``).
    """
    from netsurv.tasks.cohort import resolve_cohort

    cohort = resolve_cohort(cfg.data)
    table, out = extract(cohort, cfg)
    n_feat = sum(1 for c in table.columns if c.startswith(("original_", "log-", "wavelet-")))
    from netsurv.stages import stage_env

    if stage_env().rank == 0:
        print(f"radiomics: {len(table)} case(s), {n_feat} features per case -> "
              f"{out / 'radiomics.csv'}")
    return {"n_cases": len(table), "n_features": n_feat, "table": str(out / "radiomics.csv")}
