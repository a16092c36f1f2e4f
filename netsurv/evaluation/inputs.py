"""Model inputs shared by the classical and deep split-fitters: the modality tables (running
the radiomics / pathomics stages when no user table exists) and the per-modality ComBat step."""
from __future__ import annotations

import warnings

import pandas as pd
from omegaconf import DictConfig

from netsurv.cohort.schema import Cohort, CohortError
from netsurv.modalities import CLINICAL, EMBEDDINGS, PATHOMICS, RADIOMICS, WSI

ACQ_EXCLUDE = {"patient_id", "image", "mask", "label", "roi"}


def require_inputs(cohort: Cohort, cfg: DictConfig) -> None:
    """Fail before any stage runs when a modality of the run has no usable item at all
    (slides.csv / ct.csv absent, empty, or every path wrong); single bad rows are only recorded
    as failures by the stages, so without this a run would end in an empty modality far from
    the cause."""
    from netsurv.cohort.schema import require_items

    mods = set(cfg.modalities)
    emb_dir = (cfg.get("embeddings") or {}).get("dir")
    if WSI in mods or (EMBEDDINGS in mods and EMBEDDINGS not in cohort.features):
        require_items(cohort, "slides", need_files=not emb_dir)
    if PATHOMICS in mods and PATHOMICS not in cohort.features:
        require_items(cohort, "slides")
    if RADIOMICS in mods and RADIOMICS not in cohort.features:
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
        if m == WSI:  # bags of tile embeddings, see netsurv.evaluation.deep
            continue
        if m == CLINICAL:
            frames[m] = cohort.clinical
        elif m in cohort.features:
            frames[m] = cohort.features[m]
        elif m == EMBEDDINGS:  # the linear probe: mean tile embedding per patient
            from netsurv.training.bags import embedding_means, wsi_bag_store

            bags, _ = wsi_bag_store(cohort, cfg, cohort.patients)
            frames[m] = embedding_means(bags, cohort.patients)
        elif m == RADIOMICS:
            from netsurv.tasks.radiomics import extract

            table, _ = extract(cohort, cfg, progress=False)
            acq = [c for c in table.columns if c in set(cohort.ct.columns) - ACQ_EXCLUDE]
            frames[m] = table.drop(columns=acq).set_index("patient_id")
        elif m == PATHOMICS:
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


def probe_frames(cohort: Cohort, cfg: DictConfig, mods) -> dict[str, pd.DataFrame]:
    """Tables of ``mods`` that are not modalities of the run (the deep offset's stacked probes,
    :mod:`netsurv.training.offset`), built as :func:`modality_frames` builds them.  The probes
    are optional: a table that cannot be built (no readable slide, a failed stage) is left out
    with a warning naming why, and the offset goes without it."""
    from omegaconf import OmegaConf

    out = {}
    for m in mods:
        if m in (EMBEDDINGS, WSI):  # the mean tile embedding comes from the run's bags
            continue
        one = OmegaConf.merge(cfg, {"modalities": [m]})
        try:
            require_inputs(cohort, one)
            out.update(modality_frames(cohort, one))
        except Exception as exc:  # noqa: BLE001 - an optional input must not fail the run
            warnings.warn(f"offset probe {m!r} skipped: its table could not be built "
                          f"({type(exc).__name__}: {exc})", UserWarning)
    return out


def acquisition_meta(cohort: Cohort) -> pd.DataFrame | None:
    """ct.csv acquisition columns by patient (ComBat batches), with clinical covariates."""
    if cohort.ct is None:
        return None
    ct = cohort.ct.drop_duplicates("patient_id").set_index("patient_id")
    acq = ct[[c for c in ct.columns if c not in ACQ_EXCLUDE]]
    return acq.join(cohort.clinical.drop(columns=[c for c in cohort.clinical.columns
                                                  if c in acq.columns]), how="left")


def harmonize_method(cfg: DictConfig) -> str:
    """``none`` or the harmonizer's class name in lower case (``combat``), as metrics.json and
    the results table name it.  ``cfg.harmonize``: the harmonizer's config (``_target_``) or
    null; run configs written before it had a ``_target_`` have ``method``."""
    h = cfg.get("harmonize")
    if not h:
        return "none"
    if "_target_" in h:
        return str(h._target_).rsplit(".", 1)[-1].lower()
    return str(h.get("method", "none"))


def harmonized_modalities(cfg: DictConfig) -> list[str]:
    """The feature tables the harmonizer applies to (``harmonize_modalities``; older run
    configs: ``harmonize.modalities``); [] without a harmonizer."""
    h = cfg.get("harmonize")
    if harmonize_method(cfg) == "none":
        return []
    if "_target_" not in h and "modalities" in h:
        return list(h.modalities)
    return list(cfg.get("harmonize_modalities") or [])


def make_harmonizer(cfg: DictConfig, modality: str, meta):
    """A fresh harmonizer (``hydra.utils.instantiate(cfg.harmonize)``, ComBat with
    ``harmonize=combat``) for ``modality`` when ``harmonize_modalities`` lists it, else None."""
    h = cfg.harmonize
    if modality not in harmonized_modalities(cfg):
        return None
    batch_col = h.get("batch_col")
    if batch_col is not None and (meta is None or batch_col not in meta.columns):
        raise CohortError(f"harmonize={harmonize_method(cfg)} needs batch column {batch_col!r} "
                          f"in ct.csv (modality {modality}); set harmonize.batch_col or use "
                          "harmonize=none")
    from hydra.utils import instantiate

    # plain lists (ComBat's covariates), not OmegaConf ListConfigs, in the fitted step
    return instantiate(h, _convert_="all")
