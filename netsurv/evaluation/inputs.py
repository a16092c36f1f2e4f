"""Model inputs shared by the classical and deep split-fitters: the modality tables (running
the radiomics / pathomics stages when no user table exists) and the per-modality ComBat step."""
from __future__ import annotations

import warnings

import pandas as pd
from omegaconf import DictConfig

from netsurv.cohort.schema import Cohort, CohortError

ACQ_EXCLUDE = {"patient_id", "image", "mask", "label", "roi"}


def require_inputs(cohort: Cohort, cfg: DictConfig) -> None:
    """Fail before any stage runs when a modality of the run has no usable item at all
    (slides.csv / ct.csv absent, empty, or every path wrong); single bad rows are only recorded
    as failures by the stages, so without this a run would end in an empty modality far from
    the cause."""
    from netsurv.cohort.schema import require_items

    mods = set(cfg.modalities)
    emb_dir = (cfg.get("embeddings") or {}).get("dir")
    if "wsi" in mods or ("embeddings" in mods and "embeddings" not in cohort.features):
        require_items(cohort, "slides", need_files=not emb_dir)
    if "pathomics" in mods and "pathomics" not in cohort.features:
        require_items(cohort, "slides")
    if "radiomics" in mods and "radiomics" not in cohort.features:
        require_items(cohort, "ct")


def modality_frames(cohort: Cohort, cfg: DictConfig) -> dict[str, pd.DataFrame]:
    """Raw per-modality tables indexed by patient_id.

    A user table ``features/<modality>.csv`` wins; otherwise the modality's extraction stage runs
    (or resumes from its cache): radiomics from ct.csv, pathomics (nuclear morphology) from
    slides.csv.  The stages are called on every rank of a multi-process job and return the
    same complete table on each.  ``wsi`` (tile-embedding bags) is handled by the deep fitter;
    ``embeddings`` is the mean tile embedding per patient (the embedding stage's bags, or
    ``embeddings.dir``), a feature table for classical models (the linear probe).
    """
    frames = {}
    for m in cfg.modalities:
        if m == "wsi":  # bags of tile embeddings, see netsurv.evaluation.deep
            continue
        if m == "clinical":
            frames[m] = cohort.clinical
        elif m in cohort.features:
            frames[m] = cohort.features[m]
        elif m == "embeddings":  # the linear probe: mean tile embedding per patient
            from netsurv.training.bags import embedding_means, wsi_bag_store

            bags, _ = wsi_bag_store(cohort, cfg, cohort.patients)
            frames[m] = embedding_means(bags, cohort.patients)
        elif m == "radiomics":
            from netsurv.tasks.radiomics import extract

            table, _ = extract(cohort, cfg, progress=False)
            acq = [c for c in table.columns if c in set(cohort.ct.columns) - ACQ_EXCLUDE]
            frames[m] = table.drop(columns=acq).set_index("patient_id")
        elif m == "pathomics":
            from netsurv.tasks.pathomics import extract as extract_pathomics

            table, fails = extract_pathomics(cohort, cfg, progress=False)
            if len(fails):
                warnings.warn(f"pathomics: {len(fails)} slide(s) failed (see failures.csv under "
                              f"{cfg.data.derived}/pathomics/)", UserWarning)
            frames[m] = table.set_index("patient_id")
        else:
            raise CohortError(
                f"modality {m!r}: no table for it in {cohort.root}: expected "
                f"features/{m}.csv (or one of the stages: radiomics from ct.csv, pathomics from "
                "slides.csv, embeddings = mean tile embedding from slides.csv, wsi = "
                "tile-embedding bags for deep models)")
    return frames


def acquisition_meta(cohort: Cohort) -> pd.DataFrame | None:
    """ct.csv acquisition columns by patient (ComBat batches), with clinical covariates."""
    if cohort.ct is None:
        return None
    ct = cohort.ct.drop_duplicates("patient_id").set_index("patient_id")
    acq = ct[[c for c in ct.columns if c not in ACQ_EXCLUDE]]
    return acq.join(cohort.clinical.drop(columns=[c for c in cohort.clinical.columns
                                                  if c in acq.columns]), how="left")


def make_harmonizer(cfg: DictConfig, modality: str, meta):
    """The ComBat step for ``modality`` when ``harmonize=combat`` covers it, else None."""
    h = cfg.harmonize
    if h.method != "combat" or modality not in h.modalities:
        return None
    if meta is None or h.batch_col not in meta.columns:
        raise CohortError(f"harmonize=combat needs batch column {h.batch_col!r} in ct.csv "
                          f"(modality {modality}); set harmonize.batch_col or use harmonize=none")
    from netsurv.features.harmonize import ComBat

    return ComBat(batch_col=h.batch_col, covariates=tuple(h.covariates),
                  categorical_covariates=tuple(h.categorical_covariates),
                  parametric=h.parametric, eb=h.eb, mean_only=h.mean_only, unseen=h.unseen,
                  unseen_min_cases=int(h.get("unseen_min_cases", 10)))
