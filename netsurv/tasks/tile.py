"""WSI tiling stage: ``python scripts/tile.py data=demo [tiling.patch_size=224 ...]``.

Per slide: open (mpp chain) -> tissue mask -> grid -> ``<out>/<slide_id>.h5`` (atomic) and
``<out>/qc/<slide_id>.png``, with ``<out> = <data.derived>/tiles/<params_hash>``.  Slides whose
coords file exists with the same params hash and the same per-slide mpp override are
skipped.  Failures (unreadable file, missing or implausible mpp, no tissue, ...) are written
to ``<out>/failures.csv`` and the other slides go on; every slide, failed ones included, gets
a QC image (the reason in its title) and a row of ``<out>/index.csv`` (status, tiles, mpp and
its source, tissue and the share excluded as marks, tile overlap, QC path, error).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

__all__ = ["output_dir", "tile_cohort", "run"]

FAILURE_COLUMNS = ["slide_id", "patient_id", "path", "error_type", "error"]
# index.csv: one row per slide, failed ones included (the per-slide columns are
# netsurv.pathology.tiling.RECORD_COLUMNS: status, tiles, mpp and its source, tissue and
# marks, overlap, QC image, error)
INDEX_COLUMNS = ["slide_id", "patient_id", "path", "h5", "n_tiles", "status", "n_grid_tiles",
                 "n_gap_fill_tiles", "mpp", "mpp_source", "mpp_file", "mpp_file_source",
                 "mpp_warning", "tissue_mm2", "marked_tissue_mm2", "marked_tissue_fraction",
                 "overlap_factor", "qc", "error_type", "error"]


def output_dir(derived, params: dict) -> Path:
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


def _is_done(h5: Path, phash: str, override) -> bool:
    if not h5.is_file():
        return False
    try:
        import h5py

        with h5py.File(h5, "r") as f:
            if f.attrs.get("params_hash") != phash or "coords" not in f:
                return False
            old = float(f.attrs.get("mpp_override", np.nan))
    except Exception:  # noqa: BLE001 - unreadable / partial file: redo it
        return False
    new = np.nan if override is None else float(override)
    return (np.isnan(old) and np.isnan(new)) or old == new


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
    """Tile every slide of ``slides`` (patient_id, slide_id, path, optional mpp) into ``out``."""
    from tqdm import tqdm

    from netsurv.pathology.tiling import (coords_record, normalise_params, params_hash,
                                          tile_one_slide)

    params = normalise_params(params)
    phash = params_hash(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps({"params_hash": phash, **params}, indent=2,
                                                sort_keys=True, default=str))
    rows, failures = [], []
    n_done = n_skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(list(slides.itertuples(index=False)), desc="tiling", unit="slide",
               disable=not progress)
    for r in bar:
        row = r._asdict()
        sid = str(row["slide_id"])
        h5 = out / f"{sid}.h5"
        override = _slide_override(row, params)
        rec = {"slide_id": sid, "patient_id": row.get("patient_id"), "path": str(row["path"]),
               "h5": str(h5), "n_tiles": 0, "status": ""}
        if _is_done(h5, phash, override):
            rec.update(coords_record(h5), status="skipped")
            qc_png = out / "qc" / f"{sid}.png"
            rec["qc"] = str(qc_png) if qc_png.is_file() else None
            n_skipped += 1
            rows.append(rec)
            continue
        bar.set_postfix_str(sid)
        # the whole per-slide body (QC also for failed slides, the record's columns) lives in
        # netsurv.pathology.tiling.tile_one_slide; it never raises for a slide's own problems
        rec.update(tile_one_slide(
            row["path"], h5, params, slide_id=sid, mpp_override=override,
            mpp_origin=_override_origin(row, params), backend=backend,
            user_mask=_user_mask(user_mask_dir, sid), user_mask_downsample=user_mask_downsample,
            device=device, qc_path=out / "qc" / f"{sid}.png" if qc else None,
            params_hash_=phash))
        if rec["status"] == "done":
            n_done += 1
        else:
            failures.append({"slide_id": sid, "patient_id": row.get("patient_id"),
                             "path": str(row["path"]), "error_type": rec["error_type"],
                             "error": rec["error"]})
        rows.append(rec)
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    index.to_csv(out / "index.csv", index=False)
    pd.DataFrame(failures, columns=FAILURE_COLUMNS).to_csv(out / "failures.csv", index=False)
    return {"out": str(out), "params_hash": phash, "n_slides": len(index), "n_done": n_done,
            "n_skipped": n_skipped, "n_failed": len(failures),
            "n_tiles": int(index["n_tiles"].sum()), "seconds": time.perf_counter() - t0,
            "index": index, "failures": pd.DataFrame(failures, columns=FAILURE_COLUMNS)}


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
    print(f"tiling: {res['n_done']} tiled, {res['n_skipped']} skipped (already done), "
          f"{res['n_failed']} failed; {res['n_tiles']} tiles -> {out}")
    if res["n_failed"]:
        print(f"tiling: failure reasons in {out / 'failures.csv'}")
    return {k: v for k, v in res.items() if k not in ("index", "failures")}
