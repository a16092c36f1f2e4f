"""How a stage splits its items over the ranks of a job and meets again.

Every stage entry point may run on every rank of a torchrun / SLURM job: it takes the items
(slides, CT cases) sorted the same way on every rank, keeps ``items[rank::world_size]``
(:func:`shard`), processes them, and :func:`gather` hands every rank the records of all ranks.
Rank 0 then writes the stage's tables (:func:`rank_zero`), and the others wait for it, so every
rank returns the same complete result and finds the tables on disk.  An error on one rank is
re-raised on every rank (naming the rank) instead of leaving the others waiting at a barrier.
In a single process all of this is a no-op.
"""
from __future__ import annotations

import contextlib
import contextvars
import traceback

from netsurv.distributed import DistEnv, all_gather_object, broadcast_object, dist_env

__all__ = ["stage_env", "local_only", "shard", "gather", "rank_zero", "StageRankError"]

_LOCAL = contextvars.ContextVar("netsurv_stage_local", default=False)
_SINGLE = DistEnv(0, 1, 0, "single")


class StageRankError(RuntimeError):
    """Raised on every rank when a stage failed on one of them."""


def stage_env() -> DistEnv:
    """This process's place in the job (:func:`netsurv.distributed.dist_env`), or a single
    process inside :func:`local_only`."""
    return _SINGLE if _LOCAL.get() else dist_env()


@contextlib.contextmanager
def local_only():
    """Within the block, stages ignore the job's other ranks: this process does all items and
    meets nobody.  For code that calls a stage on one rank only (e.g. rank 0 after training)."""
    tok = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(tok)


def shard(items: list, env: DistEnv | None = None) -> list:
    """This rank's share ``items[rank::world_size]`` (sort ``items`` identically on every rank
    first)."""
    env = env or stage_env()
    return list(items)[env.rank::env.world_size]


def _checked(local_ok: bool, payload, env: DistEnv, what: str, gathered: list):
    bad = [(r, p) for r, (ok, p) in enumerate(gathered) if not ok]
    if bad:
        r, msg = bad[0]
        if local_ok:
            raise StageRankError(f"{what}: rank {r} of {env.world_size} failed: {msg}")
        return None  # our own exception is re-raised by the caller
    return [p for _, p in gathered]


def gather(fn, *, what: str = "stage", env: DistEnv | None = None) -> list:
    """Run ``fn()`` on this rank; return ``[result of rank 0, rank 1, ...]`` on every rank.

    If ``fn`` raises on any rank, every rank raises (the failing rank its own exception, the
    others :class:`StageRankError` with its message)."""
    env = env or stage_env()
    if env.world_size == 1:
        return [fn()]
    try:
        local = (True, fn())
        exc = None
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        local, exc = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"), e
    out = _checked(local[0], local[1], env, what, all_gather_object(local))
    if exc is not None:
        raise exc
    return out


def rank_zero(fn, *, what: str = "stage", env: DistEnv | None = None):
    """Run ``fn()`` on rank 0 only; the other ranks wait for it and receive its result (or its
    error, as :class:`StageRankError`)."""
    env = env or stage_env()
    if env.world_size == 1:
        return fn()
    exc = None
    if env.rank == 0:
        try:
            box = (True, fn())
        except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
            box, exc = (False, f"{type(e).__name__}: {e}"), e
    else:
        box = None
    box = broadcast_object(box)
    if exc is not None:
        raise exc
    if not box[0]:
        raise StageRankError(f"{what}: rank 0 failed: {box[1]}")
    return box[1]
