"""WSI tiling stage: ``python scripts/tile.py data=demo [tiling.patch_size=224 ...]``.

Per slide: open (mpp chain) -> tissue mask -> grid -> ``<out>/<slide_id>.h5`` (atomic) and
``<out>/qc/<slide_id>.png``, with ``<out> = <data.derived>/tiles/<params_hash>``.  Slides whose
coords file exists with the same params hash and the same per-slide mpp override are
skipped.  Failures (unreadable file, missing mpp, no tissue, ...) are written to
``<out>/failures.csv`` and the other slides go on; ``<out>/index.csv`` lists every slide with
its status and tile count.

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

from netsurv.stages import (CorruptCacheError, ItemFailed, ItemLocks, VerifiedFiles,
                            atomic_path, clean_stale_temps, gather, h5_attach_checksum,
                            rank_zero, run_items, shard, stage_env, verify_h5, write_csv,
                            write_text)

__all__ = ["output_dir", "tile_cohort", "run", "coords_tiles", "write_coords_checked"]

FAILURE_COLUMNS = ["stage", "patient_id", "item_id", "path", "error_type", "error", "slide_id"]
INDEX_COLUMNS = ["slide_id", "patient_id", "path", "h5", "n_tiles", "status"]


def output_dir(derived, params: dict) -> Path:
    from netsurv.pathology.tiling import params_hash

    return Path(str(derived)) / "tiles" / params_hash(params)


def _slide_override(row, params: dict):
    v = row.get("mpp") if hasattr(row, "get") else None
    if v is not None and not (isinstance(v, float) and math.isnan(v)) and not pd.isna(v):
        return float(v)
    return params.get("mpp_override")


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


def write_coords_checked(h5, res, slide, **kw) -> Path:
    """:func:`~netsurv.pathology.tiling.write_coords` into a temp file unique to this process,
    with the checksum of its datasets recorded, then renamed into place."""
    import h5py

    from netsurv.pathology.tiling import write_coords

    with atomic_path(h5) as tmp:
        write_coords(tmp, res, slide, **kw)
        with h5py.File(tmp, "r+") as f:
            h5_attach_checksum(f)
    return Path(h5)


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
    from netsurv.pathology.slides import open_slide
    from netsurv.pathology.tiling import normalise_params, params_hash, tile_slide
    from netsurv.pathology.tissue import save_qc

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

    def lookup(i):
        row = records[i]
        sid = str(row["slide_id"])
        n = coords_tiles(out / f"{sid}.h5", phash, _slide_override(row, params), memo)
        return None if n is None else {**_rec(row), "n_tiles": n, "status": "skipped"}

    def tile_one(i) -> dict:
        row = records[i]
        sid = str(row["slide_id"])
        h5 = out / f"{sid}.h5"
        override = _slide_override(row, params)
        rec = _rec(row)
        try:
            problem = row.get("problem")
            if isinstance(problem, str) and problem:  # slides.csv: no path / file not found
                raise FileNotFoundError(problem)
            with open_slide(row["path"], override, backend=backend) as slide:
                res = tile_slide(slide, params, _user_mask(user_mask_dir, sid),
                                 user_mask_downsample, device=device)
                write_coords_checked(h5, res, slide, slide_id=sid, params_hash_=phash)
                memo.add(h5)
                if qc:
                    save_qc(out / "qc" / f"{sid}.png", res.tissue, res.coords,
                            res.plan.size_level0,
                            title=f"{sid}: {res.n_grid} grid + {res.n_tiles - res.n_grid} "
                                  f"gap-fill tiles, {slide.mpp:g} um/px [{slide.mpp_source}]",
                            n_grid=res.n_grid)
            rec["n_tiles"], rec["status"] = res.n_tiles, "done"
        except Exception as e:  # noqa: BLE001 - record and go on with the other slides
            rec["status"] = "failed"
            rec["error_type"], rec["error"] = type(e).__name__, str(e)
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
            rec = dict(o.value) if o.value is not None else _rec(records[i])
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
    failures = pd.DataFrame(
        [{"stage": "tiling", "patient_id": r["patient_id"], "item_id": r["slide_id"],
          "path": r["path"], "error_type": r.get("error_type", ""), "error": r.get("error", ""),
          "slide_id": r["slide_id"]} for r in rows if r["status"] == "failed"],
        columns=FAILURE_COLUMNS)

    def write_tables():
        write_csv(out / "index.csv", index)
        write_csv(out / "failures.csv", failures)

    rank_zero(write_tables, what="tiling", env=env)
    st = index["status"]
    return {"out": str(out), "params_hash": phash, "n_slides": len(index),
            "n_done": int((st == "done").sum()), "n_skipped": int((st == "skipped").sum()),
            "n_failed": len(failures), "n_tiles": int(index["n_tiles"].sum()),
            "seconds": time.perf_counter() - t0, "index": index, "failures": failures}


def run(cfg: DictConfig) -> dict:
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
