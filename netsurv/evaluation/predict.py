"""Score a cohort with a finished run's fitted models (``scripts/predict.py``).

Every reload of a run's fitted artefacts goes through :func:`load_fitted` and
:func:`predict_risk`; they read what the split-fitters saved (``models/<split>.joblib``: the
classical pipeline; ``models/<split>.pt`` + ``.snapshots.pt`` + ``.inputs.joblib``: the deep
network's weights and its fitted tabular steps) and the run's ``config.yaml`` (architecture,
stages' parameters).  A run of ``evaluation=external`` holds one model fitted on all its training
patients, which is used alone; otherwise the split models' risks are averaged.

The new cohort goes through the run's stages with the run's parameters (tiling, encoder,
radiomics, pathomics), cached in its own ``derived`` folder.  Outcome columns are optional.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from netsurv.cohort.schema import CohortError
from netsurv.evaluation.groups import is_deep, upgrade_saved
from netsurv.modalities import CLINICAL, EMBEDDINGS, WSI

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """One fitted split model of a run."""

    name: str
    kind: str            # "classical" | "deep"
    model: Any           # classical: ClassicalPipeline; deep: weights + fitted inputs (dict)


@dataclass
class CohortInputs:
    """A cohort's model inputs, built with the run's configuration."""

    patients: list[str]
    frames: dict[str, pd.DataFrame]
    meta: pd.DataFrame | None
    bags: Any = None
    bags_info: dict | None = None
    aux: dict = field(default_factory=dict)  # tables only the offset's probes read (pathomics)


def run_config(run_dir) -> DictConfig:
    """The config of a finished training run, read from ``<run_dir>/config.yaml``.

    A config saved in the older deep-model layout is returned in the current one
    (:func:`netsurv.evaluation.groups.upgrade_saved`).

    Parameters
    ----------
    run_dir : str or path-like
        Directory of a finished ``scripts/train.py`` run.

    Returns
    -------
    DictConfig
        The run's config.

    Raises
    ------
    CohortError
        If ``config.yaml`` is not in ``run_dir``.
    """
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise CohortError(f"{p} not found: run=<dir> must be the directory of a finished "
                                "scripts/train.py run (it holds config.yaml and models/)")
    return upgrade_saved(OmegaConf.load(p), str(p))  # a run saved with model=<deep net> too


def load_fitted(run_dir) -> list[Fitted]:
    """The run's fitted split models: only ``external`` (fitted on all training patients) when
    the run has it, else every split in order."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    deep = is_deep(cfg)
    models = run_dir / "models"
    ext = ".pt" if deep else ".joblib"
    files = sorted(p for p in models.glob(f"*{ext}") if p.suffixes == [ext])
    if not files:
        raise CohortError(f"{models}: no fitted model (*{ext}); is the run finished?")
    chosen = [p for p in files if p.stem == "external"] or files
    out = []
    for p in chosen:
        if deep:
            import joblib
            import torch

            side = p.with_suffix(".inputs.joblib")
            if not side.is_file():
                raise CohortError(f"{side} not found: this run was made by a netsurv "
                                        "version that did not save the fitted feature steps of "
                                        "deep models; train it again to predict with it")
            snaps = p.with_suffix(".snapshots.pt")
            model = {"state_dict": torch.load(p, map_location="cpu", weights_only=True),
                     "snapshots": (torch.load(snaps, map_location="cpu", weights_only=True)
                                   if snaps.is_file() else None),
                     "inputs": joblib.load(side)}
            out.append(Fitted(p.stem, "deep", model))
        else:
            import joblib

            out.append(Fitted(p.stem, "classical", joblib.load(p)))
    return out


def expected_columns(fitted: Fitted) -> dict[str, list[str] | None]:
    """Per modality, the input columns the fitted steps were fitted on (None: clinical, whose
    declared covariates are checked instead)."""
    if fitted.kind == "classical":
        pipe = fitted.model
        out = {CLINICAL: None} if pipe.clinical_encoder is not None else {}
        out.update({m: list(b.drop_.feature_names_in_) for m, b in pipe.fitted_.items()
                    if m != CLINICAL and hasattr(b, "drop_")})
        return out
    steps = fitted.model["inputs"]["steps"]
    return {m: (None if m == CLINICAL else list(s.block.drop_.feature_names_in_))
            for m, s in steps.items()}


def cohort_inputs(cfg: DictConfig, cohort, fitted: Fitted) -> CohortInputs:
    """Run the run's stages on ``cohort`` and check its tables against the fitted steps."""
    from netsurv.evaluation.external import check_batches, check_tables
    from netsurv.evaluation.inputs import (
        acquisition_meta,
        modality_frames,
        probe_frames,
        require_inputs,
    )

    require_inputs(cohort, cfg)
    frames = modality_frames(cohort, cfg)
    expected = expected_columns(fitted)
    frames = check_tables({m: expected.get(m) for m in frames}, frames, cfg, str(cohort.root))
    bags = info = None
    if WSI in cfg.modalities:
        from netsurv.evaluation.deep import load_wsi

        bags, info = load_wsi(cohort, cfg, cohort.patients)
    deep = fitted.kind == "deep"
    if deep:
        have = set(bags) if bags is not None else set()
        patients = [p for p in cohort.patients
                    if any(p in f.index for f in frames.values()) or p in have]
    else:
        patients = [p for p in cohort.patients if all(p in f.index for f in frames.values())]
    if len(patients) < len(cohort.patients):
        warnings.warn(f"{len(cohort.patients) - len(patients)} patient(s) of {cohort.root} "
                      f"{'have none' if deep else 'lack one'} of the modalities "
                      f"{list(cfg.modalities)}: no risk for them (empty in predictions.csv)",
                      UserWarning)
    frames = {m: f.loc[[p for p in patients if p in f.index]] for m, f in frames.items()}
    meta = acquisition_meta(cohort)
    check_batches(cfg, frames, meta, str(cohort.root))
    aux = {}
    st = (fitted.model or {}).get("inputs", {}).get("offset") if deep else None
    if st is not None:  # tables the offset's stacked probes read beyond the run's modalities
        from netsurv.training.offset import state_modalities

        aux = probe_frames(cohort, cfg, [m for m in state_modalities(st) if m not in frames])
    return CohortInputs(patients, frames, meta, bags, info, aux)


def check_embeddings(run_dir, fitted: Fitted, info: dict | None) -> None:
    """The new cohort's tile embeddings must be those the run was trained on."""
    if fitted.kind != "deep" or info is None:
        return
    dims = fitted.model["inputs"]["dims"]
    if WSI in dims and int(info["dim"]) != int(dims[WSI]):
        raise CohortError(f"the cohort's tile embeddings have {info['dim']} dimensions "
                          f"({info.get('encoder')}, {info.get('out')}), the run's model "
                          f"expects {dims[WSI]}: use the run's encoder")
    mpath = Path(run_dir) / "metrics.json"
    trained = (json.loads(mpath.read_text()).get("embeddings") or {}) if mpath.is_file() else {}
    for key, what in (("encoder", "encoder"), ("tiling_params_hash", "tiling parameters")):
        a, b = trained.get(key), info.get(key)
        known = a and b and not str(a).startswith("unknown") and not str(b).startswith("unknown")
        if known and str(a) != str(b):
            raise CohortError(f"{what} mismatch: the run was trained on {key}={a}, this "
                              f"cohort's embeddings have {key}={b} ({info.get('out')}); embed "
                              "the cohort with the run's encoder and tiling (leave encoder/"
                              "tiling/embeddings.dir as the run had them)")


def predict_risk(cfg: DictConfig, fitted: Fitted, inputs: CohortInputs) -> dict:
    """{"risk": one per ``inputs.patients``, "attention": {position: tile weights} or None}."""
    if fitted.kind == "classical":
        pipe = fitted.model  # ComBat batches of this cohort's patients come from inputs.meta
        return {"risk": np.asarray(pipe.predict(inputs.frames, meta=inputs.meta), float),
                "attention": None}
    return _deep_risk(cfg, fitted, inputs)


def _deep_risk(cfg: DictConfig, fitted: Fitted, inputs: CohortInputs) -> dict:
    from netsurv.evaluation.deep import build_net, eval_batch_sampler
    from netsurv.survival.losses import make_loss
    from netsurv.training.datamodule import PatientDataset, SurvivalDataModule, TabularSteps
    from netsurv.training.module import SurvivalModule

    inp = fitted.model["inputs"]
    steps = TabularSteps(None)
    steps.steps_, steps.dims_, steps.columns_ = inp["steps"], inp["tab_dims"], inp["columns"]
    for s in steps.steps_.values():
        if hasattr(s, "meta"):  # feature-table steps read ComBat batches from this table
            s.meta = inputs.meta
    patients = inputs.patients
    X, present = steps.transform(inputs.frames, patients)
    st = inp.get("offset")  # the classical offset (netsurv.training.offset), if the run had one
    offset = None
    if st is not None:
        from netsurv.training.bags import embedding_means
        from netsurv.training.offset import predict_offset, state_modalities

        tables = {**inputs.aux, **inputs.frames}
        # a probe table that could not be built: its probe is 0 (the training mean) for all
        ofr = {m: (embedding_means(inputs.bags, patients) if m == EMBEDDINGS
                   else tables.get(m, pd.DataFrame(index=pd.Index([], name="patient_id"))))
               for m in state_modalities(st)}
        offset = predict_offset(st, ofr, patients, inputs.meta)
    net = build_net(cfg, inp["dims"], int(inp["out_dim"]), offset=st is not None)
    net.load_state_dict(fitted.model["state_dict"])
    # the saved name rebuilds the loss object (risk from the network output)
    module = SurvivalModule(net, loss=make_loss(inp["loss"], edges=inp["edges"]))
    bags = inputs.bags if WSI in inp["dims"] else None
    n = len(patients)
    ds = PatientDataset(np.arange(n), patients, bags, X, present, np.zeros(n), np.zeros(n),
                        feat_dim=int(inp["dims"].get(WSI, 0)), offset=offset)
    dm = SurvivalDataModule({"all": ds}, eval_batch_size=int(cfg.optim.get("eval_batch_size", 64)),
                            eval_batch_sampler=eval_batch_sampler(cfg, bags))
    loader = dm.eval_dataloader("all", 0, 1)
    snaps = fitted.model.get("snapshots")
    pred = module.predict_snapshots(loader, snaps) if snaps else module.predict_loader(loader)
    risk = np.empty(n)
    risk[pred["pos"]] = pred["risk"]
    attn = None
    if pred["attention"] is not None:
        attn = {int(p): a for p, a in zip(pred["pos"], pred["attention"])}
    return {"risk": risk, "attention": attn}


def predict(run_dir, data_cfg: DictConfig, out, embeddings_dir=None) -> dict:
    """Score the cohort of ``data_cfg`` (``root``, optional ``derived``) with the run in
    ``run_dir``; writes ``predictions.csv``, ``prediction.json`` and (MIL models)
    ``attention.h5`` into ``out``.  Returns the summary written to ``prediction.json``."""
    from netsurv.cohort.schema import load_cohort
    from netsurv.evaluation.deep import attention_records
    from netsurv.evaluation.runner import log_warnings
    from netsurv.survival.metrics import bootstrap_ci, harrell_cindex

    run_dir, out = Path(run_dir), Path(out)
    cfg = run_config(run_dir)
    root = Path(str(data_cfg.root)).expanduser().resolve()
    with open_dict(cfg):
        cfg.data.root = str(root)
        cfg.data.derived = str(data_cfg.get("derived") or root / "derived")
        cfg.data.demo = None
        if embeddings_dir:
            cfg.embeddings.dir = str(embeddings_dir)
    fitted = load_fitted(run_dir)
    cohort = load_cohort(root, outcomes=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
        inputs = cohort_inputs(cfg, cohort, fitted[0])
        check_embeddings(run_dir, fitted[0], inputs.bags_info)
        risks, records = [], []
        for f in fitted:
            res = predict_risk(cfg, f, inputs)
            risks.append(res["risk"])
            if res["attention"]:
                role = np.full(len(inputs.patients), "predict", dtype=object)
                records += attention_records(f.name, inputs.patients,
                                             np.arange(len(inputs.patients)), res["risk"],
                                             res["attention"], inputs.bags, role)
        harm = _harmonize_record(cfg, fitted)
    msgs = log_warnings(caught)
    out.mkdir(parents=True, exist_ok=True)
    risk = pd.Series(np.mean(risks, axis=0), index=inputs.patients)
    pred = pd.DataFrame({"patient_id": cohort.patients})
    pred["risk"] = pred.patient_id.map(risk)
    for m in cfg.modalities:
        have = (set(inputs.bags or ()) if m == WSI else set(inputs.frames[m].index))
        pred[f"has_{m}"] = pred.patient_id.isin(have).astype(int)
    pred.to_csv(out / "predictions.csv", index=False)
    if records:
        from netsurv.evaluation.attention import write_attention

        write_attention(out / "attention.h5", records, mode="w")
    summary = {"run": str(run_dir.resolve()), "cohort": str(root), "endpoint": str(cfg.target),
               "models": [f.name for f in fitted],
               "combine": "single model fitted on all training patients"
               if [f.name for f in fitted] == ["external"] else "mean of the split models' risks",
               "n_patients": len(cohort.patients), "n_scored": int(pred.risk.notna().sum())}
    tcol, ecol = f"{cfg.target}_time", f"{cfg.target}_event"
    if {tcol, ecol} <= set(cohort.clinical.columns):
        c = cohort.clinical.loc[risk.index]
        t, e = c[tcol].to_numpy(float), c[ecol].to_numpy(int)
        summary["cindex"] = float(harrell_cindex(t, e, risk.to_numpy()))
        summary["cindex_bootstrap_ci95"] = list(bootstrap_ci(harrell_cindex, t, e, risk.to_numpy(),
                                                             n_boot=500, seed=0))
    if harm:
        summary["harmonize"] = harm
    summary["warnings"] = msgs
    (out / "prediction.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _harmonize_record(cfg, fitted: list[Fitted]) -> dict | None:
    """What ComBat did with this cohort's batches (the fitted ComBat steps' last transform)."""
    from netsurv.evaluation.inputs import harmonize_method

    if harmonize_method(cfg) != "combat":
        return None
    res = {"unseen": str(cfg.harmonize.get("unseen", "pass")), "models": {}}
    for f in fitted:
        blocks = (f.model.fitted_ if f.kind == "classical"
                  else {m: s.block for m, s in f.model["inputs"]["steps"].items()
                        if hasattr(s, "block")})
        for m, b in blocks.items():
            h = getattr(b, "harm_", None)
            if h is not None:
                res["models"].setdefault(f.name, {})[m] = {
                    "training_batches": {str(k): int(v) for k, v in h.n_per_batch_.items()},
                    "unseen_batches": getattr(h, "unseen_report_", {})}
    return res
