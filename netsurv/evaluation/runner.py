"""The evaluation runner: fit and evaluate a survival model over the evaluation protocol's splits.

Order of a run, on every process of the job (one process, ``torchrun`` ranks or the tasks of a
SLURM step):
  1. stages: cohort (demo generation), radiomics / pathomics tables, tiling + embedding for
     the ``wsi`` modality; each is sharded over the ranks and returns the same complete result
     on every rank;
  2. splits (by patient, identical on every rank);
  3. per split: deep models train on all ranks together (Lightning DDP) and gather their
     predictions on rank 0; classical splits are dealt out to the ranks and gathered on rank 0;
     deep splits get their classical baseline on rank 0 (:mod:`.compare`).

Only global rank 0 writes run outputs: ``metrics.json``, ``predictions.csv``,
``selected_features.csv``, ``brier_curves.csv``, ``inner_search.csv`` / ``hazard_ratios.csv`` (classical),
``models/<split>.{joblib,pt}``, ``attention.h5`` (MIL models), ``splits/<split>.json`` (one
record per finished split), ``config.yaml``, ``warnings.log`` and ``report.html``.  Every rank
returns the same metrics.

Resume: a rerun in the same run directory (a requeued SLURM job, or ``hydra.run.dir`` /
``+output_dir`` pointing at an earlier run) reuses the finished splits whose record matches the
config, and continues an interrupted deep split from its last checkpoint.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from netsurv.cohort.schema import CohortError
from netsurv.cohort.splits import make_splits
from netsurv.distributed import all_gather_object, broadcast_object, dist_env
from netsurv.evaluation import compare
from netsurv.evaluation.attention import replace_split
from netsurv.evaluation.groups import check_groups
from netsurv.evaluation.groups import is_deep as _is_deep
from netsurv.evaluation.inputs import (
    acquisition_meta,
    harmonize_method,
    modality_frames,
    probe_frames,
    require_inputs,
)
from netsurv.evaluation.records import RunData, SplitFit, SplitRecords, config_hash, split_key
from netsurv.modalities import WSI
from netsurv.survival.metrics import (
    MetricError,
    bootstrap_ci,
    harrell_cindex,
    mean_ci,
    td_auc,
    uno_cindex,
)

log = logging.getLogger(__name__)

PER_SPLIT = ("cindex", "cindex_uno", "td_auc", "ibs", "ibs_null", "oracle_cindex", "val_cindex")


def loss_class(cfg: DictConfig):
    """The class of the ``loss`` config (its ``_target_``, a SurvivalLoss), without building it."""
    from hydra.utils import get_class

    return get_class(str(cfg.loss._target_))


def is_deep(cfg: DictConfig) -> bool:
    """Deep run iff the ``net`` group is set (:mod:`netsurv.evaluation.groups`)."""
    return _is_deep(cfg)


def run_dir(cfg: DictConfig) -> Path:
    """``output_dir`` if set, else Hydra's run directory; rank 0's under several processes
    (each torchrun rank runs Hydra itself, and a ``${now:...}`` run dir may differ by a
    second between them)."""
    if cfg.get("output_dir"):
        out = str(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        out = str(HydraConfig.get().runtime.output_dir)
    return Path(broadcast_object(out))


def run(cfg: DictConfig) -> dict:
    """Fit and evaluate the configured model over every split of the evaluation protocol.

    Runs on every process of the job.  Global rank 0 writes the run outputs (``metrics.json``,
    ``warnings.log``, and ``report.html`` unless ``cfg.report`` is false; a failing report is
    only logged); finished splits whose record matches the config are reused.

    Parameters
    ----------
    cfg : DictConfig
        The composed training config (``scripts/train.py``).

    Returns
    -------
    dict
        The run's metrics, the same on every rank (``n_warnings``: distinct warnings raised).
    """
    check_groups(cfg)  # old layout (model=abmil, tabular.k) or a bad selection.k: stop now
    env = dist_env()
    out = run_dir(cfg)
    if env.is_zero:
        out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # library-internal deprecation notices are not about the user's run
        warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
        # Lightning's hint on any machine with srun installed; netsurv takes its processes
        # from netsurv.distributed (a one-process run there is meant to be one process)
        warnings.filterwarnings("ignore", "The `srun` command is available on your system")
        metrics = _run(cfg, out, env.is_zero)
    if env.is_zero:
        seen = log_warnings(caught)
        (out / "warnings.log").write_text("\n".join(seen) + ("\n" if seen else ""),
                                          encoding="utf-8")
        metrics["n_warnings"] = len(seen)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _print_summary(metrics, out)
        if cfg.get("report", True):
            from netsurv.report.html import write_report

            try:
                print(f"report: {write_report(out)}", flush=True)
            except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
                log.warning("report not written: %s", exc)
    return broadcast_object(metrics)


def log_warnings(caught) -> list[str]:
    """Log each distinct caught warning once (``Category: message``), in order; returns them."""
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in seen:
            seen.append(msg)
            log.warning(msg)
    return seen


def _print_summary(metrics: dict, out: Path) -> None:
    c = metrics["cindex"]
    ext = metrics.get("external")
    how = (f"{ext['n_train']} training, {ext['n_test']} test patients" if ext else
           f"{len(c['per_split'])} splits, {metrics['n_patients']} patients")
    line = (f"{metrics['experiment']} · {metrics['endpoint']} · harmonize={metrics['harmonize']} · "
            f"{metrics['protocol']} ({how}): test C-index {c['mean']:.3f} "
            f"(95% CI {c['ci95'][0]:.3f}–{c['ci95'][1]:.3f})")
    if "oracle_cindex" in metrics:
        line += f" · oracle {metrics['oracle_cindex']['mean']:.3f}"
    extra = compare.summary_text(metrics)
    print(line + (f" · {extra}" if extra else ""), flush=True)
    print(f"outputs: {out}", flush=True)


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


# --------------------------------------------------------------------------------------------
def prepare(cfg: DictConfig) -> RunData:
    """Stages and model inputs (every rank; the stages shard their work over the ranks)."""
    from netsurv.tasks.cohort import resolve_cohort

    if is_deep(cfg):  # a trainer that cannot run here fails now, not after the stages
        from netsurv.cluster import check_trainer

        check_trainer(cfg.trainer)
    cohort = resolve_cohort(cfg.data)
    modalities = list(cfg.modalities)
    deep = is_deep(cfg)
    if not deep and WSI in modalities:
        raise CohortError("modality 'wsi' (tile-embedding bags) needs a deep model, e.g. "
                          "net=abmil; classical models take feature tables (pathomics, "
                          "radiomics)")
    if not deep and not loss_class(cfg).classical:
        raise ValueError(f"loss={loss_class(cfg).name}: classical models fit a Cox model; discrete-time "
                         "losses need a deep model (net=abmil, ...)")
    require_inputs(cohort, cfg)
    frames = modality_frames(cohort, cfg)
    bags = bags_info = None
    if deep:
        if WSI in modalities:
            from netsurv.evaluation.deep import load_wsi

            bags, bags_info = load_wsi(cohort, cfg, cohort.patients)
        from netsurv.evaluation.deep import bag_patients

        with_bag = bag_patients(bags)
        if cfg.get("complete_cases") and frames:
            # the classical counterpart's patients (every feature table), hence its splits
            patients = [p for p in cohort.patients if all(p in f.index for f in frames.values())]
            why = "lack one of the feature tables (complete_cases=true) of"
        else:
            # deep models handle missing modalities: keep patients with at least one of them
            patients = [p for p in cohort.patients
                        if any(p in f.index for f in frames.values()) or p in with_bag]
            why = "have none of the modalities"
    else:
        # classical models need every modality: keep complete cases
        patients = [p for p in cohort.patients if all(p in f.index for f in frames.values())]
        why = "lack one of the modalities"
    dropped = len(cohort.patients) - len(patients)
    if dropped:
        warnings.warn(f"{dropped} patient(s) {why} {modalities} and are left out of this "
                      f"{'deep' if deep else 'classical'} model", UserWarning)
    frames = {k: v.loc[[p for p in patients if p in v.index]] if deep else v.loc[patients]
              for k, v in frames.items()}
    aux = {}
    if deep:  # the offset's stacked probes that are not modalities of the run (pathomics)
        from netsurv.training.offset import probe_modalities

        aux = {k: v.loc[[p for p in patients if p in v.index]]
               for k, v in probe_frames(cohort, cfg, probe_modalities(cfg)).items()}
    time, event = cohort.endpoint(str(cfg.target))
    pos = pd.Series(np.arange(len(cohort.patients)), index=cohort.patients)[patients].to_numpy()
    truth = None
    if cohort.truth is not None:
        truth = cohort.truth["true_risk"].reindex(patients).to_numpy(float)
    return RunData(cfg=cfg, cohort=cohort, patients=patients, frames=frames, time=time[pos],
                   event=event[pos], truth=truth, meta=acquisition_meta(cohort), bags=bags,
                   bags_info=bags_info, aux=aux)


def split_record(data: RunData, split, fit: SplitFit, key: str) -> dict:
    """Test metrics of one fitted split, with its predictions: the committed record."""
    time, event = data.time, data.event
    tr, te = split.train, split.test
    tt, et, rt = time[te], event[te], fit.risk[te]
    m = {"cindex": harrell_cindex(tt, et, rt)}
    boot = list(bootstrap_ci(harrell_cindex, tt, et, rt, n_boot=500, seed=0))
    try:
        m["cindex_uno"] = uno_cindex(time[tr], event[tr], tt, et, rt)
        _, _, m["td_auc"] = td_auc(time[tr], event[tr], tt, et, rt)
    except (MetricError, ValueError) as exc:
        warnings.warn(f"split {split.name}: time-dependent metrics skipped ({exc})", UserWarning)
    if data.truth is not None:
        m["oracle_cindex"] = harrell_cindex(tt, et, data.truth[te])
    # the inner-validation C the model was chosen on: the best epoch's validation C
    # (optim.inner_folds=0) or the chosen model's pooled out-of-fold C (inner folds)
    val = fit.info.get("best_val_cindex", fit.info.get("best_inner_cindex"))
    if val is not None:
        m["val_cindex"] = float(val)
    brier, curves = compare.brier_metrics(data, split, fit)  # ibs, ibs_null: one grid
    m.update(brier)
    tables = dict(fit.tables)
    if curves is not None:
        tables["brier_curves"] = curves
    rec = {"split": split.name, "key": key,
           "metrics": {k: float(v) for k, v in m.items()}, "bootstrap_ci95": boot,
           "predictions": {"patient_id": list(data.patients), "role": [str(r) for r in fit.role],
                           "risk": [float(r) for r in fit.risk]},
           "selected": list(fit.selected), "training": fit.info,
           "tables": {k: v.to_dict(orient="list") for k, v in tables.items()}}
    if fit.baseline is not None:
        rec["baseline"] = compare.baseline_record(data, split, fit)
        if fit.baseline.get("risk") is not None:
            rec["predictions"]["baseline_risk"] = [
                None if not np.isfinite(r) else float(r) for r in fit.baseline["risk"]]
    return rec


def _commit(out: Path, store: SplitRecords, record: dict, fit: SplitFit, deep: bool) -> None:
    """Rank 0: model files and attention first, the record last (it marks the split done)."""
    name = record["split"]
    (out / "models").mkdir(exist_ok=True)
    if deep:
        from netsurv.evaluation.deep import discard_resume_state, save_model

        save_model(fit.model, out / "models" / f"{name}.pt")
        replace_split(out / "attention.h5", name, fit.attention)
    else:
        import joblib

        joblib.dump(fit.model, out / "models" / f"{name}.joblib")
    store.save(record)
    if deep:
        discard_resume_state(out, name)


def _run(cfg: DictConfig, out: Path, is_zero: bool) -> dict | None:
    env = dist_env()
    deep = is_deep(cfg)
    protocol = OmegaConf.to_container(cfg.evaluation, resolve=True)
    external = None
    if protocol.get("name") == "external":  # train on data.root, score evaluation.test_root
        from netsurv.evaluation.external import prepare_external

        data, splits, external = prepare_external(cfg, prepare)
    else:
        data = prepare(cfg)
        splits = make_splits(protocol, data.event)
    chash = config_hash(cfg)
    keys = {s.name: split_key(chash, data.patients, s) for s in splits}
    store = SplitRecords(out)
    records = store.finished(keys) if is_zero else {}
    done = broadcast_object(sorted(records))
    if done and is_zero:
        log.warning("reusing %d finished split(s) of %s: %s", len(done), out, ", ".join(done))
    pending = [s for s in splits if s.name not in done]
    if deep:
        from netsurv.evaluation import deep as fitter

        for split in pending:
            fit = fitter.fit_split(data, split, out, keys[split.name])
            if is_zero:
                compare.ensure_baseline(data, split, fit)  # classical: no process group needed
                rec = split_record(data, split, fit, keys[split.name])
                _commit(out, store, rec, fit, deep=True)
                records[split.name] = rec
    else:
        from netsurv.evaluation import classical as fitter

        # dealt out: round r gives split r * world + rank to each rank, gathered on rank 0
        for start in range(0, len(pending), env.world_size):
            batch = pending[start:start + env.world_size]
            mine = batch[env.rank] if env.rank < len(batch) else None
            payload = None
            if mine is not None:
                fit = fitter.fit_split(data, mine)
                rec = split_record(data, mine, fit, keys[mine.name])
                fit.surv = None  # a closure over the data: not sent between processes
                payload = (rec, fit)
            for got in all_gather_object(payload) if env.world_size > 1 else [payload]:
                if got is not None and is_zero:
                    _commit(out, store, got[0], got[1], deep=False)
                    records[got[0]["split"]] = got[0]
    if not is_zero:
        return None
    metrics = _assemble(cfg, data, splits, protocol, records, out, deep)
    if external is not None:
        metrics["external"] = external
        # one test cohort: its interval is the bootstrap over test patients, not over splits
        metrics["cindex"]["ci95"] = list(metrics["cindex"]["bootstrap_ci95_per_split"]["external"])
        metrics["cindex"]["ci95_method"] = "bootstrap over test patients"
    return metrics


def _summary(values: dict) -> dict:
    m, sd, ci = mean_ci(list(values.values()))
    return {"mean": m, "std": sd, "ci95": list(ci), "per_split": values}


def _assemble(cfg, data: RunData, splits, protocol, records: dict, out: Path, deep: bool) -> dict:
    """Run outputs from the split records (fresh or reused), in split order (rank 0)."""
    per = {k: {} for k in PER_SPLIT}
    boot, rows, selected, tables, training = {}, [], [], {}, {}
    for s in splits:
        rec = records[s.name]
        for k, v in rec["metrics"].items():
            per[k][s.name] = v
        boot[s.name] = rec["bootstrap_ci95"]
        p = rec["predictions"]
        rows.append(pd.DataFrame({"patient_id": p["patient_id"], "split": s.name,
                                  "role": p["role"], "risk": p["risk"],
                                  **({"baseline_risk": p["baseline_risk"]}
                                     if "baseline_risk" in p else {})}))
        selected += [{"split": s.name, "feature": f} for f in rec["selected"]]
        for name, t in rec["tables"].items():
            tables.setdefault(name, []).append(pd.DataFrame(t).assign(split=s.name))
        if deep:
            training[s.name] = rec["training"]
    pd.concat(rows).to_csv(out / "predictions.csv", index=False)
    pd.DataFrame(selected, columns=["split", "feature"]).to_csv(out / "selected_features.csv",
                                                               index=False)
    for name, parts in tables.items():
        pd.concat(parts).to_csv(out / f"{name}.csv", index=False)

    metrics = {
        "experiment": str(cfg.name),
        "endpoint": str(cfg.target),
        "modalities": list(cfg.modalities),
        "harmonize": harmonize_method(cfg),
        "model": (str(cfg.net.mil._target_).rsplit(".", 1)[-1] if deep
                  else str(cfg.model.estimator._target_).rsplit(".", 1)[-1]),
        "n_patients": len(data.patients),
        "n_events": int(data.event.sum()),
        "protocol": protocol["name"],
        "cindex": {**_summary(per["cindex"]), "bootstrap_ci95_per_split": boot},
    }
    if deep:
        metrics["complete_cases"] = bool(cfg.get("complete_cases"))
        metrics.update({"loss": loss_class(cfg).name,
                        "fusion": str(cfg.fusion.module._target_).rsplit(".", 1)[-1],
                        "training": training})
        if data.bags_info is not None:
            metrics["embeddings"] = {k: data.bags_info[k] for k in (
                "out", "encoder", "weights_source", "precision", "device", "n_tiles",
                "tiling_params_hash")}
    for key in PER_SPLIT[1:]:
        if len(per[key]) == len(splits):
            metrics[key] = _summary(per[key])
    if deep:
        base = compare.assemble_baseline(splits, records)
        if base is not None:
            metrics["baseline"] = base
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return metrics
