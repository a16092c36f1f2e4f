"""pyradiomics extraction over a cohort: parallel, cached per case, failures recorded.

Each case is keyed by a content hash of its image and mask plus a hash of the extraction
parameters, so a rerun recomputes only what changed and an interrupted run resumes. One bad case
is recorded in the failures table and never stops the others.  Case results are verified JSON
files (:mod:`netsurv.stages`): a truncated, empty or edited one is logged with its path,
deleted and recomputed; two jobs on one cohort never extract the same case twice (per-case
locks); on several ranks each rank extracts ``cases[rank::world_size]`` and every rank
returns the whole table.  Reading notes (mask labelled 255, other labels present, mask
resampled) are kept per case: ``notes`` column of ``failures.csv`` and the console summary.
A DICOM RTSTRUCT/SEG mask's provenance (kind, ROI used, rasteriser and version) is kept in the
case's cache document and in the ``mask_kind``/``roi``/``rasteriser`` columns of
``failures.csv``, where every such case has a row.  The loop and the table are those of every
stage: :func:`netsurv.stages.cached_map` and :mod:`netsurv.stages.failures`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pandas as pd

from .dicom_masks import dicom_mask_kind, rasteriser
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
    """Cache key (12 hex characters) of radiomics extraction parameters.

    Covers what changes the features: the ``settings``, ``image_types``, ``features``,
    ``label`` and ``resample_mask`` entries of ``params``, the installed pyradiomics version and
    ``CODE_VERSION``.
    """
    import radiomics

    keep = {k: params.get(k) for k in ("settings", "image_types", "features", "label",
                                       "resample_mask")}
    blob = json.dumps({**keep, "pyradiomics": radiomics.__version__, "code": CODE_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class HashIndex:
    """Content hashes of input files, memoised by (path, size, mtime) so reruns don't re-read.

    The memo is itself a verified cache file: a damaged one is logged and started afresh (it
    only saves time).  :meth:`save` merges this process's entries into the file under a lock,
    so concurrent jobs and ranks add to it instead of overwriting each other."""

    def __init__(self, path: Path):
        from netsurv.stages import CorruptCacheError, read_json

        self.path = Path(path)
        self.new: dict[str, str] = {}
        try:
            self.table = dict(read_json(self.path))
        except FileNotFoundError:
            self.table = {}
        except CorruptCacheError as exc:
            log.warning("file-hash memo %s is corrupt (%s): starting a new one", exc.path,
                        exc.reason)
            self.table = {}

    def file_hash(self, p) -> str:
        """Content hash of file ``p``, or of every file under directory ``p`` (in sorted order).

        Files whose (path, size, mtime) is already in the memo are not read again; newly hashed
        files are remembered for :meth:`save`.
        """
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
                self.table[k] = self.new[k] = fh.hexdigest()
            h.update(self.table[k].encode())
        return h.hexdigest()

    def save(self):
        """Merge the entries hashed by this process into the memo file (under a lock)."""
        from netsurv.stages import merge_json

        if not self.new and self.path.is_file():
            return
        merge_json(self.path, self.new, "file_hashes")
        self.new = {}


def _extract(image, mask, params: dict, label: int = 1, roi=None):
    case = load_case(image, mask, label=label, resample_mask=bool(params.get("resample_mask")),
                     tol=float(params.get("geometry_tolerance", 1e-3)), roi=roi)
    ext = make_extractor(params)
    out = ext.execute(case.image, case.mask, label=1)
    feats = {k: float(v) for k, v in out.items() if not k.startswith("diagnostics_")}
    return feats, case.notes, case.provenance


def extract_case(image, mask, params: dict, label: int = 1, roi=None) -> tuple[dict, list[str]]:
    """Features of one case (names as pyradiomics gives them) and the reading notes.  ``roi``:
    the ROI/segment (name or number) of a DICOM RTSTRUCT/SEG mask."""
    feats, notes, _ = _extract(image, mask, params, label, roi)
    return feats, notes


def provenance_note(prov: dict) -> str:
    """One line saying which ROI of which DICOM mask file was used and what rasterised it."""
    what, how = ("segment", "read") if prov["mask_kind"] == "SEG" else ("ROI", "rasterised")
    return (f"{prov['mask_kind']} {what} {prov['roi_number']} {prov['roi']!r} of {prov['mask']} "
            f"{how} by {prov['rasteriser']}")


def _roi_of(row: dict, default):
    """The ROI/segment asked for by a ct.csv row (its 'roi' cell, else radiology.roi)."""
    v = row.get("roi")
    if v is None or (isinstance(v, float) and pd.isna(v)) or str(v).strip() == "":
        v = default
    if isinstance(v, float) and v.is_integer():  # a segment number read as a float
        v = int(v)
    return None if v is None or str(v).strip() == "" else str(v).strip()


def _worker_init():
    import SimpleITK as sitk

    # one thread per process: with n_jobs processes the cores are already used, and SimpleITK's
    # own threads would oversubscribe them (memory-bound filters gain nothing from it)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _quiet_radiomics()


def _job(args) -> dict:
    """One case in a worker: features and notes, or the error (type and message)."""
    pid, image, mask, label, params, roi = args
    t0 = time.perf_counter()
    res = {"patient_id": pid, "features": None, "notes": [], "provenance": {}, "error_type": "",
           "error": ""}
    try:
        res["features"], res["notes"], res["provenance"] = _extract(image, mask, params, label,
                                                                    roi)
    except VolumeError as exc:
        res["error_type"], res["error"] = type(exc).__name__, str(exc)
    except Exception as exc:  # noqa: BLE001 - pyradiomics raises bare ValueError/RuntimeError on odd ROIs
        res["error_type"], res["error"] = type(exc).__name__, f"{image}: {type(exc).__name__}: {exc}"
    res["seconds"] = time.perf_counter() - t0
    return res


ACQUISITION_EXCLUDE = {"patient_id", "image", "mask", "label", "roi"}


def _record(item, res: dict) -> dict:
    """Cache document of one case (``features``, ``notes``, ``provenance``, ``seconds``); a
    failed case raises :class:`~netsurv.stages.ItemFailed`."""
    from netsurv.stages import ItemFailed

    if res["error"]:
        raise ItemFailed(res["error_type"], res["error"])
    return {"features": res["features"], "notes": list(res["notes"]),
            "provenance": dict(res.get("provenance") or {}), "seconds": round(res["seconds"], 3)}


def extract_cohort(ct: pd.DataFrame, params: dict, out_dir, *, n_jobs: int = 1,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Extract all cases of ``ct`` (rows of ct.csv with absolute paths).

    Returns ``(table, failures)``; the table holds ``patient_id``, the feature columns and the
    acquisition columns of ct.csv (ComBat batches); ``failures`` the failed cases
    (:data:`netsurv.stages.FAILURE_COLUMNS`, ``status`` = ``failed``).  Both are also written
    to ``out_dir`` as ``radiomics.csv`` and ``failures.csv``, the latter also listing the
    extracted cases that have reading notes (``status`` = ``noted``); per-case results live in
    ``out_dir/cases/``.  On several ranks every rank returns the whole cohort's tables.
    """
    from netsurv.stages import (
        ItemFailed,
        cached_map,
        failure_row,
        failures_frame,
        rank_zero,
        stage_env,
        write_csv,
        write_failures,
    )

    out_dir = Path(out_dir)
    cases_dir = out_dir / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    env = stage_env()
    ph = params_hash(params)
    default_label = int(params.get("label", 1))
    default_roi = params.get("roi")
    dup = ct["patient_id"][ct["patient_id"].duplicated()].unique().tolist()
    if dup and env.rank == 0:
        log.warning("ct.csv has several scans for patient(s) %s; the first row of each is used",
                    dup[:10])
    ct = ct.drop_duplicates("patient_id", keep="first")
    rows = [r._asdict() for r in ct.itertuples(index=False)]
    memo: dict = {}

    def start():
        memo["index"] = HashIndex(out_dir / "file_hashes.json")

    def label_of(r) -> int:
        return int(r["label"]) if "label" in r and pd.notna(r["label"]) else default_label

    def cache_path(r) -> Path:
        index, label, roi = memo["index"], label_of(r), _roi_of(r, default_roi)
        try:
            key = f"{index.file_hash(r['image'])}|{index.file_hash(r['mask'])}|{label}|{ph}"
            kind = dicom_mask_kind(r["mask"])
            if kind:  # the ROI picked and the rasteriser's version change the mask
                key += f"|{roi}|{rasteriser(kind)}"
        except VolumeError as exc:
            raise ItemFailed(type(exc).__name__, str(exc)) from None
        key = hashlib.sha256(key.encode()).hexdigest()[:16]
        return cases_dir / f"{r['patient_id']}-{key}.json"

    def ready(todo):
        memo["index"].save()
        if n_jobs > 1 and len(todo) > 1:
            # import pyradiomics before forking so workers inherit it instead of each paying
            # the ~1 s import (fork is the default start method on Linux)
            import radiomics.featureextractor  # noqa: F401
        else:
            _quiet_radiomics()

    outcomes = cached_map(
        rows, stage="radiomics", folder=out_dir, item_id=lambda r: str(r["patient_id"]),
        cache_path=cache_path, compute=_job, record=_record, required=("features", "notes"),
        payload=lambda r: (r["patient_id"], r["image"], r["mask"], label_of(r), params,
                           _roi_of(r, default_roi)),
        n_jobs=int(n_jobs), initializer=_worker_init, start=start, ready=ready,
        temp_subdirs=("cases",), progress=progress, unit="case", what="radiomics case",
        env=env)
    acq_cols = [c for c in ct.columns if c not in ACQUISITION_EXCLUDE]
    table_rows, fail_rows = [], []
    for r, o in zip(rows, outcomes):
        base = {"patient_id": r["patient_id"], "path": r["image"], "mask": r["mask"],
                "roi": _roi_of(r, default_roi) or ""}
        if o.status == "failed":
            fail_rows.append(failure_row("radiomics", r["patient_id"], **base,
                                         error_type=o.error_type, error=o.error,
                                         reason=o.error))
            continue
        value = o.value
        table_rows.append({"patient_id": r["patient_id"], **value["features"],
                           **{c: r[c] for c in acq_cols}})
        prov = value.get("provenance") or {}
        notes = ([provenance_note(prov)] if prov else []) + list(value.get("notes") or [])
        if notes:
            fail_rows.append(failure_row(
                "radiomics", r["patient_id"], **{**base, **({"roi": prov["roi"]} if prov else {})},
                status="noted", reason="", notes="; ".join(notes),
                **({"mask_kind": prov["mask_kind"], "rasteriser": prov["rasteriser"]}
                   if prov else {})))
    table = pd.DataFrame(table_rows)
    report = failures_frame(fail_rows)
    fail = report[report["status"] == "failed"].reset_index(drop=True)

    def write_tables():
        write_csv(out_dir / "radiomics.csv", table)
        write_failures(out_dir / "failures.csv", report)

    rank_zero(write_tables, what="radiomics", env=env)
    if len(fail) and env.rank == 0:
        log.warning("radiomics: %d case(s) failed, see %s", len(fail), out_dir / "failures.csv")
    return table, fail


def case_notes(out_dir) -> pd.DataFrame:
    """Cases of the last extraction in ``out_dir`` that have reading notes (``patient_id``,
    ``notes``)."""
    from netsurv.stages import read_failures

    return read_failures(out_dir, status="noted")[["patient_id", "notes"]]
