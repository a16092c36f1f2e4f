"""Load and validate a cohort folder (the contract is in the README, 'Your own cohort').

Every error names the file, the row (1-based line number in the CSV, header = line 1) or patient,
and the column, and says how to fix it, because cohort tables are hand-edited by users and a
bare ``KeyError`` three stages later is the usual failure mode of peer tools.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ENDPOINTS = ("os", "pfs")
CLINICAL_REQUIRED = ("patient_id", "os_time", "os_event", "pfs_time", "pfs_event")
SLIDES_REQUIRED = ("patient_id", "slide_id", "path")
CT_REQUIRED = ("patient_id", "image", "mask")


class CohortError(ValueError):
    """A cohort table violates the data contract; the message says where and how to fix it."""


class CohortWarning(UserWarning):
    """Suspicious but usable cohort data (e.g. PFS longer than OS)."""


@dataclass
class Cohort:
    root: Path
    clinical: pd.DataFrame                     # indexed by patient_id (str)
    slides: pd.DataFrame | None = None         # patient_id, slide_id, path (absolute), mpp?
    ct: pd.DataFrame | None = None             # patient_id, image, mask (absolute), acquisition cols
    features: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> table by patient_id
    truth: pd.DataFrame | None = None          # demo only: patient_id -> true_risk

    @property
    def patients(self) -> list[str]:
        return list(self.clinical.index)

    def endpoint(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(time, event) arrays in ``self.patients`` order for ``target`` in {'os', 'pfs'}."""
        if target not in ENDPOINTS:
            raise CohortError(f"target={target!r} is not an endpoint; use one of {ENDPOINTS}")
        t = self.clinical[f"{target}_time"].to_numpy(float)
        e = self.clinical[f"{target}_event"].to_numpy(int)
        return t, e


def _line(idx) -> int:
    # pandas row index 0 is line 2 of the file (line 1 is the header)
    return int(idx) + 2


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"patient_id": str, "slide_id": str})
    except Exception as exc:  # pandas raises a zoo of parser errors
        raise CohortError(f"{path}: cannot be parsed as CSV ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _require_columns(df: pd.DataFrame, required, path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CohortError(
            f"{path}: missing required column(s) {missing}; found columns {list(df.columns)}. "
            f"Add the column(s) (required: {list(required)}; see the README, 'Your own cohort')."
        )


def _check_ids(df: pd.DataFrame, path: Path, col: str = "patient_id") -> None:
    blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
    if blank.any():
        rows = [_line(i) for i in df.index[blank]][:10]
        raise CohortError(f"{path}: empty '{col}' on line(s) {rows}; every row needs an id.")


def _validate_endpoints(df: pd.DataFrame, path: Path) -> None:
    for ep in ENDPOINTS:
        tcol, ecol = f"{ep}_time", f"{ep}_event"
        t = pd.to_numeric(df[tcol], errors="coerce")
        bad = t.isna() & df[tcol].notna()
        if bad.any():
            i = df.index[bad][0]
            raise CohortError(
                f"{path}: column '{tcol}' is not numeric for patient {df.at[i, 'patient_id']!r} "
                f"(line {_line(i)}, value {df.at[i, tcol]!r}); times must be numbers in months."
            )
        if t.isna().any():
            i = df.index[t.isna()][0]
            raise CohortError(
                f"{path}: column '{tcol}' is empty for patient {df.at[i, 'patient_id']!r} "
                f"(line {_line(i)}); give the follow-up time in months (censored patients too)."
            )
        neg = t < 0
        if neg.any():
            i = df.index[neg][0]
            raise CohortError(
                f"{path}: column '{tcol}' is negative ({t[i]}) for patient "
                f"{df.at[i, 'patient_id']!r} (line {_line(i)}); times are months since baseline."
            )
        e = pd.to_numeric(df[ecol], errors="coerce")
        bad = ~e.isin([0, 1])
        if bad.any():
            found = sorted({str(v) for v in df.loc[bad, ecol].tolist()})
            pats = df.loc[bad, "patient_id"].tolist()[:5]
            what = "death" if ep == "os" else "progression or death"
            raise CohortError(
                f"{path}: column '{ecol}' must be 0 or 1 (1 = {what} observed, 0 = censored); "
                f"found {found} for patient(s) {pats} (first on line {_line(df.index[bad][0])})."
            )
        df[tcol] = t.astype(float)
        df[ecol] = e.astype(int)


def load_clinical(path: Path) -> pd.DataFrame:
    df = _read_csv(path)
    _require_columns(df, CLINICAL_REQUIRED, path)
    _check_ids(df, path)
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    dup = df["patient_id"].duplicated(keep=False)
    if dup.any():
        ids = sorted(set(df.loc[dup, "patient_id"]))
        lines = [_line(i) for i in df.index[dup]][:10]
        raise CohortError(
            f"{path}: duplicate patient_id {ids[:10]} (lines {lines}); one row per patient — "
            "put per-slide or per-scan data in slides.csv / ct.csv."
        )
    _validate_endpoints(df, path)
    longer = df["pfs_time"] > df["os_time"] + 1e-9
    if longer.any():
        pats = df.loc[longer, "patient_id"].tolist()
        warnings.warn(
            f"{path}: pfs_time > os_time for {len(pats)} patient(s) {pats[:10]}; progression "
            "cannot be observed after death or last follow-up — check these rows.",
            CohortWarning,
            stacklevel=3,
        )
    return df.set_index("patient_id", drop=True)


def _resolve(root: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (root / p)


def _check_patients_known(df: pd.DataFrame, known: set[str], path: Path) -> None:
    unknown = ~df["patient_id"].isin(known)
    if unknown.any():
        ids = sorted(set(df.loc[unknown, "patient_id"]))
        raise CohortError(
            f"{path}: {len(ids)} patient_id(s) not in clinical.csv: {ids[:10]} "
            f"(first on line {_line(df.index[unknown][0])}); add them to clinical.csv or "
            "remove these rows."
        )


def _check_files(df: pd.DataFrame, cols, root: Path, path: Path, check_files: bool) -> None:
    for col in cols:
        empty = df[col].isna()
        if empty.any():
            i = df.index[empty][0]
            raise CohortError(
                f"{path}: column '{col}' is empty for patient {df.at[i, 'patient_id']!r} "
                f"(line {_line(i)}); drop the row if the patient has no such data."
            )
        df[col] = [str(_resolve(root, v)) for v in df[col]]
        if not check_files:
            continue
        for i, v in zip(df.index, df[col]):
            if not Path(v).exists():
                raise CohortError(
                    f"{path}: column '{col}', patient {df.at[i, 'patient_id']!r} "
                    f"(line {_line(i)}): file {v} does not exist; paths are relative to "
                    f"{root} or absolute."
                )


def load_slides(path: Path, root: Path, known: set[str], check_files: bool = True) -> pd.DataFrame:
    df = _read_csv(path)
    _require_columns(df, SLIDES_REQUIRED, path)
    _check_ids(df, path)
    _check_ids(df, path, "slide_id")
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    dup = df["slide_id"].duplicated(keep=False)
    if dup.any():
        ids = sorted(set(df.loc[dup, "slide_id"]))
        raise CohortError(f"{path}: duplicate slide_id {ids[:10]}; slide ids must be unique.")
    _check_patients_known(df, known, path)
    if "mpp" in df.columns:
        mpp = pd.to_numeric(df["mpp"], errors="coerce")
        bad = (df["mpp"].notna() & mpp.isna()) | (mpp <= 0)
        if bad.any():
            i = df.index[bad][0]
            raise CohortError(
                f"{path}: column 'mpp' for slide {df.at[i, 'slide_id']!r} (line {_line(i)}) is "
                f"{df.at[i, 'mpp']!r}; give µm per pixel at level 0 (e.g. 0.25) or leave empty."
            )
        df["mpp"] = mpp
    _check_files(df, ["path"], root, path, check_files)
    return df.reset_index(drop=True)


def load_ct(path: Path, root: Path, known: set[str], check_files: bool = True) -> pd.DataFrame:
    df = _read_csv(path)
    _require_columns(df, CT_REQUIRED, path)
    _check_ids(df, path)
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    _check_patients_known(df, known, path)
    _check_files(df, ["image", "mask"], root, path, check_files)
    return df.reset_index(drop=True)


def load_feature_table(path: Path, known: set[str]) -> pd.DataFrame:
    df = _read_csv(path)
    _require_columns(df, ["patient_id"], path)
    _check_ids(df, path)
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    if df["patient_id"].duplicated().any():
        ids = sorted(set(df.loc[df["patient_id"].duplicated(), "patient_id"]))
        raise CohortError(f"{path}: duplicate patient_id {ids[:10]}; one row per patient.")
    _check_patients_known(df, known, path)
    df = df.set_index("patient_id")
    non_num = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_num:
        raise CohortError(
            f"{path}: feature column(s) {non_num[:10]} are not numeric; feature tables hold "
            "patient_id plus numeric columns only (move metadata elsewhere)."
        )
    return df


def load_cohort(root, *, check_files: bool = True) -> Cohort:
    """Load ``root``/clinical.csv and whichever optional tables exist, validating all of them."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CohortError(f"cohort folder {root} does not exist (set data.root=...)")
    clinical = load_clinical(root / "clinical.csv")
    known = set(clinical.index)
    cohort = Cohort(root=root, clinical=clinical)
    if (root / "slides.csv").is_file():
        cohort.slides = load_slides(root / "slides.csv", root, known, check_files)
    if (root / "ct.csv").is_file():
        cohort.ct = load_ct(root / "ct.csv", root, known, check_files)
    fdir = root / "features"
    if fdir.is_dir():
        for p in sorted(fdir.glob("*.csv")):
            cohort.features[p.stem] = load_feature_table(p, known)
    if (root / "truth.csv").is_file():
        truth = _read_csv(root / "truth.csv")
        _require_columns(truth, ["patient_id", "true_risk"], root / "truth.csv")
        cohort.truth = truth.set_index("patient_id")
    return cohort
