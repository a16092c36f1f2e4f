"""Shared machinery of the stages that produce cached data (demo cohort, tiling, embedding,
radiomics, pathomics): atomic writes with per-process temp names, stale-temp cleanup, per-item
locks, checksums verified on read, the cached (parallel) item loop (:func:`cached_map`), the
one failures table of every stage (:mod:`netsurv.stages.failures`), and the rank logic that
lets every stage run on every rank of a torchrun / SLURM job."""
from .cache import (
    CorruptCacheError,
    ItemLocks,
    VerifiedFiles,
    arrays_checksum,
    atomic_path,
    clean_stale_temps,
    discard,
    folder_lock,
    h5_attach_checksum,
    h5_checksum,
    merge_json,
    read_json,
    temp_path,
    verify_h5,
    write_csv,
    write_json,
    write_text,
)
from .failures import FAILURE_COLUMNS, failure_row, failures_frame, read_failures, write_failures
from .ranks import StageRankError, gather, local_only, rank_zero, shard, stage_env
from .runner import (
    ItemFailed,
    Outcome,
    cached_map,
    die_with_parent,
    json_map,
    process_pool,
    run_items,
)

__all__ = ["CorruptCacheError", "ItemLocks", "VerifiedFiles", "arrays_checksum", "atomic_path",
           "clean_stale_temps", "discard", "folder_lock", "h5_attach_checksum", "h5_checksum",
           "merge_json", "read_json", "temp_path", "verify_h5", "write_csv", "write_json", "write_text",
           "StageRankError", "gather", "local_only", "rank_zero", "shard", "stage_env",
           "FAILURE_COLUMNS", "failure_row", "failures_frame", "read_failures", "write_failures",
           "ItemFailed", "Outcome", "cached_map", "die_with_parent", "json_map", "process_pool",
           "run_items"]
