"""External validation (``evaluation=external``): fit on every patient of ``data.root``, score
another cohort (``evaluation.test_root``, or a second demo cohort ``evaluation.test_demo_seed``).

Both cohorts go through the runner's ``prepare`` with the same configuration
(stages, encoder, tiling, radiomics parameters); only the cohort folder and its ``derived``
cache differ.  They are then joined into one :class:`RunData` with a single split whose
``train`` positions are the training cohort and whose ``test`` positions are the test cohort,
so the split-fitters fit every step (and the inner CV / inner validation) on the training
cohort only and the test cohort is only transformed and scored, exactly as a holdout test set.
Test patient ids that also occur in the training cohort are prefixed with ``test:``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from netsurv.cohort.schema import CohortError
from netsurv.cohort.splits import Split, SplitError
from netsurv.evaluation.records import RunData
from netsurv.modalities import CLINICAL

TEST_PREFIX = "test:"
SPLIT_NAME = "external"
# library notices the runner also leaves out of warnings.log
QUIET = (".*LeafSpec.*is deprecated.*", "The `srun` command is available on your system")


def test_config(cfg: DictConfig) -> DictConfig:
    """The run's config with the test cohort as ``data`` (its own ``derived`` cache: both
    cohorts may use the same slide ids, so they must never share stage caches)."""
    ev = cfg.evaluation
    seed, root = ev.get("test_demo_seed"), ev.get("test_root")
    if seed is None and not root:
        raise CohortError("evaluation=external needs the test cohort: evaluation.test_root="
                          "<cohort folder> (or evaluation.test_demo_seed=<seed> for a second "
                          "demo cohort generated with another seed)")
    tcfg = copy.deepcopy(cfg)
    with open_dict(tcfg):
        if seed is not None:
            if tcfg.data.get("demo") is None:
                raise CohortError("evaluation.test_demo_seed generates a second demo cohort and "
                                  "needs data=demo; with your own cohorts give "
                                  "evaluation.test_root=<cohort folder>")
            tcfg.data.demo.seed = int(seed)
            if root:
                tcfg.data.root = str(root)
            elif str(tcfg.data.root) == str(cfg.data.root):  # data.root was given literally
                train_root = Path(str(cfg.data.root)).expanduser().resolve()
                tcfg.data.root = str(train_root.with_name(f"{train_root.name}-test-seed{seed}"))
        else:
            tcfg.data.root = str(Path(str(root)).expanduser().resolve())
            if not (Path(str(tcfg.data.root)) / "clinical.csv").is_file():
                raise CohortError(f"evaluation.test_root={root}: no clinical.csv there; point it "
                                  "at a cohort folder (or use evaluation.test_demo_seed=<seed> "
                                  "for a demo cohort)")
            tcfg.data.demo = None  # a folder of the user's: loaded as it is, never generated
        tcfg.data.derived = str(Path(str(tcfg.data.root)).expanduser().resolve() / "derived")
        emb = cfg.get("embeddings") or {}
        if emb.get("dir"):
            if not ev.get("test_embeddings_dir"):
                raise CohortError("embeddings.dir holds the training cohort's features; give the "
                                  "test cohort's with evaluation.test_embeddings_dir=<folder>")
            tcfg.embeddings.dir = str(ev.test_embeddings_dir)
    a = Path(str(cfg.data.root)).expanduser().resolve()
    b = Path(str(tcfg.data.root)).expanduser().resolve()
    if a == b:
        raise CohortError(f"evaluation=external: the test cohort {b} is the training cohort "
                          "(data.root); give another folder or demo seed")
    return tcfg


def check_tables(expected: dict[str, list | None], test: dict[str, pd.DataFrame], cfg,
                 where: str) -> dict[str, pd.DataFrame]:
    """The new cohort's modality tables reduced to the training columns (``expected``: per
    modality, the columns the model was fitted on; None = the declared clinical covariates), or
    one error naming the modality and the missing columns (extra columns: ignored, warned)."""
    out = {}
    for m, cols in expected.items():
        te = test.get(m)
        if te is None:
            raise CohortError(f"{where}: no {m!r} table, which the model was trained on")
        if cols is None:
            need = [*cfg.data.clinical.numeric, *cfg.data.clinical.categorical]
            missing = [c for c in need if c not in te.columns]
            if missing:
                raise CohortError(f"{where}/clinical.csv lacks the clinical column(s) {missing} "
                                  "the model was trained on (data.clinical.numeric / "
                                  "categorical); add them, empty where unknown")
            out[m] = te
            continue
        missing = [c for c in cols if c not in te.columns]
        if missing:
            raise CohortError(
                f"{where}: the {m!r} table lacks {len(missing)} feature column(s) of the "
                f"training cohort's, e.g. {missing[:5]}; both cohorts need the same features "
                f"(same radiomics/pathomics parameters or the same features/{m}.csv columns)")
        extra = [c for c in te.columns if c not in set(cols)]
        if extra:
            warnings.warn(f"{where}: {len(extra)} column(s) of the {m!r} table are not in the "
                          f"training cohort's and are ignored, e.g. {extra[:5]}", UserWarning)
        out[m] = te[list(cols)]
    return out


def check_batches(cfg, frames: dict, meta, where: str) -> None:
    """With ComBat, every patient of a harmonised table needs its batch (ct.csv column)."""
    from netsurv.evaluation.inputs import harmonize_method, harmonized_modalities

    h = cfg.harmonize
    if harmonize_method(cfg) != "combat":
        return
    for m in [m for m in harmonized_modalities(cfg) if m in frames]:
        ids = list(frames[m].index)
        if meta is None or h.batch_col not in meta.columns:
            missing = ids
        else:
            batch = meta[h.batch_col].reindex(ids)
            missing = list(batch.index[batch.isna()])
        if missing:
            raise CohortError(f"{where}/ct.csv: no {h.batch_col!r} (ComBat batch of the {m!r} "
                              f"table) for {len(missing)} patient(s), e.g. {missing[:5]}; give "
                              f"each patient's {h.batch_col} in ct.csv")


def _concat_meta(a, b):
    if a is None or b is None:
        return a if b is None else b
    return pd.concat([a, b], axis=0, join="outer")


def merge_bags(a, b, rename: dict):
    """One BagStore over both cohorts' bags (the test ids renamed)."""
    from netsurv.training.bags import BagStore

    if a is None and b is None:
        return None
    if a is not None and b is not None and a.dim != b.dim:
        raise CohortError(f"the test cohort's tile embeddings have {b.dim} dimensions, the "
                          f"training cohort's {a.dim}: another encoder ({b.encoder} vs "
                          f"{a.encoder}); both cohorts need the same encoder")
    slides = {}
    if a is not None:
        slides.update({p: a.slides_of(p) for p in a})
    if b is not None:
        slides.update({rename[p]: b.slides_of(p) for p in b if p in rename})
    return BagStore(slides, dim=(a or b).dim)


def harmonize_summary(cfg, frames, meta, train_ids, test_ids) -> dict | None:
    """What ComBat does with the test cohort's batches (recorded in metrics.json): per
    harmonised modality, the training batches and the test batches with their action."""
    from netsurv.evaluation.inputs import harmonize_method, harmonized_modalities

    h = cfg.harmonize
    if harmonize_method(cfg) != "combat" or meta is None or h.batch_col not in meta.columns:
        return None
    mode, min_cases = str(h.get("unseen", "pass")), int(h.get("unseen_min_cases", 10))
    res = {"method": "combat", "unseen": mode, "unseen_min_cases": min_cases, "modalities": {}}
    for m in harmonized_modalities(cfg):
        if m not in frames:
            continue
        rows = set(frames[m].index)
        tr = meta.loc[[p for p in train_ids if p in rows and p in meta.index], h.batch_col]
        te = meta.loc[[p for p in test_ids if p in rows and p in meta.index], h.batch_col]
        seen = set(tr.astype(str))
        batches = {}
        for b, n in te.astype(str).value_counts().sort_index().items():
            if b in seen:
                action = "corrected with the training estimates"
            elif mode == "estimate" and n >= 2:
                action = "unseen: location/scale estimated from its own rows"
            else:
                action = "unseen: passed unharmonised"
            batches[b] = {"n": int(n), "action": action,
                          "few_cases": bool(b not in seen and n < min_cases)}
        res["modalities"][m] = {"training_batches": {str(k): int(v) for k, v in
                                                     tr.astype(str).value_counts().sort_index().items()},
                                "test_batches": batches}
    return res


def prepare_external(cfg: DictConfig, prepare) -> tuple[RunData, list[Split], dict]:
    """(joined RunData, [the one split], the ``external`` block of metrics.json);
    ``prepare``: the runner's cohort preparation (config -> RunData), applied to each cohort."""
    tcfg = test_config(cfg)
    train = prepare(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pattern in QUIET:
            warnings.filterwarnings("ignore", pattern)
        test = prepare(tcfg)
    where = str(test.cohort.root)
    for w in caught:  # say which cohort a stage or data warning is about
        warnings.warn(f"test cohort {where}: {w.message}", w.category)
    frames_te = check_tables({m: None if m == CLINICAL else list(f.columns)
                              for m, f in train.frames.items()}, test.frames, cfg, where)
    check_batches(cfg, frames_te, test.meta, where)
    clash = set(train.patients)
    rename = {p: (f"{TEST_PREFIX}{p}" if p in clash else p) for p in test.patients}
    n_ren = sum(rename[p] != p for p in test.patients)
    if n_ren:
        warnings.warn(f"{n_ren} test-cohort patient id(s) also occur in the training cohort; "
                      f"they are written as '{TEST_PREFIX}<id>' (e.g. "
                      f"{TEST_PREFIX}{next(p for p in test.patients if rename[p] != p)})",
                      UserWarning)
    patients = list(train.patients) + [rename[p] for p in test.patients]
    frames = {m: pd.concat([train.frames[m], frames_te[m].rename(index=rename)], axis=0,
                           join="outer" if m == CLINICAL else "inner")
              for m in train.frames}
    meta_te = None if test.meta is None else test.meta.rename(index=rename)
    meta = _concat_meta(train.meta, meta_te)
    truth = None
    if test.truth is not None:
        tr_truth = train.truth if train.truth is not None else np.full(len(train.patients), np.nan)
        truth = np.concatenate([tr_truth, test.truth])
    bags = merge_bags(train.bags, test.bags, rename)
    # the offset's probe tables (pathomics): the training cohort's columns; a test cohort
    # without the table gets probe 0 (the training mean) from the offset
    aux = {m: pd.concat([f, test.aux[m].rename(index=rename).reindex(columns=f.columns)])
           if m in test.aux else f for m, f in train.aux.items()}
    data = RunData(cfg=cfg, cohort=train.cohort, patients=patients, frames=frames,
                   time=np.concatenate([train.time, test.time]),
                   event=np.concatenate([train.event, test.event]), truth=truth, meta=meta,
                   bags=bags, bags_info=train.bags_info, aux=aux)
    n_tr = len(train.patients)
    split = Split(SPLIT_NAME, np.arange(n_tr), np.arange(n_tr, len(patients)))
    if train.event.sum() == 0:
        raise SplitError("the training cohort has no events for this endpoint: no survival "
                         "model can be fitted")
    info = {"train_root": str(train.cohort.root), "test_root": where,
            "n_train": n_tr, "n_train_events": int(train.event.sum()),
            "n_test": len(test.patients), "n_test_events": int(test.event.sum()),
            "renamed_test_ids": n_ren, "test_id_prefix": TEST_PREFIX}
    if test.bags_info is not None:
        info["test_embeddings"] = {k: test.bags_info.get(k) for k in (
            "out", "encoder", "n_tiles", "tiling_params_hash")}
    harm = harmonize_summary(cfg, frames, meta, train.patients,
                             [rename[p] for p in test.patients])
    if harm is not None:
        info["harmonize"] = harm
    return data, [split], info
