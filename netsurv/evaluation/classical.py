"""Classical split-fitter: per-modality feature steps + Cox model (CoxNet / CoxPH), with the
inner grid search (``model.grid`` and a list-valued ``selection.k``) on the training split.

Classical fits need no process group: under a multi-process job the runner gives each rank
its own splits and gathers the results on rank 0.
"""
from __future__ import annotations

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from netsurv.evaluation.inputs import make_harmonizer
from netsurv.evaluation.records import RunData, SplitFit
from netsurv.models.classical import ClassicalPipeline, ImagingBlock, inner_search, take_rows


def build_pipeline(cfg: DictConfig, modalities, meta) -> ClassicalPipeline:
    imaging = {m: ImagingBlock(harmonizer=make_harmonizer(cfg, m, meta),
                               corr_threshold=cfg.selection.corr_threshold)
               for m in modalities if m != "clinical"}
    k = cfg.selection.k
    k0 = list(k)[0] if OmegaConf.is_list(k) else k
    return ClassicalPipeline(
        clinical_encoder=instantiate(cfg.clinical_encoder) if "clinical" in modalities else None,
        imaging=imaging, model=instantiate(cfg.model.estimator), k=k0, meta=meta)


def fit_split(data: RunData, split) -> SplitFit:
    """Fit the pipeline on ``split.train`` (inner search included) and predict every patient."""
    cfg, frames, time, event = data.cfg, data.frames, data.time, data.event
    tr, te = split.train, split.test
    pipe = build_pipeline(cfg, list(cfg.modalities), data.meta)
    grid = dict(OmegaConf.to_container(cfg.model.get("grid") or {}, resolve=True))
    if OmegaConf.is_list(cfg.selection.k):
        grid["k"] = list(cfg.selection.k)
    tables = {}
    if grid:
        best, table = inner_search(pipe, take_rows(frames, tr), time[tr], event[tr], grid,
                                   cv=int(cfg.inner_cv), seed=int(cfg.seed),
                                   repeats=int(cfg.get("inner_repeats", 1)))
        tables["inner_search"] = table
        pipe.k = best.pop("k", pipe.k)
        pipe.model = pipe.model.set_params(**best)
    pipe.fit(take_rows(frames, tr), time[tr], event[tr])
    risk = np.asarray(pipe.predict_risk(frames), float)

    def surv(times):
        return pipe.predict_survival(take_rows(frames, te), times)

    summ = getattr(pipe.model_, "summary_", None)
    if summ is not None:
        tables["hazard_ratios"] = summ.reset_index().rename(columns={"covariate": "feature"})
    role = np.full(len(data.patients), "train", dtype=object)
    role[te] = "test"
    return SplitFit(risk=risk, role=role, surv=surv, selected=list(pipe.columns_), model=pipe,
                    tables=tables)
