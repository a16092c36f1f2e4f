"""netsurv.stages building blocks: temp names, atomic writes, verified JSON/HDF5, stale temps,
locks and the cached item loop (real processes where processes matter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from netsurv.stages import (
    CorruptCacheError,
    ItemFailed,
    ItemLocks,
    VerifiedFiles,
    arrays_checksum,
    atomic_path,
    clean_stale_temps,
    h5_attach_checksum,
    read_json,
    run_items,
    temp_path,
    verify_h5,
    write_json,
)
from netsurv.stages.cache import _host


def test_temp_names_are_unique_per_call_and_name_their_writer(tmp_path):
    a, b = temp_path(tmp_path / "x.h5"), temp_path(tmp_path / "x.h5")
    assert a != b and a.parent == tmp_path and a.name.startswith(".x.h5.")
    assert f"~{_host()}~{os.getpid()}~" in a.name and a.name.endswith(".tmp")
    # another process gets another name even with the same random part
    code = "from netsurv.stages import temp_path; print(temp_path('/d/x.h5'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert f"~{os.getpid()}~" not in other and "~" in other


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]
    with atomic_path(p) as tmp:
        tmp.write_text("new")
    assert p.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_verified_json_rejects_every_kind_of_damage(tmp_path):
    p = tmp_path / "case.json"
    data = {"features": {"b": 1.5, "a": float("nan")}, "notes": ["x"]}
    write_json(p, data)
    got = read_json(p, ("features", "notes"))
    assert list(got["features"]) == ["b", "a"] and got["notes"] == ["x"]  # order kept
    good = p.read_text()
    cases = {
        "empty": "",
        "truncated": good[: len(good) // 2],
        "legacy (no checksum)": json.dumps(data),
        "edited value": good.replace("1.5", "2.5"),
        "keys missing": None,
    }
    for what, text in cases.items():
        if text is None:
            write_json(p, {"notes": []})  # consistent checksum, but not a case document
        else:
            p.write_text(text)
        with pytest.raises(CorruptCacheError) as e:
            read_json(p, ("features", "notes"))
        assert e.value.path == p and str(p) in str(e.value), what
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")


def test_h5_checksum_catches_in_place_edits_with_the_same_shape(tmp_path):
    p = tmp_path / "e.h5"
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    coords = np.arange(100, dtype=np.int64).reshape(50, 2)
    with h5py.File(p, "w") as f:
        f["features"], f["coords"] = feats, coords
        c = h5_attach_checksum(f, ["features", "coords"])
    # the documented formula, computed independently of the file
    assert c == arrays_checksum({"features": feats, "coords": coords})
    verify_h5(p)
    with h5py.File(p, "r+") as f:  # finite garbage, same shape and dtype
        f["features"][3] = rng.normal(size=8).astype(np.float32)
    with pytest.raises(CorruptCacheError, match="does not match its recorded checksum"):
        verify_h5(p)
    with h5py.File(p, "r+") as f:
        del f.attrs["checksum"]
    with pytest.raises(CorruptCacheError, match="no checksum"):
        verify_h5(p)
    p.write_bytes(b"\x89HDF\r\n")  # truncated
    with pytest.raises(CorruptCacheError, match=r"e\.h5: cannot be read as HDF5"):
        verify_h5(p)


def test_verified_memo_skips_unchanged_files_but_not_edited_ones(tmp_path):
    p = tmp_path / "e.h5"
    with h5py.File(p, "w") as f:
        f["features"] = np.ones((4, 2), np.float32)
        h5_attach_checksum(f)
    memo = VerifiedFiles(tmp_path)
    memo.verify(p)
    memo.save()
    calls = []
    import netsurv.stages.cache as C

    real = C.verify_h5
    C.verify_h5 = lambda q: calls.append(q) or real(q)
    try:
        VerifiedFiles(tmp_path).verify(p)  # unchanged: not read again
        assert calls == []
        st = p.stat()
        with h5py.File(p, "r+") as f:
            f["features"][0, 0] = 7.0
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime back
        with pytest.raises(CorruptCacheError):
            VerifiedFiles(tmp_path).verify(p)
        assert calls == [p]
    finally:
        C.verify_h5 = real
    (tmp_path / ".verified.json").write_text("{garbage")  # a damaged memo is only a cost
    with pytest.raises(CorruptCacheError):
        VerifiedFiles(tmp_path).verify(p)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_stale_temps_spares_live_writers(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host, other = _host(), "some-other-node"
        (tmp_path / "qc").mkdir()
        names = {
            "dead": f".a.h5.nstmp~{host}~{_dead_pid()}~0a1b2c3d.tmp",
            "live": f".b.h5.nstmp~{host}~{live.pid}~0a1b2c3d.tmp",
            "other_host": f".c.h5.nstmp~{other}~{_dead_pid()}~0a1b2c3d.tmp",
            "legacy_new": ".d.h5.1234.tmp",
            "legacy_old": ".e.h5.1234.tmp",
            "qc_old": "qc/s1.png.tmp.png",
            "keep": "s1.h5",
        }
        for n in names.values():
            (tmp_path / n).write_text("x")
        old = time.time() - 3 * 86400
        for k in ("legacy_old", "qc_old"):
            os.utime(tmp_path / names[k], (old, old))
        # a temp folder of a dead writer (the demo cohort is built in one)
        d = tmp_path / f".demo.nstmp~{host}~{_dead_pid()}~0a1b2c3d.tmp"
        (d / "slides").mkdir(parents=True)
        removed = clean_stale_temps(tmp_path, subdirs=("qc",))
        left = {k for k, n in names.items() if (tmp_path / n).exists()}
        assert left == {"live", "other_host", "legacy_new", "keep"}
        assert not d.exists() and len(removed) == 4
        # the other host's temp goes once it is older than the age limit
        os.utime(tmp_path / names["other_host"], (old, old))
        clean_stale_temps(tmp_path)
        assert not (tmp_path / names["other_host"]).exists()
        assert (tmp_path / names["live"]).exists()
    finally:
        live.kill()
        live.wait()


def test_item_lock_is_exclusive_between_processes_and_dies_with_its_holder(tmp_path):
    code = ("import sys, time; from netsurv.stages import ItemLocks; "
            "l = ItemLocks(sys.argv[1]).try_acquire('slide/1'); print(l is not None, flush=True);"
            " time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        locks = ItemLocks(tmp_path)
        assert locks.try_acquire("slide/1") is None
        mine = locks.try_acquire("slide/2")
        assert mine is not None
        mine.release()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock
        holder.wait()
    lk = ItemLocks(tmp_path).try_acquire("slide/1")
    assert lk is not None
    lk.release()


def test_run_items_caches_adopts_recent_failures_and_recomputes_corrupt(tmp_path, caplog):
    store = {}
    calls = []
    locks = ItemLocks(tmp_path)

    def lookup(k):
        v = store.get(k)
        if v == "corrupt":
            raise CorruptCacheError(tmp_path / f"{k}.json", "truncated")
        return v

    def compute(k):
        calls.append(k)
        if k == "bad":
            raise ValueError("unreadable slide")
        return k.upper()

    def finish(k, v):
        if k == "half":
            raise ItemFailed("NoTissue", "no tissue")
        store[k] = v
        return v

    items = ["a", "bad", "half", "c"]
    out = run_items(items, key=str, lookup=lookup, compute=compute, finish=finish, locks=locks)
    assert [o.status for o in out] == ["done", "failed", "failed", "done"]
    assert (out[1].error_type, out[1].error) == ("ValueError", "unreadable slide")
    assert (out[2].error_type, out[2].value) == ("NoTissue", "HALF")
    # a failure noted after a run started is adopted (not recomputed) by that run ...
    t0 = time.time()
    locks.note_failure("c", "X", "failed in a concurrent job")
    store.pop("c")
    calls.clear()
    out = run_items(items, key=str, lookup=lookup, compute=compute, finish=finish,
                    locks=locks, since=t0)
    assert out[3].status == "failed" and out[3].error == "failed in a concurrent job"
    assert "c" not in calls and out[0].status == "skipped"
    # ... while a later run retries it; a corrupt entry is logged, deleted and recomputed
    store["a"] = "corrupt"
    calls.clear()
    with caplog.at_level("WARNING", logger="netsurv.stages"):
        out = run_items(items, key=str, lookup=lookup, compute=compute, finish=finish,
                        locks=locks)
    assert out[0].status == "done" and out[0].replaced_corrupt == str(tmp_path / "a.json")
    assert str(tmp_path / "a.json") in caplog.text and "truncated" in caplog.text
    assert out[3].status == "done" and sorted(calls) == ["a", "bad", "c", "half"]


def test_process_pool_gives_the_same_outcomes(tmp_path):
    items = [f"i{k}" for k in range(6)]
    kw = dict(key=str, lookup=lambda k: None, compute=_square_or_fail, finish=None)
    a = run_items(items, locks=ItemLocks(tmp_path / "a"), n_jobs=1, **kw)
    b = run_items(items, locks=ItemLocks(tmp_path / "b"), n_jobs=2, **kw)
    assert [(o.status, o.value, o.error) for o in a] == [(o.status, o.value, o.error) for o in b]
    assert [o.status for o in a].count("failed") == 2


def _square_or_fail(k: str):
    n = int(k[1:])
    if n % 3 == 0:
        raise ArithmeticError(f"{k} fails")
    return n * n
