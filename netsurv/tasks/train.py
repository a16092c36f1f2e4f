"""Training task: fit and evaluate a survival model over the evaluation protocol's splits.

Writes ``metrics.json``, ``predictions.csv``, ``warnings.log`` and the fitted pipeline of every
split (``models/<split>.joblib``) into the run directory (DESIGN.md §4).
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
from netsurv.features.tabular import TableScaler
from netsurv.survival.metrics import harrell_cindex, mean_ci
from netsurv.tasks.cohort import resolve_cohort

log = logging.getLogger(__name__)


class ClassicalPipeline:
    """Per-modality fitted transformers, concatenated, then a Cox-type model.

    Every step is fitted in ``fit`` on the rows it is given (the training split) only.
    """

    def __init__(self, encoders: dict, model):
        self.encoders = encoders
        self.model = model

    def _design(self, frames: dict[str, pd.DataFrame], fit: bool, time=None, event=None):
        parts = []
        for name, enc in self.encoders.items():
            if fit:
                enc.fit(frames[name])
            z = enc.transform(frames[name])
            parts.append(z.add_prefix(f"{name}:"))
        return pd.concat(parts, axis=1)

    def fit(self, frames, time, event):
        X = self._design(frames, True, time, event)
        self.model.fit(X, time, event)
        return self

    def predict_risk(self, frames) -> np.ndarray:
        return self.model.predict_risk(self._design(frames, False))


def modality_frames(cohort: Cohort, modalities) -> dict[str, pd.DataFrame]:
    """Raw per-modality tables indexed by patient_id."""
    frames = {}
    for m in modalities:
        if m == "clinical":
            frames[m] = cohort.clinical
        elif m in cohort.features:
            frames[m] = cohort.features[m]
        else:
            raise CohortError(
                f"modality {m!r}: no table for it in {cohort.root} (expected "
                f"features/{m}.csv or the output of its extraction stage)"
            )
    return frames


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
    line = (f"{metrics['experiment']} · {metrics['endpoint']} · {metrics['protocol']} "
            f"({len(c['per_split'])} splits, {metrics['n_patients']} patients): test C-index "
            f"{c['mean']:.3f} (95% CI {c['ci95'][0]:.3f}–{c['ci95'][1]:.3f})")
    if "oracle_cindex" in metrics:
        line += f" · oracle {metrics['oracle_cindex']['mean']:.3f}"
    print(line, flush=True)
    print(f"outputs: {out}", flush=True)
    return metrics


def _run(cfg: DictConfig, out: Path) -> dict:
    cohort = resolve_cohort(cfg.data)
    target = str(cfg.target)
    frames = modality_frames(cohort, list(cfg.modalities))
    # classical models need every modality: keep complete cases, say how many were dropped
    patients = [p for p in cohort.patients if all(p in f.index for f in frames.values())]
    dropped = len(cohort.patients) - len(patients)
    if dropped:
        warnings.warn(f"{dropped} patient(s) lack one of the modalities {list(frames)} and "
                      "are left out of this classical model", UserWarning)
    frames = {k: v.loc[patients] for k, v in frames.items()}
    time, event = cohort.endpoint(target)
    pos = pd.Series(np.arange(len(cohort.patients)), index=cohort.patients)[patients].to_numpy()
    time, event = time[pos], event[pos]
    truth = None
    if cohort.truth is not None:
        truth = cohort.truth["true_risk"].reindex(patients).to_numpy(float)

    protocol = OmegaConf.to_container(cfg.evaluation, resolve=True)
    splits = make_splits(protocol, event)
    (out / "models").mkdir(exist_ok=True)
    rows, per_split, oracle = [], {}, {}
    for split in splits:
        tr, te = split.train, split.test
        pipe = ClassicalPipeline(
            {m: instantiate(cfg.clinical_encoder) if m == "clinical" else TableScaler()
             for m in frames},
            instantiate(cfg.model),
        )
        pipe.fit({k: v.iloc[tr] for k, v in frames.items()}, time[tr], event[tr])
        risk = pipe.predict_risk(frames)
        per_split[split.name] = harrell_cindex(time[te], event[te], risk[te])
        if truth is not None:
            oracle[split.name] = harrell_cindex(time[te], event[te], truth[te])
        role = np.full(len(patients), "train", dtype=object)
        role[te] = "test"
        rows.append(pd.DataFrame({"patient_id": patients, "split": split.name,
                                  "role": role, "risk": risk}))
        joblib.dump(pipe, out / "models" / f"{split.name}.joblib")
    pd.concat(rows).to_csv(out / "predictions.csv", index=False)

    mean, sd, ci = mean_ci(list(per_split.values()))
    metrics = {
        "experiment": str(cfg.name),
        "endpoint": target,
        "modalities": list(cfg.modalities),
        "n_patients": len(patients),
        "n_events": int(event.sum()),
        "protocol": protocol["name"],
        "cindex": {"mean": mean, "std": sd, "ci95": list(ci), "per_split": per_split},
    }
    if oracle:
        om, osd, oci = mean_ci(list(oracle.values()))
        metrics["oracle_cindex"] = {"mean": om, "std": osd, "ci95": list(oci), "per_split": oracle}
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return metrics
