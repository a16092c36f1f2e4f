"""WSI embedding stage: ``python scripts/embed.py data=demo encoder=efficientnet_lite0_imagenet``.

1. Tiling: every slide goes through :func:`netsurv.tasks.tile.tile_cohort` first (same folder,
   same rules: slides with a valid coords file are skipped).
2. Per slide: tiles -> encoder -> ``<out>/<slide_id>.h5`` (see :mod:`netsurv.pathology.embed`)
   with ``<out> = <data.derived>/embeddings/<encoder>-<weights tag>/<tiling params hash>``.
   Slides whose file exists with the same encoder, weights, precision, transforms, storage
   dtype (``embed.dtype``), tiling hash and coords, and whose checksum verifies, are skipped;
   a damaged file is logged with its path, deleted and embedded again.  Failures are recorded
   in ``<out>/failures.csv`` (the failures table of every stage,
   :mod:`netsurv.stages.failures`; ``reason`` says which stage failed the slide) and the
   other slides go on;
   ``<out>/index.csv`` lists every slide with its status and tile count;
   ``<out>/encoder.json`` holds the encoder's transform config.

Ranks: with ``torchrun --nproc_per_node=K scripts/embed.py ...`` or under ``srun`` (SLURM
tasks), every rank tiles and embeds ``slides[rank::world_size]`` (sorted by slide_id) on
device ``cuda:LOCAL_RANK`` (CPU without CUDA), the ranks meet, rank 0 writes the merged
``index.csv`` / ``failures.csv``, and every rank returns the complete result.  Each slide is
embedded under a lock: two jobs on one cohort never embed the same slide twice, and a slide
another job is tiling is waited for, not reported as failed.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from netsurv.stages import (
    ItemLocks,
    VerifiedFiles,
    clean_stale_temps,
    failure_row,
    failures_frame,
    gather,
    rank_zero,
    run_items,
    stage_env,
    write_csv,
    write_failures,
    write_text,
)
from netsurv.stages import shard as _shard

__all__ = ["shard_info", "shard", "embeddings_dir", "resolve_device", "embed_cohort", "run"]

INDEX_COLUMNS = ["slide_id", "patient_id", "coords_h5", "h5", "n_tiles", "status", "seconds"]


def shard_info(env=None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process (torchrun or SLURM variables, see
    :func:`netsurv.distributed.dist_env`); (0, 1, 0) without them."""
    from netsurv.distributed import dist_env

    e = dist_env(env)
    return e.rank, e.world_size, e.local_rank


def shard(slides: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Rows ``rank::world_size`` of ``slides`` sorted by slide_id (same split on every rank)."""
    s = slides.sort_values("slide_id", kind="stable").reset_index(drop=True)
    return s.iloc[rank::world_size].reset_index(drop=True)


def embeddings_dir(derived, encoder, tiling_hash: str) -> Path:
    """The embedding stage's output folder of one encoder and tiling.

    ``<derived>/embeddings/<encoder name>-<weights tag>/<tiling hash>``: the weights tag
    (:func:`netsurv.pathology.embed.weights_tag`) keeps embeddings of different weights apart.
    """
    from netsurv.pathology.embed import weights_tag

    return (Path(str(derived)) / "embeddings" / f"{encoder.name}-{weights_tag(encoder)}"
            / str(tiling_hash))


def resolve_device(device: str | None, local_rank: int | None = None) -> str:
    """``auto`` -> ``cuda:<local rank>`` with CUDA, else ``cpu``; ``cuda`` -> ``cuda:<local
    rank>``; anything else as given (:func:`netsurv.distributed.device_for`)."""
    from netsurv.distributed import DistEnv, device_for

    env = None if local_rank is None else DistEnv(0, 1, int(local_rank), "single")
    return device_for(device, env or stage_env())


def _container(x) -> dict:
    if x is None:
        return {}
    if isinstance(x, DictConfig):
        return OmegaConf.to_container(x, resolve=True) or {}
    return dict(x)


def embed_cohort(cohort, cfg, *, encoder=None) -> dict:
    """Tile (where needed) and embed the slides of ``cohort``; on several ranks, each rank
    its share, every rank returning the complete result.

    ``cohort``: a :class:`~netsurv.cohort.schema.Cohort` or a slides DataFrame
    (``patient_id``, ``slide_id``, ``path``, optional ``mpp``).  ``cfg``: mapping with
    ``data.derived``, ``tiling`` (parameters), ``encoder`` (``configs/encoder/*.yaml``),
    optional ``embed`` (device, batch_size, num_workers, decode_threads, prefetch, backend,
    channels_last, dtype, progress) and ``tile`` (options for the tiling job).  ``encoder``:
    an already built :class:`~netsurv.pathology.encoders.Encoder` to use instead of building
    ``cfg.encoder``.  Returns counts, ``out`` (the embeddings folder), ``index`` and
    ``failures`` (DataFrames over all slides, in the order of ``cohort``'s slides).
    """
    from netsurv.pathology.embed import (
        CohortEmbedder,
        SlideJob,
        embed_slide,
        embedded_tiles,
        encoder_attrs,
        storage_dtype,
    )
    from netsurv.pathology.encoders import build_encoder_from_config
    from netsurv.pathology.tiling import params_hash
    from netsurv.runtime import keep_freed_memory, release_free_memory
    from netsurv.stages.cache import CorruptCacheError
    from netsurv.tasks.tile import output_dir, tile_cohort, tile_options

    t0 = time.perf_counter()
    slides = getattr(cohort, "slides", cohort)
    if slides is None or len(slides) == 0:
        raise ValueError("no slides to embed (slides.csv missing or empty)")
    env = stage_env()
    ecfg = _container(cfg.get("embed"))
    tcfg = _container(cfg.get("tile"))
    params = _container(cfg["tiling"])
    derived = cfg["data"]["derived"]
    dtype = storage_dtype(ecfg.get("dtype"))

    tiles_out = output_dir(derived, params)
    phash = params_hash(params)
    tres = tile_cohort(slides, params, tiles_out, **tile_options(tcfg))
    if tres["n_done"] and env.rank == 0:
        print(f"embed: tiled {tres['n_done']} slide(s) first, {tres['n_failed']} failed -> "
              f"{tiles_out}")
    tiling_fail = {str(r.slide_id): r for r in tres["failures"].itertuples(index=False)}

    enc_cfg = _container(cfg["encoder"])
    batch_size = int(ecfg.get("batch_size") or enc_cfg.get("batch_size") or 64)
    num_workers = int(ecfg.get("num_workers", 0) or 0)
    records = slides.to_dict("records")
    order = sorted(range(len(records)), key=lambda i: str(records[i]["slide_id"]))
    mine = _shard([i for i in order if str(records[i]["slide_id"]) not in tiling_fail], env)
    st: dict = {"encoder": encoder}

    def paths(i):
        sid = str(records[i]["slide_id"])
        return sid, tiles_out / f"{sid}.h5", st["out"] / f"{sid}.h5"

    def lookup(i):
        _, coords_h5, h5 = paths(i)
        return embedded_tiles(h5, st["encoder"], coords_h5, dtype=dtype, verified=st["memo"])

    def embed_one(i) -> int:
        sid, coords_h5, h5 = paths(i)
        enc = st["encoder"]
        if st.get("pipeline") is not None:
            n = st["pipeline"].embed(sid)
        else:  # worker processes (embed.num_workers > 0): one DataLoader per slide
            try:
                n = embed_slide(
                    coords_h5, enc, h5, batch_size, num_workers,
                    backend=str(ecfg.get("backend", "auto")),
                    decode_threads=int(ecfg.get("decode_threads", 2) or 1),
                    prefetch=default_prefetch(ecfg.get("prefetch"), enc.device),
                    slide_path=records[i].get("path"), slide_id=sid, dtype=dtype)
            finally:
                release_free_memory()  # bounded RSS: reuse within a slide, not across slides
        st["memo"].add(h5)
        return n

    def pending(i) -> bool:
        try:
            return lookup(i) is None
        except CorruptCacheError:
            return True

    def local():
        # everything a rank may fail at on its own (device, disk) runs in here: the error then
        # reaches the other ranks instead of leaving them waiting
        if st["encoder"] is None:
            enc = build_encoder_from_config(enc_cfg, resolve_device(ecfg.get("device")))
            cl = ecfg.get("channels_last")
            if cl is not None and bool(cl) != enc.channels_last:
                fmt = torch.channels_last if cl else torch.contiguous_format
                enc.model = enc.model.to(memory_format=fmt)
                enc.channels_last = bool(cl)
            st["encoder"] = enc
        enc = st["encoder"]
        out = st["out"] = embeddings_dir(derived, enc, phash)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "encoder.json", json.dumps(
            {**encoder_attrs(enc), "transform_config": enc.transform_config(),
             "tiling_params_hash": phash, "batch_size": batch_size}, indent=2, default=str))
        clean_stale_temps(out)
        st["memo"] = VerifiedFiles(out)
        # the loop's big per-batch tensors are reused instead of page-faulted in afresh
        # (CPU lite0: 29 -> 65 img/s; netsurv.runtime); freed memory goes back afterwards.
        # One pipeline for all of this rank's slides (netsurv.pathology.embed.CohortEmbedder):
        # full batches across slides; every batch has the same shapes, so the kept heap
        # reaches its size within a few batches and stays there (no trimming per slide)
        with keep_freed_memory(), contextlib.ExitStack() as stack:
            if num_workers <= 0:
                pipe = st["pipeline"] = stack.enter_context(CohortEmbedder(
                    enc, batch_size, backend=str(ecfg.get("backend", "auto")),
                    decode_threads=int(ecfg.get("decode_threads", 2) or 1),
                    prefetch=default_prefetch(ecfg.get("prefetch"), enc.device), dtype=dtype))
                pipe.plan([SlideJob(paths(i)[0], paths(i)[1], paths(i)[2],
                                    records[i].get("path"), paths(i)[0])
                           for i in mine if pending(i)])
            outcomes = run_items(mine, key=lambda i: paths(i)[0], lookup=lookup,
                                 compute=embed_one, locks=ItemLocks(out),
                                 progress=bool(ecfg.get("progress", True)),
                                 desc=f"embed[{env.rank}/{env.world_size}]", unit="slide",
                                 what="embeddings file")
            st["pipeline"] = None
        st["memo"].save()
        return [(i, o.status, o.value or 0, round(o.seconds, 3), o.error_type, o.error)
                for i, o in zip(mine, outcomes)]

    got = {r[0]: r[1:] for part in gather(local, what="embedding", env=env) for r in part}
    encoder, out = st["encoder"], st["out"]
    rows, fails = [], []
    for i, r in enumerate(records):
        sid, coords_h5, h5 = paths(i)
        rec = {"slide_id": sid, "patient_id": r.get("patient_id"), "coords_h5": str(coords_h5),
               "h5": str(h5), "n_tiles": 0, "status": "failed", "seconds": 0.0}
        fail = None
        if sid in tiling_fail:
            t = tiling_fail[sid]
            fail = ("tiling", t.error_type, t.error, f"tiling failed: {t.error_type}: {t.error}")
        else:
            status, n, secs, et, err = got[i]
            rec.update(status=status, n_tiles=int(n), seconds=secs)
            if status == "failed":
                fail = ("embedding", et, err, f"{et}: {err}")
        if fail is not None:
            fails.append(failure_row(fail[0], sid, patient_id=r.get("patient_id"),
                                     path=str(r.get("path")), error_type=fail[1],
                                     error=fail[2], reason=fail[3], slide_id=sid))
        rows.append(rec)
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    failures = failures_frame(fails)

    def write_tables():
        write_csv(out / "index.csv", index)
        write_failures(out / "failures.csv", failures)

    rank_zero(write_tables, what="embedding", env=env)
    st = index["status"]
    n_new = int(index.loc[st == "done", "n_tiles"].sum())
    return {"out": str(out), "tiles_dir": str(tiles_out), "tiling_params_hash": phash,
            "encoder": encoder.name, "weights_source": encoder.weights_source,
            "precision": encoder.precision, "dtype": dtype, "device": str(encoder.device),
            "rank": env.rank, "world_size": env.world_size, "n_slides": len(index),
            "n_done": int((st == "done").sum()), "n_skipped": int((st == "skipped").sum()),
            "n_failed": len(failures), "n_tiles": int(index["n_tiles"].sum()),
            "n_tiles_embedded": n_new, "seconds": time.perf_counter() - t0,
            "index": index, "failures": failures}


def default_prefetch(value, device) -> int:
    """``None`` -> 0 on CPU (tiles read between forward passes: the model already uses every
    core, and a reader thread beside it measured 0.86 vs 0.91 of model-only), 2 on GPU."""
    if value is not None:
        return int(value)
    return 0 if torch.device(device).type == "cpu" else 2


def run(cfg: DictConfig) -> dict:
    """Tile (where needed) and embed the slides of the configured cohort (``scripts/embed.py``).

    Returns
    -------
    dict
        The summary of :func:`embed_cohort` without its ``index`` and ``failures`` tables.

    Raises
    ------
    CohortError
        If the cohort has no slides.
    """
    from netsurv.cohort.schema import CohortError
    from netsurv.tasks.cohort import resolve_cohort

    cohort = resolve_cohort(cfg.data)
    if cohort.slides is None or len(cohort.slides) == 0:
        raise CohortError(f"{cohort.root}: no slides.csv (or it is empty): nothing to embed")
    res = embed_cohort(cohort, cfg)
    if res["rank"] == 0:
        ranks = f" on {res['world_size']} ranks" if res["world_size"] > 1 else ""
        print(f"embed: {res['n_done']} embedded, {res['n_skipped']} skipped (already done), "
              f"{res['n_failed']} failed; {res['n_tiles_embedded']} tiles in "
              f"{res['seconds']:.1f} s{ranks} ({res['encoder']}, {res['precision']}, "
              f"{res['dtype']}, {res['device']}) -> {res['out']}")
        if res["n_failed"]:
            print(f"embed: failure reasons in {res['out']}/failures.csv")
    return {k: v for k, v in res.items() if k not in ("index", "failures")}
