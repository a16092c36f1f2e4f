"""WSI embedding stage: ``python scripts/embed.py data=demo encoder=efficientnet_lite0_imagenet``.

1. Tiling: slides without a valid coords file for the current ``tiling`` parameters are
   tiled first with :func:`netsurv.tasks.tile.tile_cohort` (same folder, same rules).
2. Per slide: tiles -> encoder -> ``<out>/<slide_id>.h5`` (see :mod:`netsurv.pathology.embed`)
   with ``<out> = <data.derived>/embeddings/<encoder>-<weights tag>/<tiling params hash>``.
   Slides whose file exists with the same encoder, weights, precision, transforms, tiling
   hash and coords are skipped.  Failures are recorded in ``<out>/failures.csv``
   (``slide_id``, ``reason``) and the other slides go on; ``<out>/index.csv`` lists every
   slide of this rank with its status and tile count; ``<out>/encoder.json`` holds the
   encoder's transform config.

Sharding: with ``torchrun --nproc_per_node=K scripts/embed.py ...`` each rank (``RANK`` of
``WORLD_SIZE``, device ``cuda:LOCAL_RANK``) takes ``slides[rank::world_size]`` (tiling
included) and writes its own slide files, ``index.rank<r>.csv`` and ``failures.rank<r>.csv``;
no process group is needed.  Without those variables: rank 0 of 1.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["shard_info", "shard", "embeddings_dir", "resolve_device", "embed_cohort", "run"]

FAILURE_COLUMNS = ["slide_id", "reason"]
INDEX_COLUMNS = ["slide_id", "patient_id", "coords_h5", "h5", "n_tiles", "status", "seconds"]


def shard_info(env=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun variables; (0, 1, 0) without them."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", 1))
    rank = int(env.get("RANK", 0))
    local = int(env.get("LOCAL_RANK", rank))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad sharding variables RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def shard(slides: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Rows ``rank::world_size`` of ``slides`` sorted by slide_id (same split on every rank)."""
    s = slides.sort_values("slide_id", kind="stable").reset_index(drop=True)
    return s.iloc[rank::world_size].reset_index(drop=True)


def embeddings_dir(derived, encoder, tiling_hash: str) -> Path:
    from netsurv.pathology.embed import weights_tag

    return (Path(str(derived)) / "embeddings" / f"{encoder.name}-{weights_tag(encoder)}"
            / str(tiling_hash))


def resolve_device(device: str | None, local_rank: int = 0) -> str:
    import torch

    device = "auto" if device is None else str(device)
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    return device


def _container(x) -> dict:
    if x is None:
        return {}
    if isinstance(x, DictConfig):
        return OmegaConf.to_container(x, resolve=True) or {}
    return dict(x)


def _ensure_tiles(slides: pd.DataFrame, params: dict, tiles_out: Path, tcfg: dict) -> dict:
    """Tile the slides that lack a valid coords file; {slide_id: failure reason}."""
    from netsurv.pathology.tiling import normalise_params, params_hash
    from netsurv.tasks.tile import _is_done, _slide_override, tile_cohort, tile_options

    phash = params_hash(params)
    p = normalise_params(params)
    todo = [i for i, r in enumerate(slides.to_dict("records"))
            if not _is_done(tiles_out / f"{r['slide_id']}.h5", phash, _slide_override(r, p))]
    if not todo:
        return {}
    res = tile_cohort(slides.iloc[todo], params, tiles_out, **tile_options(tcfg))
    print(f"embed: tiled {res['n_done']} slide(s) first, {res['n_failed']} failed -> {tiles_out}")
    return {str(r.slide_id): f"tiling failed: {r.error_type}: {r.error}"
            for r in res["failures"].itertuples(index=False)}


def embed_cohort(cohort, cfg, *, encoder=None) -> dict:
    """Tile (where needed) and embed this rank's share of the slides of ``cohort``.

    ``cohort``: a :class:`~netsurv.cohort.schema.Cohort` or a slides DataFrame
    (``patient_id``, ``slide_id``, ``path``, optional ``mpp``).  ``cfg``: mapping with
    ``data.derived``, ``tiling`` (parameters), ``encoder`` (``configs/encoder/*.yaml``),
    optional ``embed`` (device, batch_size, num_workers, decode_threads, prefetch, backend,
    channels_last, progress) and ``tile`` (options for the tiling job).  ``encoder``: an already built
    :class:`~netsurv.pathology.encoders.Encoder` to use instead of building ``cfg.encoder``.
    """
    from tqdm import tqdm

    from netsurv.pathology.embed import embed_slide, encoder_attrs, is_embedded
    from netsurv.pathology.encoders import build_encoder_from_config
    from netsurv.pathology.tiling import params_hash
    from netsurv.tasks.tile import output_dir

    t0 = time.perf_counter()
    slides = getattr(cohort, "slides", cohort)
    if slides is None or len(slides) == 0:
        raise ValueError("no slides to embed (slides.csv missing or empty)")
    ecfg = _container(cfg.get("embed"))
    tcfg = _container(cfg.get("tile"))
    params = _container(cfg["tiling"])
    derived = cfg["data"]["derived"]
    rank, world, local = shard_info()
    mine = shard(slides, rank, world)

    tiles_out = output_dir(derived, params)
    phash = params_hash(params)
    tiling_fail = _ensure_tiles(mine, params, tiles_out, tcfg) if len(mine) else {}

    enc_cfg = _container(cfg["encoder"])
    if encoder is None:
        encoder = build_encoder_from_config(enc_cfg, resolve_device(ecfg.get("device"), local))
        cl = ecfg.get("channels_last")
        if cl is not None and bool(cl) != encoder.channels_last:
            import torch

            fmt = torch.channels_last if cl else torch.contiguous_format
            encoder.model = encoder.model.to(memory_format=fmt)
            encoder.channels_last = bool(cl)
    batch_size = int(ecfg.get("batch_size") or enc_cfg.get("batch_size") or 64)
    out = embeddings_dir(derived, encoder, phash)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(
        {**encoder_attrs(encoder), "transform_config": encoder.transform_config(),
         "tiling_params_hash": phash, "batch_size": batch_size}, indent=2, default=str))

    rows, failures = [], []
    n_done = n_skipped = 0
    bar = tqdm(mine.to_dict("records"), desc=f"embed[{rank}/{world}]", unit="slide",
               disable=not bool(ecfg.get("progress", True)))
    from netsurv.runtime import keep_freed_memory, release_free_memory

    # the loop's big per-batch tensors are reused instead of page-faulted in afresh
    # (CPU lite0: 29 -> 65 img/s; netsurv.runtime); freed memory goes back afterwards
    with keep_freed_memory():
        for r in bar:
            sid = str(r["slide_id"])
            coords_h5 = tiles_out / f"{sid}.h5"
            h5 = out / f"{sid}.h5"
            rec = {"slide_id": sid, "patient_id": r.get("patient_id"), "coords_h5": str(coords_h5),
                   "h5": str(h5), "n_tiles": 0, "status": "", "seconds": 0.0}
            ts = time.perf_counter()
            if sid in tiling_fail:
                rec["status"] = "failed"
                failures.append({"slide_id": sid, "reason": tiling_fail[sid]})
            elif is_embedded(h5, encoder, coords_h5):
                import h5py

                with h5py.File(h5, "r") as f:
                    rec["n_tiles"] = int(f["features"].shape[0])
                rec["status"] = "skipped"
                n_skipped += 1
            else:
                bar.set_postfix_str(sid)
                try:
                    rec["n_tiles"] = embed_slide(
                        coords_h5, encoder, h5, batch_size, int(ecfg.get("num_workers", 0) or 0),
                        backend=str(ecfg.get("backend", "auto")),
                        decode_threads=int(ecfg.get("decode_threads", 2) or 1),
                        prefetch=default_prefetch(ecfg.get("prefetch"), encoder.device),
                        slide_path=r.get("path"), slide_id=sid)
                    rec["status"] = "done"
                    n_done += 1
                except Exception as e:  # noqa: BLE001 - record and go on with the other slides
                    rec["status"] = "failed"
                    failures.append({"slide_id": sid, "reason": f"{type(e).__name__}: {e}"})
            rec["seconds"] = round(time.perf_counter() - ts, 3)
            rows.append(rec)
            release_free_memory()  # bounded RSS: reuse within a slide, not across the cohort

    suffix = "" if world == 1 else f".rank{rank}"
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    fails = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
    index.to_csv(out / f"index{suffix}.csv", index=False)
    fails.to_csv(out / f"failures{suffix}.csv", index=False)
    secs = time.perf_counter() - t0
    n_new = int(index.loc[index.status == "done", "n_tiles"].sum())
    return {"out": str(out), "tiles_dir": str(tiles_out), "tiling_params_hash": phash,
            "encoder": encoder.name, "weights_source": encoder.weights_source,
            "precision": encoder.precision, "device": str(encoder.device),
            "rank": rank, "world_size": world, "n_slides": len(index), "n_done": n_done,
            "n_skipped": n_skipped, "n_failed": len(fails),
            "n_tiles": int(index["n_tiles"].sum()), "n_tiles_embedded": n_new,
            "seconds": secs, "index": index, "failures": fails}


def default_prefetch(value, device) -> int:
    """``None`` -> 0 on CPU (tiles read between forward passes: the model already uses every
    core, and a reader thread beside it measured 0.86 vs 0.91 of model-only), 2 on GPU."""
    if value is not None:
        return int(value)
    return 0 if torch.device(device).type == "cpu" else 2


def run(cfg: DictConfig) -> dict:
    from netsurv.cohort.schema import CohortError
    from netsurv.tasks.cohort import resolve_cohort

    cohort = resolve_cohort(cfg.data)
    if cohort.slides is None or len(cohort.slides) == 0:
        raise CohortError(f"{cohort.root}: no slides.csv (or it is empty): nothing to embed")
    res = embed_cohort(cohort, cfg)
    print(f"embed[rank {res['rank']}/{res['world_size']}]: {res['n_done']} embedded, "
          f"{res['n_skipped']} skipped (already done), {res['n_failed']} failed; "
          f"{res['n_tiles_embedded']} tiles in {res['seconds']:.1f} s "
          f"({res['encoder']}, {res['precision']}, {res['device']}) -> {res['out']}")
    if res["n_failed"]:
        print(f"embed: failure reasons in {res['out']}/failures*.csv")
    return {k: v for k, v in res.items() if k not in ("index", "failures")}
