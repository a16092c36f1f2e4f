"""pyradiomics extraction over a cohort: parallel, cached per case, failures recorded.

Each case is keyed by a content hash of its image and mask plus a hash of the extraction
parameters, so a rerun recomputes only what changed and an interrupted run resumes. One bad case
is recorded in the failures table and never stops the others.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from .volumes import VolumeError, load_case

CODE_VERSION = "1"  # bump when netsurv's reading/label logic changes the features

log = logging.getLogger(__name__)


def _quiet_radiomics():
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)


def make_extractor(params: dict):
    """A ``RadiomicsFeatureExtractor`` from netsurv's radiology config.

    ``params``: ``settings`` (pyradiomics settings: binWidth, resampledPixelSpacing,
    resegmentRange (HU window), normalize, ...), ``image_types`` (e.g. ``{Original: {}, LoG:
    {sigma: [1, 2, 3]}, Wavelet: {}}``) and ``features`` (classes to enable, null = all).
    """
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    _quiet_radiomics()
    settings = {k: v for k, v in (params.get("settings") or {}).items() if v is not None}
    ext = RadiomicsFeatureExtractor(**settings)
    ext.disableAllImageTypes()
    ext.enableImageTypes(**{k: dict(v or {}) for k, v in params["image_types"].items()})
    feats = params.get("features")
    if feats:
        ext.disableAllFeatures()
        for cls in feats:
            ext.enableFeatureClassByName(cls)
    return ext


def params_hash(params: dict) -> str:
    import radiomics

    keep = {k: params.get(k) for k in ("settings", "image_types", "features", "label",
                                       "resample_mask")}
    blob = json.dumps({**keep, "pyradiomics": radiomics.__version__, "code": CODE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class HashIndex:
    """Content hashes of input files, memoised by (path, size, mtime) so reruns don't re-read."""

    def __init__(self, path: Path):
        self.path = path
        self.table = json.loads(path.read_text()) if path.is_file() else {}

    def file_hash(self, p) -> str:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            st = f.stat()
            k = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if k not in self.table:
                fh = hashlib.blake2b(digest_size=16)
                with open(f, "rb") as fp:
                    for chunk in iter(lambda: fp.read(1 << 22), b""):
                        fh.update(chunk)
                self.table[k] = fh.hexdigest()
            h.update(self.table[k].encode())
        return h.hexdigest()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.table))
        os.replace(tmp, self.path)


def extract_case(image, mask, params: dict, label: int = 1) -> tuple[dict, list[str]]:
    """Features of one case (names as pyradiomics gives them) and the reading notes."""
    case = load_case(image, mask, label=label, resample_mask=bool(params.get("resample_mask")),
                     tol=float(params.get("geometry_tolerance", 1e-3)))
    ext = make_extractor(params)
    out = ext.execute(case.image, case.mask, label=1)
    feats = {k: float(v) for k, v in out.items() if not k.startswith("diagnostics_")}
    return feats, case.notes


def _worker_init():
    import SimpleITK as sitk

    # one thread per process: with n_jobs processes the cores are already used, and SimpleITK's
    # own threads would oversubscribe them (memory-bound filters gain nothing from it)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _quiet_radiomics()


def _job(args):
    pid, image, mask, label, params = args
    t0 = time.perf_counter()
    try:
        feats, notes = extract_case(image, mask, params, label)
        return pid, feats, notes, None, time.perf_counter() - t0
    except VolumeError as exc:
        return pid, None, [], str(exc), time.perf_counter() - t0
    except Exception as exc:  # pyradiomics raises bare ValueError/RuntimeError on odd ROIs
        return pid, None, [], f"{image}: {type(exc).__name__}: {exc}", time.perf_counter() - t0


ACQUISITION_EXCLUDE = {"patient_id", "image", "mask", "label"}


def extract_cohort(ct: pd.DataFrame, params: dict, out_dir, *, n_jobs: int = 1,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Extract all cases of ``ct`` (rows of ct.csv with absolute paths).

    Returns ``(table, failures)``; the table holds ``patient_id``, the feature columns and the
    acquisition columns of ct.csv (ComBat batches). Both are also written to ``out_dir`` as
    ``radiomics.csv`` and ``failures.csv``; per-case results live in ``out_dir/cases/``.
    """
    out_dir = Path(out_dir)
    cases_dir = out_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    ph = params_hash(params)
    index = HashIndex(out_dir / "file_hashes.json")
    default_label = int(params.get("label", 1))
    dup = ct["patient_id"][ct["patient_id"].duplicated()].unique().tolist()
    if dup:
        log.warning("ct.csv has several scans for patient(s) %s; the first row of each is used",
                    dup[:10])
    ct = ct.drop_duplicates("patient_id", keep="first")

    todo, done, failures = [], {}, []
    for row in ct.itertuples(index=False):
        r = row._asdict()
        label = default_label
        if "label" in r and pd.notna(r["label"]):
            label = int(r["label"])
        try:
            key = hashlib.sha256(
                f"{index.file_hash(r['image'])}|{index.file_hash(r['mask'])}|{label}|{ph}".encode()
            ).hexdigest()[:16]
        except OSError as exc:
            failures.append({"patient_id": r["patient_id"], "image": r["image"],
                             "mask": r["mask"], "reason": f"cannot read input: {exc}"})
            continue
        cache = cases_dir / f"{r['patient_id']}-{key}.json"
        if cache.is_file():
            done[r["patient_id"]] = json.loads(cache.read_text())
        else:
            todo.append(((r["patient_id"], r["image"], r["mask"], label, params), cache))
    index.save()

    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="radiomics", unit="case", disable=not progress)
        by_pid = {args[0]: (args, cache) for args, cache in todo}

        def record(result):
            pid, feats, notes, err, secs = result
            args, cache = by_pid[pid]
            if err is None:
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps({"features": feats, "notes": notes,
                                           "seconds": round(secs, 3)}))
                os.replace(tmp, cache)  # atomic: an interrupted run never leaves half a case
                done[pid] = {"features": feats, "notes": notes}
            else:
                failures.append({"patient_id": pid, "image": args[1], "mask": args[2],
                                 "reason": err})
            bar.update(1)

        if n_jobs <= 1:
            _quiet_radiomics()
            for args, _ in todo:
                record(_job(args))
        else:
            # import pyradiomics before forking so workers inherit it instead of each paying
            # the ~1 s import (fork is the default start method on Linux)
            import radiomics.featureextractor  # noqa: F401

            with ProcessPoolExecutor(n_jobs, initializer=_worker_init) as pool:
                futures = [pool.submit(_job, args) for args, _ in todo]
                for fut in as_completed(futures):
                    record(fut.result())
        bar.close()

    acq_cols = [c for c in ct.columns if c not in ACQUISITION_EXCLUDE]
    rows = []
    for row in ct.itertuples(index=False):
        r = row._asdict()
        if r["patient_id"] in done:
            rows.append({"patient_id": r["patient_id"], **done[r["patient_id"]]["features"],
                         **{c: r[c] for c in acq_cols}})
    table = pd.DataFrame(rows)
    fail = pd.DataFrame(failures, columns=["patient_id", "image", "mask", "reason"])
    table.to_csv(out_dir / "radiomics.csv", index=False)
    fail.to_csv(out_dir / "failures.csv", index=False)
    if len(fail):
        log.warning("radiomics: %d case(s) failed, see %s", len(fail), out_dir / "failures.csv")
    return table, fail
