"""The stage helper (netsurv.stages.cached_map) and the one failures table of every stage:
a parallel map where one item fails keeps the others' cached results, the failures table has
the shared columns, and a second run reads the cache and retries only the failed item."""
from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest

from netsurv.stages import (
    FAILURE_COLUMNS,
    ItemFailed,
    cached_map,
    failure_row,
    failures_frame,
    read_failures,
    write_failures,
)


def _work(args):
    """One item in a worker: notes the call (a file per call), fails item 'bad'."""
    item, calls = args
    (Path(calls) / f"{item}~{uuid.uuid4().hex}").touch()
    if item == "bad":
        raise ValueError(f"{item}.tiff: cannot be read")
    return {"value": len(item)}


def _record(item, res):
    if res["value"] == 4 and item["id"] == "half":  # fails after compute, in the parent
        raise ItemFailed("NoTissue", f"slide {item['id']}: no tissue")
    return {"value": res["value"]}


def _calls(d: Path) -> list[str]:
    return sorted(p.name.split("~")[0] for p in d.iterdir())


def _map(items, out, calls, **kw):
    return cached_map(
        items, stage="demo", folder=out, item_id=lambda it: it["id"],
        cache_path=lambda it: out / "items" / f"{it['id']}.json", compute=_work,
        record=_record, required=("value",), payload=lambda it: (it["id"], str(calls)),
        temp_subdirs=("items",), **kw)


def _table(items, outcomes):
    return failures_frame(
        failure_row("demo", it["id"], patient_id=it["pid"], path=f"{it['id']}.tiff",
                    error_type=o.error_type, error=o.error, slide_id=it["id"])
        for it, o in zip(items, outcomes) if o.status == "failed")


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_cached_map_keeps_the_others_and_retries_only_the_failed(tmp_path, pool):
    out, calls = tmp_path / "out", tmp_path / "calls"
    calls.mkdir()
    items = [{"id": i, "pid": f"P{k}"} for k, i in enumerate(["c", "bad", "a", "half", "bb"])]
    res = _map(items, out, calls, n_jobs=2, pool=pool)
    assert [o.status for o in res] == ["done", "failed", "done", "failed", "done"]
    assert [o.key for o in res] == [it["id"] for it in items]          # the order of items
    assert (res[1].error_type, res[1].error) == ("ValueError", "bad.tiff: cannot be read")
    assert (res[3].error_type, res[3].error) == ("NoTissue", "slide half: no tissue")
    assert res[2].value == {"value": 1}
    assert sorted(p.stem for p in (out / "items").glob("*.json")) == ["a", "bb", "c"]
    assert _calls(calls) == ["a", "bad", "bb", "c", "half"]
    write_failures(out / "failures.csv", _table(items, res))
    raw = pd.read_csv(out / "failures.csv")
    assert list(raw.columns) == FAILURE_COLUMNS
    back = read_failures(out)
    assert back["item_id"].tolist() == ["bad", "half"]
    assert back["patient_id"].tolist() == ["P1", "P3"] and (back["status"] == "failed").all()
    assert back["reason"].tolist() == ["ValueError: bad.tiff: cannot be read",
                                       "NoTissue: slide half: no tissue"]
    # second run: cached items are read back, only the failed ones are computed again
    for p in calls.iterdir():
        p.unlink()
    res2 = _map(items, out, calls, n_jobs=2, pool=pool)
    assert [o.status for o in res2] == ["skipped", "failed", "skipped", "failed", "skipped"]
    assert [o.value for o in res2][::2] == [o.value for o in res][::2]
    assert _calls(calls) == ["bad", "half"]


def test_cached_map_unreadable_input_fails_that_item_only(tmp_path):
    out, calls = tmp_path / "out", tmp_path / "calls"
    calls.mkdir()
    items = [{"id": "x", "pid": "P0"}, {"id": "gone", "pid": "P1"}, {"id": "y", "pid": "P2"}]

    def cache_path(it):
        if it["id"] == "gone":
            (tmp_path / "gone.tiff").stat()  # FileNotFoundError naming the file
        if it["id"] == "y":
            raise ItemFailed("VolumeError", "y.nii.gz: mask is empty")
        return out / f"{it['id']}.json"

    res = cached_map(items, stage="demo", folder=out, item_id=lambda it: it["id"],
                     cache_path=cache_path, compute=_work, record=_record,
                     payload=lambda it: (it["id"], str(calls)))
    assert [o.status for o in res] == ["done", "failed", "failed"]
    assert res[1].error_type == "FileNotFoundError"
    assert res[1].error.startswith("cannot read input: ") and "gone.tiff" in res[1].error
    assert (res[2].error_type, res[2].error) == ("VolumeError", "y.nii.gz: mask is empty")
    assert _calls(calls) == ["x"]


def test_failure_rows_and_reader(tmp_path):
    r = failure_row("tiling", "s1", patient_id="P1", path="/d/s1.tiff", error_type="SlideError",
                    error="/d/s1.tiff: no tissue", slide_id="s1")
    assert list(r) == FAILURE_COLUMNS and r["reason"] == "SlideError: /d/s1.tiff: no tissue"
    # an error already prefixed with its type is not prefixed twice; a given reason is kept
    assert failure_row("morphology", "s", error_type="OSError",
                       error="OSError: x")["reason"] == "OSError: x"
    assert failure_row("radiomics", "P", error_type="VolumeError", error="m: empty",
                       reason="m: empty")["reason"] == "m: empty"
    with pytest.raises(ValueError, match="not columns of the failures table"):
        failure_row("tiling", "s", colour="red")
    with pytest.raises(ValueError, match="not in the schema"):
        failures_frame(pd.DataFrame({"stage": ["x"], "colour": ["red"]}))
    # no file yet: an empty table with the columns
    empty = read_failures(tmp_path)
    assert list(empty.columns) == FAILURE_COLUMNS and empty.empty
    write_failures(tmp_path / "e" / "failures.csv", [])
    assert list(pd.read_csv(tmp_path / "e" / "failures.csv").columns) == FAILURE_COLUMNS
    # the bag index's table of older versions
    pd.DataFrame({"slide_id": ["b"], "patient_id": ["P2"], "path": ["/f/b.h5"],
                  "reason": ["/f/b.h5: cannot be read"]}).to_csv(tmp_path / "failures.csv",
                                                                 index=False)
    old = read_failures(tmp_path / "failures.csv")
    assert list(old.columns) == FAILURE_COLUMNS
    assert old.loc[0, ["item_id", "error", "status"]].tolist() == [
        "b", "/f/b.h5: cannot be read", "failed"]
    assert read_failures(tmp_path, status="noted").empty
