"""WSI morphology ("pathomics") stage: ``python scripts/extract_pathomics.py data=demo``.

Slides without coords are tiled first (:func:`netsurv.tasks.tile.tile_cohort`, which skips
slides already tiled with the same parameters); then every slide's tiles are measured by
:func:`netsurv.pathology.morphology.slide_features` in ``morphology.n_jobs`` processes.

Config keys read (the train config provides them):

- ``data.derived``: outputs go to ``<data.derived>/tiles/<tiling hash>/`` (coords) and
  ``<data.derived>/pathomics/<hash>/`` with ``<hash>`` over the morphology parameters, the
  tiling hash and the code version;
- ``tiling``: the whole group (:mod:`netsurv.pathology.tiling` parameters);
- ``morphology``: the whole group (:data:`~netsurv.pathology.morphology.MORPHOLOGY_DEFAULTS`
  plus ``n_jobs`` and ``name``, which are not hashed);
- ``tile`` (optional; ``qc``, ``backend``, ``user_mask_dir``, ``user_mask_downsample``: as in
  ``configs/tile.yaml``).

Output folder: ``pathomics.csv`` (patient_id + features: tile-weighted mean of the patient's
slides), ``slides.csv`` (per slide: features, tiles measured, nuclei, seconds),
``failures.csv`` (the failures table of every stage, :mod:`netsurv.stages.failures`),
``params.json`` and ``slides/<slide_id>-<key>.json``, one per slide, keyed by the slide file,
its coords file and the parameter hash; a rerun recomputes only slides whose key changed.
The slide files are verified JSON (a damaged one is logged, deleted and recomputed), each
slide is measured under a lock (two jobs never measure one slide twice), and on several
ranks each rank measures ``slides[rank::world_size]`` while every rank returns the whole
table (the same cached loop as radiomics: :func:`netsurv.stages.cached_map`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from netsurv.cohort.schema import Cohort, CohortError
from netsurv.stages.failures import FAILURE_COLUMNS

__all__ = ["output_dir", "extract", "extract_slides", "run", "FAILURE_COLUMNS"]

INFO_COLUMNS = ["n_tiles", "n_tiles_total", "n_nuclei", "tissue_mm2", "mpp", "seconds"]


def _params(cfg: DictConfig) -> tuple[dict, dict, int]:
    from netsurv.pathology.morphology import normalise_params
    from netsurv.pathology.tiling import normalise_params as tiling_params

    tiling = tiling_params(OmegaConf.to_container(cfg.tiling, resolve=True) if cfg.get("tiling")
                           is not None else {})
    raw = OmegaConf.to_container(cfg.morphology, resolve=True) if cfg.get("morphology") \
        is not None else {}
    n_jobs = int(raw.get("n_jobs") or 1)
    return tiling, normalise_params(raw), n_jobs


def output_dir(cfg: DictConfig) -> Path:
    """The stage's output folder: ``<data.derived>/pathomics/<hash>``.

    The hash covers the morphology parameters and the hash of the tiling parameters, so a
    change of either gets its own folder.
    """
    from netsurv.pathology.morphology import params_hash
    from netsurv.pathology.tiling import params_hash as tiling_hash

    tiling, morph, _ = _params(cfg)
    return Path(str(cfg.data.derived)) / "pathomics" / params_hash(morph, tiling_hash(tiling))


def _stat(p) -> str:
    st = Path(p).stat()
    return f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _job(args) -> dict:
    sid, h5, path, params = args
    from netsurv.pathology.morphology import slide_features

    t0 = time.perf_counter()
    try:
        feats, info = slide_features(h5, path, params, slide_id=sid)
        return {"features": feats, "info": info}
    except Exception as exc:  # noqa: BLE001 - recorded; the other slides go on
        return {"error_type": type(exc).__name__, "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}


def _record(item, res: dict) -> dict:
    from netsurv.stages import ItemFailed

    if "error" in res:
        raise ItemFailed(res["error_type"], res["error"])
    return {"features": res["features"], "info": res["info"]}


def _worker_init():
    # one thread per process: n_jobs processes already fill the cores
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = "1"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover
        pass


def extract_slides(index: pd.DataFrame, params: dict, phash: str, out: Path, *, n_jobs: int = 1,
                   progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure the slides of a tiling ``index`` (slide_id, patient_id, path, h5, status).

    Returns ``(slides, failures)``: per-slide features + :data:`INFO_COLUMNS`, and the failed
    slides (:data:`FAILURE_COLUMNS`).  Cached slides (same key) are read back, the others
    computed and cached.  On several ranks each rank measures its share and every rank
    returns the whole tables."""
    from netsurv.stages import cached_map, failure_row, failures_frame

    cache_dir = out / "slides"
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = [r._asdict() for r in index.itertuples(index=False)]

    def cache_path(r) -> Path:
        sid = str(r["slide_id"])
        key = hashlib.sha256(f"{sid}|{_stat(r['path'])}|{_stat(r['h5'])}|{phash}"
                             .encode()).hexdigest()[:16]
        return cache_dir / f"{sid}-{key}.json"

    outcomes = cached_map(
        rows, stage="pathomics", folder=out, item_id=lambda r: str(r["slide_id"]),
        cache_path=cache_path, compute=_job, record=_record, required=("features", "info"),
        payload=lambda r: (str(r["slide_id"]), str(r["h5"]), str(r["path"]), params),
        n_jobs=int(n_jobs), initializer=_worker_init, temp_subdirs=("slides",),
        progress=progress, unit="slide", what="pathomics slide")
    done, failures = [], []
    for r, o in zip(rows, outcomes):
        sid = str(r["slide_id"])
        if o.status == "failed":
            failures.append(failure_row("morphology", sid, patient_id=r["patient_id"],
                                        path=str(r["path"]), error_type=o.error_type,
                                        error=o.error, slide_id=sid))
        else:
            done.append({"patient_id": r["patient_id"], "slide_id": sid,
                         **o.value["info"], **o.value["features"]})
    return pd.DataFrame(done), failures_frame(failures)


def extract(cohort: Cohort, cfg: DictConfig, progress: bool = False
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or resume) tiling + morphology for ``cohort``.

    Returns ``(table, failures)``: ``table`` has ``patient_id`` and numeric feature columns
    (one row per patient with at least one measured slide); ``failures`` lists slides that
    failed in tiling or morphology (:data:`FAILURE_COLUMNS`).  Both are also written to
    :func:`output_dir` (``pathomics.csv``, ``failures.csv``)."""
    from netsurv.pathology.morphology import combine_slides, params_hash
    from netsurv.pathology.tiling import params_hash as tiling_hash
    from netsurv.stages import (
        failures_frame,
        rank_zero,
        stage_env,
        write_csv,
        write_failures,
        write_text,
    )
    from netsurv.tasks.tile import output_dir as tiles_dir
    from netsurv.tasks.tile import tile_cohort, tile_options

    if cohort.slides is None or len(cohort.slides) == 0:
        raise CohortError(f"{cohort.root}: no slides.csv (or it is empty), so there are no "
                          "slides to extract pathomics from")
    tiling, morph, n_jobs = _params(cfg)
    thash = tiling_hash(tiling)
    phash = params_hash(morph, thash)
    out = Path(str(cfg.data.derived)) / "pathomics" / phash
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "params.json", json.dumps(
        {"params_hash": phash, "tiling_hash": thash, "morphology": morph, "tiling": tiling},
        indent=2, sort_keys=True, default=str))

    tcfg = OmegaConf.to_container(cfg.tile, resolve=True) if cfg.get("tile") is not None else {}
    tres = tile_cohort(cohort.slides, tiling, tiles_dir(cfg.data.derived, tiling),
                       **{**tile_options(tcfg), "progress": progress})
    tfail = failures_frame(tres["failures"]).assign(
        error=lambda d: d["error_type"] + ": " + d["error"])
    index = tres["index"]
    index = index[index["status"].isin(["done", "skipped"])]

    slides, mfail = extract_slides(index, morph, phash, out, n_jobs=n_jobs, progress=progress)
    failures = failures_frame(pd.concat([f for f in (tfail, mfail) if len(f)] or [tfail],
                                        ignore_index=True))
    info = {"patient_id", "slide_id", *INFO_COLUMNS}
    feature_cols = [c for c in slides.columns if c not in info]
    table = combine_slides(slides, feature_cols) if len(slides) else pd.DataFrame(
        columns=["patient_id"])

    def write_tables():
        write_csv(out / "slides.csv", slides)
        write_csv(out / "pathomics.csv", table)
        write_failures(out / "failures.csv", failures)

    env = stage_env()
    rank_zero(write_tables, what="pathomics", env=env)
    if len(failures) and env.rank == 0:
        print(f"pathomics: {len(failures)} slide(s) failed; reasons in {out / 'failures.csv'}")
    return table, failures


def run(cfg: DictConfig) -> dict:
    """Extract the pathomics table of the configured cohort (``scripts/extract_pathomics.py``).

    Returns
    -------
    dict
        ``n_patients``, ``n_features``, ``n_tiles`` (tiles measured), ``n_failed`` (failed
        slides), ``seconds`` and ``table`` (path of ``pathomics.csv``).
    """
    from netsurv.tasks.cohort import resolve_cohort

    t0 = time.perf_counter()
    cohort = resolve_cohort(cfg.data)
    table, failures = extract(cohort, cfg, progress=bool(cfg.get("progress", True)))
    out = output_dir(cfg)
    try:
        n_tiles = int(pd.read_csv(out / "slides.csv")["n_tiles"].sum())
    except (pd.errors.EmptyDataError, KeyError):  # no slide measured
        n_tiles = 0
    secs = time.perf_counter() - t0
    from netsurv.stages import stage_env

    if stage_env().rank == 0:
        print(f"pathomics: {len(table)} patient(s), {table.shape[1] - 1} features, {n_tiles} "
              f"tiles measured, {len(failures)} failure(s), {secs:.1f} s -> "
              f"{out / 'pathomics.csv'}")
    return {"n_patients": len(table), "n_features": table.shape[1] - 1, "n_tiles": n_tiles,
            "n_failed": len(failures), "seconds": secs, "table": str(out / "pathomics.csv")}
