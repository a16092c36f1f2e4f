"""WSI tiling stage: ``python scripts/tile.py data=demo [tiling.patch_size=224 ...]``.

Per slide: open (mpp chain) -> tissue mask -> grid -> ``<out>/<slide_id>.h5`` (atomic) and
``<out>/qc/<slide_id>.png``, with ``<out> = <data.derived>/tiles/<params_hash>``.  Slides whose
coords file exists with the same params hash and the same per-slide mpp override are
skipped.  Failures (unreadable file, missing or implausible mpp, no tissue, ...) are written
to ``<out>/failures.csv`` (the failures table of every stage, :mod:`netsurv.stages.failures`)
and the other slides go on; every slide, failed ones included, gets
a QC image (the reason in its title) and a row of ``<out>/index.csv`` (status, tiles, mpp and
its source, tissue and the share excluded as marks, tile overlap, QC path, error).

Every coords file carries a checksum of its datasets, verified whenever it is reused: a damaged
file is logged with its path, deleted and tiled again.  Each slide is tiled under a lock, so
two jobs on one cohort never tile the same slide twice nor see each other's half-written
files; temps left by killed jobs are removed at the start.  On several ranks (torchrun,
SLURM), each rank tiles ``slides[rank::world_size]`` (by slide_id), rank 0 writes the merged
``index.csv`` / ``failures.csv``, and every rank returns the complete result.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from netsurv.stages import (
    CorruptCacheError,
    ItemFailed,
    ItemLocks,
    VerifiedFiles,
    clean_stale_temps,
    failure_row,
    failures_frame,
    gather,
    rank_zero,
    run_items,
    shard,
    stage_env,
    verify_h5,
    write_csv,
    write_failures,
    write_text,
)

__all__ = ["output_dir", "tile_cohort", "run", "coords_tiles"]

# index.csv: one row per slide, failed ones included (the per-slide columns are
# netsurv.pathology.tiling.RECORD_COLUMNS: status, tiles, mpp and its source, tissue and
# marks, overlap, QC image, error)
INDEX_COLUMNS = ["slide_id", "patient_id", "path", "h5", "n_tiles", "status", "n_grid_tiles",
                 "n_gap_fill_tiles", "mpp", "mpp_source", "mpp_file", "mpp_file_source",
                 "mpp_warning", "tissue_mm2", "marked_tissue_mm2", "marked_tissue_fraction",
                 "overlap_factor", "qc", "error_type", "error"]


def output_dir(derived, params: dict) -> Path:
    """The tiling stage's output folder: ``<derived>/tiles/<hash of the tiling parameters>``."""
    from netsurv.pathology.tiling import params_hash

    return Path(str(derived)) / "tiles" / params_hash(params)


def _slide_override(row, params: dict):
    v = row.get("mpp") if hasattr(row, "get") else None
    if v is not None and not (isinstance(v, float) and math.isnan(v)) and not pd.isna(v):
        return float(v)
    return params.get("mpp_override")


def _override_origin(row, params: dict) -> str:
    """Where a slide's mpp override comes from (for the index's mpp_source)."""
    v = row.get("mpp") if hasattr(row, "get") else None
    if v is not None and not pd.isna(v):
        return "slides.csv"
    return "tiling.mpp_override"


def coords_tiles(h5: Path, phash: str, override, verified=None) -> int | None:
    """Tile count of a verified coords file made with params hash ``phash`` and this mpp
    override; None when absent or made otherwise.  Raises
    :class:`~netsurv.stages.CorruptCacheError` (naming the file) when it cannot be trusted.
    ``verified``: a :class:`~netsurv.stages.VerifiedFiles` memo (files unchanged since their
    last verification are not read again)."""
    import h5py

    try:
        (verified.verify if verified is not None else verify_h5)(h5)
    except FileNotFoundError:
        return None
    with h5py.File(h5, "r") as f:
        if f.attrs.get("params_hash") != phash or "coords" not in f:
            return None
        old = float(f.attrs.get("mpp_override", np.nan))
        n = int(f["coords"].shape[0])
    new = np.nan if override is None else float(override)
    return n if (np.isnan(old) and np.isnan(new)) or old == new else None


def _is_done(h5: Path, phash: str, override) -> bool:
    try:
        return coords_tiles(h5, phash, override) is not None
    except CorruptCacheError:
        return False


def _user_mask(user_mask_dir, slide_id: str):
    if not user_mask_dir:
        return None
    d = Path(str(user_mask_dir))
    for ext in (".geojson", ".json", ".png"):
        p = d / f"{slide_id}{ext}"
        if p.is_file():
            return p
    return None


def tile_options(tcfg) -> dict:
    """Keyword arguments of :func:`tile_cohort` from the ``tile`` job options (tile_opts)."""
    tcfg = dict(tcfg or {})
    return {"qc": bool(tcfg.get("qc", True)), "user_mask_dir": tcfg.get("user_mask_dir"),
            "user_mask_downsample": tcfg.get("user_mask_downsample"),
            "backend": str(tcfg.get("backend", "auto")),
            "progress": bool(tcfg.get("progress", True)),
            "device": tcfg.get("device", "auto")}


def tile_cohort(slides: pd.DataFrame, params: dict, out: Path, *, qc: bool = True,
                user_mask_dir=None, user_mask_downsample=None, backend: str = "auto",
                progress: bool = True, device="auto") -> dict:
    """Tile every slide of ``slides`` (patient_id, slide_id, path, optional mpp) into ``out``.

    May be called on every rank of a job (each tiles its share); every rank returns the
    result of all slides, ``index`` in the order of ``slides``."""
    from netsurv.pathology.tiling import (
        coords_record,
        normalise_params,
        params_hash,
        tile_one_slide,
    )

    params = normalise_params(params)
    phash = params_hash(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = stage_env()
    t0 = time.perf_counter()
    records = [r._asdict() for r in slides.itertuples(index=False)]
    order = sorted(range(len(records)), key=lambda i: str(records[i]["slide_id"]))
    mine = shard(order, env)

    def _rec(row: dict) -> dict:
        sid = str(row["slide_id"])
        return {"slide_id": sid, "patient_id": row.get("patient_id"), "path": str(row["path"]),
                "h5": str(out / f"{sid}.h5"), "n_tiles": 0, "status": ""}

    memo = VerifiedFiles(out, load=False)
    tiled: dict[int, dict] = {}  # this process's records, failed slides' included (QC, mpp)

    def lookup(i):
        row = records[i]
        sid = str(row["slide_id"])
        h5 = out / f"{sid}.h5"
        if coords_tiles(h5, phash, _slide_override(row, params), memo) is None:
            return None
        qc_png = out / "qc" / f"{sid}.png"
        return {**_rec(row), **coords_record(h5), "status": "skipped",
                "qc": str(qc_png) if qc_png.is_file() else None}

    def tile_one(i) -> dict:
        row = records[i]
        sid = str(row["slide_id"])
        h5 = out / f"{sid}.h5"
        override = _slide_override(row, params)
        rec = _rec(row)
        problem = row.get("problem")
        if isinstance(problem, str) and problem:  # slides.csv: no path / file not found
            rec.update(status="failed", error_type="FileNotFoundError", error=problem)
            return rec
        # the whole per-slide body (QC also for failed slides, the record's columns) lives in
        # netsurv.pathology.tiling.tile_one_slide; it never raises for a slide's own problems
        rec.update(tile_one_slide(
            row["path"], h5, params, slide_id=sid, mpp_override=override,
            mpp_origin=_override_origin(row, params), backend=backend,
            user_mask=_user_mask(user_mask_dir, sid), user_mask_downsample=user_mask_downsample,
            device=device, qc_path=out / "qc" / f"{sid}.png" if qc else None,
            params_hash_=phash))
        if rec["status"] == "done":
            memo.add(h5)
        tiled[i] = rec
        return rec

    def finish(i, rec):
        if rec["status"] == "failed":
            raise ItemFailed(rec["error_type"], rec["error"])
        return rec

    def local():
        write_text(out / "params.json", json.dumps({"params_hash": phash, **params}, indent=2,
                                                   sort_keys=True, default=str))
        clean_stale_temps(out, subdirs=("qc",))
        memo.load()
        outcomes = run_items(mine, key=lambda i: str(records[i]["slide_id"]), lookup=lookup,
                             compute=tile_one, finish=finish, locks=ItemLocks(out),
                             progress=progress, desc="tiling", unit="slide",
                             what="coords file")
        memo.save()
        res = []
        for i, o in zip(mine, outcomes):
            rec = dict(o.value if o.value is not None else tiled.get(i) or _rec(records[i]))
            if o.status == "failed":
                rec.update(status="failed", n_tiles=0, error_type=o.error_type, error=o.error)
            elif o.status == "skipped":
                rec["status"] = "skipped"
            res.append((i, rec))
        return res

    by_pos = dict(x for part in gather(local, what="tiling", env=env) for x in part)
    rows = [by_pos[i] for i in range(len(records))]
    index = pd.DataFrame([{k: r.get(k) for k in INDEX_COLUMNS} for r in rows],
                         columns=INDEX_COLUMNS)
    failures = failures_frame(
        failure_row("tiling", r["slide_id"], patient_id=r["patient_id"], path=r["path"],
                    error_type=r.get("error_type", ""), error=r.get("error", ""),
                    slide_id=r["slide_id"]) for r in rows if r["status"] == "failed")

    def write_tables():
        write_csv(out / "index.csv", index)
        write_failures(out / "failures.csv", failures)

    rank_zero(write_tables, what="tiling", env=env)
    st = index["status"]
    return {"out": str(out), "params_hash": phash, "n_slides": len(index),
            "n_done": int((st == "done").sum()), "n_skipped": int((st == "skipped").sum()),
            "n_failed": len(failures), "n_tiles": int(index["n_tiles"].sum()),
            "seconds": time.perf_counter() - t0, "index": index, "failures": failures}


def run(cfg: DictConfig) -> dict:
    """Tile the slides of the configured cohort (``scripts/tile.py``).

    Returns
    -------
    dict
        The summary of :func:`tile_cohort` without its ``index`` and ``failures`` tables.

    Raises
    ------
    CohortError
        If the cohort has no slides.
    """
    from netsurv.cohort.schema import CohortError
    from netsurv.tasks.cohort import resolve_cohort

    cohort = resolve_cohort(cfg.data)
    if cohort.slides is None or len(cohort.slides) == 0:
        raise CohortError(f"{cohort.root}: no slides.csv (or it is empty): nothing to tile")
    params = OmegaConf.to_container(cfg.tiling, resolve=True)
    tcfg = OmegaConf.to_container(cfg.get("tile", {}), resolve=True) or {}
    out = output_dir(cfg.data.derived, params)
    res = tile_cohort(cohort.slides, params, out, **tile_options(tcfg))
    if stage_env().rank == 0:
        print(f"tiling: {res['n_done']} tiled, {res['n_skipped']} skipped (already done), "
              f"{res['n_failed']} failed; {res['n_tiles']} tiles -> {out}")
        if res["n_failed"]:
            print(f"tiling: failure reasons in {out / 'failures.csv'}")
    return {k: v for k, v in res.items() if k not in ("index", "failures")}
