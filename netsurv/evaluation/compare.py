"""Does the model earn its place?  Comparisons every run reports beside its own metrics.

- **Baseline** (deep runs, ``baseline=coxnet``, the default): the classical counterpart, i.e. the
  experiment's tabular modalities (clinical / radiomics / pathomics tables; not the slides)
  through the classical pipeline, fitted on each split's training patients only (inner search
  included), is scored on the same test patients.  A deep model that fitted it itself hands it
  over in ``SplitFit.baseline``; otherwise :func:`ensure_baseline` fits it here, on rank 0 after
  the split's deep fit (a classical fit needs no process group).  Slides-only experiments have
  no tabular counterpart: the baseline is skipped with that reason.
- **Paired difference** model - baseline in Harrell's C: per split, 500 bootstrap resamples of
  the split's test patients, both models scored on the same resample (seed 0, the draws of the
  per-split bootstrap CI); the run's interval is the percentile interval of the per-replicate
  mean over splits (:func:`netsurv.survival.metrics.combine_paired`).  Patients the baseline
  cannot score (a tabular modality missing; classical models need complete cases) are left out
  of the pair on both sides, so the difference compares like with like.
- **Null model IBS**: the training split's Kaplan-Meier curve given to every test patient, on
  the model's own evaluation grid; a model whose IBS is not below it predicts survival curves
  worse than no model.  The per-split Brier curves of both go to ``brier_curves.csv``, which the
  report's Brier figure draws, so figure and metrics show the same IBS.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from netsurv.evaluation.records import RunData, SplitFit
from netsurv.modalities import WSI
from netsurv.survival.metrics import (
    MetricError,
    bootstrap_ci,
    brier_curve,
    combine_paired,
    default_eval_times,
    harrell_cindex,
    integrated_brier,
    km_null_survival,
    paired_bootstrap,
)

log = logging.getLogger(__name__)

N_BOOT, SEED = 500, 0          # as the per-split bootstrap CI of the C-index (runner)
TABULAR_SKIP = (WSI,)        # modalities a classical pipeline cannot take


def wants_baseline(cfg: DictConfig) -> bool:
    """Whether the run asks for a classical baseline (a ``baseline`` group other than ``none``)."""
    b = cfg.get("baseline")
    return b is not None and str(b.get("name", "none")) != "none"


def tabular_modalities(cfg: DictConfig) -> list[str]:
    """The run's modalities a classical pipeline can take (all but the slides)."""
    return [m for m in cfg.modalities if m not in TABULAR_SKIP]


def baseline_name(cfg: DictConfig, mods, spec=None) -> str:
    """``"<estimator> (<modalities>)"`` of the baseline group (or of the model spec ``spec``)."""
    est = str((cfg.baseline if spec is None else spec).estimator._target_).rsplit(".", 1)[-1]
    return f"{est} ({'+'.join(mods)})"


def _baseline_cfg(cfg: DictConfig, mods, spec=None) -> DictConfig:
    """The run's config with ``model`` = ``spec`` (default: the baseline group's estimator and
    grid) and the classical pipeline's modalities ``mods``."""
    spec = cfg.baseline if spec is None else spec
    out = cfg.copy()
    with open_dict(out):
        out.model = OmegaConf.create({k: spec[k] for k in spec if k != "name"})
        out.net = None  # a classical fit (netsurv.evaluation.groups.is_deep)
        out.modalities = list(mods)
    return out


def fit_baseline(data: RunData, split, mods, frames=None, spec=None) -> dict:
    """The classical pipeline on ``mods``, fitted on the split's training patients that have
    every one of them; ``risk`` is NaN for patients it cannot score, ``pipe`` the fitted
    pipeline.  ``frames``: the tables of ``mods`` (default: the run's)."""
    from netsurv.cohort.splits import Split
    from netsurv.evaluation.classical import fit_split

    cfg = _baseline_cfg(data.cfg, mods, spec)
    frames = data.frames if frames is None else frames
    have = np.array([all(p in frames[m].index for m in mods) for p in data.patients])
    pos = np.flatnonzero(have)
    new = -np.ones(len(data.patients), int)
    new[pos] = np.arange(len(pos))
    tr = new[np.asarray(split.train)][have[np.asarray(split.train)]]
    te = new[np.asarray(split.test)][have[np.asarray(split.test)]]
    if len(tr) == 0 or data.event[pos][tr].sum() == 0:
        raise MetricError(f"no training patient with events has all of {mods}")
    pts = [data.patients[i] for i in pos]
    sub = RunData(cfg=cfg, cohort=data.cohort, patients=pts,
                  frames={m: frames[m].loc[pts] for m in mods}, time=data.time[pos],
                  event=data.event[pos], truth=None, meta=data.meta)
    fit = fit_split(sub, Split(name=split.name, train=tr, test=te))
    risk = np.full(len(data.patients), np.nan)
    risk[pos] = fit.risk
    return {"name": baseline_name(data.cfg, mods, spec), "risk": risk, "pipe": fit.model}


def ensure_baseline(data: RunData, split, fit: SplitFit) -> None:
    """Rank 0, deep runs: give ``fit`` its baseline unless the deep fitter already did (or
    ``baseline=none``); a baseline that cannot be fitted is recorded as skipped, with why."""
    cfg = data.cfg
    if fit.baseline is not None or not wants_baseline(cfg):
        return
    mods = tabular_modalities(cfg)
    if not mods:
        fit.baseline = {"name": None, "risk": None,
                        "skipped": "no tabular modality (slides only): the classical pipeline "
                                   "takes feature tables"}
        return
    try:
        b = fit_baseline(data, split, mods)
        fit.baseline = {"name": b["name"], "risk": b["risk"]}
    except Exception as exc:  # noqa: BLE001 - a baseline must never fail the model's run
        warnings.warn(f"split {split.name}: baseline {baseline_name(cfg, mods)} not fitted "
                      f"({type(exc).__name__}: {exc})", UserWarning)
        fit.baseline = {"name": baseline_name(cfg, mods), "risk": None,
                        "skipped": f"fit failed: {type(exc).__name__}: {exc}"}


def _nan_none(v):
    return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, float)]


def baseline_record(data: RunData, split, fit: SplitFit) -> dict:
    """The split record's ``baseline`` entry: C of both on the common test patients, the paired
    difference with its bootstrap replicates (NaN -> null)."""
    b = fit.baseline
    if b.get("risk") is None:
        return {"name": b.get("name"), "skipped": b.get("skipped", "no baseline risk")}
    te = np.asarray(split.test)
    br = np.asarray(b["risk"], float)[te]
    ok = np.isfinite(br)
    tt, et, rt = data.time[te][ok], data.event[te][ok], np.asarray(fit.risk, float)[te][ok]
    try:
        c_base = harrell_cindex(tt, et, br[ok])
        c_model = harrell_cindex(tt, et, rt)
    except MetricError as exc:
        return {"name": b["name"], "skipped": f"not scored on the test patients: {exc}"}
    try:
        boot = list(bootstrap_ci(harrell_cindex, tt, et, br[ok], n_boot=N_BOOT, seed=SEED))
    except MetricError:
        boot = None
    reps = paired_bootstrap(harrell_cindex, tt, et, rt, br[ok], n_boot=N_BOOT, seed=SEED)
    fin = reps[np.isfinite(reps)]
    return {"name": b["name"], "n_test": int(len(te)), "n_common": int(ok.sum()),
            "cindex": float(c_base), "bootstrap_ci95": boot, "cindex_model_common": float(c_model),
            "cindex_diff": float(c_model - c_base),
            "diff_ci95": [float(np.quantile(fin, 0.025)), float(np.quantile(fin, 0.975))]
            if len(fin) else None,
            "diff_replicates": _nan_none(reps)}


def brier_metrics(data: RunData, split, fit: SplitFit) -> tuple[dict, pd.DataFrame | None]:
    """``ibs`` (the model's survival curves, when it has them) and ``ibs_null`` (training KM
    for everyone) on one evaluation grid, and both Brier curves on it."""
    tr, te = split.train, split.test
    trt, tre, tet, tee = data.time[tr], data.event[tr], data.time[te], data.event[te]
    out, curves = {}, {}
    try:
        times = default_eval_times(trt, tet, tee)
        null = km_null_survival(trt, tre)(len(te))
        out["ibs_null"] = integrated_brier(trt, tre, tet, tee, null, times=times)
        curves["null"] = brier_curve(trt, tre, tet, tee, null, times)
        if fit.surv is not None:
            out["ibs"] = integrated_brier(trt, tre, tet, tee, fit.surv, times=times)
            curves["model"] = brier_curve(trt, tre, tet, tee, fit.surv, times)
    except (MetricError, ValueError) as exc:  # a model without survival curves is a bug: raised
        warnings.warn(f"split {split.name}: integrated Brier score skipped ({exc})", UserWarning)
        return out, None
    return out, pd.DataFrame({"time": times, **curves})


# ------------------------------------------------------------------------------ run level
METHOD = ("paired bootstrap: per split {n} resamples of the test patients (seed {s}), model "
          "and baseline scored on the same resample; 95 % percentile interval of the "
          "per-replicate mean over splits")


def assemble_baseline(splits, records: dict) -> dict | None:
    """``metrics["baseline"]`` from the split records; None when no record has one."""
    recs = [records[s.name].get("baseline") for s in splits]
    if all(r is None for r in recs):
        return None
    names = [r.get("name") for r in recs if r and r.get("name")]
    name = names[0] if names else None
    skipped = {s.name: (r or {}).get("skipped", "no baseline in this split's record")
               for s, r in zip(splits, recs) if r is None or "skipped" in r}
    if skipped:
        return {"name": name, "skipped": "; ".join(dict.fromkeys(skipped.values())),
                "skipped_splits": sorted(skipped)}
    from netsurv.survival.metrics import mean_ci

    def summ(key):
        vals = {s.name: r[key] for s, r in zip(splits, recs)}
        m, sd, ci = mean_ci(list(vals.values()))
        return {"mean": m, "std": sd, "ci95": list(ci), "per_split": vals}

    reps = [np.array([np.nan if v is None else v for v in r["diff_replicates"]], float)
            for r in recs]
    diff = summ("cindex_diff")
    try:
        lo, hi = combine_paired(reps)
    except MetricError:
        lo = hi = float("nan")
    diff.update({"ci95": [lo, hi], "ci95_over_splits": diff["ci95"],
                 "bootstrap_ci95_per_split": {s.name: r["diff_ci95"] for s, r in zip(splits, recs)},
                 "method": METHOD.format(n=N_BOOT, s=SEED)})
    out = {"name": name, "cindex": {**summ("cindex"), "bootstrap_ci95_per_split": {
        s.name: r.get("bootstrap_ci95") for s, r in zip(splits, recs)}}, "cindex_diff": diff}
    n_common = {s.name: r["n_common"] for s, r in zip(splits, recs)}
    if any(r["n_common"] != r["n_test"] for r in recs):
        out["n_common_per_split"] = n_common
        out["note"] = ("the baseline scores only patients with all its tabular modalities; "
                       "its C and the difference use those test patients only")
    return out


def summary_text(metrics: dict) -> str:
    """The console line's comparison part (empty when there is nothing to compare)."""
    parts = []
    b = metrics.get("baseline")
    if b and "cindex" in b:
        d = b["cindex_diff"]
        parts.append(f"baseline {b['name']} {b['cindex']['mean']:.3f}, difference "
                     f"{d['mean']:+.3f} (95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})")
    elif b:
        parts.append(f"baseline skipped ({b.get('skipped')})")
    if "ibs_null" in metrics:
        ibs = metrics.get("ibs", {}).get("mean")
        parts.append((f"IBS {ibs:.3f}" if ibs is not None else "IBS n/a")
                     + f" vs null {metrics['ibs_null']['mean']:.3f}")
    return " · ".join(parts)
