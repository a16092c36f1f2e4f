"""Classical split-fitter: per-modality feature steps + Cox model (CoxNet / CoxPH), with the
inner grid search (``model.grid`` and a list-valued ``selection.k``) on the training split.

Classical fits need no process group: under a multi-process job the runner gives each rank
its own splits and gathers the results on rank 0.
"""
from __future__ import annotations

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.base import clone
from sksurv.util import Surv

from netsurv.evaluation.inputs import make_harmonizer
from netsurv.evaluation.records import RunData, SplitFit
from netsurv.modalities import CLINICAL
from netsurv.models.classical import ClassicalPipeline, ImagingBlock, inner_search, take_rows


def build_pipeline(cfg: DictConfig, modalities, meta) -> ClassicalPipeline:
    """The unfitted pipeline of the run's config (``meta``: the acquisition table, checked for
    the harmonizer's batch column; it is passed to ``fit``/``predict``, not stored)."""
    imaging = {m: ImagingBlock(harmonizer=make_harmonizer(cfg, m, meta),
                               corr_threshold=cfg.selection.corr_threshold)
               for m in modalities if m != CLINICAL}
    k = cfg.selection.k
    k0 = list(k)[0] if OmegaConf.is_list(k) else k
    return ClassicalPipeline(
        clinical_encoder=instantiate(cfg.clinical_encoder) if CLINICAL in modalities else None,
        imaging=imaging, model=instantiate(cfg.model.estimator), k=k0)


def fit_split(data: RunData, split) -> SplitFit:
    """Fit the pipeline on ``split.train`` (inner search included) and predict every patient."""
    cfg, frames, time, event, meta = data.cfg, data.frames, data.time, data.event, data.meta
    tr, te = split.train, split.test
    y_tr = Surv.from_arrays(np.asarray(event)[tr].astype(bool), np.asarray(time, float)[tr])
    pipe = build_pipeline(cfg, list(cfg.modalities), data.meta)
    grid = dict(OmegaConf.to_container(cfg.model.get("grid") or {}, resolve=True))
    if OmegaConf.is_list(cfg.selection.k):
        grid["k"] = list(cfg.selection.k)
    tables = {}
    if grid:
        best, table = inner_search(pipe, take_rows(frames, tr), y_tr, grid,
                                   cv=int(cfg.inner_cv), seed=int(cfg.seed),
                                   repeats=int(cfg.get("inner_repeats", 1)), meta=meta)
        tables["inner_search"] = table
        k = best.pop("k", pipe.k)
        pipe.set_params(k=k, model=clone(pipe.model).set_params(**best))
    pipe.fit(take_rows(frames, tr), y_tr, meta=meta)
    risk = np.asarray(pipe.predict(frames, meta=meta), float)

    def surv(times):
        return pipe.predict_survival(take_rows(frames, te), times, meta=meta)

    summ = getattr(pipe.model_, "summary_", None)
    if summ is not None:
        tables["hazard_ratios"] = summ.reset_index().rename(columns={"covariate": "feature"})
    role = np.full(len(data.patients), "train", dtype=object)
    role[te] = "test"
    return SplitFit(risk=risk, role=role, surv=surv, selected=list(pipe.columns_), model=pipe,
                    tables=tables)
