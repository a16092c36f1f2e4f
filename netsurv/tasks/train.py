"""Training task: fit and evaluate a survival model over the evaluation protocol's splits.

Writes into the run directory (DESIGN.md §4): ``metrics.json``, ``predictions.csv``,
``selected_features.csv``, ``inner_search.csv``, ``hazard_ratios.csv`` (CoxPH), ``warnings.log``,
the resolved ``config.yaml`` and the fitted pipeline of every split (``models/<split>.joblib``).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from netsurv.cohort.schema import Cohort, CohortError
from netsurv.cohort.splits import make_splits
from netsurv.models.classical import ClassicalPipeline, ImagingBlock, inner_search, take_rows
from netsurv.survival.metrics import (MetricError, bootstrap_ci, harrell_cindex, integrated_brier,
                                      mean_ci, td_auc, uno_cindex)
from netsurv.tasks.cohort import resolve_cohort

log = logging.getLogger(__name__)

ACQ_EXCLUDE = {"patient_id", "image", "mask", "label"}


def modality_frames(cohort: Cohort, cfg: DictConfig) -> dict[str, pd.DataFrame]:
    """Raw per-modality tables indexed by patient_id.

    A user table ``features/<modality>.csv`` wins; otherwise the modality's extraction stage runs
    (or resumes from its cache) — radiomics from ct.csv.
    """
    frames = {}
    for m in cfg.modalities:
        if m == "clinical":
            frames[m] = cohort.clinical
        elif m in cohort.features:
            frames[m] = cohort.features[m]
        elif m == "radiomics":
            from netsurv.tasks.radiomics import extract

            table, _ = extract(cohort, cfg, progress=False)
            acq = [c for c in table.columns if c in set(cohort.ct.columns) - ACQ_EXCLUDE]
            frames[m] = table.drop(columns=acq).set_index("patient_id")
        else:
            raise CohortError(
                f"modality {m!r}: no table for it in {cohort.root}: expected "
                f"features/{m}.csv" + (" (the WSI morphology stage is not available yet)"
                                       if m == "pathomics" else "")
            )
    return frames


def acquisition_meta(cohort: Cohort) -> pd.DataFrame | None:
    """ct.csv acquisition columns by patient (ComBat batches), with clinical covariates."""
    if cohort.ct is None:
        return None
    ct = cohort.ct.drop_duplicates("patient_id").set_index("patient_id")
    acq = ct[[c for c in ct.columns if c not in ACQ_EXCLUDE]]
    return acq.join(cohort.clinical.drop(columns=[c for c in cohort.clinical.columns
                                                  if c in acq.columns]), how="left")


def build_pipeline(cfg: DictConfig, modalities, meta) -> ClassicalPipeline:
    h = cfg.harmonize
    imaging = {}
    for m in modalities:
        if m == "clinical":
            continue
        harm = None
        if h.method == "combat" and m in h.modalities:
            if meta is None or h.batch_col not in meta.columns:
                raise CohortError(f"harmonize=combat needs batch column {h.batch_col!r} in ct.csv "
                                  f"(modality {m}); set harmonize.batch_col or use harmonize=none")
            from netsurv.features.harmonize import ComBat

            harm = ComBat(batch_col=h.batch_col, covariates=tuple(h.covariates),
                          categorical_covariates=tuple(h.categorical_covariates),
                          parametric=h.parametric, eb=h.eb, mean_only=h.mean_only, unseen=h.unseen)
        imaging[m] = ImagingBlock(harmonizer=harm, corr_threshold=cfg.selection.corr_threshold)
    k = cfg.selection.k
    k0 = list(k)[0] if OmegaConf.is_list(k) else k
    return ClassicalPipeline(
        clinical_encoder=instantiate(cfg.clinical_encoder) if "clinical" in modalities else None,
        imaging=imaging, model=instantiate(cfg.model.estimator), k=k0, meta=meta)


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig) -> dict:
    out = _run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = _run(cfg, out)
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in seen:
            seen.append(msg)
            log.warning(msg)
    (out / "warnings.log").write_text("\n".join(seen) + ("\n" if seen else ""))
    metrics["n_warnings"] = len(seen)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    c = metrics["cindex"]
    line = (f"{metrics['experiment']} · {metrics['endpoint']} · harmonize={metrics['harmonize']} · "
            f"{metrics['protocol']} ({len(c['per_split'])} splits, {metrics['n_patients']} "
            f"patients): test C-index {c['mean']:.3f} (95% CI {c['ci95'][0]:.3f}–{c['ci95'][1]:.3f})")
    if "oracle_cindex" in metrics:
        line += f" · oracle {metrics['oracle_cindex']['mean']:.3f}"
    print(line, flush=True)
    print(f"outputs: {out}", flush=True)
    return metrics


def _summary(values: dict) -> dict:
    m, sd, ci = mean_ci(list(values.values()))
    return {"mean": m, "std": sd, "ci95": list(ci), "per_split": values}


def _run(cfg: DictConfig, out: Path) -> dict:
    cohort = resolve_cohort(cfg.data)
    target = str(cfg.target)
    modalities = list(cfg.modalities)
    frames = modality_frames(cohort, cfg)
    # classical models need every modality: keep complete cases, say how many were dropped
    patients = [p for p in cohort.patients if all(p in f.index for f in frames.values())]
    dropped = len(cohort.patients) - len(patients)
    if dropped:
        warnings.warn(f"{dropped} patient(s) lack one of the modalities {modalities} and "
                      "are left out of this classical model", UserWarning)
    frames = {k: v.loc[patients] for k, v in frames.items()}
    time, event = cohort.endpoint(target)
    pos = pd.Series(np.arange(len(cohort.patients)), index=cohort.patients)[patients].to_numpy()
    time, event = time[pos], event[pos]
    truth = None
    if cohort.truth is not None:
        truth = cohort.truth["true_risk"].reindex(patients).to_numpy(float)
    meta = acquisition_meta(cohort)

    protocol = OmegaConf.to_container(cfg.evaluation, resolve=True)
    splits = make_splits(protocol, event)
    grid = dict(OmegaConf.to_container(cfg.model.get("grid") or {}, resolve=True))
    if OmegaConf.is_list(cfg.selection.k):
        grid["k"] = list(cfg.selection.k)
    (out / "models").mkdir(exist_ok=True)
    rows, selected, searches, hrs = [], [], [], []
    per = {"cindex": {}, "cindex_uno": {}, "td_auc": {}, "ibs": {}, "oracle_cindex": {}}
    boot = {}
    for split in splits:
        tr, te = split.train, split.test
        pipe = build_pipeline(cfg, modalities, meta)
        if grid:
            best, table = inner_search(pipe, take_rows(frames, tr), time[tr], event[tr], grid,
                                       cv=int(cfg.inner_cv), seed=int(cfg.seed),
                                       repeats=int(cfg.get("inner_repeats", 1)))
            searches.append(table.assign(split=split.name))
            pipe.k = best.pop("k", pipe.k)
            pipe.model = pipe.model.set_params(**best)
        pipe.fit(take_rows(frames, tr), time[tr], event[tr])
        risk = pipe.predict_risk(frames)
        tt, et, rt = time[te], event[te], risk[te]
        per["cindex"][split.name] = harrell_cindex(tt, et, rt)
        boot[split.name] = list(bootstrap_ci(harrell_cindex, tt, et, rt, n_boot=500, seed=0))
        try:
            per["cindex_uno"][split.name] = uno_cindex(time[tr], event[tr], tt, et, rt)
            _, _, per["td_auc"][split.name] = td_auc(time[tr], event[tr], tt, et, rt)
            per["ibs"][split.name] = integrated_brier(
                time[tr], event[tr], tt, et,
                lambda times: pipe.predict_survival(take_rows(frames, te), times))
        except (MetricError, AttributeError, ValueError) as exc:
            warnings.warn(f"split {split.name}: time-dependent metrics skipped ({exc})", UserWarning)
        if truth is not None:
            per["oracle_cindex"][split.name] = harrell_cindex(tt, et, truth[te])
        role = np.full(len(patients), "train", dtype=object)
        role[te] = "test"
        rows.append(pd.DataFrame({"patient_id": patients, "split": split.name,
                                  "role": role, "risk": risk}))
        selected += [{"split": split.name, "feature": c} for c in pipe.columns_]
        summ = getattr(pipe.model_, "summary_", None)
        if summ is not None:
            hrs.append(summ.reset_index().rename(columns={"covariate": "feature"})
                       .assign(split=split.name))
        joblib.dump(pipe, out / "models" / f"{split.name}.joblib")
    pd.concat(rows).to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(selected).to_csv(out / "selected_features.csv", index=False)
    if searches:
        pd.concat(searches).to_csv(out / "inner_search.csv", index=False)
    if hrs:
        pd.concat(hrs).to_csv(out / "hazard_ratios.csv", index=False)

    metrics = {
        "experiment": str(cfg.name),
        "endpoint": target,
        "modalities": modalities,
        "harmonize": str(cfg.harmonize.method),
        "model": str(cfg.model.estimator._target_).rsplit(".", 1)[-1],
        "n_patients": len(patients),
        "n_events": int(event.sum()),
        "protocol": protocol["name"],
        "cindex": {**_summary(per["cindex"]), "bootstrap_ci95_per_split": boot},
    }
    for key in ("cindex_uno", "td_auc", "ibs", "oracle_cindex"):
        if len(per[key]) == len(splits):
            metrics[key] = _summary(per[key])
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return metrics
