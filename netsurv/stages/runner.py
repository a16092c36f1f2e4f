"""The one loop of every stage: items -> cached result, computed at most once, failures kept.

:func:`run_items` takes a list of items (slides, CT cases), looks each one up in its cache,
and computes the missing ones -- in this process or in a pool of worker processes -- under a
per-item lock, so that two jobs on one cohort never compute the same item twice:

1. without a lock, ``lookup(item)``: a verified cached value means ``skipped``;
2. otherwise the item's lock is tried without waiting.  If another job holds it, the item
   is put aside and retried later (the job goes on with other items and never blocks while
   it holds a lock, so two jobs cannot deadlock);
3. under the lock, ``lookup`` again (the other job may just have finished it; a corrupt entry
   is logged with its path and deleted here), then a failure another job recorded since this
   run started is adopted instead of repeated, otherwise ``compute`` runs (``done`` or
   ``failed``) and the lock is released.

:func:`json_map` is the same loop for stages whose per-item result is a small JSON document
(radiomics, pathomics): the parent writes each result atomically with a checksum and reads
it back verified.  Worker processes die with their parent (:func:`die_with_parent`).

:func:`cached_map` is the whole stage around it: this rank's share of the items
(:func:`~netsurv.stages.ranks.shard`), stale temps removed, each item's cache file named
(an input that cannot be read fails that item only), :func:`json_map`, and every rank's
outcomes gathered, so each rank gets one :class:`Outcome` per item of the cohort.  The stage
then writes its tables, failures with :func:`netsurv.stages.failures.write_failures`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import CorruptCacheError, ItemLocks, clean_stale_temps, discard, read_json, write_json
from .ranks import gather, shard, stage_env

__all__ = ["Outcome", "ItemFailed", "run_items", "json_map", "cached_map", "process_pool",
           "die_with_parent"]

log = logging.getLogger("netsurv.stages")


class ItemFailed(Exception):
    """Raised by a stage's ``finish`` (or ``compute``) to fail one item with a given type."""

    def __init__(self, error_type: str, error: str):
        super().__init__(error)
        self.error_type, self.error = error_type, error


@dataclass
class Outcome:
    """What became of one item: ``status`` is ``done`` (computed now), ``skipped`` (valid
    cache, possibly written by a concurrent job) or ``failed``."""

    key: str
    status: str
    value: Any = None
    error_type: str = ""
    error: str = ""
    seconds: float = 0.0
    replaced_corrupt: str = ""  # path of a corrupt entry that was deleted and recomputed
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the item has a result (``done`` or ``skipped``)."""
        return self.status in ("done", "skipped")


# ----------------------------------------------------------------------------- worker processes
_PR_SET_PDEATHSIG = 1


def _watch_parent(ppid: int, period: float) -> None:
    while True:
        time.sleep(period)
        if os.getppid() != ppid:  # re-parented: our parent is gone
            os._exit(1)


def die_with_parent(parent_pid: int | None = None, period: float = 1.0) -> None:
    """Make this (worker) process exit when its parent dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill it.  Everywhere: a daemon
    thread polls the parent pid and exits once the process has been re-parented (the fallback
    where prctl is missing).  ``parent_pid``: the pid the worker was started from, to catch a
    parent that died before this ran."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog remains
            pass
    ppid = os.getppid()
    if parent_pid is not None and ppid != parent_pid and ppid == 1:
        os._exit(1)  # the parent died before prctl took effect
    threading.Thread(target=_watch_parent, args=(ppid, period), name="parent-watchdog",
                     daemon=True).start()


def _worker_start(parent_pid, initializer, initargs):
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def process_pool(n_jobs: int, initializer: Callable | None = None, initargs: tuple = ()
                 ) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` whose workers die with this process (no orphans computing for
    nobody after the job was killed) and then run ``initializer(*initargs)``."""
    return ProcessPoolExecutor(int(n_jobs), initializer=_worker_start,
                               initargs=(os.getpid(), initializer, tuple(initargs)))


# ----------------------------------------------------------------------------- the loop
def _run(compute, arg):
    try:
        return True, compute(arg)
    except Exception as exc:  # noqa: BLE001 - recorded as the item's failure
        return False, exc


def _error_of(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ItemFailed):
        return exc.error_type, exc.error
    if isinstance(exc, BrokenProcessPool):
        return "WorkerDied", ("its worker process died (killed, e.g. out of memory?): "
                              f"{exc}")
    return type(exc).__name__, str(exc)


def run_items(items: Sequence, *, key: Callable[[Any], str],
              lookup: Callable[[Any], Any], compute: Callable[[Any], Any],
              locks: ItemLocks, n_jobs: int = 1, payload: Callable[[Any], Any] | None = None,
              finish: Callable[[Any, Any], Any] | None = None,
              initializer: Callable | None = None, initargs: tuple = (),
              progress: bool = False, desc: str = "items", unit: str = "item",
              what: str = "cache entry", poll: float = 0.2,
              since: float | None = None, pool: str = "process") -> list[Outcome]:
    """Bring every item's cached result up to date; one :class:`Outcome` per item, in order.

    ``key(item)``: unique id (lock and failure-note names, messages).  ``lookup(item)``: the
    verified cached value, or None when absent or made with other parameters; raises
    :class:`~netsurv.stages.cache.CorruptCacheError` for a damaged entry (never deletes: that
    happens here, under the item's lock).  ``compute(payload(item))``: the work, in this
    process (``n_jobs <= 1``) or in a worker process (then ``compute`` and the payload must be
    picklable); raising fails the item.  ``finish(item, result)``: in this process, persists
    the result and returns the value to keep; raising (e.g. :class:`ItemFailed`) fails the item.
    ``since``: failures other jobs noted at or after this time (``time.time()``; default: now)
    are adopted instead of recomputed.  ``pool``: ``process`` (default; worker processes that
    die with this one) or ``thread`` (worker threads of this process: ``compute`` need not be
    picklable; for work that releases the GIL) when ``n_jobs > 1``.
    """
    if pool not in ("process", "thread"):
        raise ValueError(f"run_items: pool={pool!r}; expected 'process' or 'thread'")
    from tqdm.auto import tqdm

    t_start = time.time() if since is None else float(since)
    payload = payload or (lambda it: it)
    out: list[Outcome | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress)

    def settle(i, o):
        out[i] = o
        bar.update(1)

    todo = []
    for i, it in enumerate(items):
        try:
            v = lookup(it)
        except CorruptCacheError:
            v = None  # deleted and recomputed under the item's lock
        if v is not None:
            settle(i, Outcome(key(it), "skipped", v))
        else:
            todo.append(i)

    parallel = n_jobs > 1 and len(todo) > 1
    kind, pool = pool, [None]
    inflight: dict = {}
    cap = 2 * int(n_jobs)

    def executor():
        if pool[0] is None:
            n = min(int(n_jobs), len(todo))
            pool[0] = (process_pool(n, initializer, initargs) if kind == "process" else
                       ThreadPoolExecutor(n, initializer=initializer, initargs=tuple(initargs)))
        return pool[0]

    def complete(i, lock, t0, ok, res, corrupt):
        it = items[i]
        k = key(it)
        try:
            raw = None
            if ok:
                raw = res
                try:
                    value = finish(it, res) if finish is not None else res
                except Exception as exc:  # noqa: BLE001 - the item's failure
                    ok, res = False, exc
            secs = time.perf_counter() - t0
            if ok:
                locks.clear_failure(k)
                settle(i, Outcome(k, "done", value, seconds=secs, replaced_corrupt=corrupt))
            else:
                et, msg = _error_of(res)
                locks.note_failure(k, et, msg)
                # value: compute's result when it was ``finish`` that failed the item
                settle(i, Outcome(k, "failed", raw, et, msg, seconds=secs,
                                  replaced_corrupt=corrupt))
        finally:
            lock.release()

    def start(i) -> bool:
        """False when another process holds the item; otherwise it is settled or in flight."""
        it = items[i]
        k = key(it)
        lock = locks.try_acquire(k)
        if lock is None:
            return False
        try:
            corrupt = ""
            try:
                v = lookup(it)
            except CorruptCacheError as exc:
                discard(exc, what)
                v, corrupt = None, str(exc.path)
            if v is not None:
                lock.release()
                settle(i, Outcome(k, "skipped", v))
                return True
            note = locks.recent_failure(k, t_start)
            if note is not None:
                lock.release()
                settle(i, Outcome(k, "failed", None, note[0], note[1],
                                  extra={"adopted": True}))
                return True
            t0 = time.perf_counter()
            if parallel:
                try:
                    fut = executor().submit(compute, payload(it))
                except BrokenProcessPool:
                    pool[0].shutdown(wait=False, cancel_futures=True)
                    pool[0] = None
                    fut = executor().submit(compute, payload(it))
                inflight[fut] = (i, lock, t0, corrupt)
                return True
        except BaseException:
            lock.release()
            raise
        try:
            ok, res = _run(compute, payload(it))
        except BaseException:  # interrupted: let the next run redo this item
            lock.release()
            raise
        complete(i, lock, t0, ok, res, corrupt)
        return True

    queue, busy = deque(todo), deque()
    told = False
    try:
        while queue or busy or inflight:
            moved = False
            while queue and (not parallel or len(inflight) < cap):
                i = queue.popleft()
                if start(i):
                    moved = True
                else:
                    busy.append(i)
            for _ in range(len(busy)):
                if parallel and len(inflight) >= cap:
                    break
                i = busy.popleft()
                if start(i):
                    moved = True
                else:
                    busy.append(i)
            if busy and not told and not queue:
                log.info("%s: waiting for %d item(s) another job is computing", desc,
                         len(busy))
                told = True
            if inflight:
                done, _ = wait(list(inflight), timeout=poll if busy else None,
                               return_when=FIRST_COMPLETED)
                for fut in done:
                    i, lock, t0, corrupt = inflight.pop(fut)
                    try:
                        ok, res = True, fut.result()
                    except Exception as exc:  # noqa: BLE001 - worker error or death
                        ok, res = False, exc
                    complete(i, lock, t0, ok, res, corrupt)
            elif busy and not moved:
                time.sleep(poll)
    finally:
        for fut, (_i, lock, *_rest) in list(inflight.items()):
            fut.cancel()
            lock.release()
        if pool[0] is not None:
            pool[0].shutdown(wait=True, cancel_futures=True)
        bar.close()
    return out  # type: ignore[return-value]


def json_map(items: Sequence, *, key: Callable[[Any], str], path: Callable[[Any], Path],
             compute: Callable[[Any], Any], record: Callable[[Any, Any], dict],
             required: Sequence[str], locks: ItemLocks, **kw) -> list[Outcome]:
    """:func:`run_items` for results stored as one verified JSON file per item.

    ``path(item)``: the item's cache file (its name should hold a key of the inputs and
    parameters, so that a change makes a new entry).  ``record(item, result)``: the JSON
    document to store for a worker's result (raise :class:`ItemFailed` to fail the item).
    Cached documents lacking a ``required`` key, or not matching their checksum, are logged
    with their path, deleted and recomputed."""

    def lookup(it):
        try:
            return read_json(path(it), required)
        except FileNotFoundError:
            return None

    def finish(it, res):
        data = record(it, res)
        write_json(path(it), data)
        return data

    return run_items(items, key=key, lookup=lookup, compute=compute, finish=finish,
                     locks=locks, **kw)


def cached_map(items: Sequence, *, stage: str, folder, item_id: Callable[[Any], str],
               cache_path: Callable[[Any], Path], compute: Callable[[Any], Any],
               record: Callable[[Any, Any], dict], required: Sequence[str] = (),
               payload: Callable[[Any], Any] | None = None, n_jobs: int = 1,
               pool: str = "process", initializer: Callable | None = None,
               initargs: tuple = (), start: Callable[[], None] | None = None,
               ready: Callable[[list], None] | None = None, temp_subdirs: Sequence[str] = (),
               progress: bool = False, unit: str = "item", what: str | None = None,
               env=None) -> list[Outcome]:
    """Map ``compute`` over the items of a cohort, each result cached as one verified JSON file.

    May be called on every rank of a job (torchrun, SLURM): each rank takes its share of the
    items sorted by ``item_id`` (:func:`~netsurv.stages.ranks.shard`) and every rank returns
    the outcomes of all items.  Items whose cache file is valid are not recomputed; a failed
    item never loses the other items' results (each is written as soon as it is done), and is
    tried again by the next run.

    Parameters
    ----------
    items : sequence
        The items (e.g. rows of slides.csv or ct.csv as dicts), the same on every rank.
    stage : str
        The stage's name (progress bar, messages naming a failed rank).
    folder : str or Path
        The stage's output folder: per-item locks and failure notes go to ``<folder>/.locks/``
        and temps left there (and in ``temp_subdirs``) by killed jobs are removed first.
    item_id : callable
        ``item_id(item)``: the item's unique id (order of the shards, lock names).
    cache_path : callable
        ``cache_path(item)``: the item's cache file; its name should hold a key of the inputs
        and parameters, so that a change makes a new entry.  Raising
        :class:`ItemFailed` fails the item with that type and message, raising ``OSError`` (an
        input that cannot be read) fails it with ``cannot read input: <error>``.
    compute : callable
        ``compute(payload(item))``: the work, in this process (``n_jobs <= 1``) or in a pool
        (``pool``); raising fails the item.  For a process pool, ``compute`` and the payload
        must be picklable.
    record : callable
        ``record(item, result)``: the JSON document to cache for ``compute``'s result;
        raising (e.g. :class:`ItemFailed`) fails the item.
    required : sequence of str
        Keys a cached document must have to be used (otherwise it is deleted and recomputed).
    payload : callable, optional
        ``payload(item)``: what ``compute`` gets (default: the item).
    n_jobs : int
        Number of worker processes or threads; 1: everything in this process.
    pool : {"process", "thread"}
        Kind of workers when ``n_jobs > 1``.
    initializer, initargs
        Run once in every worker.
    start : callable, optional
        ``start()``: called first on each rank (e.g. to open a memo ``cache_path`` reads).
    ready : callable, optional
        ``ready(items)``: called on each rank with its items that have a cache path, before any
        is looked up or computed (e.g. to save that memo, to import a library before forking).
    temp_subdirs : sequence of str
        Subfolders of ``folder`` cleaned of stale temps too.
    progress : bool
        Show a progress bar.
    unit : str
        Unit of the progress bar (``slide``, ``case``).
    what : str, optional
        What a cache entry is, in messages (default: ``<stage> entry``).
    env : DistEnv, optional
        This process's place in the job (default :func:`~netsurv.stages.ranks.stage_env`).

    Returns
    -------
    list of Outcome
        One per item, in the order of ``items``: ``status`` ``done``, ``skipped`` or
        ``failed`` (then ``error_type`` and ``error``); ``value`` the cached document of an
        item that succeeded.
    """
    env = env or stage_env()
    folder = Path(folder)
    items = list(items)
    ids = [str(item_id(it)) for it in items]
    order = sorted(range(len(items)), key=lambda i: ids[i])
    payload = payload or (lambda it: it)

    def local():
        clean_stale_temps(folder, subdirs=tuple(temp_subdirs))
        if start is not None:
            start()
        paths: dict[int, Path] = {}
        done: list[tuple[int, Outcome]] = []
        for i in shard(order, env):
            try:
                paths[i] = Path(cache_path(items[i]))
            except ItemFailed as exc:
                done.append((i, Outcome(ids[i], "failed", None, exc.error_type, exc.error)))
            except OSError as exc:
                done.append((i, Outcome(ids[i], "failed", None, type(exc).__name__,
                                        f"cannot read input: {exc}")))
        todo = list(paths)
        if ready is not None:
            ready([items[i] for i in todo])
        outcomes = json_map(
            todo, key=lambda i: ids[i], path=lambda i: paths[i], compute=compute,
            record=lambda i, res: record(items[i], res), required=required,
            payload=lambda i: payload(items[i]), locks=ItemLocks(folder), n_jobs=int(n_jobs),
            pool=pool, initializer=initializer, initargs=initargs, progress=progress,
            desc=stage, unit=unit, what=what or f"{stage} entry")
        return done + list(zip(todo, outcomes))

    got = dict(x for part in gather(local, what=stage, env=env) for x in part)
    return [got[i] for i in range(len(items))]
