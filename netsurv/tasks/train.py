"""Training task: fit and evaluate a survival model over the evaluation protocol's splits.

Writes into the run directory: ``metrics.json``, ``predictions.csv``,
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
from netsurv.survival.losses import canonical_loss
from netsurv.survival.metrics import (MetricError, bootstrap_ci, harrell_cindex, integrated_brier,
                                      mean_ci, td_auc, uno_cindex)
from netsurv.tasks.cohort import resolve_cohort

log = logging.getLogger(__name__)

ACQ_EXCLUDE = {"patient_id", "image", "mask", "label"}


def modality_frames(cohort: Cohort, cfg: DictConfig) -> dict[str, pd.DataFrame]:
    """Raw per-modality tables indexed by patient_id.

    A user table ``features/<modality>.csv`` wins; otherwise the modality's extraction stage runs
    (or resumes from its cache): radiomics from ct.csv, pathomics (nuclear morphology) from
    slides.csv. ``wsi`` (tile-embedding bags) is loaded by the deep task instead.
    """
    frames = {}
    for m in cfg.modalities:
        if m == "wsi":  # bags of tile embeddings, loaded by the deep task
            continue
        if m == "clinical":
            frames[m] = cohort.clinical
        elif m in cohort.features:
            frames[m] = cohort.features[m]
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
                "slides.csv, wsi = tile-embedding bags for deep models)")
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
                  parametric=h.parametric, eb=h.eb, mean_only=h.mean_only, unseen=h.unseen)


def build_pipeline(cfg: DictConfig, modalities, meta) -> ClassicalPipeline:
    imaging = {m: ImagingBlock(harmonizer=make_harmonizer(cfg, m, meta),
                               corr_threshold=cfg.selection.corr_threshold)
               for m in modalities if m != "clinical"}
    k = cfg.selection.k
    k0 = list(k)[0] if OmegaConf.is_list(k) else k
    return ClassicalPipeline(
        clinical_encoder=instantiate(cfg.clinical_encoder) if "clinical" in modalities else None,
        imaging=imaging, model=instantiate(cfg.model.estimator), k=k0, meta=meta)


def is_deep(cfg: DictConfig) -> bool:
    return str(cfg.model.get("kind", "classical")) == "deep"


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
        # library-internal deprecation notices are not about the user's run
        warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
        metrics = _run(cfg, out)
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in seen:
            seen.append(msg)
            log.warning(msg)
    (out / "warnings.log").write_text("\n".join(seen) + ("\n" if seen else ""), encoding="utf-8")
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
    if cfg.get("report", True):
        from netsurv.report.html import write_report

        try:
            print(f"report: {write_report(out)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
            log.warning("report not written: %s", exc)
    return metrics


def sweep_objective(cfg: DictConfig, metrics: dict) -> float | None:
    """The value a hyper-parameter sweeper optimises: ``metrics[cfg.optimized_metric]["mean"]``
    (``val_cindex``, the inner-validation C-index, for hparams_search=optuna). Never the test
    C-index: choosing on it would leak the test patients into model selection."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        raise KeyError(f"optimized_metric={key!r} is not in this run's metrics.json (it has "
                       f"{sorted(k for k, v in metrics.items() if isinstance(v, dict) and 'mean' in v)}"
                       "); val_cindex exists for deep models only")
    return float(metrics[key]["mean"])


def _summary(values: dict) -> dict:
    m, sd, ci = mean_ci(list(values.values()))
    return {"mean": m, "std": sd, "ci95": list(ci), "per_split": values}


def _run(cfg: DictConfig, out: Path) -> dict:
    if is_deep(cfg):  # a trainer that cannot run here fails now, not after the stages
        from netsurv.cluster import check_trainer

        check_trainer(cfg.trainer)
    cohort = resolve_cohort(cfg.data)
    target = str(cfg.target)
    modalities = list(cfg.modalities)
    deep = is_deep(cfg)
    if not deep and "wsi" in modalities:
        raise CohortError("modality 'wsi' (tile-embedding bags) needs a deep model, e.g. "
                          "model=abmil; classical models take feature tables (pathomics, "
                          "radiomics)")
    if not deep and canonical_loss(cfg.loss.name) != "cox":
        raise ValueError(f"loss={cfg.loss.name}: classical models fit a Cox model; discrete-time "
                         "losses need a deep model (model=abmil, ...)")
    frames = modality_frames(cohort, cfg)
    bags = emb_info = None
    if deep:
        from netsurv.tasks.train_deep import prepare_inputs

        frames, bags, emb_info = prepare_inputs(cohort, cfg, frames, cohort.patients)
        # deep models handle missing modalities: keep patients with at least one of them
        have = [p for p in cohort.patients if any(p in f.index for f in frames.values())
                or (bags is not None and p in bags)]
        why = "have none of the modalities"
    else:
        # classical models need every modality: keep complete cases
        have = [p for p in cohort.patients if all(p in f.index for f in frames.values())]
        why = "lack one of the modalities"
    patients = have
    dropped = len(cohort.patients) - len(patients)
    if dropped:
        warnings.warn(f"{dropped} patient(s) {why} {modalities} and are left out of this "
                      f"{'deep' if deep else 'classical'} model", UserWarning)
    frames = {k: v.loc[[p for p in patients if p in v.index]] if deep else v.loc[patients]
              for k, v in frames.items()}
    time, event = cohort.endpoint(target)
    pos = pd.Series(np.arange(len(cohort.patients)), index=cohort.patients)[patients].to_numpy()
    time, event = time[pos], event[pos]
    truth = None
    if cohort.truth is not None:
        truth = cohort.truth["true_risk"].reindex(patients).to_numpy(float)
    meta = acquisition_meta(cohort)

    protocol = OmegaConf.to_container(cfg.evaluation, resolve=True)
    splits = make_splits(protocol, event)
    (out / "models").mkdir(exist_ok=True)
    rows, selected, searches, hrs, deep_info = [], [], [], [], {}
    per = {"cindex": {}, "cindex_uno": {}, "td_auc": {}, "ibs": {}, "oracle_cindex": {},
           "val_cindex": {}}
    boot = {}
    for split in splits:
        tr, te = split.train, split.test
        role = np.full(len(patients), "train", dtype=object)
        if deep:
            from netsurv.tasks.train_deep import run_split, survival_fn, write_attention

            feat_dim = next(iter(bags.values())).features.shape[1] if bags else 0
            pred, module, role, edges, info = run_split(cfg, split, patients, frames, bags, time,
                                                        event, meta, out, feat_dim)
            risk = np.empty(len(patients))
            risk[pred["pos"]] = pred["risk"]
            outs = np.empty((len(patients), pred["out"].shape[1]))
            outs[pred["pos"]] = pred["out"]
            fit_idx = np.flatnonzero(role == "train")
            sfn = survival_fn(module.loss_name, outs, fit_idx, time, event, edges)

            def surv(times, _fn=sfn, _te=te):
                return _fn(_te, times)
            if info["best_val_cindex"] is not None:
                per["val_cindex"][split.name] = info["best_val_cindex"]
            deep_info[split.name] = {k: v for k, v in info.items() if k != "features"}
            selected += [{"split": split.name, "feature": f"{m}:{c}"}
                         for m, cols in info["features"].items() for c in cols]
            if bags:
                write_attention(out / "attention.h5", split.name, patients, te, pred, bags, role)
            torch_save(module, out / "models" / f"{split.name}.pt")
        else:
            pipe = build_pipeline(cfg, modalities, meta)
            grid = dict(OmegaConf.to_container(cfg.model.get("grid") or {}, resolve=True))
            if OmegaConf.is_list(cfg.selection.k):
                grid["k"] = list(cfg.selection.k)
            if grid:
                best, table = inner_search(pipe, take_rows(frames, tr), time[tr], event[tr], grid,
                                           cv=int(cfg.inner_cv), seed=int(cfg.seed),
                                           repeats=int(cfg.get("inner_repeats", 1)))
                searches.append(table.assign(split=split.name))
                pipe.k = best.pop("k", pipe.k)
                pipe.model = pipe.model.set_params(**best)
            pipe.fit(take_rows(frames, tr), time[tr], event[tr])
            risk = pipe.predict_risk(frames)

            def surv(times, _pipe=pipe, _te=te):
                return _pipe.predict_survival(take_rows(frames, _te), times)
            selected += [{"split": split.name, "feature": c} for c in pipe.columns_]
            summ = getattr(pipe.model_, "summary_", None)
            if summ is not None:
                hrs.append(summ.reset_index().rename(columns={"covariate": "feature"})
                           .assign(split=split.name))
            joblib.dump(pipe, out / "models" / f"{split.name}.joblib")
        role[te] = "test"
        tt, et, rt = time[te], event[te], risk[te]
        per["cindex"][split.name] = harrell_cindex(tt, et, rt)
        boot[split.name] = list(bootstrap_ci(harrell_cindex, tt, et, rt, n_boot=500, seed=0))
        try:
            per["cindex_uno"][split.name] = uno_cindex(time[tr], event[tr], tt, et, rt)
            _, _, per["td_auc"][split.name] = td_auc(time[tr], event[tr], tt, et, rt)
            per["ibs"][split.name] = integrated_brier(time[tr], event[tr], tt, et, surv)
        except (MetricError, AttributeError, ValueError) as exc:
            warnings.warn(f"split {split.name}: time-dependent metrics skipped ({exc})", UserWarning)
        if truth is not None:
            per["oracle_cindex"][split.name] = harrell_cindex(tt, et, truth[te])
        rows.append(pd.DataFrame({"patient_id": patients, "split": split.name,
                                  "role": role, "risk": risk}))
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
        "model": (str(cfg.model.mil._target_).rsplit(".", 1)[-1] if deep
                  else str(cfg.model.estimator._target_).rsplit(".", 1)[-1]),
        "n_patients": len(patients),
        "n_events": int(event.sum()),
        "protocol": protocol["name"],
        "cindex": {**_summary(per["cindex"]), "bootstrap_ci95_per_split": boot},
    }
    if deep:
        metrics.update({"loss": canonical_loss(cfg.loss.name),
                        "fusion": str(cfg.fusion.module._target_).rsplit(".", 1)[-1],
                        "training": deep_info})
        if emb_info is not None:
            metrics["embeddings"] = {k: emb_info[k] for k in (
                "out", "encoder", "weights_source", "precision", "device", "n_tiles",
                "tiling_params_hash")}
    for key in ("cindex_uno", "td_auc", "ibs", "oracle_cindex", "val_cindex"):
        if len(per[key]) == len(splits):
            metrics[key] = _summary(per[key])
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return metrics


def torch_save(module, path: Path) -> None:
    """Weights of a deep model (the best checkpoint of the split), loadable with
    ``torch.load(weights_only=True)``; the architecture comes from config.yaml.  With a
    snapshot ensemble, ``<split>.snapshots.pt`` holds the list of the averaged nets' weights."""
    import torch

    torch.save(module.net.state_dict(), path)
    if getattr(module, "best_snapshots", None):
        torch.save(module.best_snapshots, path.with_suffix(".snapshots.pt"))
