"""Files of the stage caches: unique temp names, atomic writes, stale temps, locks, checksums.

Every cached artefact (coords and embeddings HDF5, radiomics / pathomics JSON, the file-hash
memo) is written to a temp file in its final folder and renamed into place, and carries a
checksum of its content recorded at write time.  Reading verifies the checksum: an entry that
does not match (truncated, empty, edited in place, keys missing) raises
:class:`CorruptCacheError` naming the file, and the stage deletes and recomputes it.

Temp names hold the host, the process id and a random part
(``.<name>.nstmp~<host>~<pid>~<random>.tmp``), so two processes, on one host or on several
hosts sharing a file system, never write the same temp file.  Because the name says who wrote
it, :func:`clean_stale_temps` can delete the temps of processes that are provably dead on this
host without touching those of a live concurrent job; temps of other hosts and temps written by
older versions (no owner in the name) are deleted only when older than ``max_age`` (default
24 h, ``NETSURV_STALE_TMP_HOURS``).

Locks are ``flock`` locks (the ``filelock`` package) on files under ``<folder>/.locks/``: the
kernel drops them when their process dies, so a killed job never leaves a lock behind.  On
network file systems flock needs client support (NFSv4, Lustre mounted with ``-o flock``);
filelock falls back to lock files created atomically where flock is missing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["CorruptCacheError", "temp_path", "atomic_path", "write_text", "write_csv",
           "write_json", "read_json", "discard", "clean_stale_temps", "pid_alive", "ItemLocks",
           "folder_lock", "h5_checksum", "h5_attach_checksum", "verify_h5", "VerifiedFiles",
           "arrays_checksum", "merge_json", "STALE_TMP_SECONDS"]

log = logging.getLogger("netsurv.stages")

STALE_TMP_SECONDS = float(os.environ.get("NETSURV_STALE_TMP_HOURS", 24)) * 3600
JSON_FORMAT = "netsurv-cache/1"
_TAG = "nstmp"
_TAG_RE = re.compile(_TAG + r"~(?P<host>[^~/]+)~(?P<pid>\d+)~[0-9a-f]+")
# temp names of older netsurv versions (no owner recorded): `.x.h5.<pid>.tmp`,
# `.x.h5.<pid>.<thread>.tmp`, `file_hashes.tmp`, `cases/<id>.tmp`, `qc/x.png.tmp.png`,
# `<demo root>.tmp-<pid>`
_LEGACY_RE = re.compile(r"(\.tmp$)|(\.tmp\.png$)|(\.tmp-\d+$)")


class CorruptCacheError(Exception):
    """A cached entry that cannot be trusted; ``path`` names it."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def temp_path(path, suffix: str = "") -> Path:
    """A temp name beside ``path``, unique to this process (host, pid) and this call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_TAG}~{_host()}~{os.getpid()}~"
                          f"{secrets.token_hex(4)}.tmp{suffix}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a unique temp path; on success it replaces ``path`` (``os.replace``: readers see
    the old or the new file, never half of one); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`) and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(path, df) -> Path:
    """Write DataFrame ``df`` to ``path`` as CSV without its index, atomically; return the path."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def _canonical(data) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def write_json(path, data) -> Path:
    """Write ``data`` atomically with a sha256 of its canonical JSON (sorted keys); the file
    keeps ``data``'s own key order."""
    env = {"format": JSON_FORMAT, "sha256": hashlib.sha256(_canonical(data)).hexdigest(),
           "data": data}
    return write_text(path, json.dumps(env, default=str))


def read_json(path, required: Iterable[str] = ()):
    """``data`` of a file written by :func:`write_json`, verified.

    Raises ``FileNotFoundError`` when absent and :class:`CorruptCacheError` when the file is
    empty, truncated, not netsurv's format (e.g. written by an older version), does not match
    its checksum, or lacks one of the ``required`` keys."""
    path = Path(path)
    text = path.read_text()
    if not text.strip():
        raise CorruptCacheError(path, "empty file")
    try:
        env = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptCacheError(path, f"not valid JSON ({exc.msg} at char {exc.pos}; "
                                      "truncated?)") from None
    if not isinstance(env, dict) or env.get("format") != JSON_FORMAT or "data" not in env:
        raise CorruptCacheError(path, "no checksum recorded (not written by this netsurv "
                                      "version)")
    data = env["data"]
    if hashlib.sha256(_canonical(data)).hexdigest() != env.get("sha256"):
        raise CorruptCacheError(path, "content does not match its recorded checksum")
    missing = [k for k in required if not isinstance(data, Mapping) or k not in data]
    if missing:
        raise CorruptCacheError(path, f"keys {missing} missing")
    return data


def discard(exc: CorruptCacheError, what: str = "cache entry") -> None:
    """Log a corrupt entry with its path and delete it (callers hold the item's lock)."""
    log.warning("%s %s is corrupt (%s): deleted, it will be recomputed", what, exc.path,
                exc.reason)
    _remove(exc.path)


# ----------------------------------------------------------------------------- stale temps
def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(p: Path, now: float, max_age: float) -> bool:
    try:
        age = now - p.lstat().st_mtime
    except FileNotFoundError:
        return False
    m = _TAG_RE.search(p.name)
    if m:
        if m["host"] == _host() and not pid_alive(int(m["pid"])):
            return True  # its writer is gone: nobody will ever finish or rename it
        return age > max_age
    return bool(_LEGACY_RE.search(p.name)) and age > max_age


def clean_stale_temps(folder, *, subdirs: Iterable[str] = (), prefix: str | None = None,
                      max_age: float | None = None) -> list[Path]:
    """Delete temp files/folders left by killed writers in ``folder`` (and ``subdirs``).

    Only temps whose writer is provably dead on this host, or older than ``max_age`` seconds,
    are removed: a live concurrent job's temps stay.  ``prefix``: only names starting with
    it (e.g. the demo cohort's folder name).  Returns the removed paths."""
    max_age = STALE_TMP_SECONDS if max_age is None else float(max_age)
    now = time.time()
    removed = []
    folder = Path(folder)
    for d in [folder, *(folder / s for s in subdirs)]:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            name = p.name.lstrip(".")
            if prefix is not None and not name.startswith(prefix):
                continue
            if (_TAG in p.name or ".tmp" in p.name) and _stale(p, now, max_age):
                _remove(p)
                removed.append(p)
    if removed:
        log.info("removed %d stale temp file(s) of killed writers in %s: %s", len(removed),
                 folder, ", ".join(p.name for p in removed[:5]))
    return removed


# ----------------------------------------------------------------------------- locks
def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), thread_local=False, poll_interval=0.1)


@contextlib.contextmanager
def folder_lock(folder, name: str = "folder", *, message: str | None = None):
    """Exclusive lock ``<folder>/.locks/<name>.lock`` held for the block (waits for it)."""
    from filelock import Timeout

    lock = _lock(Path(folder) / ".locks" / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if message:
            print(message, flush=True)
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def merge_json(path, entries: Mapping, lock: str) -> None:
    """Add ``entries`` to the JSON mapping at ``path`` (written by :func:`write_json`) under the
    folder's lock ``lock``: several jobs each add what they computed, none loses another's.  A
    missing or damaged file starts afresh (it only memoises recomputable values)."""
    path = Path(path)
    with folder_lock(path.parent, lock):
        try:
            cur = dict(read_json(path))
        except (FileNotFoundError, CorruptCacheError):
            cur = {}
        cur.update(entries)
        write_json(path, cur)


class ItemLocks:
    """Per-item locks and failure notes of one stage folder (``<folder>/.locks/``).

    A failure note records an item's failure with the time; a job that finds a note written
    after its own start adopts the failure instead of repeating the work (two jobs started
    together report the same failure once each, computed once), while a later rerun
    retries the item."""

    def __init__(self, folder):
        self.dir = Path(folder) / ".locks"

    def _name(self, key: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(key))[:80]
        if safe != str(key):
            safe += "-" + hashlib.sha1(str(key).encode()).hexdigest()[:8]
        return safe

    def try_acquire(self, key: str):
        """The held lock, or None when another process holds it."""
        from filelock import Timeout

        lock = _lock(self.dir / f"{self._name(key)}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def note_failure(self, key: str, error_type: str, error: str) -> None:
        """Record that item ``key`` failed (error type, message, time, host and pid)."""
        write_json(self.dir / f"{self._name(key)}.failed.json",
                   {"error_type": error_type, "error": error, "time": time.time(),
                    "host": _host(), "pid": os.getpid()})

    def recent_failure(self, key: str, since: float):
        """(error_type, error) of a failure noted at or after ``since``, else None."""
        p = self.dir / f"{self._name(key)}.failed.json"
        try:
            d = read_json(p, ("error_type", "error", "time"))
        except FileNotFoundError:
            return None
        except CorruptCacheError:
            return None  # an unreadable note only costs a retry
        return (d["error_type"], d["error"]) if float(d["time"]) >= since else None

    def clear_failure(self, key: str) -> None:
        """Remove the failure note of item ``key``, if any."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{self._name(key)}.failed.json").unlink()


# ----------------------------------------------------------------------------- HDF5 checksums
_CHUNK_BYTES = 64 << 20


def _update(h, name: str, dtype: np.dtype, shape: tuple) -> None:
    h.update(f"{name}|{np.dtype(dtype).str}|{tuple(int(s) for s in shape)}|".encode())


def arrays_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """``sha256:<hex>`` over the arrays in the given order: per array the UTF-8 header
    ``"<name>|<dtype.str>|<shape tuple>|"`` then its C-order bytes."""
    h = hashlib.sha256()
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        _update(h, name, a.dtype, a.shape)
        h.update(memoryview(a).cast("B"))
    return "sha256:" + h.hexdigest()


def h5_checksum(f, names: Iterable[str]) -> str:
    """:func:`arrays_checksum` of datasets ``names`` of an open h5py file, read in blocks
    of rows (memory bounded for large feature matrices)."""
    h = hashlib.sha256()
    for name in names:
        d = f[name]
        _update(h, name, d.dtype, d.shape)
        if d.shape == () or d.size == 0:
            h.update(np.ascontiguousarray(d[()]).tobytes())
            continue
        row = max(1, d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64)))
        step = max(1, _CHUNK_BYTES // row)
        for s in range(0, d.shape[0], step):
            h.update(np.ascontiguousarray(d[s:s + step]).tobytes())
    return "sha256:" + h.hexdigest()


def h5_attach_checksum(f, names: Iterable[str] | None = None) -> str:
    """Record the checksum of ``names`` (default: every dataset at the root) in the open
    (writable) file's attributes ``checksum`` and ``checksum_datasets`` (comma-separated)."""
    names = sorted(k for k in f if hasattr(f[k], "dtype")) if names is None \
        else list(names)
    c = h5_checksum(f, names)
    f.attrs["checksum"] = c
    f.attrs["checksum_datasets"] = ",".join(names)
    return c


def verify_h5(path) -> None:
    """Raise :class:`CorruptCacheError` unless ``path`` opens and its datasets match the
    checksum recorded at write time (``FileNotFoundError`` when absent)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with h5py.File(path, "r") as f:
            want = f.attrs.get("checksum")
            names = f.attrs.get("checksum_datasets")
            if want is None or names is None:
                raise CorruptCacheError(path, "no checksum recorded (not written by this "
                                              "netsurv version)")
            names = str(names).split(",") if str(names) else []
            missing = [n for n in names if n not in f]
            if missing:
                raise CorruptCacheError(path, f"datasets {missing} missing")
            got = h5_checksum(f, names)
    except CorruptCacheError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CorruptCacheError(path, f"cannot be read as HDF5 ({type(exc).__name__}: "
                                      f"{exc})") from None
    if got != str(want):
        raise CorruptCacheError(path, "content does not match its recorded checksum "
                                      "(modified after it was written)")


class VerifiedFiles:
    """Memo of files whose checksum was verified, by (inode, size, mtime, ctime).

    Verifying a cohort's embeddings reads all of them (600 GB at 10,000 slides x 10,000 tiles
    x 1,536-d); a file that has not changed since it was verified (any write, even in place,
    changes its mtime/ctime) need not be read again.  Stored as ``<folder>/.verified.json``;
    a damaged memo is only a cost (files verified again), never trusted."""

    def __init__(self, folder, *, load: bool = True):
        self.path = Path(folder) / ".verified.json"
        self.new: dict[str, list] = {}
        self.table: dict[str, list] = {}
        if load:
            self.load()

    def load(self) -> None:
        """Read the memo file; a missing or damaged memo leaves the memo empty."""
        try:
            self.table = dict(read_json(self.path))
        except FileNotFoundError:
            self.table = {}
        except CorruptCacheError as exc:
            log.info("verification memo %s unusable (%s): files are verified again",
                     exc.path, exc.reason)
            self.table = {}

    @staticmethod
    def _sig(p: Path) -> list | None:
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def verify(self, p) -> None:
        """:func:`verify_h5`, skipped when the memo says this very file was verified."""
        p = Path(p)
        sig = self._sig(p)
        if sig is not None and (self.new.get(p.name) or self.table.get(p.name)) == sig:
            return
        verify_h5(p)
        self.add(p)

    def add(self, p) -> None:
        """Remember file ``p`` as verified in its current state (to be written by :meth:`save`)."""
        sig = self._sig(Path(p))
        if sig is not None:
            self.new[Path(p).name] = sig

    def save(self) -> None:
        """Merge this process's entries into the memo file (under the folder's memo lock)."""
        if not self.new:
            return
        merge_json(self.path, self.new, "verified")
        self.table.update(self.new)
        self.new = {}
