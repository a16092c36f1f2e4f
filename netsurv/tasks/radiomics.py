"""CT radiomics stage: ``python scripts/extract_radiomics.py data=demo [radiology=default]``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from netsurv.cohort.schema import Cohort, CohortError


def output_dir(cfg: DictConfig, params: dict) -> Path:
    from netsurv.radiology.radiomics import params_hash

    return Path(str(cfg.data.derived)) / "radiomics" / f"{params['name']}-{params_hash(params)}"


def extract(cohort: Cohort, cfg: DictConfig, progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Run (or resume) extraction for ``cohort``; cached cases are not recomputed."""
    from netsurv.radiology.radiomics import extract_cohort

    if cohort.ct is None:
        raise CohortError(f"{cohort.root}: no ct.csv, so there is no CT to extract radiomics from")
    params = OmegaConf.to_container(cfg.radiology, resolve=True)
    out = output_dir(cfg, params)
    table, failures = extract_cohort(cohort.ct, params, out, n_jobs=int(params.get("n_jobs", 1)),
                                     progress=progress)
    if len(failures):
        print(f"radiomics: {len(failures)} case(s) failed; reasons in {out / 'failures.csv'}")
    return table, out


def run(cfg: DictConfig) -> dict:
    from netsurv.tasks.cohort import resolve_cohort

    cohort = resolve_cohort(cfg.data)
    table, out = extract(cohort, cfg)
    n_feat = sum(1 for c in table.columns if c.startswith(("original_", "log-", "wavelet-")))
    print(f"radiomics: {len(table)} case(s), {n_feat} features per case -> {out / 'radiomics.csv'}")
    return {"n_cases": len(table), "n_features": n_feat, "table": str(out / "radiomics.csv")}
